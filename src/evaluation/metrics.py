"""Routing metrics as pure functions over (expected, predicted) pairs, so every number can be checked by hand.

Scoring rules (the report cites them):
- The routed tool is the first call; "<no call>" for a text answer, "<malformed>" for output that did not parse.
  Tool accuracy counts a case right when the routed label equals the expected one (a no-call case is right when
  the model answered in text).
- Exact call: the right tool, exactly one call (extra calls are a mismatch), the same argument keys as expected
  (extra or missing keys are a mismatch) and every value equal. An expected value of null only requires the key.
  A no-call case is an exact call when the model answered in text. A call case whose test line has no
  `expected_arguments` is left out of the exact-call and argument denominators (there is nothing to compare).
- Values: strings equal after trimming; numbers numerically (128 == 128.0; booleans are not numbers); lists in
  order; objects key by key. The normalised variant also folds case, full/half width (NFKC), whitespace and
  punctuation, and compares a number with its string form.
- Argument accuracy: over every expected argument of the scored call cases; an argument counts only if the routed
  call is the expected tool and carries the key with an equal value.
- A rate whose denominator is empty is 1.0 when the other side is empty too (nothing could go wrong) and 0.0
  otherwise, so every rate stays in [0, 1].
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Sequence

NO_CALL = "<no call>"
MALFORMED = "<malformed>"
_MISSING = object()


@dataclass(frozen=True)
class Expected:
    """One test case's expectation; `arguments` None means the line gave none (not scored)."""

    tool: str | None
    arguments: dict | None = None


@dataclass(frozen=True)
class Predicted:
    """What the router produced for one case (the fields of a parsed output that scoring needs)."""

    kind: str  # "calls" | "text" | "malformed"
    calls: tuple = ()

    @property
    def label(self) -> str:
        if self.kind == "malformed":
            return MALFORMED
        if self.kind == "calls" and self.calls:
            return str(self.calls[0].get("name"))
        return NO_CALL


@dataclass
class CaseScore:
    expected_label: str
    predicted_label: str
    tool_correct: bool
    exact_scored: bool
    exact_call: bool
    normalized_exact_call: bool
    args_total: int = 0
    args_correct: int = 0
    args_normalized_correct: int = 0
    wrong_args: list[str] = field(default_factory=list)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def values_equal(expected, got) -> bool:
    """Strict equality: trimmed strings, numeric numbers, ordered lists, objects key by key."""
    if isinstance(expected, str) and isinstance(got, str):
        return expected.strip() == got.strip()
    if _is_number(expected) and _is_number(got):
        return expected == got
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected is got
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(values_equal(a, b) for a, b in zip(expected, got))
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(values_equal(expected[k], got[k]) for k in expected)
    return expected is None and got is None


def normalize_text(s: str) -> str:
    """NFKC (full-width → half-width), casefold, then drop whitespace and punctuation/symbols."""
    s = unicodedata.normalize("NFKC", s).casefold()
    return "".join(ch for ch in s if not (ch.isspace() or unicodedata.category(ch)[0] in "PS"))


def _scalar_text(v) -> str | None:
    if isinstance(v, str):
        return normalize_text(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if _is_number(v):
        return normalize_text(str(int(v)) if float(v).is_integer() else repr(float(v)))
    return None


def values_match_normalized(expected, got) -> bool:
    """Lenient equality for the normalised metric: case, width, spacing and punctuation do not count."""
    if values_equal(expected, got):
        return True
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(values_match_normalized(a, b) for a, b in zip(expected, got))
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(values_match_normalized(expected[k], got[k]) for k in expected)
    a, b = _scalar_text(expected), _scalar_text(got)
    return a is not None and a == b


def score_case(expected: Expected, predicted: Predicted) -> CaseScore:
    exp_label = expected.tool if expected.tool is not None else NO_CALL
    pred_label = predicted.label
    tool_correct = exp_label == pred_label
    if expected.tool is None:
        return CaseScore(exp_label, pred_label, tool_correct, True, tool_correct, tool_correct)
    if expected.arguments is None:
        return CaseScore(exp_label, pred_label, tool_correct, False, False, False)

    got = (predicted.calls[0].get("arguments") or {}) if tool_correct else {}
    score = CaseScore(exp_label, pred_label, tool_correct, True, False, False, args_total=len(expected.arguments))
    for key, want in expected.arguments.items():
        have = got.get(key, _MISSING) if isinstance(got, dict) else _MISSING
        if have is _MISSING:
            score.wrong_args.append(key)
            continue
        strict = want is None or values_equal(want, have)
        score.args_correct += strict
        score.args_normalized_correct += strict or values_match_normalized(want, have)
        if not strict:
            score.wrong_args.append(key)
    same_shape = tool_correct and len(predicted.calls) == 1 and isinstance(got, dict) \
        and got.keys() == expected.arguments.keys()
    score.exact_call = same_shape and score.args_correct == score.args_total
    score.normalized_exact_call = same_shape and score.args_normalized_correct == score.args_total
    return score


def rate(numerator: int, denominator: int, other_side_empty: bool = True) -> float:
    """numerator/denominator; an empty denominator is 1.0 if nothing could have gone wrong, else 0.0."""
    if denominator:
        return numerator / denominator
    return 1.0 if other_side_empty else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def precision_recall_f1(tp: int, n_pred: int, n_true: int) -> dict:
    p = rate(tp, n_pred, other_side_empty=n_true == 0)
    r = rate(tp, n_true, other_side_empty=n_pred == 0)
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "support": n_true}


def confusion_matrix(scores: Sequence[CaseScore], functions: Iterable[str] = ()) -> dict:
    """Rows expected, columns predicted; catalog order first, unknown predicted names next, then the two specials."""
    labels = list(dict.fromkeys(functions))
    for s in scores:
        for lab in (s.expected_label, s.predicted_label):
            if lab not in labels and lab not in (NO_CALL, MALFORMED):
                labels.append(lab)
    labels += [NO_CALL, MALFORMED]
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for s in scores:
        matrix[index[s.expected_label]][index[s.predicted_label]] += 1
    return {"labels": labels, "matrix": matrix}


def aggregate(scores: Sequence[CaseScore], latencies_ms: Sequence[float] = (), functions: Iterable[str] = ()) -> dict:
    """All report metrics for one model over one test set (`functions`: the catalog, to fix the label order)."""
    functions = list(functions)
    n = len(scores)
    scored = [s for s in scores if s.exact_scored]
    args_total = sum(s.args_total for s in scored)

    exp_no = sum(s.expected_label == NO_CALL for s in scores)
    pred_no = sum(s.predicted_label == NO_CALL for s in scores)
    both_no = sum(s.expected_label == NO_CALL == s.predicted_label for s in scores)

    per_function = {}
    for name in confusion_matrix(scores, functions)["labels"]:
        if name in (NO_CALL, MALFORMED):
            continue
        n_true = sum(s.expected_label == name for s in scores)
        n_pred = sum(s.predicted_label == name for s in scores)
        tp = sum(s.expected_label == name == s.predicted_label for s in scores)
        per_function[name] = precision_recall_f1(tp, n_pred, n_true)

    return {
        "n": n,
        "tool_accuracy": rate(sum(s.tool_correct for s in scores), n),
        "exact_call_accuracy": rate(sum(s.exact_call for s in scored), len(scored)),
        "normalized_exact_call_accuracy": rate(sum(s.normalized_exact_call for s in scored), len(scored)),
        "argument_accuracy": rate(sum(s.args_correct for s in scored), args_total),
        "normalized_argument_accuracy": rate(sum(s.args_normalized_correct for s in scored), args_total),
        "no_call_precision": rate(both_no, pred_no, other_side_empty=exp_no == 0),
        "no_call_recall": rate(both_no, exp_no, other_side_empty=pred_no == 0),
        "malformed_rate": rate(sum(s.predicted_label == MALFORMED for s in scores), n, other_side_empty=False),
        "latency_ms": {"p50": percentile(latencies_ms, 50), "p95": percentile(latencies_ms, 95)},
        "per_function": per_function,
        "confusion_matrix": confusion_matrix(scores, functions),
        "counts": {"exact_scored": len(scored), "arguments": args_total, "expected_no_call": exp_no,
                   "predicted_no_call": pred_no},
    }


def severity(score: CaseScore) -> tuple:
    """Sort key for the worst-mistakes list: malformed, then wrong routing, then fewest right arguments."""
    return (
        score.predicted_label != MALFORMED,
        score.tool_correct,
        score.args_correct / score.args_total if score.args_total else 1.0,
    )
