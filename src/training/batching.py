"""Tokenize once into (shared prefix, suffix) and batch samples that share a prefix, so the prefix runs once per batch.

A processed sample renders as `<bos>` + developer turn (the tool declarations: ~97% of the tokens, identical across
a dataset) + user turn + completion. `tokenize_record` keeps the two parts apart, `group_batches` /
`PrefixGroupedBatchSampler` only put samples with identical prefix ids in one batch (length-grouped, so padding stays
small), and `SharedPrefixCollator` builds the batch `shared_prefix.completion_loss` expects.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from src.data_engine.formatter import BOS, CALL_OPEN, split_prompt_completion, split_shared_prefix
from src.training.shared_prefix import IGNORE_INDEX
from src.utils.errors import UserError

# Batches are length-sorted inside windows of this many batches: padding stays small while the order stays random.
_LENGTH_WINDOW_BATCHES = 50


def tokenize_record(tokenizer, record: dict, max_seq_length: int, source: str = "sample",
                    prefix_cache: dict[str, list[int]] | None = None) -> dict:
    """`{"prefix_ids", "suffix_ids", "n_completion", "n_route"}`: the last `n_completion` suffix ids are the loss
    targets, and the first `n_route` of those decide the routing (through the function name's `{`, or the first token
    of a text answer).

    The rendered text already starts with `<bos>`, so nothing is added. The parts are tokenized separately (the
    prompt is tokenized alone at inference too) and must equal the whole text's tokenization, otherwise a token
    would straddle a boundary and the model would train on ids it never sees when serving. `source` names the sample
    in errors (e.g. `FILE:LINE`); pass one `prefix_cache` dict for a whole dataset to tokenize each distinct
    developer turn once and hold its ids once in memory.
    """
    try:
        prompt, completion = split_prompt_completion(record["messages"], record.get("tools"))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: messages: cannot render the sample ({exc})") from None
    prefix, rest = split_shared_prefix(prompt)
    if not prefix and prompt.startswith(BOS):
        # No developer turn: `<bos>` alone is the shared part, so every sample still has a non-empty prefix.
        prefix, rest = BOS, prompt[len(BOS):]
    if prefix_cache is not None and prefix in prefix_cache:
        prefix_ids = prefix_cache[prefix]
    else:
        prefix_ids = _ids(tokenizer, prefix)
        if prefix_cache is not None:
            prefix_cache[prefix] = prefix_ids
    rest_ids, completion_ids = _ids(tokenizer, rest), _ids(tokenizer, completion)

    total = len(prefix_ids) + len(rest_ids) + len(completion_ids)
    if total > max_seq_length:
        raise UserError(f"{source}: messages: {total} tokens, over model.max_seq_length={max_seq_length}; "
                        "shorten the sample or raise model.max_seq_length")
    whole = _ids(tokenizer, prompt + completion)
    if prefix_ids + rest_ids + completion_ids != whole:
        raise UserError(f"{source}: messages: prompt and completion tokenize differently apart than together "
                        "(a token straddles the boundary); check the start of the assistant message")
    bos = tokenizer.bos_token_id
    if not prefix_ids or prefix_ids[0] != bos or whole.count(bos) != 1:
        raise UserError(f"{source}: messages: the rendered sample must start with exactly one <bos> "
                        f"(found {whole.count(bos)})")
    return {"prefix_ids": prefix_ids, "suffix_ids": rest_ids + completion_ids, "n_completion": len(completion_ids),
            "n_route": _route_length(tokenizer, completion, completion_ids)}


def _route_length(tokenizer, completion: str, completion_ids: list[int]) -> int:
    """Completion tokens up to the one that completes the first function name (its `{`); 1 for a text answer."""
    brace = completion.find("{")
    if not completion.startswith(CALL_OPEN) or brace < 0:
        return 1
    for n in range(1, len(completion_ids) + 1):
        if len(tokenizer.decode(completion_ids[:n], skip_special_tokens=False)) > brace:
            return n
    return len(completion_ids)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def group_batches(prefix_keys: Sequence[Hashable], lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True, by_length: bool = True) -> list[list[int]]:
    """Index batches that never mix prefixes, with similar suffix lengths when `by_length`; the same for the same
    (seed, epoch). Length grouping saves padding but can make batches of one kind: in routing data the suffix
    length depends on the function, so grouped batches hold one or two functions each and the model swings between
    them (HR main job, lr 2e-3: eval routing accuracy 0.34 after one epoch grouped, see README)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(prefix_keys):
        groups.setdefault(key, []).append(index)

    batches: list[list[int]] = []
    for indices in groups.values():
        if shuffle:
            indices = [indices[i] for i in rng.permutation(len(indices))]
        window = (batch_size * _LENGTH_WINDOW_BATCHES if shuffle else len(indices)) if by_length else batch_size
        for start in range(0, len(indices), window):
            chunk = sorted(indices[start:start + window], key=lambda i: lengths[i])
            batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class PrefixGroupedBatchSampler(torch.utils.data.Sampler):
    """`group_batches` as a DataLoader `batch_sampler`; accelerate/HF Trainer call `set_epoch` to reshuffle."""

    def __init__(self, prefix_keys: Sequence[Hashable], lengths: Sequence[int], batch_size: int, seed: int,
                 shuffle: bool = True, by_length: bool = True):
        self.prefix_keys, self.lengths = list(prefix_keys), list(lengths)
        self.batch_size, self.seed, self.shuffle, self.by_length = batch_size, seed, shuffle, by_length
        self.epoch = 0
        # Windows hold whole batches, so each prefix group yields ceil(size / batch_size) batches in every epoch.
        self._count = sum(-(-n // batch_size) for n in Counter(self.prefix_keys).values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        yield from group_batches(self.prefix_keys, self.lengths, self.batch_size, self.seed, self.epoch,
                                 self.shuffle, self.by_length)

    def __len__(self) -> int:
        return self._count


class SharedPrefixCollator:
    """Features from `tokenize_record` → one batch: shared-prefix form when every prefix is identical and the mode is
    on, else full right-padded sequences (mixed prefixes, e.g. after distractor augmentation, or the mode off)."""

    def __init__(self, pad_id: int, shared_prefix: bool = True):
        self.pad_id = pad_id
        self.shared_prefix = shared_prefix

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        first = list(features[0]["prefix_ids"])
        if self.shared_prefix and all(list(f["prefix_ids"]) == first for f in features[1:]):
            batch = self._pad([list(f["suffix_ids"]) for f in features], [f["n_completion"] for f in features])
            batch["prefix_ids"] = torch.tensor([first], dtype=torch.long)
        else:
            batch = self._pad([list(f["prefix_ids"]) + list(f["suffix_ids"]) for f in features],
                              [f["n_completion"] for f in features])
        if all("n_route" in f for f in features):
            batch["n_route"] = torch.tensor([f["n_route"] for f in features], dtype=torch.long)
        return batch

    def _pad(self, sequences: list[list[int]], n_completion: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, (seq, n) in enumerate(zip(sequences, n_completion)):
            input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, :len(seq)] = 1
            labels[row, len(seq) - n:len(seq)] = input_ids[row, len(seq) - n:len(seq)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
