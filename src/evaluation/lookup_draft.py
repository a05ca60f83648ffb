"""Drafts from the router's own earlier calls, where the grammar has none to give.

The grammar (draft.py) cannot guess a date: `2026-06-17` is ten sequential digit tokens when the query said
"June 17", and a choice between functions or optional keys is open too. But a router serves the same catalog all
day, so what it wrote after `start_date:<escape>` last time (`2026-0...`) is a good guess this time. This is
n-gram lookup decoding over past outputs (llama.cpp's lookup decoding, with the router's history as the corpus):
the longest recent n-gram that ends the current output proposes what followed it then. Drafts are verified like
the grammar's, so the tokens are the greedy ones; a wrong guess only widens one forward pass.
"""
from __future__ import annotations

NGRAM_MAX = 4  # longest context matched first: fewer, surer hits
NGRAM_MIN = 2  # a single token (`0`, `,`) is followed by too many different things
LOOKUP_TOKENS = 8  # drafted per lookup: a date's `2026-0` or a function name and its `{`
MAX_NGRAMS = 200_000  # the table starts over past this (~1000 calls' worth of distinct n-grams)


class OutputLookup:
    def __init__(self, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN, tokens: int = LOOKUP_TOKENS):
        self.n_max, self.n_min, self.tokens = n_max, n_min, tokens
        self.table: dict[tuple[int, ...], tuple[int, ...]] = {}

    def remember(self, ids: list[int]) -> None:
        """Index a finished output: each n-gram maps to the tokens that followed it (the latest occurrence)."""
        if len(self.table) > MAX_NGRAMS:
            self.clear()
        for end in range(self.n_min, len(ids)):
            follow = tuple(ids[end:end + self.tokens])
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.table[tuple(ids[end - n:end])] = follow

    def clear(self) -> None:
        self.table.clear()

    def draft(self, new: list[int]) -> list[int]:
        """What followed the longest earlier n-gram that ends `new`, or []."""
        for n in range(min(self.n_max, len(new)), self.n_min - 1, -1):
            follow = self.table.get(tuple(new[-n:]))
            if follow:
                return list(follow)
        return []
