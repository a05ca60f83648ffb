"""convert / check_file: every accepted row shape, and every bad input fails on one line naming file and line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from src.data_engine.convert import DEFAULT_ANSWER, check_file, convert, load_records
from src.data_engine.formatter import ACTIVATION_SENTENCE, render_conversation
from src.data_engine.readers import read_rows
from src.utils.errors import UserError
from src.utils.io import MAX_LINE_BYTES, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "data/tools/hr_tools.json"
BAD = Path(__file__).with_name("bad_files")
GOOD = {"user_content": "查询张三的年假", "tool_name": "get_leave_balance",
        "tool_arguments": {"employee_name": "张三", "leave_type": "annual"}}

# file -> (line, what the message must contain)
BAD_FILES = {
    "broken_json.jsonl": (2, "not JSON"),
    "wrong_type.jsonl": (2, "tool_arguments.amount: wrong type: expected number, got string"),
    "unknown_tool.jsonl": (2, "tool_name: unknown function 'book_meeting_room'"),
    "unknown_argument.jsonl": (2, "tool_arguments.currency: argument not in the schema"),
    "missing_required.jsonl": (2, "tool_arguments.start_date: missing required argument"),
    "bad_enum.jsonl": (2, 'tool_arguments.leave_type: value "bereavement" not allowed'),
    "empty_query.jsonl": (2, "user_content: empty query"),
    "duplicate.jsonl": (2, "user_content: duplicate of line 1"),
    "args_without_tool.jsonl": (2, "tool_arguments: arguments given but tool_name is empty"),
    "messages_no_target.jsonl": (2, "messages: last message must be the assistant's reply"),
    "sharegpt_bad_call.jsonl": (2, "conversations[1].value: not JSON"),
    "unknown_shape.jsonl": (2, "unknown row shape"),
    "bad_arguments.csv": (3, "tool_arguments: not JSON"),
    "gbk.jsonl": (1, "not valid UTF-8"),
    "empty.jsonl": (None, "file is empty"),
    "binary.jsonl": (None, "binary file"),
}


def _assert_fails_cleanly(src: Path, tmp_path: Path, line: int | None, needle: str) -> str:
    out = tmp_path / "out" / "train.jsonl"
    with pytest.raises(UserError) as info:
        convert(src, out, tools_file=TOOLS)
    msg = str(info.value)
    assert "\n" not in msg
    prefix = f"{src}:{line}: " if line is not None else f"{src}: "
    assert msg.startswith(prefix), msg
    assert needle in msg, msg
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir()), "partial or temp output left behind"
    return msg


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_fails_with_one_line_naming_file_and_line(name, tmp_path):
    line, needle = BAD_FILES[name]
    _assert_fails_cleanly(BAD / name, tmp_path, line, needle)


def test_bad_files_corpus_is_complete():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(BAD_FILES)


def test_huge_line_is_rejected(tmp_path):
    src = tmp_path / "huge.jsonl"
    big = dict(GOOD, user_content="x" * (MAX_LINE_BYTES + 10))
    src.write_text(json.dumps(GOOD, ensure_ascii=False) + "\n" + json.dumps(big) + "\n", encoding="utf-8")
    _assert_fails_cleanly(src, tmp_path, 2, "line longer than")


def test_existing_output_is_untouched_on_failure(tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text("old\n")
    with pytest.raises(UserError):
        convert(BAD / "bad_enum.jsonl", out, tools_file=TOOLS)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_drop_policy_keeps_good_rows_and_reports_bad_ones(tmp_path):
    src = tmp_path / "mixed.jsonl"
    lines = [(BAD / n).read_text(encoding="utf-8").splitlines()[1] for n in ("bad_enum.jsonl", "unknown_tool.jsonl")]
    src.write_text("\n".join([json.dumps(GOOD, ensure_ascii=False), lines[0], "{oops", lines[1]]) + "\n", encoding="utf-8")
    report = convert(src, tmp_path / "out.jsonl", tools_file=TOOLS, on_error="drop")
    assert report.n_ok == 1 and report.n_rows == 4
    assert [(e.line, e.field) for e in report.errors] == [(2, "tool_arguments.leave_type"), (3, ""), (4, "tool_name")]
    file, line, field, reason = report.errors[0]
    assert file == str(src) and line == 2 and "not allowed" in reason
    assert len(list(read_jsonl(tmp_path / "out.jsonl"))) == 1


def test_no_valid_rows_is_fatal_even_when_dropping(tmp_path):
    src = tmp_path / "only_bad.jsonl"
    src.write_text('{"user_content": "", "tool_name": ""}\n')
    with pytest.raises(UserError, match=r"no valid rows \(1 read\); first problem: .*only_bad.jsonl:1: user_content: empty query"):
        convert(src, tmp_path / "o.jsonl", tools_file=TOOLS, on_error="drop")


def test_simple_rows_need_a_catalog(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(GOOD, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"s.jsonl:1: tool_name: .*pass --tools"):
        convert(src, tmp_path / "o.jsonl")


def _records(path: Path) -> list[dict]:
    return [obj for _, obj in read_jsonl(path)]


def _convert(tmp_path: Path, rows: list[dict], **kw) -> list[dict]:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    convert(src, tmp_path / "out.jsonl", **kw)
    return _records(tmp_path / "out.jsonl")


def test_simple_shape(tmp_path):
    rows = [
        GOOD,
        {"user_content": " 张三 3月5日请病假 ", "tool_name": "request_leave",
         "tool_arguments": '{"employee_name": "张三", "leave_type": "sick", "start_date": "2026-03-05"}'},
        {"user_content": "讲个笑话", "tool_name": None},
        {"user_content": "what's the weather", "tool_name": "", "tool_arguments": ""},
        {"user_content": "hello", "tool_name": "none", "answer": "Hi! How can I help?"},
        {"user_content": "查询李四的年假", "tool_name": "get_leave_balance", "tool_arguments": {"employee_name": "李四"},
         "system": "Current date: 2026-03-01"},
    ]
    out = _convert(tmp_path, rows, tools_file=TOOLS)
    tools = json.loads(TOOLS.read_text(encoding="utf-8"))
    assert all(r["tools"] == tools for r in out)
    first = out[0]["messages"]
    assert first[0] == {"role": "developer", "content": ACTIVATION_SENTENCE}
    assert first[1] == {"role": "user", "content": "查询张三的年假"}
    assert first[2] == {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_leave_balance", "arguments": {"employee_name": "张三", "leave_type": "annual"}}}]}
    assert out[1]["messages"][1]["content"] == "张三 3月5日请病假"
    assert out[1]["messages"][2]["tool_calls"][0]["function"]["arguments"]["start_date"] == "2026-03-05"
    assert out[2]["messages"][2] == {"role": "assistant", "content": DEFAULT_ANSWER["zh"]}
    assert out[3]["messages"][2] == {"role": "assistant", "content": DEFAULT_ANSWER["en"]}
    assert out[4]["messages"][2] == {"role": "assistant", "content": "Hi! How can I help?"}
    assert out[5]["messages"][0]["content"] == f"Current date: 2026-03-01\n{ACTIVATION_SENTENCE}"
    for r in out:
        render_conversation(r["messages"], r["tools"])  # every output renders


def test_messages_shape_hf_and_openai_variants(tmp_path):
    tools = json.loads(TOOLS.read_text(encoding="utf-8"))
    rows = [
        {"messages": [  # Google Mobile Actions style: developer with date context, dict arguments, own tools
            {"role": "developer", "content": f"Current date and time: 2026-01-16T00:50:30\n{ACTIVATION_SENTENCE}"},
            {"role": "user", "content": "张三1月的工资条"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "get_payslip",
                                                               "arguments": {"employee_name": "张三", "month": "2026-01"}}}]}],
         "tools": [t["function"] for t in tools]},
        {"messages": [  # OpenAI style: system prompt, JSON-string arguments, tool reply, final answer; no tools -> --tools
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "王五在哪个部门"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_employee_info", "arguments": '{"employee_name": "王五", "field": "department"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"department": "Sales"}'},
            {"role": "assistant", "content": "王五在销售部。"}]},
    ]
    out = _convert(tmp_path, rows, tools_file=TOOLS)
    a, b = out
    assert a["messages"][0]["content"].startswith("Current date and time") and a["messages"][0]["content"].count(ACTIVATION_SENTENCE) == 1
    assert a["tools"] == tools  # bare tools come out OpenAI-wrapped
    assert b["messages"][0] == {"role": "developer", "content": f"Be brief.\n{ACTIVATION_SENTENCE}"}
    assert b["messages"][1] == {"role": "user", "content": "王五在哪个部门"}
    assert b["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"employee_name": "王五", "field": "department"}
    assert b["messages"][3] == {"role": "tool", "content": {"name": "get_employee_info", "response": {"department": "Sales"}}}
    assert b["messages"][4] == {"role": "assistant", "content": "王五在销售部。"}
    for r in out:
        render_conversation(r["messages"], r["tools"])


def test_messages_shape_validates_calls_against_own_tools(tmp_path):
    row = {"messages": [{"role": "user", "content": "张三的工资"},
                        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                            "name": "get_payslip", "arguments": {"employee_name": "张三", "month": 3}}}]}]}
    src = tmp_path / "m.jsonl"
    src.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"m.jsonl:1: messages\[1\].tool_calls\[0\].function.arguments.month: wrong type"):
        convert(src, tmp_path / "o.jsonl", tools_file=TOOLS)


GLAIVE_TOOLS = [{"name": "get_exchange_rate", "description": "Get the exchange rate between two currencies",
                 "parameters": {"type": "object", "properties": {
                     "base_currency": {"type": "string", "description": "The currency to convert from"},
                     "target_currency": {"type": "string", "description": "The currency to convert to"}},
                     "required": ["base_currency", "target_currency"]}}]


def test_sharegpt_glaive_toolcall_shape(tmp_path):
    row = {"conversations": [
        {"from": "human", "value": "Hi, I need the exchange rate from USD to EUR."},
        {"from": "function_call", "value": '{"name": "get_exchange_rate", "arguments": {"base_currency": "USD", "target_currency": "EUR"}}'},
        {"from": "observation", "value": '{"exchange_rate": 0.85}'},
        {"from": "gpt", "value": "The current exchange rate from USD to EUR is 0.85."}],
        "tools": json.dumps(GLAIVE_TOOLS)}
    no_call = {"conversations": [{"from": "human", "value": "Tell me a joke"},
                                 {"from": "gpt", "value": "Sorry, I can only fetch exchange rates."}],
               "tools": json.dumps(GLAIVE_TOOLS), "system": "You are helpful."}
    out = _convert(tmp_path, [row, no_call])
    m = out[0]["messages"]
    assert [x["role"] for x in m] == ["developer", "user", "assistant", "tool", "assistant"]
    assert m[2]["tool_calls"] == [{"type": "function", "function": {
        "name": "get_exchange_rate", "arguments": {"base_currency": "USD", "target_currency": "EUR"}}}]
    assert m[3]["content"] == {"name": "get_exchange_rate", "response": {"exchange_rate": 0.85}}
    assert out[0]["tools"] == [{"type": "function", "function": GLAIVE_TOOLS[0]}]
    assert out[1]["messages"][0]["content"] == f"You are helpful.\n{ACTIVATION_SENTENCE}"
    text = render_conversation(m, out[0]["tools"])
    assert "<start_function_call>call:get_exchange_rate{" in text and "response:get_exchange_rate{exchange_rate:0.85}" in text


def test_sharegpt_unknown_argument_is_reported_on_the_turn(tmp_path):
    row = {"conversations": [{"from": "human", "value": "rate?"},
                             {"from": "function_call", "value": '{"name": "get_exchange_rate", "arguments": {"base": "USD"}}'}],
           "tools": json.dumps(GLAIVE_TOOLS)}
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"g.jsonl:1: conversations\[1\].value.arguments.base: argument not in the schema"):
        convert(src, tmp_path / "o.jsonl")


def test_json_array_file_reports_item_lines(tmp_path):
    src = tmp_path / "demo.json"
    good = {"conversations": [{"from": "human", "value": "rate?"}, {"from": "function_call", "value": json.dumps(
        {"name": "get_exchange_rate", "arguments": {"base_currency": "USD", "target_currency": "EUR"}})}], "tools": json.dumps(GLAIVE_TOOLS)}
    bad = dict(good, conversations=[{"from": "human", "value": ""}, good["conversations"][1]])
    src.write_text(json.dumps([good, bad], indent=2))
    bad_line = src.read_text().splitlines().index("  {", 3) + 1
    with pytest.raises(UserError, match=rf"demo.json:{bad_line}: conversations\[0\].value: empty query"):
        convert(src, tmp_path / "o.jsonl")


def test_spreadsheets_csv_xlsx_custom_columns_and_directory_batch(tmp_path):
    import openpyxl

    src = tmp_path / "batch"
    src.mkdir()
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["问题", "函数", "参数", "回答"])
    ws.append(["查询张三的年假", "get_leave_balance", '{"employee_name": "张三", "leave_type": "annual"}', None])
    ws.append([None, None, None, None])  # blank rows are skipped, row numbers stay true
    ws.append(["你好", None, None, "您好！"])
    wb.save(src / "a.xlsx")
    (src / "b.csv").write_text('问题,函数,参数\n李四的工资条 2026年3月,get_payslip,"{""employee_name"": ""李四"", ""month"": ""2026-03""}"\n',
                               encoding="utf-8")
    (src / "notes.txt").write_text("ignored")
    columns = {"user_content": "问题", "tool_name": "函数", "tool_arguments": "参数", "answer": "回答"}
    rows = list(read_rows(src, columns))
    assert [(Path(r.file).name, r.line) for r in rows] == [("a.xlsx", 2), ("a.xlsx", 4), ("b.csv", 2)]
    report = convert(src, tmp_path / "out.jsonl", tools_file=TOOLS, columns=columns)
    assert report.n_ok == 3 and report.shapes["simple"] == 3
    out = _records(tmp_path / "out.jsonl")
    assert out[1]["messages"][2] == {"role": "assistant", "content": "您好！"}
    assert out[2]["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"employee_name": "李四", "month": "2026-03"}


def test_spreadsheet_missing_column_and_fake_xlsx(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.append(["question", "answer"])
    wb.active.append(["hi", "hello"])
    wb.save(tmp_path / "cols.xlsx")
    with pytest.raises(UserError, match=r"cols.xlsx:1: missing column 'user_content' .*--columns"):
        convert(tmp_path / "cols.xlsx", tmp_path / "o.jsonl", tools_file=TOOLS)
    (tmp_path / "fake.xlsx").write_text("user_content,tool_name\n")
    with pytest.raises(UserError, match=r"fake.xlsx: not an .xlsx workbook"):
        convert(tmp_path / "fake.xlsx", tmp_path / "o.jsonl", tools_file=TOOLS)
    assert not (tmp_path / "o.jsonl").exists()


def test_check_file_on_test_shape(tmp_path):
    src = tmp_path / "test.jsonl"
    cases = [
        {"user_content": "查询张三的年假", "expected_tool": "get_leave_balance"},  # the guide's routing-only form
        {"user_content": "李四请病假", "expected_tool": "request_leave",
         "expected_arguments": {"employee_name": "李四", "leave_type": "sick", "start_date": "2026-03-05"}},
        {"user_content": "讲个笑话", "expected_tool": None, "expected_arguments": {}},
        {"user_content": "订会议室", "expected_tool": "book_room"},
        {"user_content": "王五的年假", "expected_tool": "get_leave_balance", "expected_arguments": {"employee_name": "王五", "leave_type": "yearly"}},
    ]
    src.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    report = check_file(src, TOOLS, on_error="drop")
    assert report.n_ok == 3 and report.shapes["test"] == 5
    assert [(e.line, e.field) for e in report.errors] == [(4, "expected_tool"), (5, "expected_arguments.leave_type")]
    with pytest.raises(UserError, match=r"test.jsonl:4: expected_tool: unknown function 'book_room'"):
        check_file(src, TOOLS, on_error="fail")
    with pytest.raises(UserError, match="this is a test file"):
        convert(src, tmp_path / "o.jsonl", tools_file=TOOLS)


def test_max_seq_length_check(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(GOOD, ensure_ascii=False) + "\n", encoding="utf-8")
    count = len  # characters as "tokens": deterministic and tokenizer-free
    records, _ = load_records(src, TOOLS)
    n = count(render_conversation(records[0]["messages"], records[0]["tools"]))
    assert check_file(src, TOOLS, max_seq_length=n, count_tokens=count).n_ok == 1
    with pytest.raises(UserError, match=rf"s.jsonl:1: rendered sample is {n} tokens, over max_seq_length {n - 1}"):
        convert(src, tmp_path / "o.jsonl", tools_file=TOOLS, max_seq_length=n - 1, count_tokens=count)


def test_bad_catalog_is_fatal_and_names_the_tools_file(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "str"}}}}]))
    with pytest.raises(UserError, match=r"tools.json: tools\[0\].parameters.properties.x.type: unknown type 'str'"):
        convert(BAD / "unknown_tool.jsonl", tmp_path / "o.jsonl", tools_file=tools)


def test_on_error_value_is_checked(tmp_path):
    with pytest.raises(UserError, match="on_error"):
        convert(BAD / "bad_enum.jsonl", tmp_path / "o.jsonl", tools_file=TOOLS, on_error="skip")


def test_error_messages_are_single_lines_for_whole_corpus(tmp_path):
    for name in BAD_FILES:
        report_or_error = None
        try:
            check_file(BAD / name, TOOLS, on_error="drop")
        except UserError as exc:
            report_or_error = str(exc)
        if report_or_error:
            assert re.match(rf"^{re.escape(str(BAD / name))}(:\d+)?: ", report_or_error) and "\n" not in report_or_error


def test_directory_batch_does_not_read_its_own_output(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps(GOOD, ensure_ascii=False) + "\n", encoding="utf-8")
    out = src / "all.jsonl"
    assert convert(src, out, tools_file=TOOLS).n_ok == 1
    assert convert(src, out, tools_file=TOOLS).n_ok == 1  # second run: all.jsonl is the output, not an input


def test_unrenderable_row_is_rejected(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "orphan reply"},
                        {"role": "assistant", "content": "ok"}]}
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"r.jsonl:1: messages: cannot be rendered in the FunctionGemma format: a tool message"):
        convert(src, tmp_path / "o.jsonl", tools_file=TOOLS)


def test_parallel_calls_and_replies_keep_their_names(tmp_path):
    tools = [{"name": n, "description": n, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
             for n in ("weather", "time")]
    row = {"conversations": [
        {"from": "human", "value": "weather and time in Oslo?"},
        {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Oslo"}},
                                                       {"name": "time", "arguments": {"city": "Oslo"}}])},
        {"from": "observation", "value": '{"temp": 3}'}, {"from": "observation", "value": '{"time": "10:00"}'},
        {"from": "gpt", "value": "3 degrees, 10:00."}], "tools": json.dumps(tools)}
    hf = {"messages": [{"role": "user", "content": "time in Oslo, then weather"},
                       {"role": "assistant", "tool_calls": [
                           {"id": "a", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}},
                           {"id": "b", "type": "function", "function": {"name": "time", "arguments": {"city": "Oslo"}}}]},
                       {"role": "tool", "tool_call_id": "b", "content": "10:00"},
                       {"role": "tool", "tool_call_id": "a", "content": "3 degrees"},
                       {"role": "assistant", "content": "10:00 and 3 degrees."}], "tools": tools}
    out = _convert(tmp_path, [row, hf])
    assert [m["content"]["name"] for m in out[0]["messages"] if m["role"] == "tool"] == ["weather", "time"]
    assert len(out[0]["messages"][2]["tool_calls"]) == 2
    assert [m["content"]["name"] for m in out[1]["messages"] if m["role"] == "tool"] == ["time", "weather"]
