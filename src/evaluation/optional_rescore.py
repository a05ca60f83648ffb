"""A greedy call keeps an optional argument only when the whole call is more probable with it than without it.

Greedy decoding settles an optional argument at its key's first token: `reason` is written when its key beats the
next key or the closing brace, before the model has said what the reason is. When the request states none, the value
that follows is a guess copied from filler ("请审批", "6h OT for Jiang Tao"), and the call without the argument is the
more probable call as a whole. So each call greedy wrote is compared with the calls that leave out one of its
optional (not required) arguments, by the log-probability the same model gives each call's tokens after the same
prompt; the most probable is kept (ties keep greedy's), and leaving out goes on from the kept call until nothing more
probable is left. Only calls greedy decoding wrote are judged: an argument it left out is never added.

Both routers use this module with their own runtime's log-probabilities, so PyTorch and llama.cpp keep the same
arguments. Tokens the candidates of a query share at their start cancel out of the comparison and are not scored.
"""
from __future__ import annotations

from dataclasses import dataclass

from src.data_engine.formatter import normalize_tools, parse_output, render_call

# (prompt ids, completion ids, index of the completion's first scored token) -> log P(scored tokens | the rest before)
Item = tuple[list[int], list[int], int]


@dataclass
class _Call:
    name: str
    arguments: dict
    tail: str  # what the output has after the call (its stop token), kept as it was

    def text(self) -> str:
        return render_call(self.name, self.arguments) + self.tail


def required_keys(tools) -> dict[str, frozenset]:
    return {tool["name"]: frozenset((tool.get("parameters") or {}).get("required") or [])
            for tool in normalize_tools(tools)}


def _single_call(raw: str, required: dict[str, frozenset]) -> _Call | None:
    """The output's call when it is exactly one call of a catalog function written as we render it, else None."""
    parsed = parse_output(raw)
    if parsed.kind != "calls" or len(parsed.calls) != 1 or parsed.calls[0]["name"] not in required:
        return None
    name, arguments = parsed.calls[0]["name"], dict(parsed.calls[0]["arguments"])
    head = render_call(name, arguments)
    return _Call(name, arguments, raw[len(head):]) if raw.startswith(head) else None


def _without_one(call: _Call, required: frozenset) -> list[_Call]:
    return [_Call(call.name, {k: v for k, v in call.arguments.items() if k != key}, call.tail)
            for key in call.arguments if key not in required]


def _shared_start(ids: list[list[int]]) -> int:
    n = min(len(x) for x in ids)
    for i in range(n):
        if any(x[i] != ids[0][i] for x in ids[1:]):
            return i
    return n


def rescore(prompts: list[list[int]], raws: list[str], tools, encode, log_likelihoods) -> list[str]:
    """Each output in `raws` (generated after the prompt ids in `prompts`) with the optional arguments that lower its
    call's probability left out; outputs that are not one call, or have no optional argument, come back as given.

    `encode(text) -> ids` is the runtime's tokenizer (special tokens parsed); `log_likelihoods(items) -> floats`
    scores many `Item`s at once (the runtime batches them as it can)."""
    required = required_keys(tools)
    out = list(raws)
    current = {}
    for i, raw in enumerate(raws):
        call = _single_call(raw, required)
        if call is not None and _without_one(call, required[call.name]):
            current[i] = call
    while current:
        items, owners = [], []
        for i, call in current.items():
            candidates = [call, *_without_one(call, required[call.name])]
            ids = [encode(c.text()) for c in candidates]
            first = _shared_start(ids)
            for candidate, completion in zip(candidates, ids):
                items.append((prompts[i], completion, first))
                owners.append((i, candidate))
        scores = log_likelihoods(items)
        best: dict[int, tuple[float, _Call]] = {}
        for (i, candidate), score in zip(owners, scores):
            if i not in best or score > best[i][0]:  # the first candidate is greedy's: a tie keeps it
                best[i] = (score, candidate)
        following = {}
        for i, (_, call) in best.items():
            if call is not current[i]:
                out[i] = call.text()
                if _without_one(call, required[call.name]):
                    following[i] = call
        current = following
    return out
