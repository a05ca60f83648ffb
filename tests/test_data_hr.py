"""The bundled HR dataset: valid, covering, independent of the test set, reproducible, and its xlsx round-trips."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from src.data_engine import hr_dataset
from src.data_engine.convert import check_file, convert, target_of
from src.data_engine.formatter import ACTIVATION_SENTENCE, render_conversation
from src.utils.io import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TOOLS_FILE = ROOT / "data/tools/hr_tools.json"
PROCESSED = ROOT / "data/processed/hr_functions.jsonl"
TEST = ROOT / "data/test.jsonl"
XLSX = ROOT / "data/raw/hr_functions.xlsx"


@pytest.fixture(scope="module")
def tools():
    return read_json(TOOLS_FILE)


@pytest.fixture(scope="module")
def train():
    return [obj for _, obj in read_jsonl(PROCESSED)]


@pytest.fixture(scope="module")
def test_cases():
    return [obj for _, obj in read_jsonl(TEST)]


def test_catalog_is_the_shared_one(tools):
    shared = ROOT.parent / "shared" / "hr_tools.json"
    if shared.exists():
        assert tools == read_json(shared)
    assert len(tools) == 10


def test_bundled_files_pass_validation():
    report = check_file(PROCESSED, on_error="fail")
    assert report.n_ok == report.n_rows >= 900
    report = check_file(TEST, TOOLS_FILE, on_error="fail")
    assert report.n_ok == report.n_rows >= 150


def test_processed_shape(train, tools):
    for rec in train[:50]:
        assert set(rec) == {"messages", "tools"} and rec["tools"] == tools
        assert rec["messages"][0] == {"role": "developer", "content": ACTIVATION_SENTENCE}
        assert rec["messages"][1]["role"] == "user"
        render_conversation(rec["messages"], rec["tools"])


def test_every_function_has_enough_samples_and_every_enum_is_covered(train, test_cases, tools):
    counts = Counter(target_of(r) for r in train)
    names = [t["function"]["name"] for t in tools]
    assert all(counts[n] >= 80 for n in names), counts
    assert 0.10 <= counts["(no call)"] / len(train) <= 0.15
    test_counts = Counter(c["expected_tool"] for c in test_cases)
    assert len(test_cases) >= 150 and all(test_counts[n] >= 10 for n in names)
    assert 0.12 <= test_counts[None] / len(test_cases) <= 0.18
    calls = [(r["messages"][-1]["tool_calls"][0]["function"]) for r in train if r["messages"][-1].get("tool_calls")]
    test_calls = [{"name": c["expected_tool"], "arguments": c["expected_arguments"]} for c in test_cases if c["expected_tool"]]
    for tool in tools:
        fn = tool["function"]
        for arg, schema in fn["parameters"]["properties"].items():
            for value in schema.get("enum", []):
                for split, cs in (("train", calls), ("test", test_calls)):
                    n = sum(1 for c in cs if c["name"] == fn["name"] and c["arguments"].get(arg) == value)
                    assert n >= (8 if split == "train" else 1), f"{split}: {fn['name']}.{arg}={value} has {n} samples"


def test_optional_arguments_only_when_stated(train):
    """Free-text arguments are copied verbatim from the query, so they must appear in it."""
    for rec in train:
        last = rec["messages"][-1]
        if not last.get("tool_calls"):
            continue
        query = rec["messages"][1]["content"]
        args = last["tool_calls"][0]["function"]["arguments"]
        for key in ("employee_name", "reason", "description", "new_value", "query"):
            if key in args:
                assert args[key] in query, (key, args[key], query)
        for key in ("start_date", "end_date", "date", "month"):
            if key in args:
                assert args[key].startswith(f"{hr_dataset.YEAR}-")


def test_both_languages_and_name_styles(train):
    queries = [r["messages"][1]["content"] for r in train]
    zh = sum(1 for q in queries if hr_dataset._CJK.search(q))
    assert 0.3 < zh / len(queries) < 0.8
    text = "\n".join(queries)
    styles = {  # two- and three-character, compound surname, English, pinyin
        "zh2": [n for n in hr_dataset.TRAIN_BANK.names_zh if len(n) == 2],
        "zh3": [n for n in hr_dataset.TRAIN_BANK.names_zh if len(n) == 3],
        "compound": [n for n in hr_dataset.TRAIN_BANK.names_zh if n[:2] in ("欧阳", "上官", "司马", "诸葛", "慕容")],
        "en": ["John Smith", "Emily Johnson", "Michael Brown", "Sarah Davis"],
        "pinyin": ["Li Wei", "Zhang San", "Wang Fang", "Liu Yang"],
    }
    for style, names in styles.items():
        assert sum(name in text for name in names) >= min(3, len(names)), style


def test_training_bank_is_broad_and_written_apart_from_the_test_bank():
    train_t, test_t = hr_dataset.TRAIN_TEMPLATES, hr_dataset.TEST_TEMPLATES
    assert all(len(train_t[tool]) >= 25 for tool in train_t), {tool: len(ts) for tool, ts in train_t.items()}
    for tool in ("get_employee_info", "update_contact_info"):
        fields = Counter(fixed.get("field") for fixed, _ in train_t[tool])
        assert min(fields.values()) >= 8, (tool, fields)
    shared = {t for ts in train_t.values() for _, t in ts} & {t for ts in test_t.values() for _, t in ts}
    assert not shared
    test_typos = hr_dataset.TEST_BANK.typos.items()
    assert not set(hr_dataset.TRAIN_BANK.typos.items()) & set(test_typos)


def test_no_leakage_between_train_and_test(train, test_cases):
    hr_dataset.assert_no_leakage(train, test_cases)
    raw, masked = hr_dataset.max_similarity(train, test_cases)
    assert raw < hr_dataset.NEAR_DUP and masked < hr_dataset.PATTERN_DUP


def test_leakage_check_catches_planted_leaks(train, test_cases):
    copied = dict(test_cases[0], user_content=train[0]["messages"][1]["content"] + "!")
    with pytest.raises(AssertionError, match="near-duplicate"):
        hr_dataset.assert_no_leakage(train, [copied])
    # the same sentence pattern with other names and dates is a leak too
    q = "查询欧阳娜娜的年假"
    seen = {"messages": [{"role": "developer", "content": ACTIVATION_SENTENCE}, {"role": "user", "content": q},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                             "name": "get_leave_balance", "arguments": {"employee_name": "欧阳娜娜", "leave_type": "annual"}}}]}],
            "tools": []}
    case = {"user_content": "查询钟书宁的病假", "expected_tool": "get_leave_balance",
            "expected_arguments": {"employee_name": "钟书宁", "leave_type": "sick"}}
    with pytest.raises(AssertionError, match="shared pattern"):
        hr_dataset.assert_no_leakage([seen], [case])


def test_generator_is_deterministic_and_matches_files(tools, train, test_cases):
    built = hr_dataset.build(tools)
    assert built.processed == train
    assert built.test_cases == test_cases
    assert hr_dataset.xlsx_bytes(built.simple_rows) == XLSX.read_bytes()


def test_xlsx_round_trip_equals_processed(tmp_path):
    assert XLSX.stat().st_size < 1_000_000
    out = tmp_path / "from_xlsx.jsonl"
    report = convert(XLSX, out, tools_file=TOOLS_FILE)
    assert report.n_ok == report.n_rows and not report.errors
    assert out.read_bytes() == PROCESSED.read_bytes()


def test_no_relative_dates(train, test_cases):
    """Without a current date in the prompt a relative date has no determinable target: calls use absolute dates."""
    pairs = [(r["messages"][1]["content"], r["messages"][-1]["tool_calls"][0]["function"]["arguments"])
             for r in train if r["messages"][-1].get("tool_calls")]
    pairs += [(c["user_content"], c["expected_arguments"]) for c in test_cases if c["expected_tool"]]
    relative = ("今天", "明天", "后天", "昨天", "下周", "上周", "下个月", "上个月", "tomorrow", "yesterday", "today",
                "next week", "last week", "next month", "last month")
    for query, args in pairs:
        for value in args.values():  # free-text values (a reason like "上周末加了班", a name like 周子涵) are copied text
            if isinstance(value, str):
                query = query.replace(value, "")
        assert not any(w in query.lower() for w in relative), query


def test_cn_numerals():
    assert [hr_dataset.cn_int(n) for n in (5, 10, 15, 20, 21, 105, 110, 1050, 2300)] == [
        "五", "十", "十五", "二十", "二十一", "一百零五", "一百一十", "一千零五十", "二千三百"]
    assert hr_dataset.cn_int(200, liang=True) == "两百" and hr_dataset.cn_int(2, liang=True) == "两"
    assert json.dumps(hr_dataset._num(128.0)) == "128" and hr_dataset._num(1280.5) == 1280.5


def test_composed_names_are_deterministic_unique_sexed_and_exclude_given_names():
    from src.data_engine.hr_names import composed_names

    zh, en, female, male = composed_names(7, 40, 30, exclude={"王伟"})
    assert (zh, en) == composed_names(7, 40, 30, exclude={"王伟"})[:2]
    assert len(set(zh)) == 40 and len(set(en)) == 30 and "王伟" not in zh
    assert female | male == set(zh) | set(en) and not female & male
    assert all(hr_dataset._CJK.search(n) for n in zh) and not any(hr_dataset._CJK.search(n) for n in en)
    assert {len(n) for n in zh} >= {2, 3}


def test_training_names_are_mostly_composed_and_never_a_test_name():
    test_names = set(hr_dataset.TEST_BANK.names_zh + hr_dataset.TEST_BANK.names_en)
    train_names = hr_dataset.TRAIN_BANK.names_zh + hr_dataset.TRAIN_BANK.names_en
    assert len(train_names) >= 300 and not test_names & set(train_names)
    composed = set(hr_dataset._ZH + hr_dataset._EN)
    assert composed <= set(train_names) and len(composed) >= 250
    assert composed <= hr_dataset.FEMALE | hr_dataset.MALE  # maternity/paternity requests pick by sex


def test_third_set_values_that_are_test_values_stay_out():
    bank = dataclasses.replace(hr_dataset.TRAIN_BANK, overtime_reasons=(["赶工"], ["a deadline"]))
    hr_dataset._add_values(bank, {"overtime_reasons": (["赶工", "新的", "测试值"], ["a deadline", "new one"])},
                           exclude={"测试值"})
    assert bank.overtime_reasons == (["赶工", "新的"], ["a deadline", "new one"])
    train_values = hr_dataset._strings(hr_dataset.TRAIN_BANK.overtime_reasons)
    assert not train_values & hr_dataset._strings(hr_dataset.TEST_BANK.overtime_reasons)
