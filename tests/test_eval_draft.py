"""Grammar drafts (what the call format and the catalog force next) and the lossless verification of drafts.

The tiny random model never writes a call, so the verification loop is driven here by drafters that know the
greedy answer (all accepted), know it only partly (cut mid-draft: the cache must be cropped), or are always wrong.
Each must give exactly the plain greedy tokens; only the number of forward steps may change.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.evaluation.draft import CallDrafter
from src.evaluation.router import Router
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer

HR_TOOLS = json.loads((Path(__file__).resolve().parents[1] / "data" / "tools" / "hr_tools.json").read_text())
C = "<start_function_call>"
END = "}<end_function_call><start_function_response>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("text, draft", [
    ("", "call:"),
    ("ca", "ll:"),
    ("call:", ""),                                             # which function: the model decides
    ("call:get_", ""),                                         # get_leave_balance / get_payslip / ...
    ("call:get_l", "eave_balance{employee_name:<escape>"),     # unique name; employee_name is first and required
    ("call:search_p", "olicy{query:<escape>"),
    ("call:submit_expense", "{amount:"),                       # amount sorts first, is required, is a number
    ("call:submit_expense{amount:12", ""),                     # a number still being written
    ("call:submit_expense{amount:12.5,", "category:<escape>"),  # next in order and required
    ("call:submit_expense{amount:12.5,category:<escape>o", ""),  # office_supplies / other
    ("call:submit_expense{amount:12.5,category:<escape>tr", ""),  # travel / training
    ("call:submit_expense{amount:12.5,category:<escape>trav", "el<escape>"),  # then optional keys: model decides
    ("call:get_leave_balance{employee_name:<escape>张三<escape>", ""),  # optional leave_type or the end
    ("call:get_leave_balance{employee_name:<escape>张三<escape>,l", "eave_type:<escape>"),
    ("call:get_leave_balance{employee_name:<escape>张三<escape>,leave_type:<escape>an", "nual<escape>" + END),
    ("call:get_leave_balance{employee_name:<escape>张三<escape>,leave_type:<escape>annual<escape>}",
     "<end_function_call><start_function_response>"),
    ("call:get_leave_balance{employee_name:<escape>a<escape>,leave_type:<escape>sick<escape>}<end_function_call>",
     "<start_function_response>"),
    ("call:request_leave{employee_name:<escape>a<escape>,", ""),  # end_date is optional
    ("call:request_leave{employee_name:<escape>a<escape>,s", "tart_date:<escape>"),
    ("call:request_overtime{date:<escape>2025-01-01<escape>,employee_name:<escape>a<escape>,", "hours:"),
    ("call:fly_to_moon{", ""),                                 # not in the catalog
    ("cell:", ""),                                             # not the format
    ("call:get_leave_balance{employee_name:[", ""),             # nested values are not drafted
])
def test_draft_text(text, draft):
    assert CallDrafter(HR_TOOLS).draft(C + text) == draft


@pytest.mark.parametrize("value, draft", [
    ("Coco", " Huang's"),             # copied from the query, COPY_CHARS long
    ("Sam Carter (cousin), 1577587650", "0"),
    ("", ""),                        # nothing written yet: no anchor in the query
    ("Bob", ""),                     # not in the query
])
def test_string_values_are_copied_from_the_query(value, draft):
    query = "Coco Huang's emergency contact should now be Sam Carter (cousin), 15775876500"
    text = C + "call:update_contact_info{employee_name:<escape>" + value
    if value.startswith("Sam"):
        text = C + "call:update_contact_info{employee_name:<escape>Coco Huang<escape>,field:<escape>" \
            "emergency_contact<escape>,new_value:<escape>" + value
    assert CallDrafter(HR_TOOLS).draft(text, query) == draft


def test_no_draft_outside_a_call():
    drafter = CallDrafter(HR_TOOLS)
    assert drafter.draft("Hello") == ""
    assert drafter.draft(C + "call:search_policy{query:<escape>x<escape>}<end_function_call>" + C + "call:") == ""


def test_tool_without_parameters_closes_at_once():
    drafter = CallDrafter([{"name": "ping", "description": "", "parameters": {"type": "object"}}, *HR_TOOLS])
    assert drafter.draft(C + "call:pi") == "ng{" + END


class OracleDrafter:
    """Drafts the known greedy continuation, `right` tokens of it, then `wrong` made-up tokens."""

    def __init__(self, answer: list[int], right: int, wrong: int):
        self.answer, self.right, self.wrong = answer, right, wrong

    def draft_ids(self, new, call_open_id, encode, decode, source=""):
        rest = self.answer[len(new):]
        return rest[: self.right] + [(t - 106) % 256 + 107 for t in rest[self.right: self.right + self.wrong]]


@pytest.fixture(scope="module")
def router():
    tokenizer = make_tiny_tokenizer()
    return Router(make_tiny_model(len(tokenizer)), tokenizer, HR_TOOLS[:2], max_new_tokens=40)


@pytest.mark.parametrize("right, wrong", [(6, 0), (2, 3), (0, 4), (39, 0)])
def test_verified_drafts_give_the_greedy_tokens(router, right, wrong):
    ids = router.encode(router.render("查询张三的年假"))
    plain, timings = router.generate_ids(ids)
    assert len(plain) == 40 and timings["forward_steps"] == 39
    router.drafter = OracleDrafter(plain, right, wrong)
    try:
        drafted, timings = router.generate_ids(ids, use_draft=True)
    finally:
        router.drafter = None
    assert drafted == plain
    assert timings["forward_steps"] == -(-39 // (right + 1))  # each step yields the accepted draft + 1 token


def test_drafted_decoding_stops_on_a_stop_token_inside_the_draft(router):
    ids = router.encode(router.render("hi"))
    plain, _ = router.generate_ids(ids)
    router.stop_ids = router.stop_ids | {plain[10]}
    router.drafter = OracleDrafter(plain, 8, 0)
    try:
        drafted, _ = router.generate_ids(ids, use_draft=True)
    finally:
        router.drafter = None
        router.stop_ids = router.stop_ids - {plain[10]}
    assert drafted == plain[: plain.index(plain[10]) + 1]
