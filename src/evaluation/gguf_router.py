"""The Router interface over a GGUF file run by llama.cpp (llama-cpp-python), with the same prefix-cache idea.

The developer turn is evaluated once into llama.cpp's KV cache; each query then keeps that part of the cache and only
evaluates its own tokens (llama-cpp-python keeps the longest common token prefix between calls and removes the rest
with `kv_cache_seq_rm`). Gemma 3's sliding-window layers normally keep only the last window of the cache, so
removing the previous query's tail could leave the new tokens without the window they need; `swa_full=True`
keeps the whole cache for those layers (a few MB more) so the reuse is exact. Saving and restoring the whole state
instead was measured slower: `save_state`/`load_state` copy the logits buffer (n_batch x 262k floats) each time.
With `draft=True` (greedy only) the grammar's drafts (draft.py) are verified in one llama_decode with logits at every
drafted position, through llama.cpp's C API (llama-cpp-python's `eval` keeps only the last position's logits).
With `constrain=True` (greedy only) calls keep to the catalog (constrain.py) as in the PyTorch router; decoding then
runs through that same loop (with or without drafts), since llama-cpp-python's `generate` picks tokens itself.
Flash attention is on: over the 165 HR test queries on 2 cores (q8_0, served decoding) p50 688 ms / p95 1256 ms
against 751 / 1461 ms without it, in the same session; 158 of 165 outputs identical (float rounding).
`route_many` decodes many queries at once as sequences of a second context on the same model (gguf_batch.py): what
export verification uses.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from src.data_engine.formatter import CALL_OPEN, STOP_STRINGS, split_shared_prefix
from src.evaluation.constrain import CatalogConstraint, TokenTable, llama_pieces, scores_of
from src.evaluation.draft import MAX_DRAFT_TOKENS, CallDrafter
from src.evaluation.gguf_batch import MultiSequenceGreedy
from src.evaluation.router import (
    BaseRouter, RouteResult, batch_size_of, check_user_content, copied_arguments_of, inference_options, load_tools,
    trained_system_prompt,
)
from src.utils.config_schema import EvaluationConfig
from src.utils.errors import UserError

DEFAULT_CTX = 4096
N_THREADS = 2  # the deployment target; more threads than cores makes llama.cpp slower, not faster
USER_ROOM = 512  # tokens of user turn the context leaves room for (route_many routes longer ones one by one)
MAX_SEQUENCES = 255  # llama.cpp's limit (llama_max_parallel_sequences) less the prefix's own sequence
ROOM_STEP = 64  # cells per sequence rounded up to this, so a slightly longer query does not remake the context


class GgufRouter(BaseRouter):
    runtime = "llama.cpp"

    def __init__(self, model_path, tools, system_prompt: str | None = None, prefix_cache: bool = True,
                 max_new_tokens: int = 96, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, draft: bool = False, constrain: bool = False,
                 n_threads: int = N_THREADS, batch_size: int = EvaluationConfig.batch_size,
                 copied: dict[str, list[str]] | None = None, rescore_optional: bool = False):
        self.model_path = Path(model_path)
        self.rescore_optional = rescore_optional
        if not self.model_path.is_file():
            raise UserError(f"{model_path}: GGUF file not found")
        self.tools, self.system_prompt, self.prefix_cache = tools, system_prompt, prefix_cache
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.seed, self.n_threads, self.batch_size = seed, n_threads, batch_size
        self.copied = copied or {}  # keys whose values the constraint keeps to pieces of the request
        prefix, _ = split_shared_prefix(self.render("x"))
        self.llm = self._open(DEFAULT_CTX)
        self.prefix_ids = self.encode(prefix)
        needed = len(self.prefix_ids) + USER_ROOM + max_new_tokens
        if needed > DEFAULT_CTX:
            self.llm.close()
            self.llm = self._open(needed)
        bos = self.llm.token_bos()
        if self.prefix_ids[:1] != [bos] or self.prefix_ids[1:2] == [bos]:
            raise UserError(f"{self.model_path}: the prompt does not start with exactly one <bos> (id {bos}) "
                            "in this GGUF's tokenizer")
        self.stop_ids = {self._single_token(s) for s in STOP_STRINGS}
        self.drafter = CallDrafter(tools) if draft else None
        self.call_open_id = self._single_token(CALL_OPEN)
        self.constrainer = self._constraint() if constrain else None
        self._batch = None  # llama_batch for drafted steps, allocated on first use
        self._many = None  # route_many's multi-sequence context (gguf_batch.py), made on first use
        if prefix_cache:
            self.llm.reset()
            self.llm.eval(self.prefix_ids)

    def _open(self, n_ctx: int):
        from llama_cpp import Llama

        try:
            return Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_threads=self.n_threads,
                         n_threads_batch=self.n_threads, logits_all=False, swa_full=True, flash_attn=True,
                         verbose=False, seed=self.seed if self.seed is not None else 0xFFFFFFFF)
        except ValueError as exc:  # llama-cpp-python reports an unreadable model this way
            raise UserError(f"{self.model_path}: cannot load GGUF ({exc})") from None

    @classmethod
    def from_model_file(cls, path, tools_file=None, config=None) -> "GgufRouter":
        from src.utils.model_loader import resolve_model_source

        path = Path(resolve_model_source(path).path)  # missing file or bad magic bytes: one-line error
        tools = load_tools(path, tools_file)
        return cls(path, tools, system_prompt=trained_system_prompt(path, config), batch_size=batch_size_of(config),
                   copied=copied_arguments_of(path, config), **inference_options(config))

    def _constraint(self) -> CatalogConstraint:
        """Token bytes read from the GGUF's own vocabulary (~262k llama_token_to_piece calls for Gemma)."""
        return CatalogConstraint(self.tools, TokenTable(llama_pieces(self.llm)), self.copied)

    def close(self) -> None:
        """Free llama.cpp's model and context now (its own finalizer can fail at interpreter exit)."""
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._many is not None:
            self._many.close()
            self._many = None
        self.llm.close()

    def encode(self, text: str) -> list[int]:
        """Special tokens parsed, no BOS added: the rendered prompt already starts with `<bos>`."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _single_token(self, text: str) -> int:
        ids = self.encode(text)
        if len(ids) != 1:
            raise UserError(f"{self.model_path}: no {text} token in this GGUF's vocabulary; "
                            "export it from a FunctionGemma-format model")
        return ids[0]

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def generate_ids(self, prompt_ids: list[int], use_prefix_cache: bool | None = None,
                     use_draft: bool | None = None, draft_source: str = "",
                     use_constrain: bool | None = None) -> tuple[list[int], dict]:
        use_cache = self.prefix_cache if use_prefix_cache is None else use_prefix_cache
        drafted, constrained = self._greedy_aids(use_draft, use_constrain)
        if not use_cache:
            self.llm.reset()  # n_tokens = 0: nothing of the previous prompt is reused
        reused = min(_common_prefix(self.llm.eval_tokens, prompt_ids), len(prompt_ids) - 1)
        t0 = time.perf_counter()
        if drafted or constrained:
            new, steps, t_first = self._decode_greedy(prompt_ids, reused, draft_source, drafted, constrained)
        else:
            new, steps, t_first = self._decode_plain(prompt_ids)
        t2 = time.perf_counter()
        return new, {"prefill_ms": (t_first - t0) * 1e3, "decode_ms": (t2 - t_first) * 1e3,
                     "prefill_tokens": len(prompt_ids) - reused, "cached_prefix": reused > 0, "forward_steps": steps}

    def _decode_plain(self, prompt_ids: list[int]) -> tuple[list[int], int, float]:
        """llama-cpp-python's own loop: it keeps the longest common token prefix with what the cache holds."""
        new, t_first = [], None
        for token in self.llm.generate(prompt_ids, temp=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                       min_p=0.0, typical_p=1.0, repeat_penalty=1.0):
            t_first = t_first or time.perf_counter()
            new.append(token)
            if token in self.stop_ids or len(new) >= self.max_new_tokens:
                break
        return new, max(len(new) - 1, 0), t_first or time.perf_counter()

    def _logits(self, i: int) -> np.ndarray:
        """Logits of batch position i (-1: the last), a view valid until the next llama_decode."""
        import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, i)
        return np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))

    def _choose(self, new: list[int], i: int, constraint) -> int:
        """Greedy token at batch position i after the generated ids `new`, by `constraint`'s pick if given."""
        row = self._logits(i)
        best = int(row.argmax())
        return constraint.pick(new, best, scores_of(row)) if constraint is not None else best

    def _decode_with_logits(self, tokens: list[int]) -> None:
        """Evaluate `tokens` after the cached ones with logits at every position (eval() keeps only the last)."""
        import llama_cpp

        if self._batch is None:
            self._batch = llama_cpp.llama_batch_init(MAX_DRAFT_TOKENS + 1, 0, 1)
        n_past, batch = self.llm.n_tokens, self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, n_past + i, 1, True
            batch.seq_id[i][0] = 0
        if llama_cpp.llama_decode(self.llm.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        self.llm.input_ids[n_past:n_past + len(tokens)] = tokens
        self.llm.n_tokens = n_past + len(tokens)

    def _log_likelihoods(self, items: list[tuple[list[int], list[int], int]], use_cache: bool = True) -> list[float]:
        """optional_rescore's scores, one item after the other in the router's own context: an item keeps the cells
        it shares with the previous one (its prompt, and the call's start for the candidates of one query); without
        `use_cache` the first item starts from an empty cache."""
        import llama_cpp

        if not use_cache:
            self.llm.reset()
        scores = []
        for prompt, completion, first in items:
            ids = prompt + completion
            before = len(prompt) + first - 1  # the token whose logits score completion[first]
            self.llm.n_tokens = min(_common_prefix(self.llm.eval_tokens, ids), before)
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), 0, self.llm.n_tokens, -1)
            if before > self.llm.n_tokens:
                self.llm.eval(ids[self.llm.n_tokens:before])
            total, fed = 0.0, ids[before:-1]
            for start in range(0, len(fed), MAX_DRAFT_TOKENS + 1):
                piece = fed[start:start + MAX_DRAFT_TOKENS + 1]
                self._decode_with_logits(piece)
                for i in range(len(piece)):
                    row = self._logits(i).astype(np.float64)
                    top = row.max()
                    total += row[ids[before + start + i + 1]] - top - np.log(np.exp(row - top).sum())
            scores.append(float(total))
        return scores

    def _decode_greedy(self, prompt_ids: list[int], reused: int, source: str, drafted: bool,
                       constrained: bool) -> tuple[list[int], int, float]:
        """Greedy decoding with our own loop: the grammar's drafts verified at each step (see draft.py) and/or the
        catalog constraint, as the PyTorch router does; a draft token is kept when it is what would be chosen there.

        The cache bookkeeping (n_tokens, input_ids) is kept as llama-cpp-python keeps it, so the next plain query
        still finds the shared prefix; rejected draft tokens are removed from the cache (exact with swa_full).
        """
        import llama_cpp

        self.llm.n_tokens = reused
        self.llm.eval(prompt_ids[reused:])  # drops cache cells past `reused`, logits for the last token only
        constraint = self._bound_constraint(source, constrained)
        new, steps = [], 0
        token, t_first = self._choose(new, -1, constraint), time.perf_counter()
        while True:
            new.append(token)
            if token in self.stop_ids or len(new) >= self.max_new_tokens:
                return new, steps, t_first
            draft = self.drafter.draft_ids(new, self.call_open_id, self.encode, self.decode, source) if drafted else []
            draft = draft[: self.max_new_tokens - len(new)]
            self._decode_with_logits([token, *draft])
            steps += 1
            accepted = 0
            while True:
                token = self._choose(new, accepted, constraint)
                if accepted == len(draft) or token != draft[accepted]:
                    break
                new.append(token)
                accepted += 1
                if token in self.stop_ids or len(new) >= self.max_new_tokens:
                    return new, steps, t_first
            if accepted < len(draft):
                self.llm.n_tokens -= len(draft) - accepted
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), 0, self.llm.n_tokens, -1)

    def route_many(self, queries: list[str], batch_size: int | None = None, progress=None) -> list[RouteResult]:
        """Route `queries` greedily, `batch_size` at a time (default: the router's), each chunk decoded as that many
        sequences of one llama.cpp context on the prefix's shared cells (gguf_batch.py): the raw text `route`
        gives, up to float rounding. Drafts are not used (one token per sequence and step); the catalog constraint
        is. The router's own context, where optional arguments are rescored, keeps the prefix for `route`.

        A batched result's `latency_ms` is its chunk's wall time (decoding, detokenizing, parsing; the prompts are
        encoded before) divided by the chunk's rows: a share of the throughput, not the latency of one query routed
        alone (`route` measures that); `timings` holds the chunk's prefill/decode ms and steps, with `batched: True`.
        Sampling, a router without its prefix cache, and a prompt that does not start with the prefix or whose user
        turn is over USER_ROOM tokens are routed one by one with `route`. `progress(n)` is called as each n more
        queries are done.
        """
        for query in queries:
            check_user_content(query)
        if self.temperature > 0 or not self.prefix_cache:
            return super().route_many(queries, progress=progress)
        _, constrained = self._greedy_aids(None, None)
        size = max(1, min(int(batch_size or self.batch_size), MAX_SEQUENCES))
        n_prefix = len(self.prefix_ids)
        prompts = [self.encode(self.render(query)) for query in queries]
        shared = [i for i, ids in enumerate(prompts)
                  if ids[:n_prefix] == self.prefix_ids and 0 < len(ids) - n_prefix <= USER_ROOM]
        results: list[RouteResult | None] = [None] * len(queries)
        if shared:
            longest = max(len(prompts[i]) for i in shared) - n_prefix
            decoder = self._sequences(min(size, len(shared)), longest + self.max_new_tokens)
        for start in range(0, len(shared), size):
            t0 = time.perf_counter()
            chunk = shared[start:start + size]
            new, timings = decoder([prompts[i][n_prefix:] for i in chunk], self.stop_ids, self.max_new_tokens,
                                   [self.constrainer.for_source(queries[i]) for i in chunk] if constrained else None)
            for i, result in zip(chunk, self._chunk_results([prompts[i] for i in chunk], new, timings, t0)):
                results[i] = result
            if progress is not None:
                progress(len(chunk))
        for i, result in enumerate(results):
            if result is None:
                results[i] = self.route(queries[i])
                if progress is not None:
                    progress(1)
        return results

    def _sequences(self, rows: int, room: int) -> MultiSequenceGreedy:
        """The multi-sequence context, (re)made when it has fewer sequences or cells per sequence than asked."""
        if self._many is None or not self._many.fits(rows, room):
            if self._many is not None:
                self._many.close()
                self._many = None
            self._many = MultiSequenceGreedy(self.llm, self.prefix_ids, rows, -(-room // ROOM_STEP) * ROOM_STEP)
        return self._many


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
