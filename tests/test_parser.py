"""Parsing model output: calls, text answers, and a clear "malformed" verdict instead of an exception."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src.data_engine.formatter import CONTROL_TOKENS, STOP_STRINGS, ParsedOutput, parse_output, render_call

E = "<escape>"
CALL = "<start_function_call>call:"
END = "<end_function_call>"


def test_single_call_with_stop_token():
    out = parse_output(f"{CALL}get_leave_balance{{employee_name:{E}张三{E},leave_type:{E}annual{E}}}{END}"
                       "<start_function_response>")
    assert out == ParsedOutput("calls", [{"name": "get_leave_balance",
                                          "arguments": {"employee_name": "张三", "leave_type": "annual"}}])


@pytest.mark.parametrize("tail", ["", "<end_of_turn>", "<eos>", "<start_function_response>", "<end_of_turn><eos><pad>",
                                  "<start_function_response>response:f{value:1}<end_function_response>junk"])
def test_trailing_stop_tokens_ignored(tail):
    out = parse_output(f"<start_of_turn>model\n{CALL}f{{}}{END}{tail}")
    assert out.kind == "calls" and out.calls == [{"name": "f", "arguments": {}}]


def test_parallel_calls():
    out = parse_output(f"{CALL}a{{x:1}}{END}{CALL}b{{y:{E}z{E}}}{END}")
    assert out.calls == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": "z"}}]


def test_values_of_every_kind():
    out = parse_output(f"{CALL}f{{a:-3,b:2.5,c:1e-07,d:true,e:false,g:null,h:[1,[{E}x{E}],{{k:2}}],"
                       f"i:{{inner:{{deep:{E}v{E}}},n:[]}},j:{E}{E},k:{{}}}}{END}")
    assert out.kind == "calls", out.error
    args = out.calls[0]["arguments"]
    assert args == {"a": -3, "b": 2.5, "c": 1e-07, "d": True, "e": False, "g": None, "h": [1, ["x"], {"k": 2}],
                    "i": {"inner": {"deep": "v"}, "n": []}, "j": "", "k": {}}
    assert type(args["a"]) is int and type(args["b"]) is float


def test_escaped_strings_keep_everything():
    tricky = 'a,b}{c:d "quoted" \'single\' [x] 中文\n第二行 <end_of_turn> <start_function_call>'
    out = parse_output(render_call("f", {"s": tricky}))
    assert out.kind == "calls" and out.calls[0]["arguments"] == {"s": tricky}


def test_unescaped_values_accepted_like_googles_parser():
    out = parse_output(f"{CALL}f{{city: Tokyo , n: 3}}{END}")
    assert out.calls == [{"name": "f", "arguments": {"city": "Tokyo", "n": 3}}]


def test_escaped_keys_accepted():
    out = parse_output(f"{CALL}f{{o:{{{E}a b{E}:1}}}}{END}")
    assert out.calls[0]["arguments"] == {"o": {"a b": 1}}


def test_text_answers():
    assert parse_output("Sorry, I can't do that.<end_of_turn>") == ParsedOutput("text", text="Sorry, I can't do that.")
    out = parse_output("<start_of_turn>model\n  你好\n<end_of_turn>\n<start_of_turn>user")
    assert out == ParsedOutput("text", text="你好")
    assert parse_output("<eos>") == ParsedOutput("text", text="")


def test_text_before_call_is_kept():
    out = parse_output(f"Let me check.{CALL}f{{}}{END}")
    assert out.kind == "calls" and out.text == "Let me check."


@pytest.mark.parametrize("text, error", [
    (f"{CALL}f{{a:{E}x", "call 'f': unterminated <escape> string at offset 30"),
    (f"{CALL}f{{a:1", "expected ',' or '}' in arguments at end of text"),
    (f"{CALL}f{{a:1}}", "expected <end_function_call> at end of text"),
    (f"{CALL}f{{a:1}}<start_function_response>", "call 'f': expected <end_function_call>"),
    (f"{CALL}f{{a:}}{END}", "missing value"),
    (f"{CALL}f{{a}}{END}", "expected ':' after 'a'"),
    (f"{CALL}f{{:1}}{END}", "expected an argument name"),
    (f"{CALL}f{{a:[1,2}}{END}", "expected ',' or ']' in list"),
    (f"{CALL}f{{a:1}}x{END}", "expected <end_function_call>"),
    (f"{CALL}{{a:1}}{END}", "expected a function name"),
    (f"{CALL}f(a=1){END}", "expected '{'"),
    (f"<start_function_call>f{{}}{END}", "expected 'call:'"),
    (f"{CALL}f{{}}{END} and more", "unexpected text after a function call: 'and more'"),
    (f"answer {END}", "stray <end_function_call>"),
    (f"answer {E}", "stray <escape>"),
    (f"{CALL}f{{a:{'[' * 100}{']' * 100}}}{END}", "nested too deeply"),
    (f"{CALL}f{{a:{'9' * 5000}}}{END}", "number too long"),
])
def test_malformed_outputs_say_why(text, error):
    out = parse_output(text)
    assert out.kind == "malformed" and out.calls == []
    assert error in out.error
    assert out.text


def test_non_string_input():
    assert parse_output(None).kind == "malformed"


# ------------------------------------------------------------------------------------------ properties

KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
TRICKY = st.sampled_from([*',{}[]:"\'<>\n\t 中文', "<end_of_turn>", "<eos>", "<start_function_call>", "escape>"])
STRINGS = st.one_of(st.text(), st.lists(TRICKY | st.characters(), max_size=12).map("".join))
STRINGS = STRINGS.filter(lambda s: E not in s)
SCALARS = st.one_of(STRINGS, st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)


def same(a, b) -> bool:
    """Equality that also tells 1 from 1.0 from True (`==` does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NAMES, st.dictionaries(KEYS, VALUES, max_size=5))
def test_render_then_parse_round_trips(name, arguments):
    """Strings containing the literal '<escape>' are excluded: the format cannot represent them."""
    out = parse_output(render_call(name, arguments) + "<start_function_response>")
    assert out.kind == "calls", out.error
    assert out.calls[0]["name"] == name and same(out.calls[0]["arguments"], arguments)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_never_raises_on_any_text(text):
    out = parse_output(text)
    assert out.kind in ("calls", "text", "malformed")
    assert (out.kind == "malformed") == (out.error is not None)


FRAGMENTS = st.sampled_from([*CONTROL_TOKENS, *STOP_STRINGS, "call:", "f", "{", "}", "[", "]", ":", ",", "a", "1",
                             "-", ".", "e", "true", " ", "\n", "<start_of_turn>model\n", "<bos>"])


@settings(max_examples=200, deadline=None)
@given(st.lists(FRAGMENTS | st.text(max_size=3), max_size=40).map("".join))
def test_never_raises_on_format_like_garbage(text):
    out = parse_output(text)
    assert out.kind in ("calls", "text", "malformed")
    assert (out.kind == "calls") == bool(out.calls)
