"""Which arguments the training data always copies from the request, and the file that carries them."""
from __future__ import annotations

import json

import pytest

from src.data_engine.copied_arguments import (
    COPIED_FILE, MIN_SAMPLES, learn_copied_arguments, read_copied_arguments, stated_numbers, write_copied_arguments,
)
from src.utils.errors import UserError
from tests.test_eval_constrain import HR_TOOLS


def record(request: str, name: str, arguments) -> dict:
    return {"messages": [{"role": "user", "content": request},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                             "name": name, "arguments": arguments}}]}]}


def test_keys_copied_in_every_call_are_learnt_and_a_single_exception_rules_one_out():
    names = ["Coco Huang", "张三", "Deng Hao", "令狐晨", "Peng Yu", "Bella Xu"]
    records = [record(f"查询{n}的年假 June 17", "get_leave_balance", {"employee_name": n, "leave_type": "annual"})
               for n in names]
    records += [record(f"{n} 加班 June 17, 因为审计", "request_overtime",
                       json.dumps({"employee_name": n, "date": "2026-06-17", "hours": 2, "reason": "审计"}))
                for n in names]  # arguments as a JSON string are read too
    assert learn_copied_arguments(records, HR_TOOLS) == {
        "get_leave_balance": ["employee_name"],  # leave_type is an enum: never a copy
        "request_overtime": ["employee_name", "reason"]}  # date is written 2026-06-17: not a copy; hours 2 not stated
    records.append(record("Coco 的年假", "get_leave_balance", {"employee_name": "Coco Huang"}))
    assert "get_leave_balance" not in learn_copied_arguments(records, HR_TOOLS)
    untrimmed = records[6:12] + [record("加班 Amy Li", "request_overtime", {"employee_name": " Amy Li"})]
    assert learn_copied_arguments(untrimmed, HR_TOOLS) == {"request_overtime": ["reason"]}  # a value with a space


@pytest.mark.parametrize("text, numbers", [
    ("报销餐费五百四十块", {"540"}),
    ("一千二百八十元五角", {"1280", "1280.5", "5"}),
    ("三块五的咖啡", {"3", "3.5"}),
    ("两个半小时", {"2", "2.5", "0.5"}),
    ("加班半小时", {"0.5"}),
    ("三点五个小时", {"3", "3.5"}),
    ("两万零五元", {"20005"}),
    ("十二个小时", {"12"}),
    ("$1,850.50 for meals", {"1850.5"}),
    ("¥1,280.00", {"1280"}),
    ("6月1号的five hours overtime", {"5"}),  # a number word right after a Chinese character; a date's numbers aren't
    ("eight and a half hours", {"8.5"}),
    ("someone", set()),  # "one" inside a word is not a number
    ("2026-03-05", set()),
    ("6 hours OT on July 22, 2026, 2 more on the 3rd of March", {"6", "2"}),
    ("2026年3月10日多干了10个小时，三月十号三个小时，报销2026元", {"10", "3", "2026"}),
    ("May 5th 2026, 8 hours; may I claim 300", {"8", "300"}),
    ("10个小时，记一下加班", {"10"}),  # 一下 (note it down), 一共 (in total) are words, not the number one
    ("一共一个半小时", {"1", "1.5", "0.5"}),
])
def test_stated_numbers_read_digits_chinese_numerals_and_english_words(text, numbers):
    assert stated_numbers(text) == numbers


def test_number_keys_stated_in_every_call_are_learnt():
    hours = [("加班两个半小时", 2.5), ("overtime 3 hours", 3), ("加班1.5h", 1.5), ("five hours of overtime", 5),
             ("加班十二个小时", 12), ("OT eight and a half hours", 8.5)]
    records = [record(f"张三{q}", "request_overtime", {"employee_name": "张三", "date": "2026-06-17", "hours": h})
               for q, h in hours]
    assert learn_copied_arguments(records, HR_TOOLS) == {"request_overtime": ["employee_name", "hours"]}
    records.append(record("张三加班一下午", "request_overtime", {"employee_name": "张三", "hours": 4}))
    assert learn_copied_arguments(records, HR_TOOLS) == {"request_overtime": ["employee_name"]}


def test_too_few_calls_prove_nothing():
    records = [record(f"查询{n}的年假", "get_leave_balance", {"employee_name": n})
               for n in ["甲", "乙", "丙", "丁", "戊", "己"][:MIN_SAMPLES - 1]]
    assert learn_copied_arguments(records, HR_TOOLS) == {}
    records.append(record("查询庚的年假", "get_leave_balance", {"employee_name": "庚"}))
    assert learn_copied_arguments(records, HR_TOOLS) == {"get_leave_balance": ["employee_name"]}


def test_the_file_round_trips_and_a_bad_one_is_named(tmp_path):
    write_copied_arguments(tmp_path, {"get_payslip": ["employee_name"]})
    assert read_copied_arguments(tmp_path) == {"get_payslip": ["employee_name"]}
    assert read_copied_arguments(tmp_path / "missing") == {} and read_copied_arguments(None) == {}
    (tmp_path / COPIED_FILE).write_text('{"get_payslip": "employee_name"}', encoding="utf-8")
    with pytest.raises(UserError, match=COPIED_FILE):
        read_copied_arguments(tmp_path)
