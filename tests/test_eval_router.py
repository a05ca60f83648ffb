"""The PyTorch router on the tiny Gemma 3: prefix-cached decoding equals uncached decoding and `model.generate`."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from src.data_engine.formatter import parse_output
from src.evaluation.router import RouteResult, Router, load_tools, run_inference
from src.utils.errors import UserError
from tests.tiny_model import make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer, save_adapter_dir

TOOLS = [
    {"type": "function", "function": {
        "name": "get_leave_balance", "description": "Leave days left.",
        "parameters": {"type": "object", "properties": {
            "employee_name": {"type": "string", "description": "Name."},
            "leave_type": {"type": "string", "enum": ["annual", "sick"]}}, "required": ["employee_name"]}}},
    {"type": "function", "function": {"name": "search_policy", "description": "HR rules.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
]
QUERIES = ["查询张三的年假", "How many sick days does Li Si have?", "hi"]
SLIDING_WINDOW = 16
SHORT = {"inference": {"max_new_tokens": 8}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    return make_tiny_model(len(tokenizer), sliding_window=SLIDING_WINDOW), tokenizer


@pytest.fixture(scope="module")
def router(tiny):
    model, tokenizer = tiny
    return Router(model, tokenizer, TOOLS, max_new_tokens=24)


def test_prefix_is_longer_than_the_sliding_window(router):
    assert len(router.prefix_ids) > 10 * SLIDING_WINDOW
    assert router.prefix_ids[0] == router.tokenizer.bos_token_id
    assert router.prefix_ids.count(router.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("query", QUERIES)
def test_prefix_cache_gives_the_tokens_of_uncached_decoding_and_generate(router, query):
    model, tokenizer = router.model, router.tokenizer
    ids = router.encode(router.render(query))
    cached, timings = router.generate_ids(ids, use_prefix_cache=True)
    uncached, plain = router.generate_ids(ids, use_prefix_cache=False)
    assert timings["cached_prefix"] and timings["prefill_tokens"] == len(ids) - len(router.prefix_ids)
    assert not plain["cached_prefix"] and plain["prefill_tokens"] == len(ids)
    reference = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=24, do_sample=False, eos_token_id=sorted(router.stop_ids),
                               pad_token_id=0)[0, len(ids):].tolist()
    assert cached == uncached == reference
    # the suffix plus what was generated runs past the window, so the sliding layers really slide
    assert len(ids) - len(router.prefix_ids) + len(cached) > SLIDING_WINDOW


def test_the_cached_prefix_is_not_changed_by_a_query(router):
    first = router.route(QUERIES[0])
    router.route(QUERIES[1])
    again = router.route(QUERIES[0])
    assert (again.raw, again.n_new_tokens) == (first.raw, first.n_new_tokens)


def test_decoding_stops_on_a_stop_token_and_keeps_it_in_raw(tiny):
    model, tokenizer = tiny
    router = Router(model, tokenizer, TOOLS, max_new_tokens=24)
    ids = router.encode(router.render(QUERIES[0]))
    free, _ = router.generate_ids(ids)
    stop = free[5]
    router.stop_ids = router.stop_ids | {stop}
    stopped, _ = router.generate_ids(ids)
    assert stopped == free[: free.index(stop) + 1]


def test_route_result_fields(router):
    result = router.route(QUERIES[0])
    ids = router.encode(router.render(QUERIES[0]))
    new, _ = router.generate_ids(ids)
    assert result.n_prompt_tokens == len(ids)
    assert result.n_new_tokens == len(new)
    assert result.raw == router.tokenizer.decode(new, skip_special_tokens=False)
    parsed = parse_output(result.raw)
    assert (result.kind, result.calls, result.text) == (parsed.kind, parsed.calls, parsed.text)
    assert result.latency_ms > 0 and result.timings["prefill_ms"] > 0


def test_to_json_shapes():
    call = RouteResult("calls", [{"name": "f", "arguments": {"a": 1}}], "", "<start_function_call>...", 1.0, 10, 5)
    assert call.to_json() == {"kind": "calls", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}
    assert call.to_json(raw=True)["raw"] == "<start_function_call>..."
    text = RouteResult("text", [], "Hello", "Hello<end_of_turn>", 1.0, 10, 2)
    assert text.to_json() == {"kind": "text", "text": "Hello"}
    bad = RouteResult("malformed", [], "call:f{", "<start_function_call>call:f{", 1.0, 10, 5, error="expected '}'")
    assert bad.to_json() == {"kind": "malformed", "error": "expected '}'", "text": "call:f{"}


def test_sampling_with_top_k_1_is_greedy_and_a_seed_is_reproducible(tiny):
    model, tokenizer = tiny
    greedy = Router(model, tokenizer, TOOLS, max_new_tokens=12).route(QUERIES[0]).raw
    top1 = Router(model, tokenizer, TOOLS, max_new_tokens=12, temperature=1.0, top_k=1, seed=1).route(QUERIES[0]).raw
    assert top1 == greedy
    tiny_p = Router(model, tokenizer, TOOLS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=1)
    assert tiny_p.route(QUERIES[0]).raw == greedy
    runs = [Router(model, tokenizer, TOOLS, max_new_tokens=12, temperature=1.5, seed=7).route(QUERIES[0]).raw
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_empty_query_is_a_user_error(router):
    with pytest.raises(UserError, match="user_content"):
        router.route("   ")


# ---------------------------------------------------------------- loading from disk


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", sliding_window=SLIDING_WINDOW)
    (path / "tools.json").write_text(json.dumps(TOOLS), encoding="utf-8")
    return path


def test_tools_come_from_the_model_dir_or_a_matching_file(model_dir, tmp_path):
    assert [t["name"] for t in load_tools(model_dir, None)] == ["get_leave_balance", "search_policy"]
    same = tmp_path / "same.json"
    same.write_text(json.dumps([t["function"] for t in TOOLS]), encoding="utf-8")  # bare form of the same catalog
    assert load_tools(model_dir, same) == load_tools(model_dir, None)


def test_tools_that_do_not_match_the_model_are_refused(model_dir, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(TOOLS[:1]), encoding="utf-8")
    with pytest.raises(UserError, match=r"do not match.*missing \['search_policy'\]"):
        load_tools(model_dir, other)
    changed = json.loads(json.dumps(TOOLS))
    changed[1]["function"]["description"] = "Something else."
    other.write_text(json.dumps(changed), encoding="utf-8")
    with pytest.raises(UserError, match="'search_policy' differs"):
        load_tools(model_dir, other)


def test_no_catalog_anywhere_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--tools"):
        load_tools(tmp_path, None)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "tools"}', encoding="utf-8")
    with pytest.raises(UserError, match="list of tools"):
        load_tools(tmp_path, bad)


def test_from_model_dir_routes_like_the_in_memory_model(model_dir, router):
    loaded = Router.from_model_dir(model_dir)
    assert loaded.max_new_tokens == 96 and loaded.prefix_cache and loaded.temperature == 0.0
    loaded.max_new_tokens = router.max_new_tokens
    assert loaded.route(QUERIES[0]).raw == router.route(QUERIES[0]).raw


def test_missing_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Router.from_model_dir(tmp_path / "nope" / "model")


def test_adapter_dir_is_merged_and_routes_like_the_peft_model(model_dir, tmp_path):
    tokenizer = make_tiny_tokenizer()
    base = make_tiny_model(len(tokenizer), sliding_window=SLIDING_WINDOW)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adapter = save_adapter_dir(peft_model, tmp_path / "adapter", model_dir, TOOLS)
    loaded = Router.from_model_dir(adapter, config={"inference": {"max_new_tokens": 24}})
    assert not hasattr(loaded.model, "peft_config")
    unmerged = Router(peft_model.eval(), tokenizer, TOOLS, max_new_tokens=24)
    assert loaded.route(QUERIES[1]).raw == unmerged.route(QUERIES[1]).raw


def test_run_inference_prints_the_parsed_call(model_dir, capsys):
    assert run_inference(str(model_dir), prompt=QUERIES[0], raw=True, config=SHORT) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] in ("calls", "text", "malformed") and "raw" in out
    with pytest.raises(UserError, match="--prompt"):
        run_inference(str(model_dir))


def test_interactive_mode_answers_each_line(model_dir, capsys, monkeypatch):
    lines = iter(["hello", "", "查询张三的年假"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert run_inference(str(model_dir), interactive=True, config=SHORT) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 2 and all("raw" not in p for p in printed)
