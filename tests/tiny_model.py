"""A tiny random Gemma 3 with FunctionGemma's special-token layout, so unit tests train and export in milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from src.data_engine.formatter import CHAT_TEMPLATE, CONTROL_TOKENS

BYTE_OFFSET = 107  # ids 0-106 mirror Gemma 3's special-token ids; byte tokens follow


def _special_tokens() -> dict[int, str]:
    special = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"}
    for i in range(4, 105):
        special.setdefault(i, f"<unused{i - 6}>")
    for name, idx in CONTROL_TOKENS.items():
        special[idx] = name
    return special


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: every UTF-8 byte is one token, so any text (Chinese included) round-trips."""
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: idx for idx, tok in _special_tokens().items()}
    for i, ch in enumerate(sorted(byte_vocab)):
        vocab[ch] = BYTE_OFFSET + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_special_tokens().values()))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>", *CONTROL_TOKENS],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_spm_tokenizer(pieces: list[str], extra_special: tuple[str, ...] = (),
                       added: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A small Gemma-shaped tokenizer: BPE with byte fallback, spaces as '▁', FunctionGemma's control tokens (and
    `extra_special`) as special tokens, `added` as user-defined tokens. As in Gemma's tokenizer, every split of a
    piece into two pieces is a merge, ranked by the piece's position."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", *CONTROL_TOKENS, *extra_special]
    vocab = {t: i for i, t in enumerate(special)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for piece in pieces:
        vocab[piece] = len(vocab)
    merges = [(p[:i], p[i:]) for p in pieces for i in range(1, len(p)) if p[:i] in vocab and p[i:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(special)
    if added:
        tok.add_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_tiny_model(vocab_size: int, seed: int = 0, sliding_window: int = 16, heads: int = 2,
                    kv_heads: int = 1) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32, max_position_embeddings=4096,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return Gemma3ForCausalLM(config).eval()


def make_tiny_model_dir(path: str | Path, seed: int = 0, sliding_window: int = 16) -> Path:
    """Save a tiny model + tokenizer in HF layout (safetensors), as the bundled base would be."""
    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=seed, sliding_window=sliding_window)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_adapter_dir(peft_model, out: str | Path, base_dir: str | Path, tools: list[dict]) -> Path:
    """An adapter dir as `train` leaves it for inference: the adapter naming `base_dir` as its base, and tools.json."""
    out = Path(out)
    peft_model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "tools.json").write_text(json.dumps(tools))
    return out
