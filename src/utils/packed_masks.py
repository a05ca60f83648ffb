"""Attention masks for several sequences packed into one row on top of a shared prefix, for Gemma 3's layer types.

Packing many short suffixes into one row (training's shared-prefix batches, evaluation's batched decoding) runs them
in a single forward pass over one copy of the prefix's keys/values. Each token must then see only the prefix and its
own sequence's earlier tokens, within the sliding window on sliding layers; this is the mask that says so.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

PREFIX = -1  # the sample id of a shared prefix key: visible to every sequence


def visible_prefix_starts(config, prefix_len: int) -> dict[str, int]:
    """{layer type: first prefix position any later token attends to}: sliding layers never reach the prefix
    positions <= prefix_len - window, so their keys can be dropped (exact)."""
    window = getattr(config, "sliding_window", None)
    return {kind: max(0, prefix_len - window + 1) if kind == "sliding_attention" else 0
            for kind in dict.fromkeys(config.layer_types)}


def block_masks(config, q_sample: torch.Tensor, q_pos: torch.Tensor, k_sample, k_pos,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{layer type: (1, 1, Q, K) mask} for `config.layer_types` ("full_attention" / "sliding_attention").

    Query i (sample `q_sample[i]`, position `q_pos[i]`) may see key j iff the key is the shared prefix's
    (`k_sample[j] == -1`) or its own sample's, `k_pos[j] <= q_pos[i]`, and on sliding layers also
    `k_pos[j] > q_pos[i] - config.sliding_window` (HF's own convention: a window of W keys, itself included).
    `k_sample` / `k_pos` are one tensor when every layer type holds the same keys, or a {layer type: tensor} dict
    when they differ (sliding layers may drop prefix keys no query can reach). Boolean masks (True = attend) for
    sdpa; for eager, additive: 0 where allowed, the dtype's lowest value elsewhere.
    """
    window = getattr(config, "sliding_window", None)
    q_sample, q_pos = q_sample[:, None], q_pos[:, None]
    masks = {}
    for kind in dict.fromkeys(config.layer_types):
        if kind not in ("full_attention", "sliding_attention"):
            raise ValueError(f"block_masks: unsupported layer type {kind!r}")
        sample = (k_sample[kind] if isinstance(k_sample, Mapping) else k_sample)[None, :]
        position = (k_pos[kind] if isinstance(k_pos, Mapping) else k_pos)[None, :]
        allowed = ((sample == PREFIX) | (sample == q_sample)) & (position <= q_pos)
        if kind == "sliding_attention":
            allowed &= position > q_pos - window
        masks[kind] = allowed
    if getattr(config, "_attn_implementation", "eager") != "sdpa":  # eager adds the mask to the scores
        masks = {kind: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)
                 for kind, m in masks.items()}
    return {kind: m[None, None] for kind, m in masks.items()}
