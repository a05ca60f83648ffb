"""The FunctionGemma prompt format, written in exactly one place.

Training, inference, evaluation and export all render and parse through this module, so the text the model is
trained on and the text it is served with cannot drift apart. `CHAT_TEMPLATE` (chat_template.jinja) is the same
renderer in Jinja for runtimes that only read a tokenizer's chat template; tests keep the two equal.

Choices made where the spec (shared/functiongemma_format.md) is silent:
- Keys are sorted the way Jinja's `dictsort` sorts them (case-insensitive, stable), so Python and Jinja agree.
- Numbers render as Python's `str()` (shortest repr for floats, what Jinja prints too); `None` renders `null`.
- Every message's text is trimmed, as Gemma templates do; tool replies are not (they are data).
- Tools given without a leading system/developer message: a developer turn holding only the declarations.
- Calls not followed by a tool message end the model turn at `<start_function_response>` (where the model
  stops), also mid-conversation; the next message opens its turn directly.
- A tool reply leaves the model turn open: the next assistant message continues it, any other message first
  closes it with `<end_of_turn>\n`, and `add_generation_prompt` adds nothing (the model speaks next anyway).
- A reply's tool name comes from `content["name"]` (with `content["response"]`), else the message's `name`, else
  the call with the same `tool_call_id`, else the call at the same position in the preceding assistant message.
- OBJECT properties without `properties` render no `properties:{}`; enums are kept only on STRING properties.
- Strings cannot contain the literal `<escape>`: the format has no way to escape it.
- Call arguments given as a JSON string are parsed here; the Jinja template cannot parse JSON, so it writes such
  a string verbatim. Pass dicts to `apply_chat_template` (vLLM and llama.cpp already do).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ACTIVATION_SENTENCE = "You are a model that can do function calling with the following functions"

CONTROL_TOKENS: dict[str, int] = {
    "<start_function_declaration>": 46,
    "<end_function_declaration>": 47,
    "<start_function_call>": 48,
    "<end_function_call>": 49,
    "<start_function_response>": 50,
    "<end_function_response>": 51,
    "<escape>": 52,
}
STOP_STRINGS = ("<end_of_turn>", "<eos>", "<start_function_response>")

CHAT_TEMPLATE: str = (Path(__file__).with_name("chat_template.jinja")).read_text(encoding="utf-8")

BOS = "<bos>"
ESC = "<escape>"
END_OF_TURN = "<end_of_turn>"
GENERATION_PROMPT = "<start_of_turn>model\n"
DECL_OPEN, DECL_CLOSE = "<start_function_declaration>", "<end_function_declaration>"
CALL_OPEN, CALL_CLOSE = "<start_function_call>", "<end_function_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<start_function_response>", "<end_function_response>"

_ROLES = {"assistant": "model", "system": "developer"}


# ---------------------------------------------------------------------------------------------- rendering


def _sorted_items(mapping: Mapping) -> list[tuple]:
    """Jinja's `dictsort` order (case-insensitive, stable), so CHAT_TEMPLATE renders the same text."""
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _value(value, escape_keys: bool = False) -> str:
    """One argument value; JSON literals (`true`, `null`), never Python's `True`/`None`."""
    if isinstance(value, str):
        return ESC + value + ESC
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        keys = (lambda k: ESC + str(k) + ESC) if escape_keys else str
        return "{" + ",".join(f"{keys(k)}:{_value(v, escape_keys)}" for k, v in _sorted_items(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v, escape_keys) for v in value) + "]"
    return str(value)


def _required(names) -> str:
    return "[" + ",".join(ESC + str(n) + ESC for n in names) + "]"


def _properties(properties: Mapping) -> str:
    return ",".join(f"{key}:{_property(value)}" for key, value in _sorted_items(properties))


def _items(items: Mapping) -> str:
    """Array `items`, key by key as Gemma 4's official template does (type upper-cased, nested keys escaped)."""
    parts = []
    for key, value in _sorted_items(items):
        if value is None:
            continue
        if key == "properties":
            parts.append("properties:{" + (_properties(value) if isinstance(value, Mapping) else "") + "}")
        elif key == "required":
            parts.append("required:" + _required(value))
        elif key == "type":
            upper = value.upper() if isinstance(value, str) else [str(v).upper() for v in value]
            parts.append("type:" + _value(upper, escape_keys=True))
        else:
            parts.append(f"{key}:{_value(value, escape_keys=True)}")
    return ",".join(parts)


def _property(schema) -> str:
    """Inner order fixed by the official template: description, enum, items, nullable, properties/required, type."""
    schema = schema if isinstance(schema, Mapping) else {}
    kind = str(schema.get("type", "")).upper()
    parts = []
    if schema.get("description"):
        parts.append(f"description:{ESC}{schema['description']}{ESC}")
    if kind == "STRING" and schema.get("enum"):
        parts.append("enum:" + _value(schema["enum"], escape_keys=True))
    if kind == "ARRAY" and isinstance(schema.get("items"), Mapping) and schema["items"]:
        parts.append("items:{" + _items(schema["items"]) + "}")
    if schema.get("nullable"):
        parts.append("nullable:true")
    if kind == "OBJECT":
        if isinstance(schema.get("properties"), Mapping):
            parts.append("properties:{" + _properties(schema["properties"]) + "}")
        if schema.get("required"):
            parts.append("required:" + _required(schema["required"]))
    parts.append(f"type:{ESC}{kind}{ESC}")
    return "{" + ",".join(parts) + "}"


def normalize_tools(tools) -> list[dict]:
    """OpenAI/HF-wrapped or bare tools -> bare `{name, description[, parameters]}`.

    `parameters` stays absent when absent: a tool without it renders differently from one with an empty schema.
    """
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, Mapping) and "function" in tool else tool
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tool {i}: expected {{'name': ..., 'description': ..., 'parameters': ...}}")
        description = fn.get("description")
        bare = {"name": fn["name"], "description": description if isinstance(description, str) else ""}
        if "parameters" in fn:
            bare["parameters"] = fn["parameters"]
        out.append(bare)
    return out


def _declaration(tool: Mapping) -> str:
    text = f"declaration:{tool['name']}{{description:{ESC}{tool['description']}{ESC}"
    params = tool.get("parameters")
    if params:
        parts = []
        if params.get("properties"):
            parts.append("properties:{" + _properties(params["properties"]) + "}")
        if params.get("required"):
            parts.append("required:" + _required(params["required"]))
        parts.append(f"type:{ESC}{str(params.get('type') or 'object').upper()}{ESC}")
        text += ",parameters:{" + ",".join(parts) + "}"
    return DECL_OPEN + text + "}" + DECL_CLOSE


def render_declarations(tools) -> str:
    return "".join(_declaration(t) for t in normalize_tools(tools))


def _arguments(arguments) -> Mapping:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"call arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"call arguments must be an object, got {type(arguments).__name__}")
    return arguments


def render_call(name: str, arguments) -> str:
    return f"{CALL_OPEN}call:{name}{_value(_arguments(arguments))}{CALL_CLOSE}"


def _function(call: Mapping) -> Mapping:
    """HF/OpenAI `{"type": "function", "function": {...}}` or bare `{"name", "arguments"}`."""
    return call["function"] if "function" in call else call


def _text(message: Mapping) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"{message.get('role')} message content must be a string, got {type(content).__name__}")
    return content.strip()


def _body(message: Mapping) -> str:
    """What a non-tool message writes inside its turn: the model's training target when it is the assistant's."""
    calls = message.get("tool_calls") or []
    if not calls:
        return _text(message) + END_OF_TURN
    rendered = "".join(render_call(_function(c)["name"], _function(c).get("arguments")) for c in calls)
    return _text(message) + rendered + RESPONSE_OPEN


def _reply(message: Mapping, calls: list, index: int) -> str:
    content = message.get("content")
    if isinstance(content, Mapping) and "name" in content and "response" in content:
        name, response = content["name"], content["response"]
    else:
        response = content
        name = message.get("name") if isinstance(message.get("name"), str) else None
        if name is None and "tool_call_id" in message:
            name = next((_function(c)["name"] for c in calls if c.get("id") == message["tool_call_id"]), None)
        if name is None and index < len(calls):
            name = _function(calls[index])["name"]
        if name is None:
            raise ValueError("tool message without a name and no matching call")
    body = _value(response) if isinstance(response, Mapping) else "{value:" + _value(response) + "}"
    return f"response:{name}{body}{RESPONSE_CLOSE}"


def render_conversation(messages, tools=None, add_generation_prompt: bool = False) -> str:
    out = [BOS]
    rest = list(messages)
    declarations = render_declarations(tools) if tools else ""
    if rest and rest[0].get("role") in ("system", "developer"):
        out.append(f"<start_of_turn>developer\n{_text(rest[0])}{declarations}{END_OF_TURN}\n")
        rest = rest[1:]
    elif declarations:
        out.append(f"<start_of_turn>developer\n{declarations}{END_OF_TURN}\n")
    prev, calls, replies = "", [], 0  # prev: "tool" | "calls" | "text"
    for message in rest:
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"message without a role: {message!r:.80}")
        if role == "tool":
            if prev not in ("calls", "tool"):
                raise ValueError("a tool message must follow an assistant message with tool_calls")
            out.append((RESPONSE_OPEN if prev == "tool" else "") + _reply(message, calls, replies))
            prev, replies = "tool", replies + 1
            continue
        role = _ROLES.get(role, role)
        if prev == "tool" and role != "model":
            out.append(END_OF_TURN + "\n")
        if prev != "tool" or role != "model":
            out.append(f"<start_of_turn>{role}\n")
        out.append(_body(message))
        if message.get("tool_calls"):
            prev, calls, replies = "calls", list(message["tool_calls"]), 0
        else:
            out.append("\n")
            prev = "text"
    if add_generation_prompt and prev != "tool":
        out.append(GENERATION_PROMPT)
    return "".join(out)


def routing_messages(user_content: str, system_prompt: str | None = None) -> list[dict]:
    """The messages of one routing request; `system_prompt` is context (e.g. the date) put before the sentence."""
    developer = ACTIVATION_SENTENCE
    if system_prompt and system_prompt.strip():
        developer = system_prompt.rstrip()
        if ACTIVATION_SENTENCE not in developer:
            developer += "\n" + ACTIVATION_SENTENCE
    return [{"role": "developer", "content": developer}, {"role": "user", "content": user_content}]


def split_prompt_completion(messages, tools) -> tuple[str, str]:
    """Prompt and training target (the last assistant message); anything after that message is not rendered.

    The completion ends where the model must stop: `<start_function_response>` after calls, `<end_of_turn>` after text.
    """
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant message to train on")
    return render_conversation(messages[:last], tools, add_generation_prompt=True), _body(messages[last])


_DEVELOPER_TURN = re.compile(re.escape(f"{BOS}<start_of_turn>developer\n") + ".*?" + re.escape(f"{END_OF_TURN}\n"),
                             re.S)


def split_shared_prefix(prompt: str) -> tuple[str, str]:
    """`<bos>` + the developer turn, identical for every sample of a catalog, so training can run it once per batch.

    The cut sits right before `<start_of_turn>`, a special token, so tokenizing both halves equals tokenizing the whole.
    """
    match = _DEVELOPER_TURN.match(prompt)
    if not match:
        return "", prompt
    return prompt[: match.end()], prompt[match.end():]


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedOutput:
    kind: str  # "calls" | "text" | "malformed"
    calls: list[dict] = field(default_factory=list)  # [{"name": str, "arguments": dict}], only for "calls"
    text: str = ""  # text outside calls; for "malformed", the whole generated text
    error: str | None = None


class _Malformed(Exception):
    pass


_LEAD = re.compile(r"(?:<pad>)*(?:<bos>)?\s*(?:<start_of_turn>model\n)?")
_NAME = re.compile(r"[^\s{}\[\]:,<>]+")
_KEY = re.compile(r"[^:,{}\[\]<>]+")
_BARE = re.compile(r"[^,{}\[\]<>]*")
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_STRAY = tuple(t for t in CONTROL_TOKENS if t != RESPONSE_OPEN)
_MAX_DEPTH = 64


class _Reader:
    """Recursive-descent reader for call arguments; every failure is a `_Malformed` naming the offset."""

    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def fail(self, what: str):
        got = self.text[self.pos:self.pos + 30]
        raise _Malformed(f"{what} at offset {self.pos}, got {got!r}" if got else f"{what} at end of text")

    def skip_space(self):
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, literal: str) -> bool:
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def escaped(self) -> str:
        end = self.text.find(ESC, self.pos)
        if end < 0:
            self.pos -= len(ESC)
            self.fail("unterminated <escape> string")
        value, self.pos = self.text[self.pos:end], end + len(ESC)
        return value

    def value(self, depth: int):
        if depth > _MAX_DEPTH:
            self.fail("arguments nested too deeply")
        self.skip_space()
        if self.take(ESC):
            return self.escaped()
        if self.text.startswith("{", self.pos):
            return self.mapping(depth + 1)
        if self.take("["):
            items = []
            self.skip_space()
            if self.take("]"):
                return items
            while True:
                items.append(self.value(depth + 1))
                self.skip_space()
                if self.take("]"):
                    return items
                if not self.take(","):
                    self.fail("expected ',' or ']' in list")
        match = _BARE.match(self.text, self.pos)
        bare = match.group().strip()
        if not bare:
            self.fail("missing value")
        self.pos = match.end()
        if bare in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[bare]
        if _INT.fullmatch(bare):
            if len(bare) > 4000:  # int() refuses more than 4300 digits (CVE-2020-10735 limit)
                self.fail("number too long")
            return int(bare)
        if _FLOAT.fullmatch(bare):
            return float(bare)
        return bare  # unescaped text, accepted like Google's reference parser does

    def mapping(self, depth: int) -> dict:
        if not self.take("{"):
            self.fail("expected '{'")
        out = {}
        self.skip_space()
        if self.take("}"):
            return out
        while True:
            self.skip_space()
            if self.take(ESC):
                key = self.escaped()
            else:
                match = _KEY.match(self.text, self.pos)
                key = match.group().strip() if match else ""
                if not key:
                    self.fail("expected an argument name")
                self.pos = match.end()
            if not self.take(":"):
                self.fail(f"expected ':' after {key!r}")
            out[key] = self.value(depth)
            self.skip_space()
            if self.take("}"):
                return out
            if not self.take(","):
                self.fail("expected ',' or '}' in arguments")

    def call(self) -> dict:
        if not self.take("call:"):
            self.fail(f"expected 'call:' after {CALL_OPEN}")
        match = _NAME.match(self.text, self.pos)
        if not match:
            self.fail("expected a function name")
        name, self.pos = match.group(), match.end()
        try:
            arguments = self.mapping(0)
            if not self.take(CALL_CLOSE):
                self.fail(f"expected {CALL_CLOSE}")
        except _Malformed as exc:
            raise _Malformed(f"call {name!r}: {exc}") from None
        return {"name": name, "arguments": arguments}


def _stop(text: str, pos: int) -> int:
    """Offset of the first stop string at or after pos (len(text) if none): the model's output ends there."""
    found = [i for i in (text.find(s, pos) for s in STOP_STRINGS) if i >= 0]
    return min(found, default=len(text))


def parse_output(text) -> ParsedOutput:
    """Generated text -> calls, a text answer, or "malformed" with the reason. Never raises."""
    if not isinstance(text, str):
        return ParsedOutput("malformed", error=f"expected generated text, got {type(text).__name__}")
    reader = _Reader(text, _LEAD.match(text).end())
    start, calls, free = reader.pos, [], []
    try:
        while True:
            call_at, stop_at = text.find(CALL_OPEN, reader.pos), _stop(text, reader.pos)
            if call_at < 0 or stop_at < call_at:
                free.append(text[reader.pos:stop_at])
                end = stop_at
                break
            free.append(text[reader.pos:call_at])
            reader.pos = call_at + len(CALL_OPEN)
            calls.append(reader.call())
        for piece in free:
            stray = next((t for t in _STRAY if t in piece), None)
            if stray:
                raise _Malformed(f"stray {stray} outside a function call")
        if calls and any(p.strip() for p in free[1:]):
            raise _Malformed(f"unexpected text after a function call: {''.join(free[1:]).strip()[:30]!r}")
    except _Malformed as exc:
        return ParsedOutput("malformed", text=text[start:_stop(text, start)].strip(), error=str(exc))
    if calls:
        return ParsedOutput("calls", calls=calls, text=free[0].strip())
    return ParsedOutput("text", text=text[start:end].strip())
