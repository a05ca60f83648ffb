"""Optional arguments judged by the whole call's probability: the choice, the scores both runtimes give, the wiring.

The choice is checked with a scorer whose log-probabilities are set per set of keys; the scores are checked on the
tiny Gemma 3 against a plain full-sequence log-softmax (packed on the prefix, one by one, and in llama.cpp)."""
from __future__ import annotations

import json

import pytest
import torch

from src.data_engine.formatter import render_call
from src.evaluation import batch_decode, optional_rescore
from src.evaluation.optional_rescore import rescore
from src.evaluation.router import Router, inference_options
from src.utils.config_loader import load_config
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer

TOOLS = [{"name": "request_overtime", "parameters": {"type": "object", "properties": {
    "employee_name": {"type": "string"}, "hours": {"type": "number"}, "reason": {"type": "string"},
    "date": {"type": "string"}}, "required": ["employee_name", "hours"]}}]
TAIL = "<start_function_response>"
FULL = {"employee_name": "Leo Zhou", "hours": 4.5, "reason": "请审批", "date": "2026-04-25"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _encode(text: str) -> list[int]:
    return list(text.encode())


def _keys_of(completion: list[int]) -> frozenset:
    text = bytes(completion).decode()
    return frozenset(k for k in FULL if f"{k}:" in text)


def _scorer(table: dict, seen: list):
    """log P of a candidate = table[its optional keys]; records every item it is asked for."""
    def log_likelihoods(items):
        seen.extend(items)
        return [table[_keys_of(c) - {"employee_name", "hours"}] for _, c, _ in items]
    return log_likelihoods


def _raw(arguments: dict) -> str:
    return render_call("request_overtime", arguments) + TAIL


def test_an_optional_argument_is_left_out_when_the_call_is_more_probable_without_it():
    seen = []
    table = {frozenset({"reason", "date"}): -5.0, frozenset({"date"}): -3.0, frozenset({"reason"}): -9.0,
             frozenset(): -4.0}
    out = rescore([[7]], [_raw(FULL)], TOOLS, _encode, _scorer(table, seen))
    assert out == [_raw({k: v for k, v in FULL.items() if k != "reason"})]  # date kept: -3 beats -4 without it
    assert out[0].endswith(TAIL)
    # round 1: greedy's call and one call per optional key; round 2: the kept call and the call without date
    assert [_keys_of(c) - {"employee_name", "hours"} for _, c, _ in seen] == [
        {"reason", "date"}, {"reason"}, {"date"}, {"date"}, set()]


def test_leaving_out_goes_on_until_nothing_is_more_probable():
    table = {frozenset({"reason", "date"}): -5.0, frozenset({"date"}): -4.0, frozenset({"reason"}): -9.0,
             frozenset(): -1.0}
    out = rescore([[7]], [_raw(FULL)], TOOLS, _encode, _scorer(table, []))
    assert out == [_raw({"employee_name": "Leo Zhou", "hours": 4.5})]


def test_a_tie_keeps_greedys_call_and_required_keys_are_never_candidates():
    seen = []
    table = {frozenset({"reason", "date"}): -2.0, frozenset({"date"}): -2.0, frozenset({"reason"}): -2.0}
    out = rescore([[7]], [_raw(FULL)], TOOLS, _encode, _scorer(table, seen))
    assert out == [_raw(FULL)]
    assert all({"employee_name", "hours"} <= _keys_of(c) for _, c, _ in seen)


def test_only_the_tokens_after_the_candidates_shared_start_are_scored():
    seen = []
    table = {frozenset({"reason", "date"}): -1.0, frozenset({"date"}): -2.0, frozenset({"reason"}): -2.0}
    rescore([[7, 8]], [_raw(FULL)], TOOLS, _encode, _scorer(table, seen))
    completions = [c for _, c, _ in seen]
    first = seen[0][2]
    assert all(p == [7, 8] and f == first for p, _, f in seen)
    assert len({tuple(c[:first]) for c in completions}) == 1  # the same before `first`...
    assert len({c[first] for c in completions if len(c) > first}) > 1  # ...and not all the same at it


@pytest.mark.parametrize("raw", [
    "Hello! How can I help?<end_of_turn>",  # text
    _raw({"employee_name": "Leo Zhou", "hours": 4.5}),  # no optional argument
    _raw(FULL)[:-len(TAIL)] + _raw(FULL),  # two calls
    render_call("get_weather", {"city": "x"}) + TAIL,  # not in the catalog
    "<start_function_call>call:request_overtime{hours:4.5,employee_name:<escape>Leo Zhou<escape>}" + TAIL,  # not as
])  # we render it (keys unsorted): left as written rather than rewritten
def test_outputs_that_are_not_one_rendered_call_with_optional_arguments_are_left_alone(raw):
    seen = []
    assert rescore([[7]], [raw], TOOLS, _encode, _scorer({}, seen)) == [raw]
    assert seen == []


# ------------------------------------------------------------------------------ scores on the tiny model

def _reference(model, prompt: list[int], completion: list[int], first: int) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(prompt) + i - 1, completion[i]] for i in range(first, len(completion))))


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), sliding_window=16)  # window shorter than prompt and completion
    return model, tokenizer


def _items(router) -> list:
    calls = [render_call("request_overtime", FULL) + TAIL,
             render_call("request_overtime", {k: v for k, v in FULL.items() if k != "date"}) + TAIL,
             render_call("request_overtime", {"employee_name": "x", "hours": 1}) + TAIL]
    prompts = [router.encode(router.render(q)) for q in ("替Leo Zhou申报4月25号的加斑4.5小时", "hi")]
    items = []
    for prompt in prompts:
        for call in calls:
            completion = router.encode(call)
            for first in (0, 5, len(completion) - 1):
                items.append((prompt, completion, first))
    return items


@pytest.mark.parametrize("prefill_rows", [batch_decode.PREFILL_ROWS, 4])
def test_packed_scores_equal_a_plain_forward(tiny, prefill_rows, monkeypatch):
    monkeypatch.setattr(batch_decode, "PREFILL_ROWS", prefill_rows)
    model, tokenizer = tiny
    router = Router(model, tokenizer, TOOLS)
    items = _items(router)
    packed = router._log_likelihoods(items)
    one_by_one = Router(model, tokenizer, TOOLS, prefix_cache=False)._log_likelihoods(items)
    reference = [_reference(model, *item) for item in items]
    assert packed == pytest.approx(reference, abs=1e-3)
    assert one_by_one == pytest.approx(reference, abs=1e-3)
    assert len(set(round(x, 3) for x in reference)) > len(reference) // 2  # the items really differ


def test_route_keeps_the_most_probable_of_the_calls_without_optional_arguments(tiny, monkeypatch):
    model, tokenizer = tiny
    router = Router(model, tokenizer, TOOLS, max_new_tokens=4, rescore_optional=True)
    query = "替Leo Zhou申报4月25号的加斑4.5小时"
    prompt = router.encode(router.render(query))
    greedy = render_call("request_overtime", FULL) + TAIL
    monkeypatch.setattr(router, "generate_ids", lambda *a, **k: (router.encode(greedy), {}))
    result = router.route(query)
    candidates = [greedy] + [_raw({k: v for k, v in FULL.items() if k not in drop})
                             for drop in ({"reason"}, {"date"}, {"reason", "date"})]
    best = max(candidates, key=lambda c: _reference(model, prompt, router.encode(c), 0))
    assert result.raw == best != greedy  # the random model does not prefer greedy's call here
    assert result.calls[0]["arguments"] == {k: v for k, v in FULL.items() if f"{k}:" in best}
    assert router.route(query, use_prefix_cache=False).raw == best  # scored over the whole prompt
    assert router.route(query, use_rescore=False).raw == greedy
    router.rescore_optional = False
    assert router.route(query).raw == greedy


def test_route_many_rescores_what_route_rescores(tiny, monkeypatch):
    model, tokenizer = tiny
    router = Router(model, tokenizer, TOOLS, max_new_tokens=4, rescore_optional=True)
    greedy = router.encode(render_call("request_overtime", FULL) + TAIL)
    monkeypatch.setattr(router, "generate_ids", lambda *a, **k: (greedy, {}))
    monkeypatch.setattr(batch_decode.PackedGreedy, "__call__", lambda self, suffixes, *a: ([greedy] * len(suffixes), {}))
    queries = ["替Leo Zhou申报4月25号的加斑4.5小时", "hi"]
    assert [r.raw for r in router.route_many(queries)] == [router.route(q).raw for q in queries]


def test_the_option_comes_from_the_config_and_is_part_of_the_decoding(tiny):
    model, tokenizer = tiny
    assert inference_options(load_config())["rescore_optional"] is True
    assert inference_options(load_config(overrides=["inference.rescore_optional=false"]))["rescore_optional"] is False
    assert Router(model, tokenizer, TOOLS, rescore_optional=True).decoding()["rescore_optional"] is True
    assert Router(model, tokenizer, TOOLS, rescore_optional=True, temperature=0.7).decoding()["rescore_optional"] \
        is False


def test_llama_cpp_scores_equal_pytorchs(tmp_path):
    pytest.importorskip("llama_cpp")
    from src.evaluation.gguf_router import GgufRouter
    from src.export.gguf_writer import write_gguf
    from tests.test_eval_gguf import llama_cpp_tiny_model

    tokenizer = make_tiny_tokenizer()
    model = llama_cpp_tiny_model(len(tokenizer))
    path = write_gguf(model, tokenizer, tmp_path / "tiny-f32.gguf", "f32")
    gguf = GgufRouter(path, TOOLS, n_threads=1)
    try:
        items = _items(gguf)
        items.append((items[0][0], items[0][1] * 3, 0))  # more tokens than one llama.cpp batch of logits
        scores = gguf._log_likelihoods(items)
        assert scores == pytest.approx([_reference(model, *item) for item in items], rel=1e-4, abs=2e-3)  # f32 rounding
        assert gguf._log_likelihoods(items[:1]) == pytest.approx(scores[:1], abs=1e-4)  # whatever the cache held
    finally:
        gguf.close()
