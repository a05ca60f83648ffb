"""Attention for a batch of suffixes on one shared prefix, without the blocks between different suffixes.

The suffixes of a shared-prefix batch run packed into one row (no padding in the projections and MLPs). Through
sdpa with a block mask, each of those T tokens scores every other sample's tokens too, only to mask them: at batch
16 that is ~960 extra keys per query where a sample has ~60 of its own, and on the 15 sliding layers the prefix
keeps only ~500 keys, so most of the attention work was masked away. Here each query scores
  * the prefix keys, in one product for all queries of a key/value head (the keys are shared, never copied), with
    the sliding window's band where the layer has one;
  * its own sample's keys, with the suffixes laid out padded (B, S) for that product only;
and one softmax runs over both parts together, so the result is the same attention as the block mask gives.
Selected for the suffix pass only (`suffix_attention`); every other forward keeps the model's own attention.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

NAME = "functiongemma_shared_prefix"


@dataclass
class SuffixLayout:
    """What one layer type's attention needs about the packed suffixes: passed in place of the attention mask.

    `prefix` holds every layer's (keys, values) of the prefix, (1, kv heads, visible prefix, head dim); `slot` maps
    each packed token to its place in the padded (batch x width) grid; `blocked` (T, visible prefix + width) says
    which prefix keys and which keys of its own sample's row of the grid each packed token may not see."""

    prefix: list[tuple[torch.Tensor, torch.Tensor]]
    slot: torch.Tensor
    batch: int
    width: int
    blocked: torch.Tensor


def suffix_layouts(config, prefix: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, cols: torch.Tensor,
                   batch: int, width: int, prefix_len: int, starts: dict[str, int]) -> dict[str, SuffixLayout]:
    """{layer type: layout} for packed tokens at (`rows`, `cols`) of a right-padded (batch, width) suffix grid whose
    prefix has `prefix_len` tokens, of which each layer type kept positions `starts[type]`.. HF's conventions: causal,
    and on sliding layers a query at position p sees keys at p - window < k <= p."""
    window = getattr(config, "sliding_window", None)
    query = prefix_len + cols
    own = torch.arange(prefix_len, prefix_len + width, device=cols.device)
    slot = rows * width + cols
    layouts = {}
    for kind, start in starts.items():
        keys = torch.cat([torch.arange(start, prefix_len, device=cols.device), own])
        allowed = keys[None, :] <= query[:, None]
        if kind == "sliding_attention":
            allowed &= keys[None, :] > query[:, None] - window
        layouts[kind] = SuffixLayout(prefix, slot, batch, width, ~allowed)  # inverted once, not in every layer
    return layouts


def _attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: SuffixLayout,
               scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None, **_) -> tuple:
    """HF attention-interface signature. query (1, H, T, D), key/value (1, KV, T, D): the packed suffix tokens only;
    the prefix comes from the layout. Returns ((1, T, H, D), None)."""
    layout = attention_mask
    if not isinstance(layout, SuffixLayout):
        raise TypeError(f"{NAME} attention runs only on shared-prefix suffix batches (got {type(layout).__name__})")
    if dropout or softcap is not None:  # Gemma 3 has neither; Gemma 2's logit softcapping would arrive as softcap
        raise ValueError(f"{NAME} attention has no dropout or logit softcapping (got {dropout}, {softcap})")
    prefix_keys, prefix_values = layout.prefix[module.layer_idx]
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query head h reads key/value head h // group, as HF's repeat_kv lays them out
    batch, width, slot = layout.batch, layout.width, layout.slot
    grid = (kv_heads, 1, batch, width, dim)

    q = query[0].reshape(kv_heads, group, tokens, dim)
    prefix_scores = q.reshape(kv_heads, group * tokens, dim) @ prefix_keys[0].transpose(-1, -2)
    q_grid = q.new_zeros(kv_heads, group, batch * width, dim).index_copy(2, slot, q)
    k_grid = key.new_zeros(kv_heads, batch * width, dim).index_copy(1, slot, key[0]).view(grid)
    own_scores = q_grid.view(kv_heads, group, batch, width, dim) @ k_grid.transpose(-1, -2)
    scores = torch.cat([prefix_scores.view(kv_heads, group, tokens, -1),
                        own_scores.view(kv_heads, group, batch * width, width).index_select(2, slot)], dim=-1)
    scores = scores * (dim**-0.5 if scaling is None else scaling)
    scores = scores.masked_fill(layout.blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    n_prefix = prefix_keys.shape[-2]
    prefix_probs, own_probs = probs.split([n_prefix, width], dim=-1)
    out = prefix_probs.reshape(kv_heads, group * tokens, n_prefix) @ prefix_values[0]
    v_grid = value.new_zeros(kv_heads, batch * width, dim).index_copy(1, slot, value[0]).view(grid)
    own_grid = own_probs.new_zeros(kv_heads, group, batch * width, width).index_copy(2, slot, own_probs)
    own_out = own_grid.view(kv_heads, group, batch, width, width) @ v_grid
    out = out.view(kv_heads, group, tokens, dim) + own_out.view(kv_heads, group, batch * width, dim).index_select(
        2, slot)
    return out.reshape(heads, tokens, dim).transpose(0, 1)[None], None


AttentionInterface.register(NAME, _attention)


@contextlib.contextmanager
def suffix_attention(config) -> Iterator[None]:
    """Route the model's attention through `_attention` for one forward; the model's own choice is restored after,
    so nothing saved or exported ever names it."""
    own = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = own
