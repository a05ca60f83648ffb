"""User rows in any accepted shape -> validated processed JSONL (HF conversational shape), written all or nothing.

Accepted row shapes (detected per row):
  simple        {"user_content", "tool_name", "tool_arguments", "answer"?, "system"?}   (JSONL/JSON/CSV/XLSX)
  messages      {"messages": [...], "tools": [...]?}    (HF / Google Mobile Actions)
  sharegpt      {"conversations": [{"from", "value"}...], "tools": "<json>"?, "system"?}  (LLaMA-Factory glaive_toolcall)
  test          {"user_content", "expected_tool", "expected_arguments"?}   (only `check_file` / stats)
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from src.data_engine.readers import RawRow, list_inputs, load_tools, read_rows
from src.data_engine.validate import NO_CALL, Deduper, Issue, ToolCatalog, length_problem, query_key
from src.utils.errors import UserError
from src.utils.io import atomic_write_jsonl

ON_ERROR = ("fail", "drop")
MAX_LISTED_ERRORS = 50
NO_CALL_NAMES = {"", "none", "null", "no_call", "(no call)"}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# Default text target for a simple row with no tool and no answer column: a polite deflection in the query's language.
DEFAULT_ANSWER = {
    "zh": "抱歉，这个请求不在我能处理的范围内。我可以帮您处理人事相关的事务，请问有什么可以帮您？",
    "en": "Sorry, that is outside what I can help with here. I can help with HR requests; what do you need?",
}


@dataclass
class ConvertReport:
    """What happened to each input row; `errors` lists (file, line, field, reason) of every rejected row."""

    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    n_rows: int = 0
    n_ok: int = 0
    errors: list[Issue] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)

    @property
    def n_dropped(self) -> int:
        return self.n_rows - self.n_ok

    def summary(self) -> str:
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(self.shapes.items())) or "none"
        out = f"{self.n_ok}/{self.n_rows} rows valid ({shapes})"
        if self.errors:
            out += f", {len(self.errors)} rejected"
        if self.output:
            out += f" -> {self.output}"
        return out

    def __str__(self) -> str:
        """Summary, then one line per rejected row (capped): what `convert`/`data check` print."""
        lines = [self.summary()] + [str(e) for e in self.errors[:MAX_LISTED_ERRORS]]
        if len(self.errors) > MAX_LISTED_ERRORS:
            lines.append(f"... and {len(self.errors) - MAX_LISTED_ERRORS} more rejected rows")
        return "\n".join(lines)


def language_of(text: str) -> str:
    return "zh" if _CJK.search(text or "") else "en"


def activation_sentence() -> str:
    from src.data_engine.formatter import ACTIVATION_SENTENCE  # lazy: the formatter owns the format

    return ACTIVATION_SENTENCE


def developer_message(context: str | None = None) -> dict:
    """Developer turn = optional context (e.g. current date) then the activation sentence, as FunctionGemma expects."""
    from src.data_engine.formatter import routing_messages  # lazy: the formatter owns the format

    return routing_messages("", (context or "").strip() or None)[0]


def wrap_tools(tools: list) -> list:
    """Output catalogs in one form (OpenAI-wrapped), whatever the input used."""
    out = []
    for tool in tools:
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        out.append(tool)
    return out


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def target_of(record: dict) -> str:
    """Label of a processed record: its final call names, or NO_CALL for a text answer."""
    last = record["messages"][-1]
    calls = last.get("tool_calls") or []
    if not calls:
        return NO_CALL
    return "+".join(c["function"]["name"] for c in calls)


def target_signature(record: dict) -> str:
    last = record["messages"][-1]
    if last.get("tool_calls"):
        return json.dumps([c["function"] for c in last["tool_calls"]], sort_keys=True, ensure_ascii=False)
    return NO_CALL


def query_text(record: dict) -> str:
    """All user turns: the text a duplicate/near-duplicate check compares."""
    return "\n".join(m["content"] for m in record["messages"] if m.get("role") == "user" and isinstance(m.get("content"), str))


def detect_shape(obj: dict) -> str | None:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "expected_tool" in obj:
        return "test"
    if "user_content" in obj or "tool_name" in obj:
        return "simple"
    return None


class _Row:
    """Problems collected while normalising one row, with the field names of the user's own file."""

    def __init__(self):
        self.problems: list[tuple[str, str]] = []

    def bad(self, field_: str, reason: str) -> None:
        self.problems.append((field_, reason))


def _parse_json_field(value, field_: str, row: _Row, want=dict):
    """Arguments may be an object or a JSON string of one (OpenAI, spreadsheets)."""
    if isinstance(value, str):
        if not value.strip():
            return want()
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            row.bad(field_, f"not JSON ({exc.msg} at column {exc.colno})")
            return None
    if value is None:
        return want()
    if not isinstance(value, want):
        row.bad(field_, f"wrong type: expected {'object' if want is dict else 'array'}, got {type(value).__name__}")
        return None
    return value


def _query(value, field_: str, row: _Row) -> str | None:
    if value is None:
        row.bad(field_, "missing field")
        return None
    if not isinstance(value, str):
        row.bad(field_, f"wrong type: expected string, got {type(value).__name__}")
        return None
    if not value.strip():
        row.bad(field_, "empty query")
        return None
    return value.strip()


def _catalog_for(obj_tools, field_: str, default: ToolCatalog | None, row: _Row) -> ToolCatalog | None:
    if obj_tools is None or obj_tools == "" or obj_tools == []:
        if default is None:
            row.bad(field_, "missing field (no tools in the row and no --tools catalog given)")
        return default
    tools = _parse_json_field(obj_tools, field_, row, want=list)
    if tools is None:
        return None
    catalog = ToolCatalog(tools)
    for f, reason in catalog.problems:
        row.bad(f.replace("tools", field_, 1), reason)
    return None if catalog.problems else catalog


def _check_calls(catalog: ToolCatalog, calls: list[dict], fields: list[tuple[str, str]], row: _Row) -> None:
    for c, (name_field, args_field) in zip(calls, fields):
        fn = c["function"]
        for f, reason in catalog.check_call(fn["name"], fn["arguments"], name_field, args_field):
            row.bad(f, reason)


def normalise_simple(obj: dict, catalog: ToolCatalog, row: _Row) -> dict | None:
    query = _query(obj.get("user_content"), "user_content", row)
    name = obj.get("tool_name")
    if name is not None and not isinstance(name, str):
        row.bad("tool_name", f"wrong type: expected string, got {type(name).__name__}")
        return None
    name = (name or "").strip()
    args = _parse_json_field(obj.get("tool_arguments"), "tool_arguments", row)
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        row.bad("system", f"wrong type: expected string, got {type(system).__name__}")
    if query is None or args is None or row.problems:
        return None
    messages = [developer_message(system), {"role": "user", "content": query}]
    if name.lower() in NO_CALL_NAMES:
        if args:
            row.bad("tool_arguments", "arguments given but tool_name is empty (a no-call row takes no arguments)")
            return None
        answer_key = "answer" if obj.get("answer") is not None else "response"
        answer = obj.get(answer_key)
        if answer is not None and not isinstance(answer, str):
            row.bad(answer_key, f"wrong type: expected string, got {type(answer).__name__}")
            return None
        answer = (answer or "").strip() or DEFAULT_ANSWER[language_of(query)]
        messages.append({"role": "assistant", "content": answer})
    else:
        calls = [call(name, args)]
        _check_calls(catalog, calls, [("tool_name", "tool_arguments")], row)
        messages.append({"role": "assistant", "tool_calls": calls})
    return {"messages": messages, "tools": wrap_tools(catalog.tools)}


def _normalise_calls(raw_calls, field_: str, row: _Row) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI/HF tool_calls, bare {"name","arguments"} or ShareGPT call objects -> canonical calls + field names."""
    if isinstance(raw_calls, dict):
        raw_calls = [raw_calls]
    if not isinstance(raw_calls, list) or not raw_calls:
        row.bad(field_, "wrong type: expected a non-empty list of calls")
        return [], []
    calls, fields = [], []
    for i, c in enumerate(raw_calls):
        f = f"{field_}[{i}]" if len(raw_calls) > 1 or field_.endswith("tool_calls") else field_
        if not isinstance(c, dict):
            row.bad(f, f"wrong type: expected object, got {type(c).__name__}")
            continue
        if isinstance(c.get("function"), dict):
            c, f = c["function"], f + ".function"
        if "name" not in c:
            row.bad(f + ".name", "missing field")
            continue
        args = _parse_json_field(c.get("arguments", c.get("parameters")), f + ".arguments", row)
        if args is None:
            continue
        calls.append(call(c["name"], args))
        fields.append((f + ".name", f + ".arguments"))
    return calls, fields


class _ReplyNames:
    """Which call a tool reply answers: by tool_call_id when given, else by position after the last call turn."""

    def __init__(self):
        self.names: list[str] = []
        self.ids: dict[str, str] = {}
        self.used = 0

    def new_calls(self, calls: list[dict], raw_calls=None) -> None:
        self.names, self.used = [], 0
        self.more_calls(calls)
        for rc in raw_calls if isinstance(raw_calls, list) else []:
            fn = rc.get("function") if isinstance(rc, dict) and isinstance(rc.get("function"), dict) else rc
            if isinstance(rc, dict) and rc.get("id") and isinstance(fn, dict):
                self.ids[rc["id"]] = fn.get("name")

    def more_calls(self, calls: list[dict]) -> None:
        self.names += [c["function"]["name"] for c in calls]

    def next(self, call_id=None) -> str | None:
        if call_id in self.ids:
            return self.ids[call_id]
        name = self.names[min(self.used, len(self.names) - 1)] if self.names else None
        self.used += 1
        return name


def _tool_message(content, name: str | None) -> dict:
    if isinstance(content, dict) and "name" in content and "response" in content:
        return {"role": "tool", "content": content}
    if isinstance(content, str):
        try:
            parsed = json.loads(content)
            content = parsed if isinstance(parsed, (dict, list)) else content
        except json.JSONDecodeError:
            pass
    return {"role": "tool", "content": {"name": name or "tool", "response": content}}


def _text_content(content, field_: str, row: _Row) -> str | None:
    if isinstance(content, list):  # HF content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is not None and not isinstance(content, str):
        row.bad(field_, f"wrong type: expected string, got {type(content).__name__}")
        return None
    return content


def _finish(messages: list[dict], context: str | None, first_field: str, row: _Row) -> list[dict] | None:
    """Shared tail of conversational shapes: developer turn first, a user query, an assistant target last."""
    if not any(m["role"] == "user" for m in messages):
        row.bad(first_field, "empty query (no user message)")
        return None
    if messages[-1]["role"] != "assistant":
        row.bad(first_field, "last message must be the assistant's reply (the training target)")
        return None
    last = messages[-1]
    if not last.get("tool_calls") and not (last.get("content") or "").strip():
        row.bad(first_field, "last assistant message is empty (no text and no tool call)")
        return None
    return [developer_message(context)] + messages


def normalise_messages(obj: dict, default: ToolCatalog | None, row: _Row) -> dict | None:
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        row.bad("messages", "wrong type: expected a non-empty list of messages")
        return None
    catalog = _catalog_for(obj.get("tools"), "tools", default, row)
    context, messages, call_fields = None, [], []
    replies = _ReplyNames()
    for i, m in enumerate(raw):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            row.bad(f, f"wrong type: expected object, got {type(m).__name__}")
            continue
        role = m.get("role")
        if role in ("system", "developer"):
            if messages:
                row.bad(f + ".role", f"{role} message must come first")
            context = _text_content(m.get("content"), f + ".content", row)
        elif role == "user":
            text = _text_content(m.get("content"), f + ".content", row)
            if text is not None and text.strip():
                messages.append({"role": "user", "content": text.strip()})
            elif text is not None or m.get("content") is None:  # (a wrong type was reported already)
                row.bad(f + ".content", "empty query")
        elif role in ("assistant", "model"):
            msg: dict = {"role": "assistant"}
            raw_calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else None)
            if raw_calls:
                calls, fields = _normalise_calls(raw_calls, f + (".tool_calls" if m.get("tool_calls") else ".function_call"), row)
                msg["tool_calls"] = calls
                replies.new_calls(calls, raw_calls)
                call_fields.append((calls, fields))
            text = _text_content(m.get("content"), f + ".content", row)
            if text and text.strip():
                msg["content"] = text.strip()
            messages.append(msg)
        elif role in ("tool", "function", "observation", "ipython"):
            messages.append(_tool_message(m.get("content"), m.get("name") or replies.next(m.get("tool_call_id"))))
        else:
            row.bad(f + ".role", f"unknown role {json.dumps(role, ensure_ascii=False)} (use system, user, assistant or tool)")
    if row.problems:
        return None
    messages = _finish(messages, context, "messages", row)
    if catalog is None or messages is None:
        return None
    for calls, fields in call_fields:
        _check_calls(catalog, calls, fields, row)
    return {"messages": messages, "tools": wrap_tools(catalog.tools)}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "call", "observation": "tool", "tool": "tool", "system": "system"}


def normalise_sharegpt(obj: dict, default: ToolCatalog | None, row: _Row) -> dict | None:
    raw = obj.get("conversations")
    if not isinstance(raw, list) or not raw:
        row.bad("conversations", "wrong type: expected a non-empty list of turns")
        return None
    catalog = _catalog_for(obj.get("tools"), "tools", default, row)
    context = obj.get("system") if isinstance(obj.get("system"), str) else None
    messages, call_fields = [], []
    replies = _ReplyNames()
    for i, turn in enumerate(raw):
        f = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn:
            row.bad(f, "expected an object with 'from' and 'value'")
            continue
        role = SHAREGPT_ROLES.get(turn["from"])
        value = turn.get("value")
        if role is None:
            row.bad(f + ".from", f"unknown role {json.dumps(turn['from'], ensure_ascii=False)}")
        elif role == "call":
            calls, fields = _normalise_calls(_parse_call_value(value, f + ".value", row), f + ".value", row)
            if calls:
                prev = messages[-1] if messages else None
                if prev and prev["role"] == "assistant" and prev.get("tool_calls") and "content" not in prev:
                    prev["tool_calls"] += calls  # consecutive call turns = parallel calls
                    replies.more_calls(calls)
                else:
                    messages.append({"role": "assistant", "tool_calls": calls})
                    replies.new_calls(calls)
                call_fields.append((calls, fields))
        elif role == "tool":
            messages.append(_tool_message(value, replies.next()))
        elif role == "system":
            context = value if isinstance(value, str) else context
        else:
            text = _text_content(value, f + ".value", row)
            if text is None or not text.strip():
                row.bad(f + ".value", "empty query" if role == "user" else "empty reply")
            else:
                messages.append({"role": role, "content": text.strip()})
    if row.problems:
        return None
    messages = _finish(messages, context, "conversations", row)
    if catalog is None or messages is None:
        return None
    for calls, fields in call_fields:
        _check_calls(catalog, calls, fields, row)
    return {"messages": messages, "tools": wrap_tools(catalog.tools)}


def _parse_call_value(value, field_: str, row: _Row):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            row.bad(field_, f"not JSON ({exc.msg} at column {exc.colno})")
            return []
    return value


def normalise_test(obj: dict, catalog: ToolCatalog, row: _Row) -> dict | None:
    """A test case becomes a routing record (developer + user + expected call) so it is checked and counted alike."""
    query = _query(obj.get("user_content"), "user_content", row)
    name = obj.get("expected_tool")
    args = _parse_json_field(obj.get("expected_arguments"), "expected_arguments", row)
    if query is None or args is None:
        return None
    messages = [developer_message(), {"role": "user", "content": query}]
    if name is None:
        if args:
            row.bad("expected_arguments", "arguments given but expected_tool is null")
            return None
        messages.append({"role": "assistant", "content": ""})
    else:
        if "expected_arguments" in obj:
            problems = catalog.check_call(name, args, "expected_tool", "expected_arguments")
        else:  # the guide's routing-only test files name just the tool
            problems = catalog.check_call(name, {}, "expected_tool", "expected_arguments")
            problems = [p for p in problems if p[0] == "expected_tool"]
        for f, reason in problems:
            row.bad(f, reason)
        messages.append({"role": "assistant", "tool_calls": [call(name, args)]})
    return {"messages": messages, "tools": wrap_tools(catalog.tools)}


def load_records(
    inp: str | Path,
    tools_file: str | Path | None = None,
    columns: dict | None = None,
    on_error: str = "fail",
    max_seq_length: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    allow_test: bool = False,
    exclude: str | Path | None = None,
) -> tuple[list[dict], ConvertReport]:
    """Read, normalise and validate every row; apply the error policy. Nothing is written here."""
    if on_error not in ON_ERROR:
        raise UserError(f"on_error: must be one of {', '.join(ON_ERROR)}, got '{on_error}'")
    default = None
    if tools_file is not None:
        default = ToolCatalog(load_tools(tools_file))
        if default.problems:
            f, reason = default.problems[0]
            raise UserError(f"{tools_file}: {f}: {reason}")
    from src.data_engine.formatter import render_conversation

    check_length = bool(max_seq_length and count_tokens)
    report = ConvertReport(inputs=[str(p) for p in list_inputs(inp, exclude)])
    dedupe = Deduper()
    records: list[dict] = []
    for raw in read_rows(inp, columns, exclude):
        report.n_rows += 1
        record, problems = _normalise_row(raw, default, allow_test, report)
        if record is not None and not problems:
            key = query_key(record["messages"][0]["content"].replace(activation_sentence(), "") + "\n" + query_text(record))
            dup = dedupe.check(key, target_signature(record), raw.file, raw.line)
            if dup:
                problems = [(_query_field(raw), dup)]
        if record is not None and not problems:
            # Rendering every row proves training can use it (and gives its length); it costs ~0.1 ms a row.
            try:
                text = render_conversation(record["messages"], record["tools"])
            except ValueError as exc:
                problems = [(_query_field(raw), f"cannot be rendered in the FunctionGemma format: {exc}")]
            else:
                too_long = length_problem(text, count_tokens, max_seq_length) if check_length else None
                if too_long:
                    problems = [("", too_long)]
        if problems:
            issues = [Issue(raw.file, raw.line, f, r) for f, r in problems]
            if on_error == "fail":
                raise UserError(str(issues[0]))
            report.errors.extend(issues[:1])  # one reason per row keeps the report one line per dropped row
            continue
        report.n_ok += 1
        records.append(record)
    if not records:
        first = f"; first problem: {report.errors[0]}" if report.errors else ""
        raise UserError(f"{inp}: no valid rows ({report.n_rows} read){first}")
    return records, report


def _query_field(raw: RawRow) -> str:
    shape = detect_shape(raw.data or {})
    return {"messages": "messages", "sharegpt": "conversations"}.get(shape, "user_content")


def _normalise_row(raw: RawRow, default, allow_test: bool, report: ConvertReport):
    if raw.error:
        return None, [("", raw.error)]
    row = _Row()
    shape = "simple" if raw.tabular else detect_shape(raw.data)
    if shape is None:
        keys = ", ".join(list(raw.data)[:8]) or "none"
        return None, [("", f"unknown row shape (keys: {keys}); expected user_content+tool_name, messages, conversations or expected_tool")]
    if shape == "test" and not allow_test:
        raise UserError(f"{raw.file}:{raw.line}: expected_tool: this is a test file; convert takes training rows (use `data check` for test files)")
    if shape in ("simple", "test") and default is None:
        field_ = "tool_name" if shape == "simple" else "expected_tool"
        raise UserError(f"{raw.file}:{raw.line}: {field_}: {shape} rows need a tool catalog; pass --tools FILE")
    fn = {"simple": normalise_simple, "messages": normalise_messages, "sharegpt": normalise_sharegpt, "test": normalise_test}[shape]
    record = fn(raw.data, default, row)
    report.shapes[shape] += 1
    return record, row.problems


def convert(
    inp: str | Path,
    out: str | Path,
    tools_file: str | Path | None = None,
    columns: dict | None = None,
    on_error: str = "fail",
    max_seq_length: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> ConvertReport:
    """Convert INP (file or directory) to processed JSONL at OUT; OUT is replaced atomically or left untouched."""
    records, report = load_records(inp, tools_file, columns, on_error, max_seq_length, count_tokens, exclude=out)
    atomic_write_jsonl(out, records)
    report.output = str(out)
    return report


def check_file(
    path: str | Path,
    tools_file: str | Path | None = None,
    on_error: str = "drop",
    max_seq_length: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    columns: dict | None = None,
) -> ConvertReport:
    """Validate a processed, simple or test file without writing anything; "drop" lists every bad row."""
    _, report = load_records(path, tools_file, columns, on_error, max_seq_length, count_tokens, allow_test=True)
    return report
