"""Greedy decoding of many routing prompts at once in llama.cpp: one sequence per prompt in one shared KV cache.

llama.cpp's counterpart of batch_decode.py, used by `GgufRouter.route_many`. One query at a time, each decoding step
is a 1-token pass whose cost is mostly reading the weights (the 262k-vocabulary head is 60% of them); with many
sequences in one `llama_decode` that read is shared. The context here is a second one on the router's model (the
weights are not loaded twice), made for `rows` sequences in one unified KV cache:
  * the prefix (`<bos>` + developer turn) is decoded once as sequence 0, in the same 512-token ubatches as the
    router's own context, so its cells hold what `route` attends to;
  * each chunk's prompt j becomes sequence j + 1, given the prefix by `llama_memory_seq_cp` (cells shared, nothing
    recomputed); one `llama_decode` takes every prompt's user turn (positions after the prefix, logits on each
    prompt's last token), then each step takes one token per sequence still decoding;
  * the next token of each sequence is the greedy argmax of its logits, then the catalog constraint's choice when it
    is on, as `GgufRouter.route` chooses it; a sequence stops at a stop id or after `max_new_tokens` and its cells
    are freed; after the chunk every sequence but the prefix is removed.
`swa_full` is kept as in the router's context: Gemma 3's sliding layers then keep every cell, so a sequence's cells
are only reused once no position can see them.

Tokens equal those of one-query decoding up to float rounding, and this model has near-ties enough for rounding to
matter. On the HR router's 165 test cases (q8_0, 2 cores, AVX2 build): chunks of one sequence give the text of
`route(use_draft=False)` for every case; chunks of 8-32 differ from `route` on 8-10 cases, about as much as `route`
with and without drafts differ from each other (7), and agree with the PyTorch answers as often (93-94%). Most of
it is the layout: a sequence's cells sit among other sequences' in the unified cache. Separate KV streams
(`kv_unified=false`) differ from `route(use_draft=False)` on 2 cases instead of 9, but were slower (106-145 s
against 71-79 s at 16); flash attention changed nothing measurable.
A step costs ~35 ms + ~6.8 ms per sequence there.
"""
from __future__ import annotations

import time

import numpy as np

from src.evaluation.constrain import scores_of

PREFIX_SEQ = 0


class MultiSequenceGreedy:
    """Greedy decoding of prompts that all start with `prefix_ids`, up to `rows` at once, each needing at most
    `room` cells after the prefix (user turn + new tokens); the prefix is decoded when this is made."""

    def __init__(self, llm, prefix_ids: list[int], rows: int, room: int):
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        self.rows, self.room, self.prefix_len = rows, room, len(prefix_ids)
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # threads, ubatch, attention
        params.n_ctx = params.n_batch = self.prefix_len + rows * room
        params.n_seq_max, params.kv_unified, params.swa_full = rows + 1, True, True
        self._ctx = LlamaContext(model=llm._model, params=params, verbose=False)  # freed before the model
        self.n_vocab = llm.n_vocab()
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._decode([(PREFIX_SEQ, pos, token, False) for pos, token in enumerate(prefix_ids)])

    def fits(self, rows: int, room: int) -> bool:
        return rows <= self.rows and room <= self.room

    def close(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()

    def __call__(self, suffixes: list[list[int]], stop_ids, max_new_tokens: int,
                 constraints: list | None = None) -> tuple[list[list[int]], dict]:
        """New ids per suffix (the prompt after the prefix), stop token included, and the chunk's timings.
        `constraints`: each suffix's CatalogConstraint (bound to its request), or None for plain greedy."""
        import llama_cpp

        assert len(suffixes) <= self.rows and all(len(s) + max_new_tokens <= self.room for s in suffixes)
        t0 = time.perf_counter()
        new: list[list[int]] = [[] for _ in suffixes]
        try:
            for j in range(len(suffixes)):
                llama_cpp.llama_memory_seq_cp(self._memory, PREFIX_SEQ, j + 1, -1, -1)
            outputs = self._decode([(j + 1, self.prefix_len + i, token, i == len(s) - 1)
                                    for j, s in enumerate(suffixes) for i, token in enumerate(s)])
            t1 = time.perf_counter()
            active, steps = list(range(len(suffixes))), 0
            while True:
                going = []
                for out, j in zip(outputs, active):
                    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, out),
                                                shape=(self.n_vocab,))
                    best = int(row.argmax())
                    new[j].append(constraints[j].pick(new[j], best, scores_of(row)) if constraints is not None
                                  else best)
                    if new[j][-1] in stop_ids or len(new[j]) >= max_new_tokens:
                        llama_cpp.llama_memory_seq_rm(self._memory, j + 1, -1, -1)
                    else:
                        going.append(j)
                if not going:
                    break
                active = going
                outputs = self._decode([(j + 1, self.prefix_len + len(suffixes[j]) + len(new[j]) - 1, new[j][-1],
                                         True) for j in active])
                steps += 1
        finally:
            llama_cpp.llama_memory_seq_keep(self._memory, PREFIX_SEQ)
        t2 = time.perf_counter()
        return new, {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "forward_steps": steps}

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (sequence, position, token, logits wanted) entries; returns the batch index of each
        entry with logits, in order (what `llama_get_logits_ith` takes)."""
        import llama_cpp

        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (seq, pos, token, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}) on a batch of {len(entries)} tokens")
        return [i for i, entry in enumerate(entries) if entry[3]]
