"""Catalog-constrained decoding: the grammar, the exact choice of token, and the PyTorch router on the tiny model.

The tiny random model never writes a call by itself, so two stand-ins are used. `ScriptedModel` adds a bonus to the
next token of whole scripted answers (a wrong one ranked first, the right one second), the way a fine-tuned model
that invents a name still ranks the real one close behind. `open_a_call` turns the model's output row of
`<start_function_call>` towards the prompt's last hidden state, so the untouched transformer opens a call and every
later choice is its own (this one also runs as a GGUF, see tests/test_eval_gguf.py).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from src.data_engine.formatter import CONTROL_TOKENS, parse_output
from src.evaluation.constrain import FREE, CallGrammar, CatalogConstraint, TokenTable, scores_of, tokenizer_pieces
from src.evaluation.router import Router, inference_options
from src.utils.config_loader import load_config
from tests.tiny_model import make_spm_tokenizer, make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer

HR_TOOLS = json.loads((Path(__file__).resolve().parents[1] / "data" / "tools" / "hr_tools.json").read_text())
NAMES = {t["function"]["name"] if "function" in t else t["name"] for t in HR_TOOLS}
C, END = "<start_function_call>", "<end_function_call><start_function_response>"
QUERY = "查询张三的年假"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the grammar


LEAVE_TYPES = ["annual", "sick", "personal", "compensatory"]


@pytest.mark.parametrize("text, rests", [
    ("", FREE),                                                   # no call (yet): nothing is constrained
    ("Hello <start_function_", FREE),
    ("<start_function_call>", ["call:" + n + "{" for n in NAMES]),
    ("call:get_", ["leave_balance{", "payslip{", "attendance{", "employee_info{"]),
    ("call:get_expense", None),                                   # no such function
    ("call:get_payslip{", ["employee_name:", "month:", "}<end_function_call>"]),
    ("call:get_payslip{employee", ["_name:"]),
    ("call:get_payslip{employee:", None),                         # no such key
    ("call:get_payslip{month:<escape>2025-01<escape>,", None),    # no key left after month
    ("call:get_payslip{month:<escape>2025-01<escape>,employee_name:", None),  # keys come in sorted order
    ("call:get_payslip{employee_name:<escape>a<escape>,employee_name:", None),  # and only once
    ("call:get_payslip{employee_name:<escape>a,}{<start_function_call>", FREE),  # a free string, up to <escape>
    ("call:get_leave_balance{employee_name:<escape>a<escape>,leave_type:<escape>s", ["ick<escape>"]),
    ("call:get_leave_balance{employee_name:<escape>a<escape>,leave_type:<escape>vacation", None),
    ("call:get_leave_balance{leave_type:annual", None),           # an enum value is written escaped
    ("call:get_leave_balance{leave_type:", ["<escape>" + v + "<escape>" for v in LEAVE_TYPES]),
    ("call:submit_expense{amount:12", FREE),                      # numbers are free
    ("call:submit_expense{amount:", FREE),
    ("call:submit_expense{amount:<esc", FREE),                    # <escape> spelled out
    ("call:submit_expense{amount:,", None),                       # but a value there must be
    ("call:submit_expense{amount:12<start_function_call>", None),  # and a number has no control tokens
    ("call:submit_expense{amount:12,c", ["ategory:<escape>" + v + "<escape>" for v in
                                          ["travel", "meals", "transport", "office_supplies", "training", "other"]]),
    ("call:submit_expense{amount:12,x", None),
    ("call:submit_expense{amount:12}", ["<end_function_call>"]),
    ("call:update_contact_info{employee_name:[1,{a:<escape>}<escape>}],", [  # after a nested value: a key
        *("field:<escape>" + v + "<escape>" for v in ["phone", "email", "address", "emergency_contact"]),
        "new_value:"]),
    ("call:search_policy{}<end_function_call>", FREE),            # after the call: free again
    ("call:search_policy{}<end_function_call><start_function_call>call:search_", ["policy{"]),  # and the next call
    ("call:get_expense{}<end_function_call><start_function_call>call:", None),  # an invalid call stays invalid
])
def test_grammar_rests(text, rests):
    text = text if not text.startswith("call:") else C + text
    got = CallGrammar(HR_TOOLS).rests(text.encode())
    expected = rests if rests is None or rests == FREE else sorted(r.encode() for r in rests)
    assert (got if got is None or got == FREE else sorted(got)) == expected


def test_a_function_without_parameters_closes_at_once():
    grammar = CallGrammar([{"name": "ping", "description": "", "parameters": {"type": "object"}}])
    assert grammar.rests(C.encode() + b"call:ping{") == (b"}<end_function_call>",)


# ---------------------------------------------------------------- the exact choice


def _pieces_with_merges() -> list[bytes]:
    """A vocabulary with multi-byte pieces that cross field borders (`e{`, `:1`, `,leave`, `}<`), as Gemma's has."""
    words = [b"call", b"call:", b":", b"get", b"_", b"leave", b"_balance", b"balance{", b"e{", b"{", b"{employee",
             b"employee", b"_name", b"name:", b":1", b":<", b",", b",leave", b"_type:", b"annual", b"ann", b"sick",
             b"}", b"}<", b"<end", b"e", b"pay", b"slip", b"x", b"expense", b"1", b"2", b",x", b"1,", b"}}", b"a"]
    specials = [b"<start_function_call>", b"<end_function_call>", b"<escape>", b"<end_of_turn>", b""]
    return specials + [bytes([b]) for b in range(256)] + words


@pytest.mark.parametrize("text", [
    "", "call:", "call:get_", "call:get_leave_balance", "call:get_leave_balance{", "call:get_leave_balance{employee",
    "call:get_leave_balance{employee_name:<escape>a<escape>",
    "call:get_leave_balance{employee_name:<escape>a<escape>,",
    "call:get_leave_balance{employee_name:<escape>a<escape>,leave_type:<escape>", "call:get_leave_balance{}",
    "call:submit_expense{amount:", "call:submit_expense{amount:1", "call:get_payslip{month:<escape>x<escape>",
    "call:get_payslip{employee_name:<escape>",
])
def test_pick_is_the_best_token_that_keeps_the_call_valid(text):
    """Against a scan of the whole vocabulary, for many random logits."""
    pieces = _pieces_with_merges()
    constraint = CatalogConstraint(HR_TOOLS, TokenTable(pieces))
    grammar = CallGrammar(HR_TOOLS)
    new = [0]  # <start_function_call>, then the text byte by byte with <escape> as its own token
    for i, part in enumerate(text.split("<escape>")):
        new += ([2] if i else []) + [pieces.index(bytes([b])) for b in part.encode()]
    call = C.encode() + text.encode()
    rests = grammar.rests(call)
    assert rests is not None
    valid = [t for t, p in enumerate(pieces) if (p or not rests) and grammar.rests(call + p) is not None]
    invalid = sorted(set(range(len(pieces))) - set(valid))
    among = constraint.among(new)
    assert (among is None) == (rests == FREE)
    assert among is None or set(valid) <= set(among.tolist()) and list(among) == sorted(among)
    rng = np.random.default_rng(len(text))
    for _ in range(200):
        logits = rng.standard_normal(len(pieces)).astype(np.float32)
        boosted = rng.choice(invalid) if invalid and rng.random() < 0.7 else rng.integers(len(pieces))
        logits[boosted] += 5  # a confident argmax, mostly one that does not fit
        expected = max(valid, key=lambda t: (logits[t], -t))
        assert constraint.pick(new, int(logits.argmax()), scores_of(logits)) == expected
        if among is not None:  # the routers' head computes only these logits and takes the argmax among them
            assert constraint.pick(new, int(among[logits[among].argmax()]), scores_of(logits)) == expected


def test_pick_leaves_text_answers_alone():
    pieces = _pieces_with_merges()
    constraint = CatalogConstraint(HR_TOOLS, TokenTable(pieces))
    logits = np.zeros(len(pieces), dtype=np.float32)
    logits[pieces.index(b"x")] = 1
    assert constraint.pick([pieces.index(b"a")], pieces.index(b"x"), scores_of(logits)) == pieces.index(b"x")


# ---------------------------------------------------------------- token bytes


def _spm_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma-shaped: BPE with byte fallback, '▁' for spaces, control tokens as added special tokens."""
    return make_spm_tokenizer(["▁", "c", "a", "l", ":", "call", "ca", "ll", "年", "年假", "▁a"])


@pytest.mark.parametrize("make", [make_tiny_tokenizer, _spm_tokenizer])
def test_token_bytes_spell_the_decoded_text(make):
    tokenizer = make()
    pieces = tokenizer_pieces(tokenizer, len(tokenizer) + 2)
    assert pieces[-2:] == [b"", b""]  # logits past the tokenizer
    rng = random.Random(0)
    alphabet = ["call", ":", " a", "年假", "张", "😀", "x", "<escape>", "<start_function_call>", "\n"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(pieces[i] for i in ids) == text.encode() == tokenizer.decode(ids).encode(), text


# ---------------------------------------------------------------- the router on a scripted tiny model


class ScriptedModel:
    """The tiny model plus, at each position, a bonus for the next token of every script written so far.

    Scripts start at `start` (the first generated position). It hides its output layer, so the router reads every
    logit through here, drafted verification included.
    """

    def __init__(self, model, scripts: list[tuple[list[int], float]]):
        self.model, self.config, self.scripts = model, model.config, scripts
        self.context: list[int] = []
        self.start: int | None = None

    def eval(self):
        return self

    def get_output_embeddings(self):
        return None

    def __call__(self, input_ids, cache, use_cache=True, logits_to_keep=0):
        past = cache.get_seq_length()
        self.context[past:] = input_ids[0].tolist()
        out = self.model(input_ids=input_ids, cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)
        logits = out.logits.clone()
        end = past + input_ids.shape[1]
        for row, pos in enumerate(range(end - logits.shape[1], end)):
            written = self.context[self.start: pos + 1] if self.start is not None else None
            for script, bonus in self.scripts if written is not None else ():
                if len(written) < len(script) and script[: len(written)] == written:
                    logits[0, row, script[len(written)]] += bonus
        out.logits = logits
        return out


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    return make_tiny_model(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def scripted(tiny):
    """One router (drafts and constraint on, switched per call) whose model follows the scripts it is given."""
    model, tokenizer = tiny
    router = Router(ScriptedModel(model, []), tokenizer, HR_TOOLS, max_new_tokens=120, draft=True, constrain=True)
    router.model.start = len(router.encode(router.render(QUERY)))

    def with_scripts(first: str, second: str | None = None) -> Router:
        encode = router.encode
        router.model.scripts = [(encode(first), 20.0)] + ([(encode(second), 10.0)] if second else [])
        return router

    return with_scripts


def run(router, draft: bool = False, constrain: bool = True) -> tuple[str, dict]:
    new, timings = router.generate_ids(router.encode(router.render(QUERY)), draft_source=QUERY, use_draft=draft,
                                       use_constrain=constrain)
    return router.decode(new), timings


def call(args: str, name: str = "get_leave_balance") -> str:
    return f"{C}call:{name}{{{args}}}{END}"


ZHANG = "employee_name:<escape>张三<escape>"
WRONG_THEN_RIGHT = {  # what the model ranks first, what it ranks second
    "invented name": (call(ZHANG, "get_expense"), call(ZHANG, "get_employee_info")),
    "invented key": (call("employee:<escape>张三<escape>"), call(ZHANG)),
    "enum value": (call(ZHANG + ",leave_type:<escape>vacation<escape>"),
                   call(ZHANG + ",leave_type:<escape>annual<escape>")),
    "key order": (call("leave_type:<escape>sick<escape>," + ZHANG), call("leave_type:<escape>sick<escape>")),
}
UNTOUCHED = {
    "free string": call("query:<escape>病假, {规定}: 是?]<escape>", "search_policy"),
    "numbers": call("date:<escape>2025-01-01<escape>," + ZHANG + ",hours:2.5e0,reason:<escape>x<escape>",
                    "request_overtime"),
    "text answer": "call:get_expense{} 不是一个函数。<end_of_turn>",
}


@pytest.mark.parametrize("case", WRONG_THEN_RIGHT)
def test_invented_names_keys_and_values_give_way_to_the_catalog(scripted, case):
    wrong, right = WRONG_THEN_RIGHT[case]
    router = scripted(wrong, right)
    assert run(router, constrain=False)[0] == wrong  # what the model ranks first
    assert run(router)[0] == right
    parsed = parse_output(right)
    assert parsed.kind == "calls" and parsed.calls[0]["name"] in NAMES


@pytest.mark.parametrize("case", UNTOUCHED)
def test_free_values_and_text_answers_are_untouched(scripted, case):
    router = scripted(UNTOUCHED[case])
    assert run(router)[0] == run(router, constrain=False)[0] == UNTOUCHED[case]


def test_whether_to_call_stays_the_models_choice(scripted):
    router = scripted("好的。<end_of_turn>", call(ZHANG))
    assert run(router)[0] == "好的。<end_of_turn>"


@pytest.mark.parametrize("case", [*WRONG_THEN_RIGHT, *UNTOUCHED])
def test_drafted_equals_plain_under_the_constraint(scripted, case):
    router = scripted(*WRONG_THEN_RIGHT.get(case, (UNTOUCHED.get(case), None)))
    plain, plain_timings = run(router)
    drafted, timings = run(router, draft=True)
    assert drafted == plain
    if plain.startswith(C):  # the grammar's drafts were taken, also where the constraint overruled the argmax
        assert timings["forward_steps"] < plain_timings["forward_steps"]


# ---------------------------------------------------------------- the untouched tiny transformer opening a call


def open_a_call(model, prompt_ids: list[int]):
    """Point the output row of <start_function_call> (tied to an input row the prompt does not use) along the
    prompt's last hidden state, far enough to beat every other logit there: the model then opens a call."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([prompt_ids])).last_hidden_state[0, -1]
        weight = model.get_output_embeddings().weight
        weight[CONTROL_TOKENS[C]] = hidden / hidden.norm() * 4 * weight.norm(dim=1).max()
    return model


def test_screened_drafts_equal_plain_decoding_under_the_constraint():
    tokenizer = make_tiny_tokenizer()
    router = Router(make_tiny_model(len(tokenizer)), tokenizer, HR_TOOLS, max_new_tokens=48, draft=True,
                    constrain=True)
    ids = router.encode(router.render(QUERY))
    open_a_call(router.model, ids)  # the cached prefix does not contain the token, so it stays valid
    free, _ = router.generate_ids(ids, use_draft=False, use_constrain=False)
    plain, plain_timings = router.generate_ids(ids, use_draft=False)
    drafted, timings = router.generate_ids(ids, draft_source=QUERY)
    assert router._screened_head is not None  # the drafted path used the bf16-screened head
    assert drafted == plain and timings["forward_steps"] < plain_timings["forward_steps"]
    text = router.decode(plain)
    assert text.startswith(C + "call:") and text[len(C) + 5:].split("{")[0] in NAMES, text
    assert router.decode(free).startswith(C) and not router.decode(free).startswith(C + "call:")


# ---------------------------------------------------------------- configuration


def test_constrain_is_on_by_default_and_can_be_turned_off(tmp_path):
    assert load_config().inference.constrain is True
    assert inference_options(None)["constrain"] is True
    assert inference_options({"inference": {"constrain": False}})["constrain"] is False
    model_dir = make_tiny_model_dir(tmp_path / "model")
    (model_dir / "tools.json").write_text(json.dumps(HR_TOOLS), encoding="utf-8")
    assert Router.from_model_dir(model_dir).constrainer is not None
    assert Router.from_model_dir(model_dir, config={"inference": {"constrain": False}}).constrainer is None
    sampled = Router.from_model_dir(model_dir, config={"inference": {"temperature": 1.0, "max_new_tokens": 4}})
    assert sampled.route(QUERY).n_new_tokens <= 4  # sampling: the constraint is built but not applied


# ---------------------------------------------------------------- copied arguments

COPIED = {"get_leave_balance": ["employee_name"], "request_leave": ["reason"]}
SOURCE = "查询Coco Huang的年假"
OPEN_NAME = "call:get_leave_balance{employee_name:"
NEXT_FIELD = [",leave_type:<escape>" + v + "<escape>" for v in LEAVE_TYPES] + ["}<end_function_call>"]


@pytest.mark.parametrize("text, rests", [
    (OPEN_NAME, ["<escape>"]),                                     # a copied value is a string
    (OPEN_NAME + "<escape>Coco", [" Huang的年假", "<escape>"]),      # goes on as the request does, or ends
    (OPEN_NAME + "<escape>coco", None),                             # not a piece of the request
    (OPEN_NAME + "<escape><escape>", None),                         # nor is nothing
    (OPEN_NAME + "<escape>Coco Huang<escape>", NEXT_FIELD),
    (OPEN_NAME + "<escape>Coco Huang<esc", ["ape>"]),                # <escape> spelled out
    (OPEN_NAME + "<escape> Coco", None),                            # values are trimmed pieces: no space first
    (OPEN_NAME + "<escape>Coco ", ["Huang的年假"]),                    # nor last
    (OPEN_NAME + "<escape>Coco Huang的年假", ["<escape>"]),           # the request's end: only the close is left
    ("call:search_policy{query:<escape>coco", FREE),                # keys the data does not copy stay free
    ("call:request_leave{employee_name:<escape>coco", FREE),        # per function
])
def test_copied_values_are_pieces_of_the_request(text, rests):
    got = CallGrammar(HR_TOOLS, COPIED).rests((C + text).encode(), SOURCE.encode())
    expected = rests if rests is None or rests == FREE else sorted(r.encode() for r in rests)
    assert (got if got is None or got == FREE else sorted(got)) == expected


def test_a_copied_value_may_start_anywhere_in_the_request_and_is_free_without_one():
    grammar = CallGrammar(HR_TOOLS, COPIED)
    opened = (C + OPEN_NAME + "<escape>").encode()
    source = SOURCE.encode()
    assert sorted(grammar.rests(opened, source)) == sorted(source[i:] for i in range(len(source))
                                                           if source[i:i + 1] != b" ")  # trimmed, as the data's
    assert grammar.rests(opened + b"coco") == FREE  # no request bound: a free value
    assert grammar.rests(opened + b"a", b"banana") == (b"nana", b"na", b"<escape>")  # every place it occurs


@pytest.mark.parametrize("text", [OPEN_NAME, OPEN_NAME + "<escape>", OPEN_NAME + "<escape>a", OPEN_NAME + "<escape>x1",
                                  OPEN_NAME + "<escape>ann"])
def test_pick_is_the_best_token_that_keeps_a_copied_value_a_piece_of_the_request(text):
    """As the exactness test above, with the constraint bound to a request."""
    pieces = _pieces_with_merges()
    source = "pay annual x1,leave annx1"
    constraint = CatalogConstraint(HR_TOOLS, TokenTable(pieces), COPIED).for_source(source)
    grammar = CallGrammar(HR_TOOLS, COPIED)
    new = [0]
    for i, part in enumerate(text.split("<escape>")):
        new += ([2] if i else []) + [pieces.index(bytes([b])) for b in part.encode()]
    call = C.encode() + text.encode()
    valid = [t for t, p in enumerate(pieces) if p and grammar.rests(call + p, source.encode()) is not None]
    among = constraint.among(new)
    assert set(valid) <= set(among.tolist())
    rng = np.random.default_rng(len(text))
    for _ in range(200):
        logits = rng.standard_normal(len(pieces)).astype(np.float32)
        logits[rng.integers(len(pieces))] += 5
        expected = max(valid, key=lambda t: (logits[t], -t))
        assert constraint.pick(new, int(logits.argmax()), scores_of(logits)) == expected
        assert constraint.pick(new, int(among[logits[among].argmax()]), scores_of(logits)) == expected


def test_binding_a_request_leaves_the_shared_constraint_unbound():
    constraint = CatalogConstraint(HR_TOOLS, TokenTable(_pieces_with_merges()), COPIED)
    bound = constraint.for_source(SOURCE)
    assert bound.source == SOURCE.encode() and constraint.source is None and bound.grammar is constraint.grammar
    assert constraint.for_source("") is constraint  # nothing to copy from: unchanged
    plain = CatalogConstraint(HR_TOOLS, TokenTable(_pieces_with_merges()))
    assert plain.for_source(SOURCE) is plain  # no copied keys: unchanged


STATED = {"submit_expense": ["amount"]}
EXPENSE = "call:submit_expense{amount:"
AFTER_AMOUNT = [",category:<escape>" + v + "<escape>" for v in
                ["travel", "meals", "transport", "office_supplies", "training", "other"]] + [
    ",description:", ",employee_name:", "}<end_function_call>"]


@pytest.mark.parametrize("text, rests", [
    (EXPENSE, ["540", "12.5", "3"]),                   # only numbers the request states, as a call writes them
    (EXPENSE + "5", ["40"]),
    (EXPENSE + "54", ["0"]),
    (EXPENSE + "540", AFTER_AMOUNT),                    # whole: the next field may follow at once
    (EXPENSE + "3", AFTER_AMOUNT),
    (EXPENSE + "12", [".5"]),                           # 12 alone is not stated
    (EXPENSE + "541", None),
    (EXPENSE + "1444,", None),                          # a number it does not state, closed
    (EXPENSE + "540,c", ["ategory:<escape>" + v + "<escape>" for v in
                         ["travel", "meals", "transport", "office_supplies", "training", "other"]]),
    (EXPENSE + "<escape>", None),                       # a number, not a string
])
def test_stated_numbers_are_the_requests_own(text, rests):
    source = "餐费五百四十块，另有打车12.5元，共3张票".encode()
    got = CallGrammar(HR_TOOLS, STATED).rests((C + text).encode(), source)
    expected = rests if rests is None or rests == FREE else sorted(r.encode() for r in rests)
    assert (got if got is None or got == FREE else sorted(got)) == expected


def test_a_stated_number_is_free_without_a_request_or_a_number_in_it():
    grammar = CallGrammar(HR_TOOLS, STATED)
    assert grammar.rests((C + EXPENSE + "1444").encode()) == FREE
    assert grammar.rests((C + EXPENSE + "1444").encode(), "报销打车费".encode()) == FREE
    assert grammar.rests((C + EXPENSE + "1444,").encode(), "报销打车费".encode()) is not None


def test_pick_turns_a_misread_amount_into_the_stated_one():
    pieces = _pieces_with_merges()
    source = "报销五百四十块"
    constraint = CatalogConstraint(HR_TOOLS, TokenTable(pieces), STATED).for_source(source)
    new = [0] + [pieces.index(bytes([b])) for b in EXPENSE.encode()]
    logits = np.zeros(len(pieces), dtype=np.float32)
    one, five = pieces.index(b"1"), pieces.index(b"5")
    logits[one], logits[five] = 9.0, 1.0  # the model would write 1444...
    assert constraint.pick(new, one, scores_of(logits)) == five  # ...the request says 540


@pytest.fixture(scope="module")
def copying(tiny):
    """A scripted router whose catalog constraint keeps employee_name to pieces of the request."""
    model, tokenizer = tiny
    router = Router(ScriptedModel(model, []), tokenizer, HR_TOOLS, max_new_tokens=120, draft=True, constrain=True,
                    copied=COPIED)
    router.model.start = len(router.encode(router.render(QUERY)))
    return router


@pytest.mark.parametrize("draft", [False, True])
def test_an_invented_name_gives_way_to_the_one_in_the_request(scripted, copying, draft):
    wrong, right = call("employee_name:<escape>张四<escape>"), call(ZHANG)
    assert run(scripted(wrong, right), draft=draft)[0] == wrong  # without copied keys: the model's first choice
    copying.model.scripts = [(copying.encode(wrong), 20.0), (copying.encode(right), 10.0)]
    assert run(copying, draft=draft)[0] == right
    assert copying.decoding()["copied_arguments"] == {k: sorted(v) for k, v in sorted(COPIED.items())}
