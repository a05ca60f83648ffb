"""Model loading on the tiny Gemma 3: every source kind, the offline-cache machinery and the tokenizer edits.

Real-model checks (ids on the real tokenizer, cache vs GGUF logits) live in bench/model_load.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from src.data_engine.formatter import CHAT_TEMPLATE, CONTROL_TOKENS, render_conversation
from src.utils import model_loader
from src.utils.errors import UserError
from src.utils.model_loader import OFFLINE_BASE, load_model, load_tokenizer, resolve_dtype, resolve_model_source
from tests.tiny_model import make_tiny_model_dir

GOLDEN = {
    "tools": [{"type": "function", "function": {
        "name": "get_current_weather", "description": "Gets the weather.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City"}},
                       "required": ["location"]}}}],
    "messages": [
        {"role": "developer", "content": "You are a model that can do function calling with the following functions"},
        {"role": "user", "content": "东京的天气怎么样?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_current_weather", "arguments": {"location": "Tokyo"}}}]},
        {"role": "tool", "content": {"name": "get_current_weather", "response": {"weather": "sunny"}}},
        {"role": "assistant", "content": "Sunny."},
    ],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _logits(model, ids=(2, 105, 200, 48, 300, 52, 106)):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits


def _assert_control_tokens_single(tokenizer):
    text = render_conversation(GOLDEN["messages"], GOLDEN["tools"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for name, idx in CONTROL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(name) == idx
        assert text.count(name) == ids.count(idx) > 0, name


def _gemma3_style_tokenizer_dir(tiny_dir, tmp_path):
    """The tiny tokenizer with ids 46-52 named as in the Gemma 3 base (<unused40>..) and no chat template."""
    out = tmp_path / "gemma3_tok"
    out.mkdir()
    tok_json = json.loads((tiny_dir / "tokenizer.json").read_text())
    renames = {name: f"<unused{idx - 6}>" for name, idx in CONTROL_TOKENS.items()}
    for entry in tok_json["added_tokens"]:
        entry["content"] = renames.get(entry["content"], entry["content"])
    vocab = tok_json["model"]["vocab"]
    for old, new in renames.items():
        vocab[new] = vocab.pop(old)
    (out / "tokenizer.json").write_text(json.dumps(tok_json))
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg["extra_special_tokens"] = [t for t in cfg["extra_special_tokens"] if t not in renames]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((tiny_dir / name).read_bytes())
    return out


def test_local_dir_loads_eager_fp32_with_single_id_control_tokens(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    _assert_control_tokens_single(tokenizer)
    reloaded, _ = load_model(str(tiny_dir))
    assert torch.equal(_logits(model), _logits(reloaded))


def _file_mappings(path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_weights_live_outside_the_checkpoint_files_mapping(tiny_dir):
    """transformers leaves the tensors in the mapped safetensors file; decoding from those pages was ~30% slower."""
    checkpoint = (tiny_dir / "model.safetensors").resolve()
    skipped = model_loader.copy_out_of_checkpoint
    try:
        model_loader.copy_out_of_checkpoint = lambda m: None
        as_mapped, _ = load_model(tiny_dir)
    finally:
        model_loader.copy_out_of_checkpoint = skipped
    model, _ = load_model(tiny_dir)
    mapped = _file_mappings(checkpoint)
    assert any(start <= p.data_ptr() < end for p in as_mapped.parameters() for start, end in mapped)
    assert not any(start <= p.data_ptr() < end for p in model.parameters() for start, end in mapped)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert torch.equal(_logits(model), _logits(as_mapped))


def test_bfloat16_is_honoured(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_gemma3_tokenizer_gets_control_tokens_renamed_and_template(tiny_dir, tmp_path):
    gemma3_dir = _gemma3_style_tokenizer_dir(tiny_dir, tmp_path)
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(gemma3_dir)
    assert raw.convert_ids_to_tokens(48) == "<unused42>"
    assert len(raw("<start_function_call>", add_special_tokens=False)["input_ids"]) > 1

    tokenizer = load_tokenizer(gemma3_dir)
    _assert_control_tokens_single(tokenizer)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert len(tokenizer) == len(raw)  # renamed in place, no new ids past the embeddings
    assert "<start_function_call>" in tokenizer.all_special_tokens


def test_adapter_dir_loads_base_plus_lora_with_same_logits(tiny_dir, tmp_path):
    base, tokenizer = load_model(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    expected = _logits(peft_model)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.model_max_length = 777  # marks the tokenizer saved beside the adapter
    tokenizer.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)

    assert resolve_model_source(adapter_dir).kind == "adapter"
    model, loaded_tok = load_model(adapter_dir)
    assert isinstance(model, PeftModel)
    assert loaded_tok.model_max_length == 777
    assert torch.allclose(_logits(model), expected, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())

    trainable, _ = load_model(adapter_dir, for_training=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_adapter_without_tokenizer_uses_the_base_tokenizer(tiny_dir, tmp_path):
    base, _ = load_model(tiny_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    _assert_control_tokens_single(load_tokenizer(tmp_path / "a"))


def test_adapter_with_missing_base_is_a_user_error(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="no such file or directory"):
        load_model(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(UserError, match="base_model_name_or_path: missing"):
        load_model(adapter)


@pytest.mark.parametrize("dtype", ["float16", "fp16", "half", torch.float16])
def test_fp16_is_refused(tiny_dir, dtype):
    with pytest.raises(UserError, match="overflow"):
        load_model(tiny_dir, dtype=dtype)


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("int8")


def test_bad_paths_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(UserError, match="not a model directory"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no .safetensors"):
        load_model(tmp_path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(fake)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a model"):
        load_model(tmp_path / "notes.txt")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="cannot load model"):
        load_model(broken)


def test_uncached_hub_id_offline_fails_fast_pointing_to_offline_base(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_source("fg-router-tests/no-such-model").kind == "hub"
    start = time.monotonic()
    with pytest.raises(UserError, match=f"model.name={OFFLINE_BASE}") as err:
        load_model("fg-router-tests/no-such-model")
    assert time.monotonic() - start < 5
    assert "\n" not in str(err.value)


def _tiny_builder(calls):
    def build(out, step):
        calls.append(out)
        step("building tiny")
        make_tiny_model_dir(out)
    return build


def test_offline_cache_is_built_once_and_loads_by_short_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FG_CACHE_DIR", str(tmp_path))
    cache = model_loader.offline_cache_dir()
    assert cache == tmp_path / OFFLINE_BASE
    assert model_loader.describe_offline_base()["ready"] is False

    calls = []
    assert model_loader._prepare_cached(cache, _tiny_builder(calls), progress=False) == cache
    assert model_loader._prepare_cached(cache, _tiny_builder(calls), progress=False) == cache
    assert len(calls) == 1
    info = model_loader.describe_offline_base()
    assert info["ready"] and info["path"] == str(cache) and info["size_bytes"] > 0

    model, tokenizer = load_model(OFFLINE_BASE)
    assert model.name_or_path == OFFLINE_BASE  # what PEFT writes as the adapter's base: portable
    _assert_control_tokens_single(tokenizer)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    # False: PEFT would otherwise look the short name up on the hub to check for a resized vocabulary.
    lora.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == OFFLINE_BASE
    assert isinstance(load_model(tmp_path / "adapter")[0], PeftModel)


def test_failed_or_stale_cache_is_never_used(tmp_path):
    cache = tmp_path / OFFLINE_BASE

    def broken(out, step):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        model_loader._prepare_cached(cache, broken, progress=False)
    assert not cache.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / f".{OFFLINE_BASE}.lock"]

    calls = []
    model_loader._prepare_cached(cache, _tiny_builder(calls), progress=False)
    marker = cache / model_loader.READY_MARKER
    marker.write_text(json.dumps({"version": model_loader.CACHE_VERSION - 1}))
    assert not model_loader.describe_offline_base(cache)["ready"]
    model_loader._prepare_cached(cache, _tiny_builder(calls), progress=False)
    assert len(calls) == 2 and model_loader.describe_offline_base(cache)["ready"]


def test_progress_line_and_unwritable_cache_dir(tmp_path, capsys):
    cache = tmp_path / OFFLINE_BASE
    model_loader._prepare_cached(cache, _tiny_builder([]), progress=True)
    assert f"{OFFLINE_BASE} ready in" in capsys.readouterr().err

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="FG_CACHE_DIR"):
        model_loader._prepare_cached(blocker / OFFLINE_BASE, _tiny_builder([]), progress=False)
