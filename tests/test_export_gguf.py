"""GGUF writer on a tiny Gemma 3: llama.cpp and transformers compute what PyTorch does; metadata and vocab exact."""
from __future__ import annotations

import ctypes
import random

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader, TokenType
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

llama_cpp = pytest.importorskip("llama_cpp")

from src.data_engine.formatter import CHAT_TEMPLATE, CONTROL_TOKENS  # noqa: E402
from src.evaluation.gguf_router import GgufRouter  # noqa: E402
from src.evaluation.report import TestCase as Case  # noqa: E402  (pytest would collect a name Test*)
from src.evaluation.metrics import Expected  # noqa: E402
from src.export import vocab as vocab_mod  # noqa: E402
from src.export.gguf_writer import write_gguf  # noqa: E402
from src.export.quantize import quantize_gguf  # noqa: E402
from src.export.verify import tokenizer_checks  # noqa: E402
from src.export.vocab import vocab_from_tokenizer  # noqa: E402
from src.utils.errors import UserError  # noqa: E402
from tests.tiny_model import make_spm_tokenizer, make_tiny_model, make_tiny_tokenizer  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_leave_balance", "description": "Leave days left.",
    "parameters": {"type": "object", "properties": {"employee_name": {"type": "string"}},
                   "required": ["employee_name"]}}}]
# 26 tokens: longer than the sliding window (16), so local and global layers both matter
PROMPT = "<bos><start_of_turn>user\n查询张三 <escape>hi<escape><end_of_turn>\n<start_of_turn>model\n"


def llama_cpp_tiny_model(vocab_size: int, seed: int = 0) -> Gemma3ForCausalLM:
    """Tiny Gemma 3 in the shape llama.cpp hard-codes: every 6th layer global, attention scale 1/sqrt(head_dim)."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=4096,
        sliding_window=16, layer_types=["sliding_attention"] * 5 + ["full_attention"], pad_token_id=0,
        eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attn_implementation="eager")
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norms (HF initialises w = 0): a missing or doubled "+1" must show in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    return llama_cpp_tiny_model(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def ggufs(tiny, tmp_path_factory):
    model, tokenizer = tiny
    out = tmp_path_factory.mktemp("gguf")
    meta = {"name": "tiny router", "run": "run-7", "base_model": "tiny-base", "description": "unit test"}
    return {t: write_gguf(model, tokenizer, out / f"tiny-{t}.gguf", t, meta) for t in ("f32", "f16", "q8_0", "q4_0")}


def _ids(tokenizer, text=PROMPT):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _reference(model, ids):
    return model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(path, ids):
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, swa_full=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def _fields(path) -> dict:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# rel. tolerances on max |logit diff| / max |logit|: f32 observed 1e-3 (llama.cpp's f16 KV cache), f16 2e-3,
# q8_0 ~4e-2; a conversion bug (norm offset, tensor mix-up, rope base) gives errors of the order of the logits.
@pytest.mark.parametrize("outtype,rel_tol", [("f32", 0.01), ("f16", 0.01), ("q8_0", 0.08)])
def test_llama_cpp_logits_match_pytorch(tiny, ggufs, outtype, rel_tol):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    assert len(ids) > model.config.sliding_window
    ref, got = _reference(model, ids), _llama_logits(ggufs[outtype], ids)
    assert np.abs(got - ref).max() <= rel_tol * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > (0.9999 if outtype in ("f32", "f16") else 0.99)


@pytest.mark.parametrize("outtype,atol", [("f32", 1e-5), ("f16", 0.01), ("q8_0", 0.08)])
def test_transformers_reads_the_gguf_back(tiny, ggufs, outtype, atol):
    model, tokenizer = tiny
    path = ggufs[outtype]
    # transformers' GGUF config mapping leaves query_pre_attn_scalar at Gemma 3's default (256 = real head_dim)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                  query_pre_attn_scalar=32).eval()
    ids = _ids(tokenizer)
    scale = np.abs(_reference(model, ids)).max()
    assert np.abs(_reference(loaded, ids) - _reference(model, ids)).max() <= atol * max(scale, 1.0)


def test_metadata_names_tensors_and_tokenizer(tiny, ggufs):
    model, tokenizer = tiny
    kv, tensors = _fields(ggufs["q8_0"])
    cfg = model.config
    assert kv["general.architecture"] == "gemma3"
    assert (kv["general.name"], kv["general.finetune"], kv["general.base_model.0.name"]) == \
        ("tiny router", "run-7", "tiny-base")
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {"context_length": 4096, "embedding_length": 64, "block_count": 6, "feed_forward_length": 128,
                "attention.head_count": 2, "attention.head_count_kv": 1, "attention.key_length": 32,
                "attention.value_length": 32, "attention.sliding_window": 16, "rope.freq_base": 1e6}
    assert {k: kv[f"gemma3.{k}"] for k in expected} == pytest.approx(expected)
    assert kv["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)

    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"], kv["tokenizer.ggml.eot_token_id"]) == (2, 1, 0, 106)
    assert kv["tokenizer.ggml.add_bos_token"] is True
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    assert tokens == [by_id[i] for i in range(cfg.vocab_size)]  # byte-level pieces survive as written
    for name, idx in CONTROL_TOKENS.items():
        assert (tokens[idx], types[idx]) == (name, TokenType.CONTROL)
    assert types[tokenizer.convert_tokens_to_ids("a")] == TokenType.NORMAL

    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    hf = model.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(norm.data), hf + 1.0, rtol=1e-6)


def test_q4_0_keeps_the_embedding_at_q8_0(ggufs):
    _, tensors = _fields(ggufs["q4_0"])
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0


@pytest.mark.parametrize("outtype,ftype", [("q8_0", 7), ("q4_0", 2)])
def test_direct_quants_equal_llama_cpp_quantizer(ggufs, tmp_path, outtype, ftype):
    """Our q8_0/q4_0 tensors are byte for byte what llama.cpp's own quantizer makes from the f32 file."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    out = tmp_path / f"llama-{outtype}.gguf"
    assert llama_cpp.llama_model_quantize(str(ggufs["f32"]).encode(), str(out).encode(), ctypes.byref(params)) == 0
    _, ours = _fields(ggufs[outtype])
    _, theirs = _fields(out)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[name].data)), name


def test_k_quant_through_llama_cpp(ggufs, tmp_path):
    out = quantize_gguf(ggufs["f32"], tmp_path / "tiny-q4_k_m.gguf", "q4_k_m")
    kv, _ = _fields(out)
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-q4_k_m.gguf"]


def test_vocab_and_prompt_checks_pass(tiny, ggufs):
    _, tokenizer = tiny
    router = GgufRouter(ggufs["q8_0"], TOOLS, max_new_tokens=4)
    try:
        cases = [Case(1, "查询张三的年假", Expected("get_leave_balance")), Case(2, "hi", Expected(None))]
        checks = tokenizer_checks(router, tokenizer, cases, TOOLS, None)
    finally:
        router.close()
    assert {k: c["ok"] for k, c in checks.items()} == dict.fromkeys(checks, True)
    assert set(checks) >= {"control_token_ids", "control_tokens_are_control", "single_bos", "chat_template",
                           "prompt_tokenization", "special_token_ids"}


def test_checks_catch_a_control_token_written_as_user_defined(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    real = vocab_mod.vocab_from_tokenizer

    def broken(*args, **kwargs):
        v = real(*args, **kwargs)
        v.types[CONTROL_TOKENS["<start_function_call>"]] = TokenType.USER_DEFINED
        return v

    monkeypatch.setattr("src.export.gguf_writer.vocab_from_tokenizer", broken)
    path = write_gguf(model, tokenizer, tmp_path / "broken.gguf", "f16")
    router = GgufRouter(path, TOOLS, max_new_tokens=4)
    try:
        checks = tokenizer_checks(router, tokenizer, [Case(1, "hi", Expected(None))], TOOLS, None)
    finally:
        router.close()
    assert not checks["control_tokens_are_control"]["ok"]
    assert "<start_function_call>" in checks["control_tokens_are_control"]["detail"]


def test_interrupted_write_leaves_no_file(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny

    def die(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", die)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(model, tokenizer, tmp_path / "model.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_refuses_configs_llama_cpp_would_run_differently():
    tokenizer = make_tiny_tokenizer()
    default_tiny = make_tiny_model(len(tokenizer))  # layer 2 of 2 global, query_pre_attn_scalar 256 != head_dim
    with pytest.raises(UserError, match="layer_types"):
        write_gguf(default_tiny, tokenizer, "/nonexistent/never-written.gguf", "f16")
    model = llama_cpp_tiny_model(len(tokenizer))
    model.config.query_pre_attn_scalar = 256
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        write_gguf(model, tokenizer, "/nonexistent/never-written.gguf", "f16")
    model.config.query_pre_attn_scalar = 32
    with pytest.raises(UserError, match="outtype"):
        write_gguf(model, tokenizer, "/nonexistent/never-written.gguf", "q4_k_m")


def _spm_tokenizer() -> PreTrainedTokenizerFast:
    """A small Gemma-shaped tokenizer with turn tokens as special tokens and "\n" as a user-defined token."""
    return make_spm_tokenizer(["▁", "a", "b", "n", "年", "假", "ab", "▁a", "▁ab", "an", "年假", "▁▁"],
                              extra_special=("<start_of_turn>", "<end_of_turn>"), added=("\n",))


def test_sentencepiece_style_vocab_tokenizes_like_transformers(tmp_path):
    tokenizer = _spm_tokenizer()
    vocab = vocab_from_tokenizer(tokenizer, len(tokenizer) + 3)  # embedding rows beyond the tokenizer
    assert vocab.model == "llama" and not vocab.add_space_prefix
    assert vocab.types[-1] == TokenType.UNUSED
    assert vocab.types[tokenizer.convert_tokens_to_ids("<escape>")] == TokenType.CONTROL
    assert vocab.types[tokenizer.convert_tokens_to_ids("<0x41>")] == TokenType.BYTE
    assert vocab.types[tokenizer.convert_tokens_to_ids("\n")] == TokenType.USER_DEFINED
    normal = [s for s, t in zip(vocab.scores, vocab.types) if t == TokenType.NORMAL]
    assert normal == [-float(i) for i in range(len(normal))]

    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "gemma3")
    vocab.add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    rng = random.Random(0)
    alphabet = ["a", "b", "n", " ", "  ", "年", "假", "x", "Z", "\n", "<escape>", "<end_of_turn>", "😀"]
    try:
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()


def test_unsupported_tokenizer_is_a_user_error():
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(UserError, match="not supported"):
        vocab_from_tokenizer(fast, 2)


def test_tokenizer_larger_than_the_embedding_is_a_user_error():
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(UserError, match="embedding rows"):
        vocab_from_tokenizer(tokenizer, len(tokenizer) - 1)
