"""Near-duplicate clustering, leakage-safe deterministic split, outlier filtering, distractor augmentation."""
from __future__ import annotations

from pathlib import Path

from src.data_engine.augment import GENERIC_TOOLS, augment_distractors
from src.data_engine.convert import query_text, target_of
from src.data_engine.formatter import normalize_tools
from src.data_engine.split import filter_outliers, jaccard, ngrams, near_duplicate_clusters, train_eval_split
from src.data_engine.validate import ToolCatalog
from src.utils.io import read_json

TOOLS = read_json(Path(__file__).resolve().parents[1] / "data/tools/hr_tools.json")


def _rec(query: str, tool: str | None = "get_leave_balance") -> dict:
    last = {"role": "assistant", "content": "ok"} if tool is None else {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": tool, "arguments": {"employee_name": "x"}}}]}
    return {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": query}, last], "tools": TOOLS}


def _dataset() -> list[dict]:
    recs = []
    for i in range(60):
        tool = ["get_leave_balance", "get_payslip", None][i % 3]
        recs.append(_rec(f"query number {i} about topic {chr(65 + i % 26)}{i * 7919 % 1000}", tool))
    # a family of near-duplicates (punctuation/case/one char apart)
    recs += [_rec("帮我查询一下张三今年还剩下几天年假呀"), _rec("帮我查询一下张三今年还剩下几天年假呀！"),
             _rec("帮我查询一下 张三今年还剩下几天年假呀?"), _rec("帮我查询一下张三今年还剩下几天年假啊")]
    return recs


def test_ngram_similarity_basics():
    assert jaccard(ngrams("查询张三的年假"), ngrams("查询 张三的年假！")) == 1.0
    assert jaccard(ngrams("查询张三的年假"), ngrams("what is the weather")) == 0.0
    clusters = near_duplicate_clusters(["abcdefghij", "abcdefghij!", "zzzzzzzzzz", "abcdefghik"], threshold=0.7)
    assert clusters[0] == clusters[1] == clusters[3] != clusters[2]


def test_split_keeps_near_duplicates_together_and_is_deterministic():
    recs = _dataset()
    dup_ids = {id(r) for r in recs[-4:]}
    for seed in range(12):
        train, evals = train_eval_split(recs, 0.2, seed, threshold=0.7)
        assert len(train) + len(evals) == len(recs)
        sides = {id(r) in {id(e) for e in evals} for r in recs if id(r) in dup_ids}
        assert len(sides) == 1, f"seed {seed}: near-duplicates split across train and eval"
    a = train_eval_split(recs, 0.2, 7, threshold=0.7)
    b = train_eval_split(recs, 0.2, 7, threshold=0.7)
    assert [query_text(r) for r in a[1]] == [query_text(r) for r in b[1]]
    c = train_eval_split(recs, 0.2, 8, threshold=0.7)
    assert [query_text(r) for r in a[1]] != [query_text(r) for r in c[1]]


def test_split_is_stratified_and_sized():
    recs = _dataset()
    train, evals = train_eval_split(recs, 0.25, 3)
    labels = {target_of(r) for r in evals}
    assert labels == {"get_leave_balance", "get_payslip", "(no call)"}
    assert abs(len(evals) - 0.25 * len(recs)) <= 4
    assert train_eval_split(recs, 0.0, 1) == (recs, [])


def test_filter_outliers_drops_near_duplicates_and_length_outliers():
    recs = _dataset() + [_rec("x" * 5000)]
    kept, dropped = filter_outliers(recs, query_text, near_dup_threshold=0.7)
    reasons = dict(dropped)
    assert reasons[len(recs) - 1].startswith("length outlier")
    assert sum(r.startswith("near-duplicate of sample 61") for r in reasons.values()) == 3
    assert len(kept) == len(recs) - 4


def test_augment_adds_distractors_and_keeps_targets_valid():
    recs = [_rec("查询张三的年假"), _rec("hello", None)]
    out = augment_distractors(recs, n_distractors=3, copies=2, seed=5)
    assert len(out) == 6 and out[:2] == recs
    names = {t["name"] for t in normalize_tools(GENERIC_TOOLS)}
    assert not names & {t["name"] for t in normalize_tools(TOOLS)}
    for r in out[2:]:
        assert len(r["tools"]) == len(TOOLS) + 3
        call = r["messages"][-1].get("tool_calls")
        if call:
            fn = call[0]["function"]
            assert ToolCatalog(r["tools"]).check_call(fn["name"], {"employee_name": "x"}, "n", "a") == []
    assert [t["function"]["name"] for t in out[2]["tools"]] != [t["function"]["name"] for t in TOOLS]
    assert augment_distractors(recs, seed=5) == augment_distractors(recs, seed=5)
    assert recs[0]["tools"] is TOOLS  # originals untouched
