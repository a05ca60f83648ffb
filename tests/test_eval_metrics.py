"""Every routing metric on a hand-made prediction list whose expected numbers were worked out by hand."""
from __future__ import annotations

import pytest

from src.evaluation.metrics import (
    MALFORMED, NO_CALL, Expected, Predicted, aggregate, percentile, precision_recall_f1, score_case,
    values_equal, values_match_normalized,
)

CATALOG = ["get_leave_balance", "request_leave", "submit_expense"]


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


def calls(*items):
    return Predicted("calls", tuple(items))


TEXT = Predicted("text")
BROKEN = Predicted("malformed")

# (expected, predicted): comments give tool / exact / strict args / normalised args as worked out by hand.
CASES = [
    # 1 right call, string differs only by surrounding spaces: tool ok, exact ok, args 2/2
    (Expected("get_leave_balance", {"employee_name": "张三", "leave_type": "annual"}),
     calls(call("get_leave_balance", employee_name=" 张三 ", leave_type="annual"))),
    # 2 128 == 128.0, "travel" vs "Travel": tool ok, exact no, args 2/3, normalised 3/3 (normalised exact ok)
    (Expected("submit_expense", {"employee_name": "李四", "amount": 128, "category": "travel"}),
     calls(call("submit_expense", employee_name="李四", amount=128.0, category="Travel"))),
    # 3 expected null: key present, value not scored: exact ok, args 3/3
    (Expected("request_leave", {"employee_name": "王五", "leave_type": "sick", "start_date": None}),
     calls(call("request_leave", employee_name="王五", leave_type="sick", start_date="2025-03-01"))),
    # 4 expected null but key missing: exact no, args 2/3
    (Expected("request_leave", {"employee_name": "王五", "leave_type": "sick", "start_date": None}),
     calls(call("request_leave", employee_name="王五", leave_type="sick"))),
    # 5 extra predicted key: args 1/1 but exact no (also normalised exact no)
    (Expected("get_leave_balance", {"employee_name": "赵六"}),
     calls(call("get_leave_balance", employee_name="赵六", leave_type="annual"))),
    # 6 two calls, the first one right: tool ok, args 1/1, exact no
    (Expected("get_leave_balance", {"employee_name": "赵六"}),
     calls(call("get_leave_balance", employee_name="赵六"), call("submit_expense", employee_name="赵六"))),
    # 7 wrong tool with matching-looking args: tool no, args 0/3
    (Expected("submit_expense", {"employee_name": "李四", "amount": 50, "category": "meals"}),
     calls(call("request_leave", employee_name="李四", leave_type="sick", start_date="2025-01-01"))),
    # 8 no-call case answered in text: tool ok, exact ok
    (Expected(None), TEXT),
    # 9 no-call case but the model called: tool no, exact no
    (Expected(None), calls(call("get_leave_balance", employee_name="x"))),
    # 10 call case answered in text: tool no, args 0/1
    (Expected("get_leave_balance", {"employee_name": "张三"}), TEXT),
    # 11 call case, malformed output: tool no, args 0/3
    (Expected("request_leave", {"employee_name": "张三", "leave_type": "annual", "start_date": "2025-05-01"}),
     BROKEN),
    # 12 no-call case, malformed output: tool no
    (Expected(None), BROKEN),
    # 13 call case without expected_arguments: tool ok, not in exact/argument denominators
    (Expected("get_leave_balance"), calls(call("get_leave_balance", employee_name="张三"))),
]


@pytest.fixture(scope="module")
def report():
    scores = [score_case(e, p) for e, p in CASES]
    return aggregate(scores, latencies_ms=[100.0, 200.0, 300.0, 400.0], functions=CATALOG)


def test_headline_metrics_match_hand_computation(report):
    assert report["n"] == 13
    assert report["tool_accuracy"] == pytest.approx(8 / 13)          # cases 1-6, 8, 13
    assert report["counts"]["exact_scored"] == 12                    # all but 13
    assert report["exact_call_accuracy"] == pytest.approx(3 / 12)    # cases 1, 3, 8
    assert report["normalized_exact_call_accuracy"] == pytest.approx(4 / 12)  # + case 2
    assert report["counts"]["arguments"] == 20
    assert report["argument_accuracy"] == pytest.approx(11 / 20)     # 2+2+3+2+1+1
    assert report["normalized_argument_accuracy"] == pytest.approx(12 / 20)
    assert report["malformed_rate"] == pytest.approx(2 / 13)         # cases 11, 12


def test_no_call_precision_recall(report):
    # predicted no-call: 8, 10; expected no-call: 8, 9, 12; both: 8
    assert report["no_call_precision"] == pytest.approx(1 / 2)
    assert report["no_call_recall"] == pytest.approx(1 / 3)


def test_per_function_scores(report):
    pf = report["per_function"]
    assert set(pf) == set(CATALOG)
    assert pf["get_leave_balance"] == pytest.approx({"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 5})
    # the second call of case 6 does not count as a prediction of submit_expense
    assert pf["submit_expense"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert pf["request_leave"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})


def test_confusion_matrix(report):
    cm = report["confusion_matrix"]
    assert cm["labels"] == CATALOG + [NO_CALL, MALFORMED]
    assert cm["matrix"] == [
        # glb rl se no mal  (columns: predicted)
        [4, 0, 0, 1, 0],  # expected get_leave_balance: 1, 5, 6, 13 right; 10 answered in text
        [0, 2, 0, 0, 1],  # expected request_leave: 3, 4 right; 11 malformed
        [0, 1, 1, 0, 0],  # expected submit_expense: 2 right; 7 routed to request_leave
        [1, 0, 0, 1, 1],  # expected no call: 8 right; 9 called; 12 malformed
        [0, 0, 0, 0, 0],
    ]


def test_unknown_predicted_name_gets_its_own_column():
    scores = [score_case(Expected("get_leave_balance", {}), calls(call("fly_to_moon")))]
    cm = aggregate(scores, functions=CATALOG)["confusion_matrix"]
    assert cm["labels"] == CATALOG + ["fly_to_moon", NO_CALL, MALFORMED]
    assert cm["matrix"][0][3] == 1
    assert aggregate(scores, functions=CATALOG)["per_function"]["fly_to_moon"]["precision"] == 0.0


def test_latency_percentiles(report):
    assert report["latency_ms"] == pytest.approx({"p50": 250.0, "p95": 385.0})
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0


def test_empty_denominators_stay_in_range():
    # Only call cases, all routed right: nothing no-call could go wrong.
    scores = [score_case(Expected("get_leave_balance", {"employee_name": "a"}),
                         calls(call("get_leave_balance", employee_name="a")))]
    r = aggregate(scores, functions=CATALOG)
    assert (r["no_call_precision"], r["no_call_recall"], r["malformed_rate"]) == (1.0, 1.0, 0.0)
    assert r["per_function"]["request_leave"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 0}
    # A text answer where a call was expected: no-call precision 0, recall has no positives but one false alarm.
    r = aggregate([score_case(Expected("get_leave_balance", {"employee_name": "a"}), TEXT)], functions=CATALOG)
    assert (r["no_call_precision"], r["no_call_recall"]) == (0.0, 0.0)
    assert precision_recall_f1(0, 0, 3) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}


@pytest.mark.parametrize("want, got, strict, lenient", [
    ("张三", "  张三\n", True, True),
    ("张三", "张 三", False, True),
    ("ABC", "ａｂｃ", False, True),          # full-width + case
    ("年假。", "年假", False, True),          # full-width punctuation
    ("2025-03-01", "20250301", False, True),
    (128, 128.0, True, True),
    (128, "128", False, True),
    (1.5, "1.50", False, False),
    (True, 1, False, False),
    (True, "true", False, True),
    (["a", 1], ["a", 1.0], True, True),
    (["a", "b"], ["b", "a"], False, False),
    ({"x": "A"}, {"x": "a"}, False, True),
    ("张三", "李四", False, False),
    (None, None, True, True),
])
def test_value_comparison(want, got, strict, lenient):
    assert values_equal(want, got) is strict
    assert values_match_normalized(want, got) is lenient


def test_wrong_args_are_named_for_the_mistake_list():
    s = score_case(Expected("submit_expense", {"employee_name": "李四", "amount": 128, "category": "travel"}),
                   calls(call("submit_expense", employee_name="李四", amount=12)))
    assert s.wrong_args == ["amount", "category"]
    assert (s.tool_correct, s.exact_call, s.args_correct) == (True, False, 1)
