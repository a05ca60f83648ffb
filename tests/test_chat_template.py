"""CHAT_TEMPLATE must render exactly what render_conversation renders, in plain Jinja and through transformers."""
from __future__ import annotations

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils.chat_template_utils import render_jinja_template

from src.data_engine.formatter import CHAT_TEMPLATE, render_conversation
from tests.test_formatter import GOLDEN, call, tool
from tests.test_parser import KEYS, NAMES, VALUES


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _template(trim: bool):
    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    env.globals["raise_exception"] = _raise
    return env.from_string(CHAT_TEMPLATE)


PLAIN, TRIMMED = _template(False), _template(True)


def jinja(messages, tools=None, add_generation_prompt=False, template=PLAIN):
    return template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           bos_token="<bos>")


def hf(messages, tools=None, add_generation_prompt=False):
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=CHAT_TEMPLATE,
                                        add_generation_prompt=add_generation_prompt, bos_token="<bos>")
    return rendered[0]


def assert_same(messages, tools=None, add_generation_prompt=False):
    expected = render_conversation(messages, tools, add_generation_prompt)
    assert jinja(messages, tools, add_generation_prompt) == expected
    assert jinja(messages, tools, add_generation_prompt, TRIMMED) == expected
    assert hf(messages, tools, add_generation_prompt) == expected


RICH_TOOLS = [
    tool("search", {"type": "object", "properties": {
        "query": {"type": "string", "description": "q"},
        "mode": {"type": "string", "enum": ["fast", "exact"]},
        "limit": {"type": "integer", "enum": [1, 2], "nullable": True},
        "ratio": {"type": "number"}, "strict": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"], "description": "t"}},
        "rows": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}},
                                            "required": ["n"], "minItems": 1, "items": {"type": "x"}}},
        "filter": {"type": "object", "description": "f", "required": ["B"],
                   "properties": {"B": {"type": "string"}, "a": {"type": "string"}}},
        "blob": {"type": "object"},
    }, "required": ["query", "mode"]}),
    tool("now", {"type": "object", "properties": {}}),
    tool("ping", wrapped=False),
    tool("empty", {}, description=None),
]
CALLS = [call("search", {"query": "天气, 北京: {today}", "limit": 2, "ratio": 0.1, "strict": False, "tags": ["a"],
                         "filter": {"B": None, "a": "x"}}, "c1"),
         call("now", {}, "c2")]
USER = {"role": "user", "content": "  问一下 \n"}

CASES = {
    "golden": (GOLDEN["messages"], GOLDEN["tools"]),
    "golden-prefix": (GOLDEN["messages"][:3], GOLDEN["tools"]),
    "golden-open-turn": (GOLDEN["messages"][:4], GOLDEN["tools"]),
    "rich-tools": ([{"role": "system", "content": " ctx\n"}, USER], RICH_TOOLS),
    "tools-without-developer": ([USER], RICH_TOOLS),
    "no-tools": ([{"role": "developer", "content": "x"}, USER, {"role": "assistant", "content": " ok "}], None),
    "empty": ([], None),
    "parallel-calls": ([USER, {"role": "assistant", "content": None, "tool_calls": CALLS}], RICH_TOOLS),
    "replies-dict": ([USER, {"role": "assistant", "tool_calls": CALLS},
                      {"role": "tool", "content": {"name": "search", "response": {"hits": [1, 2.5, None]}}},
                      {"role": "tool", "content": {"name": "now", "response": "12:00"}},
                      {"role": "assistant", "content": "done"}], RICH_TOOLS),
    "replies-string-by-name-id-position": (
        [USER, {"role": "assistant", "tool_calls": CALLS}, {"role": "tool", "name": "search", "content": "r1"},
         {"role": "tool", "tool_call_id": "c2", "content": "r2"}, USER,
         {"role": "assistant", "tool_calls": CALLS}, {"role": "tool", "content": "p1"},
         {"role": "tool", "content": {"ok": True}}], RICH_TOOLS),
    "reply-then-user": ([USER, {"role": "assistant", "tool_calls": CALLS[1:]}, {"role": "tool", "content": 3},
                         USER], None),
    "call-then-user": ([USER, {"role": "assistant", "content": "x", "tool_calls": CALLS[1:]}, USER], None),
}


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_template_equals_renderer(name, add_generation_prompt):
    messages, tools = CASES[name]
    assert_same(messages, tools, add_generation_prompt)


def test_golden_through_tokenizer_apply_chat_template():
    from tests.tiny_model import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    rendered = tokenizer.apply_chat_template(GOLDEN["messages"], tools=GOLDEN["tools"], tokenize=False)
    assert rendered == GOLDEN["expected"] + "\n" == render_conversation(GOLDEN["messages"], GOLDEN["tools"])
    prompt = tokenizer.apply_chat_template(GOLDEN["messages"][:2], tools=GOLDEN["tools"], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == render_conversation(GOLDEN["messages"][:2], GOLDEN["tools"], add_generation_prompt=True)


def test_template_refuses_orphan_tool_message():
    with pytest.raises(jinja2.exceptions.TemplateError, match="must follow"):
        hf([USER, {"role": "tool", "name": "a", "content": "x"}])


def test_json_string_arguments_are_written_verbatim_by_the_template():
    """Jinja cannot parse JSON: the template writes string arguments as given; pass dicts to apply_chat_template."""
    messages = [{"role": "assistant", "tool_calls": [call("f", "a:1")]}]
    assert jinja(messages).endswith("<start_function_call>call:f{a:1}<end_function_call><start_function_response>")


# ------------------------------------------------------------------------------------------ generated cases

TEXT = st.text(max_size=12)
TYPES = st.sampled_from(["string", "number", "integer", "boolean", "array", "object", "String"])


def _schema(children):
    return st.fixed_dictionaries({"type": TYPES | st.lists(TYPES, min_size=1, max_size=2)}, optional={
        "description": TEXT, "enum": st.lists(TEXT | st.integers(), max_size=3), "items": children,
        "nullable": st.booleans(), "properties": st.dictionaries(KEYS, children, max_size=3),
        "required": st.lists(KEYS, max_size=2), "minItems": st.integers(0, 3),
    })


SCHEMAS = st.recursive(st.fixed_dictionaries({"type": TYPES}, optional={"description": TEXT}), _schema, max_leaves=6)
PARAMETERS = st.one_of(
    st.just(...), st.just({}),
    st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": st.dictionaries(KEYS, SCHEMAS, max_size=4), "required": st.lists(KEYS, max_size=3)}),
)
TOOLS = st.lists(st.builds(tool, NAMES, PARAMETERS, TEXT | st.none(), st.booleans()), max_size=3)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(TEXT)})
    for _ in range(draw(st.integers(0, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        kind = draw(st.sampled_from(["text", "calls", "replies", "none"]))
        if kind == "text":
            messages.append({"role": "assistant", "content": draw(TEXT)})
        if kind in ("calls", "replies"):
            calls = [call(draw(NAMES), draw(st.dictionaries(KEYS, VALUES, max_size=3)), f"id{i}")
                     for i in range(draw(st.integers(1, 2)))]
            message = {"role": "assistant", "tool_calls": calls}
            if draw(st.booleans()):
                message["content"] = draw(TEXT)
            messages.append(message)
        if kind == "replies":
            for i, c in enumerate(calls):
                form = draw(st.sampled_from(["dict", "named", "id", "position"]))
                body = draw(VALUES)
                if form == "dict":
                    messages.append({"role": "tool", "content": {"name": c["function"]["name"], "response": body}})
                elif form == "named":
                    messages.append({"role": "tool", "name": c["function"]["name"], "content": body})
                elif form == "id":
                    messages.append({"role": "tool", "tool_call_id": f"id{i}", "content": body})
                else:
                    messages.append({"role": "tool", "content": body})
            if draw(st.booleans()):
                messages.append({"role": "assistant", "content": draw(TEXT)})
    return messages


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.none() | TOOLS, st.booleans())
def test_template_equals_renderer_on_generated_conversations(messages, tools, add_generation_prompt):
    expected = render_conversation(messages, tools, add_generation_prompt)
    assert jinja(messages, tools, add_generation_prompt) == expected
    assert hf(messages, tools, add_generation_prompt) == expected
