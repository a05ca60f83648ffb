"""Text that the call grammar and the catalog force next, so the router can verify it in one forward pass.

An HR call is ~36 tokens with Gemma's tokenizer (names and keys come in pieces: `get`, `_`, `leave`, ...), decoded
one by one, yet many are fixed once a few are known: `call:` after
`<start_function_call>`, the rest of a function name once its start matches one catalog name, `{` and the first
key when that key is required (keys come sorted), `:<escape>` after a string key, the rest of an enum value,
`}<end_function_call><start_function_response>` after the last key. The router feeds such a draft with the
last token and keeps the longest part that greedy decoding would have produced anyway (speculative decoding with
the grammar as the draft model), so the output is the greedy output, only with fewer sequential steps.
Inside a free string value the draft is copied from the user's query (prompt-lookup drafting): names, phone
numbers and reasons are usually written as the user wrote them.
Where the grammar has nothing (more) to give (a date, a choice of function or optional key), the router's earlier
calls may: see lookup_draft.py.
A draft may be wrong (an optional key, a parallel call): that costs one wider forward pass, never a different answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from src.data_engine.formatter import CALL_CLOSE, CALL_OPEN, ESC, RESPONSE_OPEN, normalize_tools
from src.evaluation.lookup_draft import OutputLookup

_CALL = "call:"
_BARE_VALUE = re.compile(r"[^,{}\[\]<]*")
_END = "}" + CALL_CLOSE + RESPONSE_OPEN
COPY_CHARS = 8  # copied per draft: best of 0-24 on the HR test calls (each drafted token widens the verifying pass)
MAX_DRAFT_TOKENS = 32  # bounds the verifying pass (and llama.cpp's batch)


@dataclass(frozen=True)
class _Function:
    keys: tuple[str, ...]  # in the order calls write them (the formatter's case-insensitive sort)
    props: dict
    required: frozenset

    def after(self, key: str | None) -> tuple[str, ...]:
        return self.keys if key is None else tuple(k for k in self.keys if k.lower() > key.lower())


class CallDrafter:
    """The grammar's draft, continued by a lookup in the router's earlier calls (lookup_draft.py)."""

    def __init__(self, tools, lookup: bool = True):
        self.lookup = OutputLookup() if lookup else None
        self.functions: dict[str, _Function] = {}
        for tool in normalize_tools(tools):
            params = tool.get("parameters") or {}
            props = params.get("properties") or {}
            self.functions[tool["name"]] = _Function(tuple(sorted(props, key=str.lower)), props,
                                                     frozenset(params.get("required") or ()))

    def draft_ids(self, new: list[int], call_open_id: int, encode, decode, source: str = "") -> list[int]:
        """Draft token ids to follow the generated ids `new`, tokenized as in context ([] when there is none)."""
        ids = self._grammar_ids(new, call_open_id, encode, decode, source)
        if self.lookup is not None:  # where the grammar's draft ends (`start_date:<escape>`), a lookup may go on
            ids = ids + self.lookup.draft(new + ids)
        return ids[:MAX_DRAFT_TOKENS]

    def remember(self, ids: list[int]) -> None:
        """A finished output, for later lookups."""
        if self.lookup is not None:
            self.lookup.remember(ids)

    def forget(self) -> None:
        """Drop the earlier outputs (a benchmark's modes each start from none)."""
        if self.lookup is not None:
            self.lookup.clear()

    def _grammar_ids(self, new: list[int], call_open_id: int, encode, decode, source: str) -> list[int]:
        """The grammar's draft (`draft`) as token ids.

        The draft is tokenized together with the call text before it, and used only if that text keeps its ids:
        a draft split differently from how the model writes it would just be rejected.
        """
        if call_open_id not in new:
            return []
        start = len(new) - 1 - new[::-1].index(call_open_id)
        call_ids = new[start:]
        text = decode(call_ids)
        draft = self.draft(text, source)
        if not draft:
            return []
        ids = encode(text + draft)
        return ids[len(call_ids):len(call_ids) + MAX_DRAFT_TOKENS] if ids[: len(call_ids)] == call_ids else []

    def draft(self, call_text: str, source: str = "") -> str:
        """Likely continuation of `call_text` (generated text from the last `<start_function_call>`), or "".

        `source` is the user's query, the place string values are copied from.
        """
        if not call_text.startswith(CALL_OPEN):
            return ""
        body = call_text[len(CALL_OPEN):]
        if CALL_CLOSE in body:
            return RESPONSE_OPEN if body.endswith(CALL_CLOSE) and body.count(CALL_CLOSE) == 1 else ""
        if len(body) < len(_CALL):
            return _CALL[len(body):] if _CALL.startswith(body) else ""
        if not body.startswith(_CALL):
            return ""
        rest = body[len(_CALL):]
        brace = rest.find("{")
        if brace < 0:
            names = [n for n in self.functions if n.startswith(rest)]
            if len(names) != 1:
                return ""
            fn = self.functions[names[0]]
            return names[0][len(rest):] + "{" + (self._next_key(fn, None) if fn.keys else _END)
        fn = self.functions.get(rest[:brace])
        return self._in_arguments(fn, rest[brace + 1:], source) if fn else ""

    def _value_open(self, fn: _Function, key: str) -> str:
        schema = fn.props.get(key) or {}
        return ESC if str(schema.get("type", "")).lower() == "string" else ""

    def _next_key(self, fn: _Function, last: str | None) -> str:
        """The key after `last` when it is certain: the next one in order is required, so it must come."""
        remaining = fn.after(last)
        if remaining and remaining[0] in fn.required:
            return remaining[0] + ":" + self._value_open(fn, remaining[0])
        return ""

    def _after_value(self, fn: _Function, key: str) -> str:
        remaining = fn.after(key)
        if not remaining:
            return _END
        forced = self._next_key(fn, key)
        return "," + forced if forced else ""

    def _in_arguments(self, fn: _Function, args: str, source: str) -> str:
        pos, last = 0, None
        while True:
            if args[pos:].startswith("}"):
                return CALL_CLOSE + RESPONSE_OPEN if args[pos:] == "}" else ""
            colon = args.find(":", pos)
            if colon < 0:
                partial = args[pos:]
                if not partial:
                    return self._next_key(fn, last)
                keys = [k for k in fn.after(last) if k.startswith(partial)]
                return keys[0][len(partial):] + ":" + self._value_open(fn, keys[0]) if len(keys) == 1 else ""
            key, pos = args[pos:colon], colon + 1
            if key not in fn.props:
                return ""
            if pos == len(args):
                return self._value_open(fn, key)
            if args.startswith(ESC, pos):
                end = args.find(ESC, pos + len(ESC))
                if end < 0:
                    partial = args[pos + len(ESC):]
                    if (fn.props.get(key) or {}).get("enum"):
                        return self._enum_rest(fn, key, partial)
                    return _copied(partial, source)
                pos = end + len(ESC)
            elif args[pos] in "{[":
                return ""  # nested values: not drafted
            else:
                pos = _BARE_VALUE.match(args, pos).end()
                if pos == len(args):
                    return ""  # a number or boolean still being written
            if pos == len(args):
                return self._after_value(fn, key)
            if args[pos] != ",":
                return CALL_CLOSE + RESPONSE_OPEN if args[pos:] == "}" else ""
            pos, last = pos + 1, key

    def _enum_rest(self, fn: _Function, key: str, partial: str) -> str:
        enum = (fn.props.get(key) or {}).get("enum") or []
        values = [v for v in enum if isinstance(v, str) and v.startswith(partial)]
        if len(values) != 1:
            return ""
        return values[0][len(partial):] + ESC + self._after_value(fn, key)


def _copied(partial: str, source: str) -> str:
    """What follows the value written so far where the query contains it (its first occurrence)."""
    at = source.find(partial) if partial else -1
    return source[at + len(partial): at + len(partial) + COPY_CHARS] if at >= 0 else ""
