"""Drafts looked up in the router's earlier outputs: what they propose, and that decoding with them is unchanged."""
from __future__ import annotations

import pytest

import src.evaluation.lookup_draft as lookup_draft
from src.evaluation.draft import MAX_DRAFT_TOKENS, CallDrafter
from src.evaluation.lookup_draft import OutputLookup
from src.evaluation.router import Router
from tests.test_eval_draft import HR_TOOLS
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer


def test_the_longest_matching_ngram_proposes_what_followed_it():
    lookup = OutputLookup(n_max=3, n_min=2, tokens=3, unconfirmed=2)
    lookup.remember([1, 2, 3, 7, 8, 9, 10])
    lookup.remember([5, 2, 3, 7, 8, 4])
    assert lookup.draft([0, 1, 2, 3]) == [7, 8]  # (1, 2, 3) beats (2, 3); seen once: `unconfirmed` tokens
    assert lookup.draft([0, 2, 3]) == [7, 8]  # (2, 3): its two continuations agree as far as (7, 8)
    assert lookup.draft([9, 3]) == []  # never seen
    assert lookup.draft([3]) == []  # one token is not enough context


def test_the_draft_follows_the_kept_continuations_as_far_as_most_agree():
    lookup = OutputLookup(n_max=2, n_min=2, tokens=4, keep=4, agree=0.75)
    for tail in ([5, 6, 7], [5, 6, 8], [5, 6, 7], [5, 6, 7]):
        lookup.remember([1, 2, *tail])
    assert lookup.draft([1, 2]) == [5, 6, 7]  # 3 of 4 write 7 after (5, 6)
    lookup.remember([1, 2, 5, 6, 9])  # the oldest continuation is dropped: 7 has 2 of 4 now
    assert lookup.draft([1, 2]) == [5, 6]
    lookup.remember([1, 2, 4])  # keep=4: (5, 6, 7), (5, 6, 7), (5, 6, 9), (4,)
    assert lookup.draft([1, 2]) == [5, 6]  # 3 of 4 still agree on (5, 6)
    lookup.remember([1, 2, 4])
    assert lookup.draft([1, 2]) == []  # 2 of 4: no majority, no draft


def test_the_table_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(lookup_draft, "MAX_NGRAMS", 5)
    lookup = OutputLookup(n_max=2, n_min=2, unconfirmed=8)
    lookup.remember(list(range(10)))
    assert lookup.draft([3, 4]) == [5, 6, 7, 8, 9]
    lookup.remember([20, 21, 22])
    assert lookup.draft([3, 4]) == [] and lookup.draft([20, 21]) == [22]


def test_drafter_looks_up_outside_a_call_and_forgets_on_request():
    drafter = CallDrafter(HR_TOOLS)
    drafter.remember([1, 2, 3, 4])
    encode_never = decode_never = None  # no call opened: the grammar is not asked
    assert drafter.draft_ids([9, 1, 2], 99, encode_never, decode_never) == [3, 4]
    drafter.forget()
    assert drafter.draft_ids([9, 1, 2], 99, encode_never, decode_never) == []
    assert CallDrafter(HR_TOOLS, lookup=False).draft_ids([1, 2], 99, None, None) == []


def test_the_lookup_goes_on_where_the_grammars_draft_ends(monkeypatch):
    drafter = CallDrafter(HR_TOOLS)
    drafter.remember([5, 6, 7, 8])
    monkeypatch.setattr(drafter, "_grammar_ids", lambda *args: [5, 6])
    assert drafter.draft_ids([1], 99, None, None) == [5, 6, 7, 8]  # (5, 6) looked up after the grammar's part
    grammar = list(range(100, 100 + MAX_DRAFT_TOKENS))
    drafter.remember(grammar[-2:] + [1, 2])
    monkeypatch.setattr(drafter, "_grammar_ids", lambda *args: grammar)
    assert drafter.draft_ids([1], 99, None, None) == grammar  # the bound holds for the whole draft


@pytest.fixture(scope="module")
def router():
    tokenizer = make_tiny_tokenizer()
    return Router(make_tiny_model(len(tokenizer)), tokenizer, HR_TOOLS[:2], max_new_tokens=40, draft=True)


def test_a_repeated_query_is_drafted_from_its_first_answer_with_the_same_tokens(router):
    router.drafter.forget()
    plain = router.route("查询张三的年假", use_draft=False)
    assert plain.timings["forward_steps"] == 39 and plain.n_new_tokens == 40
    router.drafter.forget()
    first = router.route("查询张三的年假")  # the tiny model writes no call: nothing for the grammar to draft
    again = router.route("查询张三的年假")
    assert first.raw == again.raw == plain.raw
    assert first.timings["forward_steps"] == 39  # nothing earlier to look up
    # Up to LOOKUP_TOKENS + 1 tokens a step; the tiny model's runs of one token (`236 236 236 ...`) look up
    # the run's last continuation, so some drafts are cut short.
    assert again.timings["forward_steps"] <= 39 // 2
