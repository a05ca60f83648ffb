"""The llama.cpp router on a tiny GGUF: one BOS, control-token stops, cached == uncached == PyTorch greedy tokens."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

pytest.importorskip("llama_cpp")

from src.evaluation.gguf_router import GgufRouter  # noqa: E402
from src.evaluation.report import evaluate_model  # noqa: E402
from src.evaluation.router import Router, open_router  # noqa: E402
from src.export.gguf_writer import write_gguf  # noqa: E402
from src.utils.errors import UserError  # noqa: E402
from tests.tiny_model import make_tiny_tokenizer  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_leave_balance", "description": "Leave days left.",
    "parameters": {"type": "object", "properties": {"employee_name": {"type": "string"}},
                   "required": ["employee_name"]}}}]
QUERIES = ["查询张三的年假", "hi", "How many sick days does Li Si have left this year?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def llama_cpp_tiny_model(vocab_size: int) -> Gemma3ForCausalLM:
    """The tiny Gemma 3 in the shape llama.cpp hard-codes: every 6th layer global, scale 1/sqrt(head_dim)."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=4096,
        sliding_window=16, layer_types=["sliding_attention"] * 5 + ["full_attention"], pad_token_id=0,
        eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attn_implementation="eager",
        final_logit_softcapping=None, attn_logit_softcapping=None)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = make_tiny_tokenizer()
    model = llama_cpp_tiny_model(len(tokenizer))
    out = tmp_path_factory.mktemp("gguf")
    path = write_gguf(model, tokenizer, out / "tiny-f32.gguf", "f32")
    (out / "tools.json").write_text(json.dumps(TOOLS), encoding="utf-8")
    return model, tokenizer, path


@pytest.fixture(scope="module")
def gguf_router(tiny):
    router = GgufRouter(tiny[2], TOOLS, max_new_tokens=24, n_threads=1)  # 1 thread: no spin-waiting on a busy CI
    yield router
    router.close()


def test_prompt_has_one_bos_and_the_same_ids_as_pytorch(tiny, gguf_router):
    model, tokenizer, _ = tiny
    torch_router = Router(model, tokenizer, TOOLS, max_new_tokens=24)
    for query in QUERIES:
        ids = gguf_router.encode(gguf_router.render(query))
        assert ids[0] == 2 and ids.count(2) == 1
        assert ids == torch_router.encode(torch_router.render(query))
    assert gguf_router.stop_ids == torch_router.stop_ids == {1, 50, 106}


@pytest.mark.parametrize("query", QUERIES)
def test_cached_uncached_and_pytorch_tokens_agree(tiny, gguf_router, query):
    model, tokenizer, _ = tiny
    ids = gguf_router.encode(gguf_router.render(query))
    cached, timings = gguf_router.generate_ids(ids, use_prefix_cache=True)
    uncached, plain = gguf_router.generate_ids(ids, use_prefix_cache=False)
    again, _ = gguf_router.generate_ids(ids, use_prefix_cache=True)  # the cache left by a full run is reused too
    assert timings["cached_prefix"] and timings["prefill_tokens"] <= len(ids) - len(gguf_router.prefix_ids)
    assert not plain["cached_prefix"] and plain["prefill_tokens"] == len(ids)
    reference, _ = Router(model, tokenizer, TOOLS, max_new_tokens=24).generate_ids(ids)
    assert cached == uncached == again == reference


def test_route_result_matches_the_torch_router(tiny, gguf_router):
    model, tokenizer, _ = tiny
    torch_result = Router(model, tokenizer, TOOLS, max_new_tokens=24).route(QUERIES[0])
    result = gguf_router.route(QUERIES[0])
    assert (result.raw, result.kind, result.n_prompt_tokens, result.n_new_tokens) == (
        torch_result.raw, torch_result.kind, torch_result.n_prompt_tokens, torch_result.n_new_tokens)
    assert result.latency_ms > 0


def test_open_router_and_evaluate_take_a_gguf_file(tiny, tmp_path):
    path = tiny[2]
    router = open_router(path, config={"inference": {"max_new_tokens": 8}})
    try:
        assert isinstance(router, GgufRouter) and router.runtime == "llama.cpp" and router.max_new_tokens == 8
    finally:
        router.close()
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"user_content": "谢谢", "expected_tool": None}) + "\n", encoding="utf-8")
    report = evaluate_model(str(path), data, config={"inference": {"max_new_tokens": 8}})
    assert report["runtime"] == "llama.cpp" and report["n"] == 1
    assert (path.parent / "eval_tiny-f32" / "report.json").is_file()


def test_bad_gguf_inputs_are_user_errors(tmp_path, tiny):
    with pytest.raises(UserError, match="no such file"):
        GgufRouter.from_model_file(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a GGUF file"):
        GgufRouter.from_model_file(fake)
    lonely = tmp_path / "lonely" / "model.gguf"
    lonely.parent.mkdir()
    lonely.write_bytes(tiny[2].read_bytes())
    with pytest.raises(UserError, match="--tools"):
        GgufRouter.from_model_file(lonely)


@pytest.mark.parametrize("right, wrong", [(5, 0), (2, 3), (0, 4)])
def test_verified_drafts_give_the_greedy_tokens(gguf_router, right, wrong):
    from tests.test_eval_draft import OracleDrafter

    ids = gguf_router.encode(gguf_router.render(QUERIES[2]))
    plain, _ = gguf_router.generate_ids(ids)
    gguf_router.drafter = OracleDrafter(plain, right, wrong)
    try:
        drafted, timings = gguf_router.generate_ids(ids, use_draft=True)
        after, _ = gguf_router.generate_ids(ids, use_draft=False)  # the cache left behind is still consistent
    finally:
        gguf_router.drafter = None
    assert drafted == plain == after
    assert timings["cached_prefix"]
    assert timings["forward_steps"] == -(-(len(plain) - 1) // (right + 1))


def test_latency_bench_runs_every_mode(tiny, tmp_path, capsys):
    from bench.route_latency import main

    model, tokenizer, path = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "tools.json").write_text(json.dumps(TOOLS), encoding="utf-8")
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"user_content": q, "expected_tool": None}) + "\n" for q in QUERIES))
    assert main(["--model", str(model_dir), "--gguf", str(path), "--data", str(data), "--max-new-tokens", "8",
                 "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"torch_nocache_p50_ms", "torch_cache_p50_ms", "gguf_q8_0_p50_ms", "gguf_q8_0_p95_ms"}
    assert all(isinstance(v, float) and v > 0 for v in result.values())


def test_token_bytes_of_the_gguf_equal_the_tokenizers(tiny, gguf_router):
    from src.evaluation.constrain import llama_pieces, tokenizer_pieces

    _, tokenizer, _ = tiny
    pieces = llama_pieces(gguf_router.llm)
    assert pieces == tokenizer_pieces(tokenizer, len(pieces))


@pytest.fixture(scope="module")
def calling(tmp_path_factory):
    """The llama.cpp-shaped tiny model made to open a call (see test_eval_constrain.open_a_call), in both runtimes."""
    from tests.test_eval_constrain import HR_TOOLS, QUERY, open_a_call

    tokenizer = make_tiny_tokenizer()
    model = llama_cpp_tiny_model(len(tokenizer))
    torch_router = Router(model, tokenizer, HR_TOOLS, max_new_tokens=40, draft=True, constrain=True)
    ids = torch_router.encode(torch_router.render(QUERY))
    open_a_call(model, ids)
    path = write_gguf(model, tokenizer, tmp_path_factory.mktemp("calling") / "calling-f32.gguf", "f32")
    gguf_router = GgufRouter(path, HR_TOOLS, max_new_tokens=40, draft=True, constrain=True, n_threads=1)
    yield torch_router, gguf_router, ids, QUERY
    gguf_router.close()


def test_constrained_decoding_chooses_as_pytorch_does(calling):
    from tests.test_eval_constrain import NAMES

    torch_router, gguf_router, ids, query = calling
    runs = {}
    for name, router in (("torch", torch_router), ("gguf", gguf_router)):
        for draft in (False, True):
            for constrain in (False, True):
                new, _ = router.generate_ids(ids, use_draft=draft, use_constrain=constrain, draft_source=query)
                runs[name, draft, constrain] = new
    constrained = {tuple(new) for (_, _, constrain), new in runs.items() if constrain}
    free = {tuple(new) for (_, _, constrain), new in runs.items() if not constrain}
    assert len(constrained) == 1 and len(free) == 1  # one answer per mode, whatever the runtime and drafting
    assert constrained != free
    text = gguf_router.decode(runs["gguf", False, True])
    opening = "<start_function_call>call:"
    assert text.startswith(opening) and text[len(opening):].split("{")[0] in NAMES, text
