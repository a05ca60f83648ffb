"""Outlier filtering and a train/eval split that cannot leak: near-duplicate queries always land on the same side.

Similarity is Jaccard over character n-grams of a normalised query (cheap, language-agnostic: works for Chinese,
which has no spaces). Candidate pairs come from an inverted n-gram index, so the cost stays near-linear for
typical data instead of comparing every pair.
"""
from __future__ import annotations

import random
import statistics
from collections import defaultdict
from typing import Callable, Sequence

from src.data_engine.validate import query_key


def ngrams(text: str, n: int = 3) -> frozenset[str]:
    key = query_key(text)
    if len(key) <= n:
        return frozenset([key]) if key else frozenset()
    return frozenset(key[i : i + n] for i in range(len(key) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def similar_pairs(texts: Sequence[str], threshold: float, n: int = 3, other: Sequence[str] | None = None):
    """Yield (i, j, score) with Jaccard >= threshold; within `texts`, or texts[i] vs other[j] when `other` is given."""
    grams = [ngrams(t, n) for t in texts]
    pool = grams if other is None else [ngrams(t, n) for t in other]
    index: dict[str, list[int]] = defaultdict(list)
    for j, g in enumerate(pool):
        for gram in g:
            index[gram].append(j)
    # Very common n-grams ("查一下", "the") make candidate lists quadratic; near-duplicates also share rarer ones.
    cap = max(200, int(len(pool) ** 0.5 * 10))
    for i, g in enumerate(grams):
        if not g:
            continue
        rare = [gram for gram in g if len(index.get(gram, ())) <= cap] or list(g)
        candidates = {j for gram in rare for j in index.get(gram, ()) if other is not None or j > i}
        for j in sorted(candidates):
            score = jaccard(g, pool[j])
            if score >= threshold:
                yield i, j, score


def near_duplicate_clusters(texts: Sequence[str], threshold: float = 0.9, n: int = 3) -> list[int]:
    """Cluster id per text (the smallest member index): transitive closure of "similar to"."""
    uf = _UnionFind(len(texts))
    for i, j, _ in similar_pairs(texts, threshold, n):
        uf.union(i, j)
    return [uf.find(i) for i in range(len(texts))]


def length_outliers(lengths: Sequence[int], k: float = 3.0) -> set[int]:
    """Tukey's far-out fences (k*IQR beyond the quartiles): flags broken exports, not merely long samples.

    The IQR is floored at a quarter of the median: templated data has a tiny IQR that would flag normal rows.
    """
    if len(lengths) < 4:
        return set()
    q1, median, q3 = statistics.quantiles(lengths, n=4, method="inclusive")
    iqr = max(q3 - q1, 0.25 * median, 1)
    lo, hi = q1 - k * iqr, q3 + k * iqr
    return {i for i, x in enumerate(lengths) if x < lo or x > hi}


def filter_outliers(
    records: list[dict],
    text_of: Callable[[dict], str],
    length_of: Callable[[dict], int] | None = None,
    near_dup_threshold: float | None = 0.9,
    k: float = 3.0,
) -> tuple[list[dict], list[tuple[int, str]]]:
    """Drop length outliers and all but the first of each near-duplicate cluster; return (kept, [(index, reason)])."""
    texts = [text_of(r) for r in records]
    lengths = [length_of(r) if length_of else len(t) for r, t in zip(records, texts)]
    dropped: dict[int, str] = {}
    for i in sorted(length_outliers(lengths, k)):
        dropped[i] = f"length outlier ({lengths[i]})"
    if near_dup_threshold is not None:
        clusters = near_duplicate_clusters(texts, near_dup_threshold)
        for i, c in enumerate(clusters):
            if c != i and i not in dropped:
                dropped[i] = f"near-duplicate of sample {c + 1}"
    kept = [r for i, r in enumerate(records) if i not in dropped]
    return kept, sorted(dropped.items())


def train_eval_split(
    records: list[dict],
    eval_ratio: float,
    seed: int,
    text_of: Callable[[dict], str] | None = None,
    label_of: Callable[[dict], str] | None = None,
    threshold: float = 0.9,
) -> tuple[list[dict], list[dict]]:
    """Split by near-duplicate cluster, stratified by label, deterministic for a seed; input order kept per side."""
    if not 0 <= eval_ratio < 1:
        raise ValueError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    if eval_ratio == 0 or len(records) < 2:
        return list(records), []
    if text_of is None or label_of is None:
        from src.data_engine.convert import query_text, target_of

        text_of, label_of = text_of or query_text, label_of or target_of
    clusters = near_duplicate_clusters([text_of(r) for r in records], threshold)
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(clusters):
        members[c].append(i)
    by_label: dict[str, list[int]] = defaultdict(list)
    for c in members:  # a cluster is stratified by its first member's label
        by_label[label_of(records[c])].append(c)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(by_label):
        cs = by_label[label]
        rng.shuffle(cs)
        want = round(eval_ratio * sum(len(members[c]) for c in cs))
        got = 0
        for c in cs:
            if got >= want:
                break
            if got + len(members[c]) > want * 1.5 and got > 0:
                continue  # a big cluster would overshoot: try a smaller one
            chosen.append(c)
            got += len(members[c])
    if sum(len(members[c]) for c in chosen) == len(records):  # never leave training empty
        chosen.pop()
    eval_idx = {i for c in chosen for i in members[c]}
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    evals = [r for i, r in enumerate(records) if i in eval_idx]
    return train, evals
