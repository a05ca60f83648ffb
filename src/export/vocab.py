"""The GGUF tokenizer metadata built from a Hugging Face fast tokenizer, so llama.cpp splits text into the same ids.

Two tokenizer families are supported, chosen from the tokenizer.json model:
- SentencePiece-style BPE with byte fallback (Gemma 3, FunctionGemma) -> `tokenizer.ggml.model = "llama"`.
  llama.cpp's SPM tokenizer merges the pair whose result has the highest score, so normal tokens get
  `-(rank among normal tokens)`: the vocabulary order, which is Gemma's merge priority. Control and user-defined
  tokens get -1000 and byte tokens 0. This reproduces the bundled Gemma 3 GGUF except for its 30 multi-space
  tokens, which that file stores as user-defined real spaces and the HF tokenizer (what training used) as '▁'
  runs; we follow the HF tokenizer, and llama.cpp then splits 3000 random strings and the verified test prompts into
  the same ids as transformers.
- Byte-level BPE (GPT-2 style, the unit-test tokenizer) -> `tokenizer.ggml.model = "gpt2"` with its merges.

Token types: added tokens flagged special -> CONTROL (matched only when a caller asks for special tokens, which is
how FunctionGemma's control tokens 46-52 must behave), other added tokens -> USER_DEFINED (always matched whole,
like Gemma's newline runs), `<0xNN>` byte-fallback pieces -> BYTE, embedding rows past the tokenizer -> UNUSED.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gguf import GGUFWriter, TokenType

from src.utils.errors import UserError

_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
SPECIAL_SCORE = -1000.0  # what Gemma 3's own GGUF gives control and user-defined tokens
# gguf-py cannot write an empty array, yet llama.cpp refuses a "gpt2" vocabulary without the merges key. A merge of
# two special-token strings can never fire (BPE starts from single byte-level characters), so it changes nothing.
_PLACEHOLDER_MERGE = "<pad> <eos>"


@dataclass
class GgufVocab:
    model: str  # "llama" (SentencePiece-style) | "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_space_prefix: bool
    chat_template: str | None

    def add_to(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges is not None:
            writer.add_token_merges(self.merges or [_PLACEHOLDER_MERGE])
        for add, value in ((writer.add_bos_token_id, self.bos_id), (writer.add_eos_token_id, self.eos_id),
                           (writer.add_unk_token_id, self.unk_id), (writer.add_pad_token_id, self.pad_id),
                           (writer.add_eot_token_id, self.eot_id)):
            if value is not None:
                add(value)
        # Gemma needs <bos>; runtimes that render their own prompt (Ollama, llama.cpp's chat path) add it from
        # this flag, and llama.cpp strips the <bos> our chat template writes so it is not doubled.
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _family(spec: dict, source: str) -> str:
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
        return "gpt2"
    raise UserError(f"{source}: tokenizer: model type {model.get('type')!r} is not supported for GGUF export "
                    "(supported: SentencePiece-style BPE with byte fallback, byte-level BPE)")


def _adds_space_prefix(spec: dict) -> bool:
    """True when the tokenizer itself prepends '▁' to the text (older Llama); Gemma's does not."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def _merge_strings(merges: list) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def vocab_from_tokenizer(tokenizer, n_vocab: int, source: str = "tokenizer") -> GgufVocab:
    """Describe `tokenizer` (a transformers fast tokenizer) for llama.cpp; `n_vocab` = embedding rows."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{source}: tokenizer: a fast tokenizer (tokenizer.json) is needed for GGUF export")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    family = _family(spec, source)
    by_id = {idx: tok for tok, idx in tokenizer.get_vocab().items()}
    if len(by_id) > n_vocab or max(by_id) >= n_vocab:
        raise UserError(f"{source}: tokenizer: {len(by_id)} tokens do not fit the model's {n_vocab} embedding rows")
    added = {t["id"]: bool(t["special"]) for t in spec.get("added_tokens", [])}

    tokens, types = [], []
    for idx in range(n_vocab):
        tok = by_id.get(idx)
        if tok is None:
            tokens.append(f"[PAD{idx}]")
            types.append(TokenType.UNUSED)
        elif idx in added:
            tokens.append(tok)
            types.append(TokenType.CONTROL if added[idx] else TokenType.USER_DEFINED)
        elif family == "llama" and _BYTE_PIECE.match(tok):
            tokens.append(tok)
            types.append(TokenType.BYTE)
        else:
            tokens.append(tok)
            types.append(TokenType.NORMAL)

    scores = None
    if family == "llama":
        scores, rank = [], 0
        for kind in types:
            if kind == TokenType.NORMAL:
                scores.append(-float(rank))
                rank += 1
            else:
                scores.append(0.0 if kind in (TokenType.BYTE, TokenType.UNUSED) else SPECIAL_SCORE)

    vocab = tokenizer.get_vocab()
    return GgufVocab(
        model=family, tokens=tokens, types=[int(t) for t in types], scores=scores,
        merges=_merge_strings(spec["model"].get("merges") or []) if family == "gpt2" else None,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id, eot_id=vocab.get("<end_of_turn>"),
        add_space_prefix=_adds_space_prefix(spec), chat_template=tokenizer.chat_template or None,
    )
