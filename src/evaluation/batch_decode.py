"""Greedy decoding of many routing prompts at once, packed into one row per forward pass on one prefix cache.

Routing a test set one query at a time leaves 2 CPU cores mostly waiting: each decoding step is a 1-token pass whose
cost is the weights and the 262k-vocabulary head, not the arithmetic. Here the prompts of a chunk (all starting with
the router's shared developer turn) are decoded together, as training runs its suffixes (src/training/shared_prefix):
  * the prefix runs once, into a plain `DynamicCache` (every layer keeps every key; the masks do the sliding), and
    sliding layers drop the prefix keys no query can reach (position <= prefix length - window);
  * the suffixes are fed packed into one row, with explicit positions (prefix length + offset in its prompt),
    PREFILL_ROWS prompts per pass, their keys then joined into one cache; each step feeds one token per row still
    decoding, packed again; the cache keeps growing, and a (sample, position) pair kept for every cached key builds
    the block mask (src/utils/packed_masks.py) of each pass;
  * the next token of each row is the exact fp32 argmax (bf16-screened when the head allows, src/evaluation/
    argmax_head.py), then the catalog constraint's choice when it is on, as `Router.route` chooses it.
A row stops at a stop id or after `max_new_tokens`, as in `Router.route`; the other rows go on. Keys that no row can
see any more (rows that have finished, prefix keys slid out of every window) are dropped once they are a quarter of
a layer's keys. Tokens equal those of one-query decoding up to float rounding: matrix products of another shape may
round differently, which can flip a near-tied greedy choice.
"""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from src.evaluation.argmax_head import ScreenedArgmax
from src.evaluation.constrain import scores_of
from src.utils.packed_masks import PREFIX, block_masks, visible_prefix_starts

PRUNE_SHARE = 4  # drop unreachable keys once they are 1/4 of a layer's keys (each drop copies the cache once)
PREFILL_ROWS = 16  # rows per prefill pass (see PackedGreedy._prefill)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P(targets[i]) under each row of `logits` (rows x vocabulary), without a vocabulary-sized softmax copy."""
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


class PackedGreedy:
    """Greedy decoding of prompts that all start with `prefix_ids`; the prefix runs once, when this is made."""

    def __init__(self, model, prefix_ids: list[int], head: ScreenedArgmax | None = None):
        self.model, self.config, self.head = model, model.config, head
        self.prefix_len = len(prefix_ids)
        self.kinds = list(self.config.layer_types)
        starts = visible_prefix_starts(self.config, self.prefix_len)
        cache = DynamicCache()  # no config: sliding layers keep all their keys
        with torch.inference_mode():
            model(input_ids=torch.tensor([prefix_ids]), cache=cache, use_cache=True, logits_to_keep=1)
            self._prefix = [(layer.keys[..., starts[kind]:, :].clone(), layer.values[..., starts[kind]:, :].clone())
                            for layer, kind in zip(cache.layers, self.kinds)]
        self._prefix_pos = {kind: torch.arange(start, self.prefix_len) for kind, start in starts.items()}
        self.dtype = self._prefix[0][0].dtype

    @torch.inference_mode()
    def __call__(self, suffixes: list[list[int]], stop_ids, max_new_tokens: int,
                 constraints: list | None = None) -> tuple[list[list[int]], dict]:
        """New ids per suffix (the prompt after the prefix), stop token included, and the chunk's timings.
        `constraints`: each suffix's CatalogConstraint (bound to its request), or None for plain greedy."""
        t0 = time.perf_counter()
        cache, keys, best, logits_at = self._prefill(suffixes)
        t1 = time.perf_counter()
        new: list[list[int]] = [[] for _ in suffixes]
        next_pos = self.prefix_len + torch.tensor([len(s) for s in suffixes])
        active, steps = list(range(len(suffixes))), 0
        while True:
            going = []
            for j, row in enumerate(active):
                token = constraints[row].pick(new[row], best[j], logits_at(j)) if constraints is not None \
                    else best[j]
                new[row].append(token)
                if token not in stop_ids and len(new[row]) < max_new_tokens:
                    going.append(row)
            if not going:
                break
            active, rows = going, torch.tensor(going)
            self._prune(cache, keys, rows, int(next_pos[rows].min()))
            among = [constraints[r].among(new[r]) for r in active] \
                if constraints is not None and self.head is not None else None  # only the screened head uses it
            best, logits_at = self._step(cache, keys, [new[r][-1] for r in active], rows, next_pos[rows],
                                         torch.arange(len(active)), among)
            next_pos[rows] += 1
            steps += 1
        t2 = time.perf_counter()
        return new, {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "forward_steps": steps}

    def _fresh(self) -> tuple[DynamicCache, dict]:
        """A cache holding a copy of the prefix (the prefix stays as it is for the next chunk), and its keys'
        {layer type: (sample, position)}."""
        cache = DynamicCache()
        for i, (keys, values) in enumerate(self._prefix):
            cache.update(keys, values, i)
        return cache, {kind: (torch.full_like(pos, PREFIX), pos) for kind, pos in self._prefix_pos.items()}

    def _prefill(self, suffixes: list[list[int]]):
        """Feed the suffixes PREFILL_ROWS rows per pass, each pass on its own copy of the prefix, then join the passes'
        keys after one prefix: (cache, keys, greedy token per row, logits_at(row)).

        A packed token attends to every key of its pass, its mask blanking the other rows', so one pass over a whole
        chunk would cost (rows x suffix)^2; the decoding steps after it carry one token per row."""
        passes = []
        for first in range(0, len(suffixes), PREFILL_ROWS):
            group = suffixes[first:first + PREFILL_ROWS]
            cache, keys = self._fresh()
            lengths, starts, sample, position = self._packing(group, first)
            best, logits_at = self._step(cache, keys, [t for s in group for t in s], sample, position,
                                         starts + lengths - 1)
            passes.append((cache, keys, best, logits_at))
        if len(passes) == 1:
            return passes[0]
        cache = DynamicCache()
        for i, kind in enumerate(self.kinds):
            n = len(self._prefix_pos[kind])
            layers = [p[0].layers[i] for p in passes]
            cache.update(torch.cat([layers[0].keys] + [layer.keys[..., n:, :] for layer in layers[1:]], dim=-2),
                         torch.cat([layers[0].values] + [layer.values[..., n:, :] for layer in layers[1:]], dim=-2), i)
        keys = {kind: tuple(torch.cat([passes[0][1][kind][x]] + [p[1][kind][x][len(pos):] for p in passes[1:]])
                            for x in (0, 1))
                for kind, pos in self._prefix_pos.items()}

        def logits_at(row):
            return passes[row // PREFILL_ROWS][3](row % PREFILL_ROWS)

        return cache, keys, [token for p in passes for token in p[2]], logits_at

    def _step(self, cache, keys: dict, tokens: list[int], sample: torch.Tensor, position: torch.Tensor,
              read: torch.Tensor, among: list | None = None):
        """Feed packed `tokens` (their sample and position), append them to the key bookkeeping, and return the
        greedy token after each position in `read` with `logits_at(j)` (fp32 logits there, for the constraint).
        With the screened head, `among[j]` (CatalogConstraint.among) bounds the tokens row j's argmax is over."""
        inputs = self._inputs(cache, keys, tokens, sample, position)
        if self.head is not None:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state[0, read].float()
            weight = self.head.weight

            def logits_at(j):
                def logits(ids):
                    return (weight @ hidden[j] if ids is None else weight[torch.from_numpy(ids)] @ hidden[j]).numpy()
                return logits

            return self.head(hidden, among), logits_at
        logits = self.model(**inputs, logits_to_keep=read).logits[0].float()
        return logits.argmax(-1).tolist(), lambda j: scores_of(logits[j].numpy())

    def _packing(self, sequences: list[list[int]], first_sample: int):
        """(length and start of each sequence in the packed row, sample id and position of every packed token):
        sequence i is sample `first_sample + i`, its tokens at the positions after the prefix."""
        lengths = torch.tensor([len(s) for s in sequences])
        starts = lengths.cumsum(0) - lengths
        sample = first_sample + torch.arange(len(sequences)).repeat_interleave(lengths)
        return lengths, starts, sample, self.prefix_len + torch.arange(int(lengths.sum())) - starts.repeat_interleave(lengths)

    def _inputs(self, cache, keys: dict, tokens: list[int], sample: torch.Tensor, position: torch.Tensor) -> dict:
        """The model's inputs for packed `tokens` (their sample and position) on `cache`; the key bookkeeping grows."""
        for kind, (k_sample, k_pos) in keys.items():
            keys[kind] = (torch.cat([k_sample, sample]), torch.cat([k_pos, position]))
        masks = block_masks(self.config, sample, position, {k: v[0] for k, v in keys.items()},
                            {k: v[1] for k, v in keys.items()}, self.dtype)
        return {"input_ids": torch.tensor([tokens]), "attention_mask": masks, "position_ids": position[None],
                "cache": cache, "use_cache": True}

    @torch.inference_mode()
    def log_likelihoods(self, items: list[tuple[list[int], list[int], int]]) -> list[float]:
        """Per (suffix, completion, first): log P(completion[first:] | prefix + suffix + completion[:first]), fp32.
        PREFILL_ROWS items per packed pass on a fresh copy of the prefix (src/evaluation/optional_rescore.py)."""
        scores = []
        for begin in range(0, len(items), PREFILL_ROWS):
            group = items[begin:begin + PREFILL_ROWS]
            fed = [suffix + completion[:-1] for suffix, completion, _ in group]
            _, starts, sample, position = self._packing(fed, 0)
            read = torch.cat([int(start) + torch.arange(len(s) + first - 1, len(s) + len(c) - 1)
                              for start, (s, c, first) in zip(starts, group)])
            target = torch.tensor([t for _, c, first in group for t in c[first:]])
            cache, keys = self._fresh()
            logits = self.model(**self._inputs(cache, keys, [t for f in fed for t in f], sample, position),
                                logits_to_keep=read).logits[0].float()
            picked = token_log_probs(logits, target)
            counts = [len(c) - first for _, c, first in group]
            scores += [float(part.sum()) for part in picked.split(counts)]
        return scores

    def _prune(self, cache, keys: dict, rows: torch.Tensor, lowest_next: int) -> None:
        """Drop the keys no row in `rows` can see again (their next positions are >= `lowest_next`) from the layers
        of a kind where they are at least 1/PRUNE_SHARE of the keys."""
        window = getattr(self.config, "sliding_window", None)
        for kind, (k_sample, k_pos) in keys.items():
            keep = (k_sample == PREFIX) | torch.isin(k_sample, rows)
            if kind == "sliding_attention":
                keep &= k_pos > lowest_next - window
            if (~keep).sum() * PRUNE_SHARE < keep.numel():
                continue
            index = keep.nonzero().squeeze(1)
            keys[kind] = (k_sample[index], k_pos[index])
            for layer, layer_kind in zip(cache.layers, self.kinds):
                if layer_kind == kind:
                    layer.keys, layer.values = layer.keys[..., index, :], layer.values[..., index, :]
