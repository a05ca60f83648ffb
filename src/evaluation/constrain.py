"""Catalog-constrained greedy decoding: a call may only name catalog functions, declared keys and enum values.

The fine-tuned router sometimes writes a function that does not exist (`get_expense`), a key its function does not
declare, or an enum value outside the enum; the parser accepts such text and the caller gets a call it cannot run.
Here each greedy step takes the highest-logit token whose text keeps every call in the output a prefix of a valid
call (the output read as text, as `parse_output` reads it): `call:` + a catalog name + `{`, then keys of that
function in the formatter's order (sorted case-insensitively, each at most once), enum values in full between
`<escape>`s, and `}<end_function_call>` to close. Free strings, numbers, nested values, text answers and everything
after a call are left alone, and whether to call at all stays the model's choice (`<start_function_call>` is never
forced). Both routers use this module, so PyTorch and llama.cpp choose the same token from the same logits.
Keys that the training data always takes from the request (src/data_engine/copied_arguments.py) are the exception
among free values: bound to a request (`for_source`), a copied string must be a non-empty piece of its text, and a
stated number one of the numbers the request states (free when it states none).

Per step the work stays small on Gemma's 262k-token vocabulary: the argmax is checked first (a trained model is
mostly right); when it does not fit, the only tokens that can continue a field are those whose text is a prefix of
the field's remaining text or starts with it, found by binary search in the vocabulary sorted by token bytes (built
once per tokenizer), and they are tried in logit order. Text is compared as bytes, so a character split over byte
tokens (Gemma's byte fallback, the test tokenizer) is still a prefix.
"""
from __future__ import annotations

import bisect
import copy
import functools
import json
import re
import weakref

import numpy as np

from src.data_engine.copied_arguments import is_trimmed_piece, stated_numbers, taken_kind
from src.data_engine.formatter import CALL_CLOSE, CALL_OPEN, ESC, normalize_tools

_OPEN, _ESC = CALL_OPEN.encode(), ESC.encode()
_END = b"}" + CALL_CLOSE.encode()
_NESTED = re.compile(re.escape(_ESC) + rb"|[{}\[\]]")
_BARE = re.compile(rb"[^,{}\[\]<>]*")  # what the parser reads as a number, boolean or null (formatter._BARE)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_DECODER = [  # Gemma's tokenizer.json decoder: '▁' -> ' ', <0xNN> -> byte, join
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
FREE = ()  # CallGrammar.rests: nothing constrains the text that follows
FREE_SCAN = 64  # a free value's argmax did not fit: logits ranked this deep first, then the whole vocabulary
SPELLINGS_KEPT = 4096  # TokenTable's memo starts over past this (copied values add a few entries per request)


class CallGrammar:
    """Which generated text is the start of valid calls to this catalog, read as `parse_output` reads it.

    Outside calls anything goes. In a call, a field is a choice among whole strings (`call:NAME{`, `KEY:`, `,KEY:`,
    `KEY:<escape>VALUE<escape>` for an enum, `}<end_function_call>`); each choice says what comes after it: a free
    value (a copied one for the keys in `copied`), or the next field.
    """

    def __init__(self, tools, copied: dict[str, list[str]] | None = None):
        self._functions = {}
        for tool in normalize_tools(tools):
            props = (tool.get("parameters") or {}).get("properties") or {}
            self._functions[tool["name"]] = (tuple(sorted(props, key=str.lower)), props)
        self._copied = {name: frozenset(keys) for name, keys in (copied or {}).items()}
        self._names = {b"call:" + name.encode() + b"{": (name, -1, None) for name in self._functions}
        self._fields: dict[tuple[str, int], dict[bytes, tuple | None]] = {}

    def _field(self, name: str, last: int) -> dict[bytes, tuple | None]:
        """Choices after `{` (last = -1) or after the value of key number `last`: a later key, or the end.

        Each choice maps to (function, key index, what value follows: None (written already), "free" or "copy") or
        None (the call is closed).
        """
        field = self._fields.get((name, last))
        if field is None:
            keys, props = self._functions[name]
            comma = b"" if last < 0 else b","
            field = {}
            for i in range(last + 1, len(keys)):
                head = comma + keys[i].encode() + b":"
                values = _enum(props[keys[i]])
                for value in values:
                    field[head + _ESC + value.encode() + _ESC] = (name, i, None)
                if not values:
                    taken = keys[i] in self._copied.get(name, ())
                    field[head] = (name, i, taken_kind(props[keys[i]]) if taken else "free")
            field[_END] = None
            self._fields[(name, last)] = field
        return field

    def rests(self, text: bytes, source: bytes | None = None) -> tuple[bytes, ...] | None:
        """What may complete the field the generated `text` ends in.

        None: a call in `text` is already invalid. FREE: `text` ends outside a call or in a free value.
        `source`: the request that copied values are pieces of (None: they are free values).
        """
        pos = 0
        while True:
            opened = text.find(_OPEN, pos)
            if opened < 0:
                return FREE
            rests, pos = self._call(text, opened + len(_OPEN), source)
            if pos is None:
                return rests

    def _call(self, text: bytes, pos: int, source: bytes | None) -> tuple[tuple[bytes, ...] | None, int | None]:
        """Read the call starting at `pos`: (FREE, end) when it is closed at `end`, else (rests, None)."""
        field = self._names
        while True:
            chosen = next((t for t in field if text.startswith(t, pos)), None)
            if chosen is None:
                rest = text[pos:]
                return tuple(t[len(rest):] for t in field if t.startswith(rest)) or None, None
            then, pos = field[chosen], pos + len(chosen)
            if then is None:
                return FREE, pos
            name, key, value = then
            if value == "copy" and source is not None:
                rests, pos = _copied_value(text, pos, source)
                if pos is None:
                    return rests, None
            elif value == "stated" and source is not None and (numbers := _stated(source)):
                end = _BARE.match(text, pos).end()
                written = text[pos:end]
                if end == len(text):  # still being written: a longer stated number, or (once whole) the next field
                    rests = [n[len(written):] for n in numbers if n.startswith(written) and n != written]
                    rests += self._field(name, key) if written in numbers else ()
                    return tuple(rests) or None, None
                if written not in numbers:
                    return None, None
                pos = end
            elif value:
                pos = _value_end(text, pos)
                if pos is None or pos < 0:
                    return (FREE if pos is None else None), None
            field = self._field(name, key)


@functools.lru_cache(maxsize=256)
def _stated(source: bytes) -> tuple[bytes, ...]:
    """The request's stated numbers as bytes: read once per request, not at every token a number field checks."""
    return tuple(sorted(n.encode() for n in stated_numbers(source.decode("utf-8", "replace"))))


def _enum(schema) -> tuple[str, ...]:
    """Enum values the formatter declares (STRING properties only, as it renders them)."""
    schema = schema if isinstance(schema, dict) else {}
    values = schema.get("enum")
    if str(schema.get("type", "")).lower() != "string" or not isinstance(values, list):
        return ()
    return tuple(values) if values and all(isinstance(v, str) for v in values) else ()


def _value_end(call: bytes, pos: int) -> int | None:
    """Where the free value starting at `pos` ends: None while it is still being written, -1 if it cannot be one."""
    if _ESC.startswith(call[pos:pos + len(_ESC)]) and pos + len(_ESC) > len(call):
        return None  # nothing yet, or `<escape>` being spelled out
    if call.startswith(_ESC, pos):
        end = call.find(_ESC, pos + len(_ESC))
        return None if end < 0 else end + len(_ESC)
    if call[pos] in b"{[":
        depth, quoted = 0, False
        for match in _NESTED.finditer(call, pos):
            if match.group() == _ESC:
                quoted = not quoted
            elif not quoted:
                depth += 1 if match.group() in b"{[" else -1
                if depth == 0:
                    return match.end()
        return None
    end = _BARE.match(call, pos).end()  # a number, a boolean: up to the `,` or `}` after it
    return None if end == len(call) else end if end > pos else -1


def _copied_value(call: bytes, pos: int, source: bytes) -> tuple[tuple[bytes, ...] | None, int | None]:
    """A copied string value starting at `pos`: (None, end) once it is closed as a trimmed, non-empty piece of
    `source` (no space at either end, as the data's values are: copied_arguments.py); while it is written, (what may
    follow, None): the rest of `source` after each place the value so far occurs there, or the closing `<escape>`;
    (None, None) when it can no longer be a copy."""
    written = call[pos:]
    if not written.startswith(_ESC):
        return ((_ESC[len(written):],) if _ESC.startswith(written) else None), None
    start = pos + len(_ESC)
    end = call.find(_ESC, start)
    if end >= 0:
        return (None, end + len(_ESC)) if is_trimmed_piece(call[start:end], source) else (None, None)
    value, rests = call[start:], []
    if value[:1].isspace():
        return None, None
    at = source.find(value)
    while at >= 0:
        rest = source[at + len(value):]
        if rest and (value or not rest[:1].isspace()):
            rests.append(rest)
        at = source.find(value, at + 1)
    if is_trimmed_piece(value, source):
        rests.append(_ESC)
    for k in range(1, len(_ESC)):  # the closing `<escape>` spelled in pieces (a vocabulary without the token)
        if len(value) > k and value.endswith(_ESC[:k]) and is_trimmed_piece(value[:-k], source):
            rests.append(_ESC[k:])
    return tuple(dict.fromkeys(rests)) or None, None


class TokenTable:
    """Every token's bytes, and the vocabulary sorted by them to find the tokens that spell a given text."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        order = sorted((i for i, piece in enumerate(pieces) if piece), key=pieces.__getitem__)
        self._keys = [pieces[i] for i in order]
        self._ids = order
        self._longest = max((len(p) for p in pieces), default=0)
        self._spelling: dict[tuple[bytes, ...], np.ndarray] = {}

    def _range(self, text: bytes, prefix: bool) -> list[int]:
        """Ids of the tokens equal to `text` (prefix=False) or starting with it."""
        keys, at, found = self._keys, bisect.bisect_left(self._keys, text), []
        while at < len(keys) and (keys[at].startswith(text) if prefix else keys[at] == text):
            found.append(self._ids[at])
            at += 1
        return found

    def spelling(self, rests: tuple[bytes, ...]) -> np.ndarray:
        """Ids (ascending) of every token that can continue a field with these remaining texts: a piece that is a
        prefix of one, or that starts with one and goes on (the grammar then checks the rest)."""
        ids = self._spelling.get(rests)
        if ids is None:
            found = set()
            for rest in rests:
                for n in range(1, min(len(rest), self._longest + 1)):
                    found.update(self._range(rest[:n], prefix=False))
                if len(rest) <= self._longest:
                    found.update(self._range(rest, prefix=True))
            if len(self._spelling) >= SPELLINGS_KEPT:
                self._spelling.clear()
            ids = self._spelling[rests] = np.array(sorted(found), dtype=np.int64)
        return ids


class CatalogConstraint:
    """Picks each greedy token of a call so that the call stays valid for the catalog (see the module docstring)."""

    def __init__(self, tools, table: TokenTable, copied: dict[str, list[str]] | None = None):
        self.grammar, self.table = CallGrammar(tools, copied), table
        self.copies = bool(copied)
        self.source: bytes | None = None  # the request copied values come from (`for_source`)

    def for_source(self, request: str | None) -> "CatalogConstraint":
        """This constraint for one request: copied keys' values must be pieces of its text. Shares the grammar and
        the token table; itself when there is nothing to copy."""
        if not self.copies or not request:
            return self
        bound = copy.copy(self)
        bound.source = request.encode("utf-8")
        return bound

    def among(self, new: list[int]) -> np.ndarray | None:
        """Every token `pick` may choose after `new` (ascending ids) while a call's field is open there, else None
        (the model's choice is free). The argmax over these is the argmax `pick` needs: what fits is among them,
        and so is a token to fall back on (each field's next byte is a token in a byte-fallback vocabulary)."""
        rests = self.grammar.rests(b"".join(self._piece(t) for t in new), self.source)
        ids = self.table.spelling(rests) if rests else None
        return ids if ids is not None and ids.size else None

    def pick(self, new: list[int], best: int, logits) -> int:
        """The token to write after the generated ids `new`: `best` (the argmax) when it keeps the calls valid,
        else the highest-logit token that does (ties to the lower id, as argmax).

        `logits(ids)` returns the logits of `ids` (an int array), or of the whole vocabulary for None.
        """
        text = b"".join(self._piece(t) for t in new)
        rests = self.grammar.rests(text, self.source)
        if rests is None or self._fits(text, rests, best):
            return best  # None: already off the grammar (not by this class), nothing left to keep valid
        if rests:
            ids = self.table.spelling(rests)
            ranked = ids[np.argsort(-logits(ids), kind="stable")] if ids.size else ids
        else:  # a free number or nested value whose argmax leaves it badly (`,` with no key left, `,bad_key`)
            ranked = _ranked(logits(None))
        return next((int(t) for t in ranked if self._fits(text, rests, int(t))), best)

    def _piece(self, token: int) -> bytes:
        return self.table.pieces[token] if token < len(self.table.pieces) else b""

    def _fits(self, text: bytes, rests: tuple[bytes, ...], token: int) -> bool:
        piece = self._piece(token)
        if rests and not piece:
            return False  # a token with no text would keep a field open forever
        return self.grammar.rests(text + piece, self.source) is not None


def _ranked(scores: np.ndarray):
    """Token ids by falling logit (ties: lower id first): the top FREE_SCAN, then, if needed, all of them."""
    k = min(FREE_SCAN, scores.size)
    top = np.flatnonzero(scores >= np.partition(scores, -k)[-k])
    yield from top[np.argsort(-scores[top], kind="stable")]
    yield from np.argsort(-scores, kind="stable")


def scores_of(row: np.ndarray):
    """`logits` for CatalogConstraint.pick from one row of logits already computed."""
    return lambda ids: row if ids is None else row[ids]


# ------------------------------------------------------------------------------------------ token bytes

_TABLES = weakref.WeakKeyDictionary()  # tokenizer -> {logits size: TokenTable}


def tokenizer_table(tokenizer, size: int) -> TokenTable:
    """TokenTable of a Hugging Face tokenizer for a model with `size` logits; kept per tokenizer (Gemma: ~0.5 s)."""
    tables = _TABLES.setdefault(tokenizer, {})
    if size not in tables:
        tables[size] = TokenTable(tokenizer_pieces(tokenizer, size))
    return tables[size]


def tokenizer_pieces(tokenizer, size: int) -> list[bytes]:
    """Each token's bytes as `decode` writes them (special tokens as their text); b"" past the tokenizer.

    Read from the token strings as the decoder would (one `decode` per token takes seconds for Gemma and turns byte
    pieces into U+FFFD): byte-level BPE maps characters back to bytes; a SentencePiece-style vocabulary (Gemma) has
    `<0xNN>` byte pieces and `▁` for spaces. Other decoders: one `decode` per token.
    """
    n = min(len(tokenizer), size)
    names = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    decoder = _decoder_state(tokenizer)
    if decoder.get("type") == "ByteLevel":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {c: b for b, c in bytes_to_unicode().items()}

        def read(name: str) -> bytes:
            return bytes(to_byte[c] for c in name) if all(c in to_byte for c in name) else name.encode()
    elif decoder.get("decoders") == _SENTENCEPIECE_DECODER:
        def read(name: str) -> bytes:
            byte = _BYTE_PIECE.fullmatch(name)
            return bytes([int(byte.group(1), 16)]) if byte else name.replace("▁", " ").encode()
    else:
        def read(name: str) -> bytes:
            ids = tokenizer.convert_tokens_to_ids([name])
            return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).encode()
    pieces = [added[i].encode() if i in added else read(names[i] or "") for i in range(n)]
    return pieces + [b""] * (size - n)


def _decoder_state(tokenizer) -> dict:
    try:
        return json.loads(tokenizer.backend_tokenizer.decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return {}


def llama_pieces(llm) -> list[bytes]:
    """Each token's bytes as llama.cpp writes them with special tokens rendered (what GgufRouter.decode does)."""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    size = 64
    buf = ctypes.create_string_buffer(size)
    pieces = []
    for token in range(llm.n_vocab()):
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n < 0:  # the piece needs -n bytes
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        pieces.append(buf.raw[:n])
    return pieces
