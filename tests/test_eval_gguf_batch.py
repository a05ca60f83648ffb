"""GgufRouter.route_many on a tiny GGUF: many sequences in one llama.cpp context give `route`'s raw text per query."""
from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from src.evaluation.gguf_router import GgufRouter  # noqa: E402
from tests.test_eval_gguf import QUERIES, TOOLS, calling, tiny  # noqa: E402,F401  (fixtures reused by name)

MANY = QUERIES + ["查询李四上个月的工资", "a", "Please book three days of annual leave for Wang Wu starting Monday",
                  "谢谢", "How many sick days does Zhao Liu have?", "x y z", "请帮我查一下考勤记录", "ok"]  # 11
MAX_NEW = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def summary(results) -> list[tuple]:
    return [(r.raw, r.kind, r.n_prompt_tokens, r.n_new_tokens) for r in results]


@pytest.fixture(scope="module")
def stopping(tiny):
    """A router whose rows stop at different steps: a token the tiny model writes at various places in different
    queries' outputs, and in none of some, is made a stop id (both paths read `stop_ids`)."""
    router = GgufRouter(tiny[2], TOOLS, max_new_tokens=MAX_NEW, n_threads=1)
    outputs = [router.generate_ids(router.encode(router.render(q)))[0] for q in MANY]
    firsts = {}
    for row, ids in enumerate(outputs):
        for step, token in enumerate(ids[:-1]):
            firsts.setdefault(token, {}).setdefault(row, step)
    spread = {t: rows for t, rows in firsts.items() if len(rows) < len(MANY) and len(set(rows.values())) >= 3}
    assert spread, "no token of the tiny model's outputs stops its rows at different steps"
    router.stop_ids = router.stop_ids | {max(spread, key=lambda t: len(set(spread[t].values())))}
    yield router
    router.close()


def test_stopping_rows_end_at_different_steps_and_some_at_max_new_tokens(stopping):
    lengths = [r.n_new_tokens for r in map(stopping.route, MANY)]
    assert len(set(lengths)) >= 3 and MAX_NEW in lengths and min(lengths) < MAX_NEW


@pytest.mark.parametrize("batch_size", [1, 3, len(MANY) + 5])
def test_batched_routing_equals_route_query_by_query(stopping, batch_size):
    many = stopping.route_many(MANY, batch_size=batch_size)
    singles = [stopping.route(q) for q in MANY]  # after route_many: route's own prefix cache is untouched
    assert summary(many) == summary(singles)
    assert all(s.timings["cached_prefix"] and not s.timings.get("batched") for s in singles)
    rows = min(batch_size, len(MANY))
    assert [r.timings["batch_rows"] for r in many[:rows]] == [rows] * rows
    assert all(r.timings["batched"] and r.latency_ms > 0 for r in many)
    assert many[0].timings["prefill_tokens"] == len(stopping.encode(stopping.render(MANY[0]))) - len(
        stopping.prefix_ids)


def test_progress_counts_every_query_and_the_context_is_remade_only_when_too_small(tiny):
    router = GgufRouter(tiny[2], TOOLS, max_new_tokens=4, n_threads=1)
    try:
        done = []
        router.route_many(MANY, batch_size=4, progress=done.append)
        assert done == [4, 4, 3]
        context = router._many
        router.route_many(MANY[:2], batch_size=2)
        assert router._many is context  # fewer rows fit in the context made for 4
        router.route_many(MANY, batch_size=6)
        assert router._many is not context and router._many.rows == 6
    finally:
        router.close()


def test_long_user_turns_are_routed_one_by_one(stopping, monkeypatch):
    import src.evaluation.gguf_router as gguf_router

    lengths = [len(stopping.encode(stopping.render(q))) - len(stopping.prefix_ids) for q in MANY]
    monkeypatch.setattr(gguf_router, "USER_ROOM", sorted(lengths)[len(MANY) // 2])
    many = stopping.route_many(MANY, batch_size=4)
    alone = [not r.timings.get("batched") for r in many]
    assert alone == [n > gguf_router.USER_ROOM for n in lengths] and 0 < sum(alone) < len(MANY)
    assert summary(many) == summary(map(stopping.route, MANY))


@pytest.mark.parametrize("constrained", [True, False])
def test_batched_constrained_and_free_decoding_equal_route(calling, constrained):
    from tests.test_eval_constrain import NAMES

    _, router, _, query = calling
    queries = [query, *MANY[:5], query]
    saved = router.constrainer
    router.constrainer = saved if constrained else None
    try:
        many = router.route_many(queries, batch_size=3)
        singles = [router.route(q) for q in queries]  # drafted: the same greedy tokens in fewer steps
    finally:
        router.constrainer = saved
    assert summary(many) == summary(singles)
    opening = "<start_function_call>call:"
    if constrained:
        assert many[0].raw.startswith(opening) and many[0].raw[len(opening):].split("{")[0] in NAMES, many[0].raw
    else:
        assert many[0].raw.startswith("<start_function_call>") and not many[0].raw.startswith(opening)


@pytest.mark.parametrize("options", [{"temperature": 0.8, "seed": 1}, {"prefix_cache": False}])
def test_sampling_or_no_prefix_cache_routes_one_by_one(tiny, options):
    router = GgufRouter(tiny[2], TOOLS, max_new_tokens=4, n_threads=1, **options)
    routed = []
    route = router.route
    router.route = lambda q: routed.append(q) or route(q)
    try:
        results = router.route_many(MANY[:4], batch_size=4)
        assert routed == MANY[:4] and router._many is None
        assert not any(r.timings.get("batched") for r in results)
    finally:
        router.close()


def test_close_frees_the_batch_context(tiny):
    router = GgufRouter(tiny[2], TOOLS, max_new_tokens=4, n_threads=1)
    router.route_many(MANY[:3])
    assert router._many is not None and router._many.rows == 3
    router.close()
    assert router._many is None


def test_batch_size_comes_from_the_evaluation_config(tiny):
    from src.evaluation.router import open_router

    router = open_router(tiny[2], config={"evaluation": {"batch_size": 5}, "inference": {"max_new_tokens": 4}})
    try:
        assert isinstance(router, GgufRouter) and router.batch_size == 5
    finally:
        router.close()
