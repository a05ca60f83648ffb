"""Checks a sample against its tool catalog and gives a reason a user can act on (which field, what is wrong).

Everything here is pure: no file IO, no policy. convert.py decides whether a problem fails the run or drops the row.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Callable, NamedTuple

JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
NO_CALL = "(no call)"  # label used for text-answer samples in counts and splits


class Issue(NamedTuple):
    """One rejected row: unpacks as (file, line, field, reason); str() is the one-line user message."""

    file: str
    line: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        out = str(self.file) + (f":{self.line}" if self.line is not None else "")
        return out + (f": {self.field}" if self.field else "") + f": {self.reason}"


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _matches(value, typ: str) -> bool:
    actual = _type_name(value)
    if typ == "number":
        return actual in ("number", "integer")
    return actual == typ


def check_value(value, schema: dict, field: str) -> list[tuple[str, str]]:
    """Validate one value against a (small) JSON schema: type, enum, pattern, nested properties and items."""
    problems: list[tuple[str, str]] = []
    typ = schema.get("type")
    types = [typ] if isinstance(typ, str) else list(typ or [])
    if types and not any(_matches(value, t) for t in types):
        want = " or ".join(types)
        return [(field, f"wrong type: expected {want}, got {_type_name(value)} {_short(value)}")]
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
        problems.append((field, f"value {_short(value)} not allowed; expected one of {allowed}"))
    if isinstance(value, str) and "<escape>" in value:
        problems.append((field, "contains the reserved token <escape>, which the prompt format cannot represent"))
    if isinstance(value, str) and isinstance(schema.get("pattern"), str):
        if not re.search(schema["pattern"], value):
            problems.append((field, f"value {_short(value)} does not match pattern {schema['pattern']}"))
    if isinstance(value, dict) and ("properties" in schema or "required" in schema):
        problems += check_object(value, schema, field)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += check_value(item, schema["items"], f"{field}[{i}]")
    return problems


def check_object(args: dict, schema: dict, field: str) -> list[tuple[str, str]]:
    """Unknown keys, missing required keys, then each known value; strict because the model learns what it sees."""
    props = schema.get("properties") or {}
    problems = []
    for key in args:
        if key not in props:
            known = ", ".join(props) or "none"
            problems.append((f"{field}.{key}", f"argument not in the schema (known: {known})"))
    for key in schema.get("required") or []:
        if key not in args:
            problems.append((f"{field}.{key}", "missing required argument"))
    for key, value in args.items():
        if key in props and isinstance(props[key], dict):
            problems += check_value(value, props[key], f"{field}.{key}")
    return problems


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ToolCatalog:
    """Tool name -> parameter schema, built from OpenAI-wrapped or bare tool dicts."""

    def __init__(self, tools: list):
        self.tools = tools
        self.params: dict[str, dict] = {}
        self.problems: list[tuple[str, str]] = []
        if not isinstance(tools, list):
            self.problems.append(("tools", f"wrong type: expected array, got {_type_name(tools)}"))
            return
        for i, tool in enumerate(tools):
            self._add(i, tool)

    def _add(self, i: int, tool) -> None:
        field = f"tools[{i}]"
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool, field = tool["function"], f"{field}.function"
        if not isinstance(tool, dict):
            self.problems.append((field, f"wrong type: expected object, got {_type_name(tool)}"))
            return
        name = tool.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problems.append((f"{field}.name", "missing field" if name is None else "must be a non-empty string"))
            return
        if name in self.params:
            self.problems.append((f"{field}.name", f"duplicate tool name '{name}'"))
            return
        params = tool.get("parameters") if tool.get("parameters") is not None else {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            self.problems.append((f"{field}.parameters", f"wrong type: expected object, got {_type_name(params)}"))
            return
        self.problems += _check_schema(params, f"{field}.parameters")
        self.params[name] = params

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def check_call(self, name, args, name_field: str, args_field: str) -> list[tuple[str, str]]:
        if not isinstance(name, str) or not name.strip():
            return [(name_field, "missing field" if name is None else "function name must be a non-empty string")]
        if name not in self.params:
            known = ", ".join(self.params) or "none"
            return [(name_field, f"unknown function '{name}' (catalog: {known})")]
        if not isinstance(args, dict):
            return [(args_field, f"wrong type: expected object, got {_type_name(args)}")]
        return check_object(args, self.params[name], args_field)


def _check_schema(schema: dict, field: str) -> list[tuple[str, str]]:
    """A catalog mistake (unknown type, enum not a list) would silently teach the model nonsense; catch it early."""
    problems = []
    typ = schema.get("type")
    for t in [typ] if isinstance(typ, str) else list(typ or []):
        if t not in JSON_TYPES:
            problems.append((f"{field}.type", f"unknown type '{t}' (use one of {', '.join(JSON_TYPES[:-1])})"))
    if "enum" in schema and not isinstance(schema["enum"], list):
        problems.append((f"{field}.enum", "must be a list"))
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            return problems + [(f"{field}.properties", "must be an object")]
        for key, sub in props.items():
            if not isinstance(sub, dict):
                problems.append((f"{field}.properties.{key}", "must be an object"))
            else:
                problems += _check_schema(sub, f"{field}.properties.{key}")
    required = schema.get("required")
    if required is not None:
        if not isinstance(required, list):
            problems.append((f"{field}.required", "must be a list"))
        else:
            for key in required:
                if isinstance(props, dict) and key not in props:
                    problems.append((f"{field}.required", f"'{key}' is required but not in properties"))
    if isinstance(schema.get("items"), dict):
        problems += _check_schema(schema["items"], f"{field}.items")
    return problems


_PUNCT = re.compile(r"[\s\W_]+", re.UNICODE)


def query_key(text: str) -> str:
    """Duplicate key: width/case folded, whitespace and punctuation removed ("查询张三的年假！" == "查询 张三的年假")."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold())


class Deduper:
    """Flags a query seen before; says whether the earlier one had the same target or a conflicting one."""

    def __init__(self):
        self.seen: dict[str, tuple[str, int | None, str]] = {}

    def check(self, key: str, target: str, file: str, line: int | None) -> str | None:
        if not key:
            return None
        if key not in self.seen:
            self.seen[key] = (file, line, target)
            return None
        f0, l0, t0 = self.seen[key]
        at = f"line {l0}" if f0 == file else f"{f0}:{l0}"
        if t0 == target:
            return f"duplicate of {at} (same query after normalisation)"
        return f"duplicate query of {at} with a different target (conflicting labels)"


def length_problem(text: str, count_tokens: Callable[[str], int], max_seq_length: int) -> str | None:
    n = count_tokens(text)
    if n > max_seq_length:
        return f"rendered sample is {n} tokens, over max_seq_length {max_seq_length}"
    return None


def check_file(path, tools_file=None, on_error="drop", max_seq_length=None, count_tokens=None, columns=None):
    """CLI entry for `data check`; lives in convert.py (it reads files), re-exported here for discoverability."""
    from src.data_engine.convert import check_file as _check_file

    return _check_file(path, tools_file, on_error, max_seq_length, count_tokens, columns)
