"""Hugging Face Gemma 3 -> GGUF, written on the `gguf` package so every conversion rule is ours, visible and tested.

Rules llama.cpp's gemma3 loader expects (checked against how its converter treats Gemma 3):
- Tensor names from `gguf.get_tensor_name_map(GEMMA3)`; tied embeddings are written once as `token_embd` (no
  `output.weight`: llama.cpp reuses the embedding as output projection).
- Gemma's RMSNorm computes x * (1 + w) and stores w; llama.cpp multiplies by the stored weight, so every
  `*norm.weight` is written as 1 + w (in float32, before any rounding).
- The sqrt(hidden) embedding scale and GELU are applied by llama.cpp at run time: weights are written unchanged.
- llama.cpp hard-codes parts of Gemma 3 that a Hugging Face config can vary (every 6th layer global, local rope base
  10000, attention scale 1/sqrt(head_dim), no soft-capping). A config that differs would load and answer
  differently, so it is refused here with the field named.
Types: 1-D tensors (norms) stay float32; with q4_0 the embedding (also the output projection) is q8_0, as
llama.cpp's quantizer does for Gemma 3 (its q6_k output type needs rows of 256, 640 falls back to q8_0); a tensor
whose rows a block type cannot split falls back to f16. Our q8_0 and q4_0 files hold byte for byte the tensors
llama.cpp's own quantizer writes (tested), so writing them directly costs no fidelity.
The file is written beside the target and renamed into place, so an interrupted export leaves no final file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import gguf
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from src.export.vocab import vocab_from_tokenizer
from src.utils.errors import UserError

ARCH = gguf.MODEL_ARCH.GEMMA3
DIRECT_OUTTYPES = {  # written by this module; K-quants go through src/export/quantize.py
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
LLAMA_CPP_SWA_PATTERN = 6  # llama.cpp: layer i is global when (i + 1) % 6 == 0
LLAMA_CPP_LOCAL_ROPE_BASE = 10000.0


def _rope(config, layer_type: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get(layer_type, params) if isinstance(params, dict) else {}


def check_llama_cpp_compatible(config, source: str = "config.json") -> None:
    """Refuse configs that llama.cpp would silently run differently from transformers."""
    def bad(field, reason):
        raise UserError(f"{source}: {field}: {reason}; llama.cpp's gemma3 would compute a different model")

    if getattr(config, "model_type", None) not in ("gemma3_text", "gemma3"):
        raise UserError(f"{source}: model_type: {getattr(config, 'model_type', None)!r} is not a Gemma 3 text model")
    n = config.num_hidden_layers
    expected = ["full_attention" if (i + 1) % LLAMA_CPP_SWA_PATTERN == 0 else "sliding_attention" for i in range(n)]
    if list(getattr(config, "layer_types", expected)) != expected:
        bad("layer_types", f"must be every {LLAMA_CPP_SWA_PATTERN}th layer global")
    if float(getattr(config, "query_pre_attn_scalar", config.head_dim)) != float(config.head_dim):
        bad("query_pre_attn_scalar", f"{config.query_pre_attn_scalar} != head_dim {config.head_dim}")
    for field in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, field, None):
            bad(field, "soft-capping is not applied")
    local = _rope(config, "sliding_attention")
    if float(local.get("rope_theta", LLAMA_CPP_LOCAL_ROPE_BASE)) != LLAMA_CPP_LOCAL_ROPE_BASE:
        bad("rope_parameters.sliding_attention.rope_theta", f"must be {LLAMA_CPP_LOCAL_ROPE_BASE:g}")
    if local.get("rope_type", "default") != "default":
        bad("rope_parameters.sliding_attention.rope_type", "local layers cannot be scaled")
    if _rope(config, "full_attention").get("rope_type", "default") not in ("default", "linear"):
        bad("rope_parameters.full_attention.rope_type", "only default and linear scaling are supported")


def _add_hparams(writer: gguf.GGUFWriter, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    glob = _rope(config, "full_attention")
    writer.add_rope_freq_base(float(glob.get("rope_theta", 1_000_000.0)))
    if glob.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(glob["factor"]))
    writer.add_sliding_window(config.sliding_window)


def _add_general(writer: gguf.GGUFWriter, metadata: dict, file_type: LlamaFileType) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(metadata.get("name") or "FunctionGemma router")
    if metadata.get("run"):
        writer.add_finetune(str(metadata["run"]))
    if metadata.get("description"):
        writer.add_description(str(metadata["description"]))
    if metadata.get("base_model"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(metadata["base_model"]))
    writer.add_license("gemma")
    writer.add_tags(["gemma3", "function-calling", "functiongemma"])
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_type(gguf_name: str, shape: tuple, outtype: str) -> Q:
    """The GGML type a tensor is stored as under `outtype` (see the module docstring)."""
    qtype = DIRECT_OUTTYPES[outtype][0]
    if len(shape) < 2:
        return Q.F32
    if outtype == "q4_0" and gguf_name == "token_embd.weight":
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def _tensors(model, outtype: str):
    """(gguf name, array, raw ggml type or None) for every tensor of `model` (a Gemma3ForCausalLM)."""
    config = model.config
    name_map = gguf.get_tensor_name_map(ARCH, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{hf_name}: tensor has no GGUF name for gemma3 (not a Gemma 3 text model?)")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("norm.weight"):
            data = data + 1.0
        qtype = tensor_type(name, data.shape, outtype)
        encoded = gguf.quants.quantize(data, qtype)
        yield name, encoded, (None if qtype in (Q.F32, Q.F16) else qtype)


def write_gguf(model, tokenizer, out_path, outtype: str = "f16", metadata: dict | None = None) -> Path:
    """Write `model` (Gemma3ForCausalLM, merged) + `tokenizer` as one GGUF file at `out_path`, atomically."""
    if outtype not in DIRECT_OUTTYPES:
        raise UserError(f"outtype: {outtype!r} is not written directly (choose from {', '.join(DIRECT_OUTTYPES)})")
    config = model.config
    check_llama_cpp_compatible(config)
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
    try:
        _add_general(writer, metadata or {}, DIRECT_OUTTYPES[outtype][1])
        _add_hparams(writer, config)
        vocab.add_to(writer)
        for name, data, raw in _tensors(model, outtype):
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out_path
