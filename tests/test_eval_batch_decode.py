"""Batched greedy decoding (`Router.route_many`) on the tiny Gemma 3: the tokens of `route`, query by query.

The tiny config's sliding window (16) is shorter than the prefix and than a suffix plus its output, so the block
masks' window bound is exercised on the prefix keys and on a row's own keys. Its output layer is untied and its
`<start_function_call>` row turned a little towards the prompts' last hidden states: some queries then open a call
(where the catalog constraint chooses names and keys) and others answer in text, and extra stop tokens end the rows
at different steps.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from src.data_engine.formatter import CONTROL_TOKENS
from src.evaluation.argmax_head import ScreenedArgmax
from src.evaluation import batch_decode
from src.evaluation.batch_decode import PackedGreedy
from src.evaluation.metrics import Expected, percentile
from src.evaluation.report import TestCase as Case, run_cases
from src.evaluation.router import Router, batch_size_of, render_prompt
from src.utils.config_loader import load_config
from src.utils.errors import UserError
from src.utils.packed_masks import block_masks
from tests.test_eval_router import TOOLS
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer

QUERIES = ["查询张三的年假", "How many sick days does Li Si have left this year?", "hi", "病假怎么请",
           "search the overtime policy", "王五"]
SLIDING_WINDOW = 16
MAX_NEW = 40
EXTRA_STOPS = "TW|"  # bytes the tiny model writes at different steps of different queries


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(attn: str, tokenizer):
    """The tiny model with an untied output layer whose `<start_function_call>` row leans towards the prompts."""
    model = make_tiny_model(len(tokenizer), sliding_window=SLIDING_WINDOW)
    model.set_attn_implementation(attn)
    probe = Router(model, tokenizer, TOOLS, prefix_cache=False)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        last = [model.model(input_ids=torch.tensor([probe.encode(probe.render(q))])).last_hidden_state[0, -1]
                for q in QUERIES[:3]]
        towards = sum(h / h.norm() for h in last)
        weight = model.lm_head.weight
        weight[CONTROL_TOKENS["<start_function_call>"]] = towards / towards.norm() * 0.3 * weight.norm(dim=1).max()
    return model


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def router(request):
    tokenizer = make_tiny_tokenizer()
    router = Router(_model(request.param, tokenizer), tokenizer, TOOLS, max_new_tokens=MAX_NEW, constrain=True)
    router.stop_ids = router.stop_ids | {router.encode(c)[0] for c in EXTRA_STOPS}
    return router


def decoded_ids(router, route) -> tuple[list[list[int]], list]:
    """(the new ids of every answer `route()` produces, in the order they were decoded, and its results)."""
    seen, decode = [], router.decode
    router.decode = lambda ids: seen.append(list(ids)) or decode(ids)
    try:
        results = route()
    finally:
        del router.decode
    return seen, results


@pytest.fixture(scope="module")
def one_by_one(router) -> dict:
    """{constrained: (new ids per query, results)} of `route`, query by query."""
    return {constrain: decoded_ids(router, lambda: [router.route(q, use_constrain=constrain) for q in QUERIES])
            for constrain in (False, True)}


def test_the_fixture_has_rows_of_every_kind(router, one_by_one):
    ids, results = one_by_one[True]
    lengths = [len(i) for i in ids]
    assert len(set(lengths)) >= 3 and MAX_NEW in lengths and min(lengths) < MAX_NEW  # finish at different steps
    calls = [r.raw.startswith("<start_function_call>call:get_leave_balance{") for r in results]
    assert any(calls) and not all(calls)  # some open a call, whose name and keys the constraint chose
    free, _ = one_by_one[False]
    assert [len(i) for i in free] != lengths  # the constraint changes answers: the batched path must apply it too
    prompt = router.encode(router.render(QUERIES[0]))
    assert len(router.prefix_ids) > SLIDING_WINDOW and len(prompt) - len(router.prefix_ids) + MAX_NEW > SLIDING_WINDOW


@pytest.mark.parametrize("constrain", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_route_many_gives_the_ids_of_route(router, one_by_one, constrain, batch_size, monkeypatch):
    monkeypatch.setattr(batch_decode, "PREFILL_ROWS", 4)  # batch 100: the 6 prompts are prefilled as 4 + 2
    want_ids, want = one_by_one[constrain]
    constrainer = router.constrainer
    router.constrainer = constrainer if constrain else None
    try:
        got_ids, got = decoded_ids(router, lambda: router.route_many(QUERIES, batch_size=batch_size))
    finally:
        router.constrainer = constrainer
    assert got_ids == want_ids
    for a, b in zip(got, want):
        assert (a.kind, a.calls, a.text, a.raw, a.error) == (b.kind, b.calls, b.text, b.raw, b.error)
        assert (a.n_prompt_tokens, a.n_new_tokens) == (b.n_prompt_tokens, b.n_new_tokens)
        assert a.timings["batched"] and a.timings["batch_rows"] == min(batch_size, len(QUERIES))


class RecordingHead(ScreenedArgmax):
    """The screened head, keeping every batch of hidden states it is given."""

    def __init__(self, weight):
        super().__init__(weight)
        self.seen = []

    def __call__(self, hidden, among=None):
        self.seen.append(hidden.clone())
        return super().__call__(hidden, among)


@pytest.mark.parametrize("prefill_rows", [batch_decode.PREFILL_ROWS, 4])
def test_every_step_sees_the_hidden_state_of_its_own_prompt_alone(router, prefill_rows, monkeypatch):
    """At each step, each row's hidden state equals the uncached decoder's on its prompt + its tokens so far (float
    tolerance): a missing or extra key (prefix kept from the wrong position, pruning, window, positions) shows here
    even where it does not change a greedy token."""
    monkeypatch.setattr(batch_decode, "PREFILL_ROWS", prefill_rows)
    model = router.model
    head = RecordingHead(model.get_output_embeddings().weight)
    prompts = [router.encode(router.render(q)) for q in QUERIES]
    n = len(router.prefix_ids)
    new, timings = PackedGreedy(model, router.prefix_ids, head)([p[n:] for p in prompts], router.stop_ids, MAX_NEW)
    passes = -(-len(QUERIES) // prefill_rows)  # the prefill's passes, then one per step
    assert len(head.seen) == passes + timings["forward_steps"] == passes - 1 + max(map(len, new))
    head.seen[:passes] = [torch.cat(head.seen[:passes])]
    with torch.inference_mode():
        for row, (prompt, ids) in enumerate(zip(prompts, new)):
            alone = model.get_decoder()(input_ids=torch.tensor([prompt + ids[:-1]])).last_hidden_state[0]
            packed = [head.seen[step][sum(len(other) > step for other in new[:row])] for step in range(len(ids))]
            torch.testing.assert_close(torch.stack(packed), alone[len(prompt) - 1:], rtol=1e-5, atol=1e-5)


def test_the_full_fp32_head_gives_the_same_ids(router, one_by_one, monkeypatch):
    """Without the bf16-screened head (e.g. a bf16 or adapter-wrapped head) the full logits are used."""
    monkeypatch.setattr(router, "_packed", None)
    monkeypatch.setitem(router.__dict__, "_screened_head", None)
    got_ids, _ = decoded_ids(router, lambda: router.route_many(QUERIES, batch_size=4))
    assert got_ids == one_by_one[True][0]


def test_batched_latency_is_the_chunks_share(router):
    results = router.route_many(QUERIES[:4], batch_size=3)
    first, second = results[:3], results[3:]
    assert len({r.latency_ms for r in first}) == 1 and first[0].latency_ms > 0
    assert [r.timings["batch_rows"] for r in results] == [3, 3, 3, 1]
    assert first[0].timings["forward_steps"] == max(r.n_new_tokens for r in first) - 1
    assert second[0].timings["prefill_tokens"] == second[0].n_prompt_tokens - len(router.prefix_ids)


# ---------------------------------------------------------------- what is not batched


def test_sampling_and_no_prefix_cache_fall_back_to_route(router):
    model, tokenizer = router.model, router.tokenizer
    sampled = Router(model, tokenizer, TOOLS, max_new_tokens=8, temperature=1.5, seed=3)
    alone = Router(model, tokenizer, TOOLS, max_new_tokens=8, temperature=1.5, seed=3)
    many = sampled.route_many(QUERIES[:3], batch_size=3)
    assert [r.raw for r in many] == [alone.route(q).raw for q in QUERIES[:3]]
    assert not any(r.timings.get("batched") for r in many)
    uncached = Router(model, tokenizer, TOOLS, max_new_tokens=8, prefix_cache=False)
    assert not any(r.timings.get("batched") for r in uncached.route_many(QUERIES[:2]))


def test_a_prompt_without_the_prefix_is_routed_alone(router, one_by_one, monkeypatch):
    render = router.render
    monkeypatch.setattr(router, "render", lambda q: render_prompt(q, TOOLS, "Another system prompt.")
                        if q == "odd" else render(q))
    results = router.route_many([QUERIES[0], "odd", QUERIES[1]], batch_size=3)
    assert [bool(r.timings.get("batched")) for r in results] == [True, False, True]
    assert results[1].raw == router.route("odd").raw and not results[1].timings["cached_prefix"]
    assert [results[0].raw, results[2].raw] == [r.raw for r in one_by_one[True][1][:2]]


def test_progress_is_reported_per_chunk(router):
    done = []
    router.route_many(QUERIES[:5], batch_size=2, progress=done.append)
    assert done == [2, 2, 1]


def test_batch_size_comes_from_the_evaluation_config():
    assert batch_size_of(None) == load_config().evaluation.batch_size == 96  # schema default = base_config.yaml
    assert batch_size_of({"evaluation": {"batch_size": 4}}) == 4
    with pytest.raises(UserError, match="evaluation.batch_size"):
        batch_size_of({"evaluation": {"batch_size": 0}})


# ---------------------------------------------------------------- the report


def test_report_latency_comes_from_single_queries(router, monkeypatch):
    cases = [Case(i + 1, q, Expected(None, None)) for i, q in enumerate(QUERIES)]
    singles, route = [], router.route

    def spy(query, **kwargs):
        result = route(query, **kwargs)
        singles.append((query, result.latency_ms))
        return result

    monkeypatch.setattr(router, "route", spy)
    report, results = run_cases(router, cases, "tiny", latency_samples=2)
    assert [q for q, _ in singles] == QUERIES[:2]
    latencies = [ms for _, ms in singles]
    assert report["latency_ms"] == {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95)}
    assert report["latency_samples"] == 2 and all(r.timings["batched"] for r in results)
    batched = report["batched"]
    assert batched["batch_size"] == router.batch_size and batched["wall_s"] > 0
    assert batched["cases_per_s"] == pytest.approx(len(cases) / batched["wall_s"], rel=0.02)  # wall_s is rounded
    assert batched["checked_single"] == batched["same_as_single"] == 2  # the sampled queries routed alone wrote what the batch wrote
    singles.clear()
    report, _ = run_cases(router, cases, "tiny", latency_samples=0)
    assert not singles and report["latency_ms"] == {"p50": None, "p95": None} and report["latency_samples"] == 0


# ---------------------------------------------------------------- the masks


class _Config:
    layer_types = ["sliding_attention", "full_attention"]
    sliding_window = 3
    _attn_implementation = "sdpa"


def test_block_masks_keep_each_sample_to_the_prefix_and_its_own_past_within_the_window():
    # keys: prefix positions 0-4, sample 0 at 5-7, sample 1 at 5-6; queries: sample 0 at 7, sample 1 at 6
    k_sample = torch.tensor([-1, -1, -1, -1, -1, 0, 0, 0, 1, 1])
    k_pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 5, 6])
    masks = block_masks(_Config, torch.tensor([0, 1]), torch.tensor([7, 6]), k_sample, k_pos, torch.float32)
    assert set(masks) == {"sliding_attention", "full_attention"}
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    assert full.shape == sliding.shape == (2, 10) and full.dtype == torch.bool
    assert full.tolist() == [[True] * 8 + [False] * 2, [True] * 5 + [False] * 3 + [True] * 2]
    # window 3: key positions q-2..q, i.e. k_pos > q_pos - 3 (HF's convention)
    assert sliding.tolist() == [[False] * 5 + [True] * 3 + [False] * 2,
                                [False] * 4 + [True] + [False] * 3 + [True] * 2]


def test_block_masks_per_layer_type_keys_and_the_eager_form():
    class Eager(_Config):
        _attn_implementation = "eager"

    k_sample = {"full_attention": torch.tensor([-1, -1, -1, 0]), "sliding_attention": torch.tensor([-1, 0])}
    k_pos = {"full_attention": torch.tensor([0, 1, 2, 3]), "sliding_attention": torch.tensor([2, 3])}
    masks = block_masks(Eager, torch.tensor([0]), torch.tensor([3]), k_sample, k_pos, torch.bfloat16)
    low = torch.finfo(torch.bfloat16).min
    assert masks["full_attention"].dtype == torch.bfloat16
    assert masks["full_attention"][0, 0].tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert masks["sliding_attention"][0, 0].tolist() == [[0.0, 0.0]]
    far = block_masks(Eager, torch.tensor([0]), torch.tensor([5]), k_sample, k_pos, torch.bfloat16)
    assert far["sliding_attention"][0, 0].tolist() == [[low, 0.0]]  # position 2 is out of the window of 5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_suffixes_see_what_each_sees_alone(attn):
    """Two suffixes packed on one prefix give the hidden states each gives alone with HF's own masks."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), sliding_window=SLIDING_WINDOW)
    model.set_attn_implementation(attn)
    decoder = model.get_decoder()
    generator = torch.Generator().manual_seed(0)
    prefix, suffixes = (torch.randint(107, 300, (n,), generator=generator) for n in (40, 2 * SLIDING_WINDOW + 5))
    suffixes = [suffixes[:SLIDING_WINDOW + 3], suffixes[SLIDING_WINDOW + 3:]]
    with torch.inference_mode():
        alone = []
        for suffix in suffixes:
            full = decoder(input_ids=torch.cat([prefix, suffix])[None]).last_hidden_state[0, len(prefix):]
            alone.append(full)
        cache = DynamicCache()
        decoder(input_ids=prefix[None], cache=cache, use_cache=True)
        sample = torch.cat([torch.full((len(s),), i) for i, s in enumerate(suffixes)])
        position = torch.cat([len(prefix) + torch.arange(len(s)) for s in suffixes])
        masks = block_masks(model.config, sample, position, torch.cat([torch.full((len(prefix),), -1), sample]),
                            torch.cat([torch.arange(len(prefix)), position]), torch.float32)
        packed = decoder(input_ids=torch.cat(suffixes)[None], attention_mask=masks, position_ids=position[None],
                         cache=cache, use_cache=True).last_hidden_state[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
