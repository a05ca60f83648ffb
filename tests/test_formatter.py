"""Rendering: the exact text FunctionGemma is trained and served with (spec: shared/functiongemma_format.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.data_engine.formatter import (
    ACTIVATION_SENTENCE,
    CONTROL_TOKENS,
    STOP_STRINGS,
    normalize_tools,
    render_call,
    render_conversation,
    render_declarations,
    routing_messages,
    split_prompt_completion,
    split_shared_prefix,
)

GOLDEN = json.loads((Path(__file__).resolve().parents[2] / "shared/fixtures/golden_weather.json").read_text())
E = "<escape>"
DECL = "<start_function_declaration>"


def tool(name, parameters=..., description="d", wrapped=True):
    """An OpenAI/HF tool (or the bare function when not wrapped); `...` leaves `parameters` out."""
    fn = {"name": name, "description": description}
    if parameters is not ...:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn} if wrapped else fn


def obj(properties, required=None):
    schema = {"type": "object", "properties": properties}
    if required is not None:
        schema["required"] = required
    return schema


def call(name, arguments, call_id=None):
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        out["id"] = call_id
    return out


def test_control_tokens_and_stops():
    assert CONTROL_TOKENS == {
        "<start_function_declaration>": 46, "<end_function_declaration>": 47, "<start_function_call>": 48,
        "<end_function_call>": 49, "<start_function_response>": 50, "<end_function_response>": 51, "<escape>": 52,
    }
    assert STOP_STRINGS == ("<end_of_turn>", "<eos>", "<start_function_response>")


def test_golden_exact():
    rendered = render_conversation(GOLDEN["messages"], GOLDEN["tools"])
    # Gemma templates close every turn with "\n"; the printout cannot show the last one.
    assert rendered == GOLDEN["expected"] + "\n"


def test_golden_declaration_alone():
    expected = GOLDEN["expected"].split(ACTIVATION_SENTENCE, 1)[1].split("<end_of_turn>", 1)[0]
    assert render_declarations(GOLDEN["tools"]) == expected


# ------------------------------------------------------------------------------------------ declarations


def decl(body):
    return f"<start_function_declaration>{body}<end_function_declaration>"


def test_enum_only_on_strings_and_required_order_kept():
    t = tool("f", obj({
        "b": {"type": "string", "enum": ["x", "y"]},
        "a": {"type": "integer", "enum": [1, 2], "description": "n"},
    }, ["b", "a"]))
    assert render_declarations([t]) == decl(
        f"declaration:f{{description:{E}d{E},parameters:{{properties:{{"
        f"a:{{description:{E}n{E},type:{E}INTEGER{E}}},"
        f"b:{{enum:[{E}x{E},{E}y{E}],type:{E}STRING{E}}}}},"
        f"required:[{E}b{E},{E}a{E}],type:{E}OBJECT{E}}}}}"
    )


def test_scalar_types_upper_cased():
    t = tool("f", obj({k: {"type": k} for k in ("number", "integer", "boolean", "string")}))
    out = render_declarations([t])
    for k in ("BOOLEAN", "INTEGER", "NUMBER", "STRING"):
        assert f"{k.lower()}:{{type:{E}{k}{E}}}" in out
    assert out.index("boolean:") < out.index("integer:") < out.index("number:") < out.index("string:")


def test_nested_object_property():
    t = tool("f", obj({"addr": {
        "type": "object", "description": "where",
        "properties": {"zip": {"type": "string"}, "city": {"type": "string", "description": "c"}},
        "required": ["zip", "city"],
    }}))
    assert render_declarations([t]) == decl(
        f"declaration:f{{description:{E}d{E},parameters:{{properties:{{addr:{{description:{E}where{E},"
        f"properties:{{city:{{description:{E}c{E},type:{E}STRING{E}}},zip:{{type:{E}STRING{E}}}}},"
        f"required:[{E}zip{E},{E}city{E}],type:{E}OBJECT{E}}}}},type:{E}OBJECT{E}}}}}"
    )


def test_array_items_and_nullable():
    t = tool("f", obj({
        "tags": {"type": "array", "description": "t", "items": {"type": "string", "enum": ["a", "b"]}},
        "rows": {"type": "array",
                 "items": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
        "note": {"type": "string", "nullable": True},
    }))
    out = render_declarations([t])
    assert f"note:{{nullable:true,type:{E}STRING{E}}}" in out
    assert (f"rows:{{items:{{properties:{{n:{{type:{E}INTEGER{E}}}}},required:[{E}n{E}],type:{E}OBJECT{E}}},"
            f"type:{E}ARRAY{E}}}") in out
    assert f"tags:{{description:{E}t{E},items:{{enum:[{E}a{E},{E}b{E}],type:{E}STRING{E}}},type:{E}ARRAY{E}}}" in out


def test_no_parameter_tool_and_tool_without_parameters():
    assert render_declarations([tool("now", {"type": "object", "properties": {}})]) == decl(
        f"declaration:now{{description:{E}d{E},parameters:{{type:{E}OBJECT{E}}}}}")
    assert render_declarations([tool("now")]) == decl(f"declaration:now{{description:{E}d{E}}}")
    assert render_declarations([tool("now", {})]) == decl(f"declaration:now{{description:{E}d{E}}}")


def test_several_tools_concatenated_and_bare_tools_accepted():
    wrapped = [tool("a"), tool("b")]
    bare = [t["function"] for t in wrapped]
    assert render_declarations(bare) == render_declarations(wrapped) == (
        decl(f"declaration:a{{description:{E}d{E}}}") + decl(f"declaration:b{{description:{E}d{E}}}"))
    assert normalize_tools(wrapped) == [{"name": "a", "description": "d"}, {"name": "b", "description": "d"}]


def test_keys_sorted_like_jinja_dictsort():
    t = tool("f", obj({"b": {"type": "string"}, "C": {"type": "string"}, "a": {"type": "string"}}))
    out = render_declarations([t])
    assert out.index("a:{") < out.index("b:{") < out.index("C:{")


def test_normalize_tools_rejects_nameless():
    with pytest.raises(ValueError, match="tool 1"):
        normalize_tools([tool("a"), {"function": {"description": "x"}}])


# ------------------------------------------------------------------------------------------ calls


def test_render_call_values():
    out = render_call("f", {"s": "a,b:{c}", "i": 15, "x": 0.1, "t": True, "n": None, "l": [1, "x"],
                            "o": {"z": 1, "a": {"b": False}}})
    assert out == (f"<start_function_call>call:f{{i:15,l:[1,{E}x{E}],n:null,o:{{a:{{b:false}},z:1}},"
                   f"s:{E}a,b:{{c}}{E},t:true,x:0.1}}<end_function_call>")
    assert "True" not in out and "None" not in out


def test_render_call_float_shortest_form():
    assert render_call("f", {"a": 1e-7, "b": 1.0, "c": 1e16}) == (
        "<start_function_call>call:f{a:1e-07,b:1.0,c:1e+16}<end_function_call>")


def test_render_call_json_string_arguments():
    assert render_call("f", '{"b": 2, "a": "x"}') == render_call("f", {"a": "x", "b": 2})
    assert render_call("f", None) == "<start_function_call>call:f{}<end_function_call>"
    with pytest.raises(ValueError, match="not valid JSON"):
        render_call("f", "{oops")
    with pytest.raises(ValueError, match="must be an object"):
        render_call("f", "[1]")


# ------------------------------------------------------------------------------------------ conversations


def test_parallel_calls_end_with_response_token():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [call("a", {"x": 1}), call("b", {})]}]
    assert render_conversation(messages) == (
        "<bos><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\n"
        "<start_function_call>call:a{x:1}<end_function_call><start_function_call>call:b{}<end_function_call>"
        "<start_function_response>")


def test_text_answer_and_system_mapped_to_developer():
    messages = [{"role": "system", "content": "  sys  \n"}, {"role": "user", "content": " hi "},
                {"role": "assistant", "content": "hello\n"}]
    assert render_conversation(messages) == (
        "<bos><start_of_turn>developer\nsys<end_of_turn>\n<start_of_turn>user\nhi<end_of_turn>\n"
        "<start_of_turn>model\nhello<end_of_turn>\n")


def test_tools_without_developer_message_get_declarations_only_turn():
    out = render_conversation([{"role": "user", "content": "q"}], [tool("a")], add_generation_prompt=True)
    assert out == ("<bos><start_of_turn>developer\n" + decl(f"declaration:a{{description:{E}d{E}}}") +
                   "<end_of_turn>\n<start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\n")


def test_empty_conversation():
    assert render_conversation([]) == "<bos>"
    assert render_conversation([], add_generation_prompt=True) == "<bos><start_of_turn>model\n"


def test_string_tool_reply_named_by_message_or_call():
    base = [{"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call("a", {}, "c1"), call("b", {}, "c2")]}]
    expected = ("<start_function_response>response:b{value:<escape>B<escape>}<end_function_response>"
                "<start_function_response>response:a{value:<escape>A<escape>}<end_function_response>")
    by_name = base + [{"role": "tool", "name": "b", "content": "B"}, {"role": "tool", "name": "a", "content": "A"}]
    by_id = base + [{"role": "tool", "tool_call_id": "c2", "content": "B"},
                    {"role": "tool", "tool_call_id": "c1", "content": "A"}]
    assert render_conversation(by_name).endswith(expected)
    assert render_conversation(by_id).endswith(expected)
    by_position = base + [{"role": "tool", "content": "A"}, {"role": "tool", "content": "B"}]
    assert render_conversation(by_position).endswith(
        "response:a{value:<escape>A<escape>}<end_function_response>"
        "<start_function_response>response:b{value:<escape>B<escape>}<end_function_response>")


def test_dict_tool_reply_without_name_key_is_the_response():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("a", {})]},
                {"role": "tool", "content": {"ok": True, "n": [1, 2]}}]
    assert render_conversation(messages).endswith(
        "<start_function_response>response:a{n:[1,2],ok:true}<end_function_response>")


def test_tool_reply_keeps_model_turn_open():
    messages = GOLDEN["messages"][:4]
    out = render_conversation(messages, GOLDEN["tools"], add_generation_prompt=True)
    assert out.endswith("<end_function_response>")
    then_user = render_conversation(messages + [{"role": "user", "content": "u"}], GOLDEN["tools"])
    assert then_user.endswith("<end_function_response><end_of_turn>\n<start_of_turn>user\nu<end_of_turn>\n")


def test_tool_message_needs_a_call():
    with pytest.raises(ValueError, match="must follow"):
        render_conversation([{"role": "user", "content": "q"}, {"role": "tool", "content": "x", "name": "a"}])
    with pytest.raises(ValueError, match="no matching call"):
        render_conversation([{"role": "assistant", "tool_calls": [call("a", {})]},
                             {"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}])


def test_content_before_calls_in_same_turn():
    messages = [{"role": "assistant", "content": " Checking. ", "tool_calls": [call("a", '{"k": "v"}')]}]
    assert render_conversation(messages) == (
        "<bos><start_of_turn>model\nChecking.<start_function_call>call:a{k:<escape>v<escape>}<end_function_call>"
        "<start_function_response>")


def test_developer_context_before_activation_sentence():
    context = "Current date and time given in YYYY-MM-DDTHH:MM:SS format: 2026-01-16T00:50:30\nDay of week is Friday"
    messages = routing_messages("查询张三的年假", system_prompt=context)
    assert messages == [{"role": "developer", "content": f"{context}\n{ACTIVATION_SENTENCE}"},
                        {"role": "user", "content": "查询张三的年假"}]
    out = render_conversation(messages, GOLDEN["tools"])
    assert out.startswith(f"<bos><start_of_turn>developer\n{context}\n{ACTIVATION_SENTENCE}{DECL}")


def test_routing_messages_defaults():
    assert routing_messages("hi") == [{"role": "developer", "content": ACTIVATION_SENTENCE},
                                      {"role": "user", "content": "hi"}]
    assert routing_messages("hi", "  ")[0]["content"] == ACTIVATION_SENTENCE
    own = f"Be brief. {ACTIVATION_SENTENCE}"
    assert routing_messages("hi", own)[0]["content"] == own


# ------------------------------------------------------------------------------------------ training split


def sample(last):
    return {"messages": routing_messages("查询张三的年假") + [last], "tools": GOLDEN["tools"]}


CALL_SAMPLE = sample({"role": "assistant", "tool_calls": [call("get_current_weather", {"location": "北京"})]})
TEXT_SAMPLE = sample({"role": "assistant", "content": "I can only check the weather."})


@pytest.mark.parametrize("s", [CALL_SAMPLE, TEXT_SAMPLE, {"messages": GOLDEN["messages"], "tools": GOLDEN["tools"]},
                               {"messages": GOLDEN["messages"][:4], "tools": GOLDEN["tools"]}])
def test_prompt_plus_completion_is_prefix_of_render(s):
    prompt, completion = split_prompt_completion(s["messages"], s["tools"])
    assert render_conversation(s["messages"], s["tools"]).startswith(prompt + completion)


def test_split_call_and_text_targets():
    prompt, completion = split_prompt_completion(CALL_SAMPLE["messages"], CALL_SAMPLE["tools"])
    assert prompt.endswith("查询张三的年假<end_of_turn>\n<start_of_turn>model\n")
    assert completion == ("<start_function_call>call:get_current_weather{location:<escape>北京<escape>}"
                          "<end_function_call><start_function_response>")
    prompt, completion = split_prompt_completion(TEXT_SAMPLE["messages"], TEXT_SAMPLE["tools"])
    assert prompt.endswith("<start_of_turn>model\n")
    assert completion == "I can only check the weather.<end_of_turn>"


def test_split_after_tool_reply_continues_the_model_turn():
    prompt, completion = split_prompt_completion(GOLDEN["messages"], GOLDEN["tools"])
    assert prompt.endswith("<end_function_response>")
    assert completion == GOLDEN["messages"][-1]["content"] + "<end_of_turn>"
    assert prompt + completion == GOLDEN["expected"]


def test_split_needs_an_assistant_message():
    with pytest.raises(ValueError, match="no assistant"):
        split_prompt_completion(routing_messages("q"), GOLDEN["tools"])


def test_shared_prefix_identical_across_samples():
    other = [*routing_messages("other question"), {"role": "assistant", "content": "x"}]
    p1, _ = split_prompt_completion(CALL_SAMPLE["messages"], CALL_SAMPLE["tools"])
    p2, _ = split_prompt_completion(other, GOLDEN["tools"])
    (a1, r1), (a2, r2) = split_shared_prefix(p1), split_shared_prefix(p2)
    assert a1 == a2 and a1 + r1 == p1 and a2 + r2 == p2
    assert a1.startswith("<bos><start_of_turn>developer\n")
    assert a1.endswith("<end_function_declaration><end_of_turn>\n")
    assert r1 == "<start_of_turn>user\n查询张三的年假<end_of_turn>\n<start_of_turn>model\n"


def test_shared_prefix_absent_without_developer_turn():
    prompt = render_conversation([{"role": "user", "content": "q"}], add_generation_prompt=True)
    assert split_shared_prefix(prompt) == ("", prompt)


def test_shared_prefix_tokenizes_like_the_whole_prompt():
    from tests.tiny_model import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    prompt, _ = split_prompt_completion(CALL_SAMPLE["messages"], CALL_SAMPLE["tools"])
    prefix, rest = split_shared_prefix(prompt)

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    assert ids(prefix) + ids(rest) == ids(prompt)
    assert ids(prefix)[0] == tokenizer.bos_token_id and ids(prompt).count(tokenizer.bos_token_id) == 1
    assert ids(prefix).count(CONTROL_TOKENS["<escape>"]) == render_declarations(GOLDEN["tools"]).count(E)

