"""Completion-only loss that runs the shared developer turn once per batch and the lm_head only where it counts.

Every HR sample is ~1.3k tokens of identical developer turn plus ~40 tokens of its own, and the 262k-vocabulary
lm_head costs more than the transformer when applied to every position. So:
  * shared batches (`prefix_ids` present, see `batching.SharedPrefixCollator`): the prefix goes through the
    transformer once, batch 1, with gradients; every suffix attends to its keys/values (prefix_attention);
  * both kinds of batch: hidden states are gathered at the positions that predict a completion token, and only those
    rows go through the lm_head.
The result equals HF's own loss (labels with -100 elsewhere) and its gradients, on a plain model and on a peft one.
Gradient checkpointing: refused on shared batches (HF's checkpointed layers drop the cache, which would silently
train every suffix without its prefix); the trainer switches to plain batches when it is requested.
Measured facts and the silent-failure traps behind each step: shared/notes/shared_prefix_training.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache, PreTrainedModel

from src.training.prefix_attention import suffix_attention, suffix_layouts
from src.utils.packed_masks import PREFIX, block_masks, visible_prefix_starts

IGNORE_INDEX = -100
# Logit elements computed at once by the head: 2**26 (256 MiB in fp32), i.e. 256 rows of Gemma's 262k vocabulary.
_LOGIT_CHUNK_ELEMENTS = 2**26


def completion_loss(model, batch: dict, num_items_in_batch=None, hits: list | None = None,
                    prefix_gradients: bool = True, reuse: "PrefixReuse | None" = None,
                    split_attention: bool = True) -> tuple[torch.Tensor, int]:
    """Cross-entropy over the completion tokens: summed, divided by `num_items_in_batch` (the label count over a whole
    gradient-accumulation step, as HF Trainer passes it) or else by this batch's own label count.

    With a `hits` list, one bool tensor per batch row is appended: whether the argmax at each of its completion
    positions is the target token. Greedy decoding writes a completion exactly when all of them are right (teacher
    forcing makes that exact), so the eval loss pass also gives routing accuracy at no extra cost.

    `prefix_gradients=False` runs a shared batch's prefix without autograd: its keys/values still come from the
    current weights, but the LoRA weights learn only through the suffix positions. Not the plain path's gradient;
    ~27% less time per step at batch 16 on 2 CPU cores (the prefix's backward is gone). With it, a `reuse` keeps
    the prefix's keys/values for a few optimizer steps (see `PrefixReuse`)."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    labels = batch["labels"]
    if "prefix_ids" in batch:
        hidden = _shared_prefix_hidden(causal_lm, batch, prefix_gradients, reuse, split_attention)
    else:
        hidden = causal_lm.get_decoder()(
            inputs_embeds=input_embeddings(causal_lm, batch["input_ids"]), attention_mask=batch["attention_mask"],
            use_cache=False,
        ).last_hidden_state
    # The hidden state at position t predicts token t + 1.
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    row_hits = torch.empty(rows.numel(), dtype=torch.bool, device=rows.device) if hits is not None else None
    loss_sum = _head_cross_entropy(causal_lm, hidden[rows, cols], targets[rows, cols], row_hits)
    if hits is not None:
        hits.extend(row_hits[rows == row] for row in range(labels.shape[0]))
    n_tokens = int(rows.numel())
    denominator = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
    return loss_sum / denominator, n_tokens


def _head_cross_entropy(causal_lm: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor,
                        hits: torch.Tensor | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy of the selected rows through the lm_head as peft wraps it (trainable rows included),
    with Gemma's final logit softcapping when configured."""
    weight, index, delta = _token_rows(causal_lm.get_output_embeddings())
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, delta))
    low = _autocast_dtype(hidden.device.type)
    matmul_weight = weight if low is None or weight.requires_grad else _frozen_copy(weight, low)
    return _ChunkedHeadCrossEntropy.apply(hidden, weight, delta, index, targets, softcap, with_grad, hits,
                                          matmul_weight)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


_FROZEN_COPIES: dict = {}


def _frozen_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, converted once while it stays unchanged: autocast would convert the 262k x 640 head
    for every chunk and pass (~2 s of a step at batch 16), since it caches only trainable weights."""
    key = (weight.data_ptr(), weight._version, dtype, tuple(weight.shape))
    if key not in _FROZEN_COPIES:
        _FROZEN_COPIES.clear()
        _FROZEN_COPIES[key] = weight.detach().to(dtype)
    return _FROZEN_COPIES[key]


def _token_rows(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight, indices of peft's trainable token rows, their current values) of the input or output embedding.

    peft's trainable-tokens wrapper would copy the whole 262k x 640 matrix with those rows swapped in, and autograd
    would then build a full-size weight gradient to keep 7 of its rows (head: 2-3 s of a 12 s step at batch 16 on
    2 cores; input embedding, run twice per shared batch: ~0.8 s of 5.4 s).
    """
    adapter = getattr(layer, "token_adapter", None)
    if adapter is None:
        return layer.weight, None, None
    names = [] if adapter.merged or adapter.disable_adapters else [
        name for name in adapter.active_adapters if name in adapter.token_indices]
    if not names:
        return adapter.base_layer.weight, None, None
    weight = adapter.base_layer.weight
    index = torch.tensor([i for name in names for i in adapter.token_indices[name]], device=weight.device)
    delta = torch.cat([adapter.trainable_tokens_delta[name] for name in names])
    return weight, index, delta


def input_embeddings(causal_lm: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's input embeddings of `ids`, with peft's trainable token rows swapped in where they occur
    (the values peft's own wrapper gives, without its full-matrix copy and gradient: see `_token_rows`)."""
    layer = causal_lm.get_input_embeddings()
    weight, index, delta = _token_rows(layer)
    if index is None:
        return layer(ids)
    base = layer.token_adapter.base_layer
    scale = getattr(base, "embed_scale", None)  # Gemma scales its embeddings by sqrt(hidden size)
    slot = ids[..., None] == index
    rows = torch.where(slot.any(-1, keepdim=True), delta[slot.int().argmax(-1)].to(weight.dtype),
                       F.embedding(ids, weight))
    return rows if scale is None else rows * scale.to(rows.dtype)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` (rows `index` replaced by `delta`), summed, a few hundred rows at a time.

    The gradients are computed during the forward, where each chunk's softmax is at hand, so neither the
    (rows x vocabulary) logits nor their softmax outlive their chunk: at batch 32 each of those is 1 GiB. Every pass
    over a chunk's 262k-wide rows is memory-bound, so the softmax is built in place (max, sub, exp, sum) and, without
    softcapping, never normalised or one-hot-corrected element by element: (softmax - onehot) @ W is computed as
    (exp @ W) / sum - W[target], with the few trainable rows corrected on the side.
    """

    @staticmethod
    def forward(ctx, hidden, weight, delta, index, targets, softcap, with_grad, hits, matmul_weight):
        # Under autocast (training.mixed_precision=bf16) the two big products run in `matmul_weight`'s precision
        # (bf16: ~3x faster on CPUs with AMX); the softmax, the loss and the rest stay fp32.
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedHeadCrossEntropy._forward(ctx, hidden, weight, delta, index, targets, softcap, with_grad,
                                                     hits, matmul_weight)

    @staticmethod
    def _forward(ctx, hidden, weight, delta, index, targets, softcap, with_grad, hits, matmul_weight):
        low = matmul_weight.dtype
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros_like(weight) if with_grad and weight.requires_grad else None
        grad_delta = torch.zeros_like(delta) if with_grad and delta is not None else None
        # Exact but element-wise: needed for the softcap's tanh factor and for a full weight gradient.
        explicit = bool(softcap) or grad_weight is not None
        delta_minus_base = None if delta is None else (delta - weight[index]).to(hidden.dtype)
        rows_per_chunk = max(1, _LOGIT_CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            h, t = hidden[rows], targets[rows]
            arange = torch.arange(len(t), device=t.device)
            logits = F.linear(h.to(low), matmul_weight).float()
            if delta is not None:
                logits[:, index] = F.linear(h, delta.to(h.dtype)).float()
            capped = None
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            target_logit = logits[arange, t]
            if hits is not None:
                hits[rows] = logits.argmax(dim=-1) == t
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # e^(z - max), in place: the chunk's only full-size buffer
            total = probs.sum(dim=-1)
            loss += (top.squeeze(1) + total.log() - target_logit).sum()
            if not with_grad:
                continue
            inv_total = total.reciprocal()[:, None]
            if explicit:
                # d loss / d logits = softmax - one_hot(target), then through the softcap's tanh.
                grad = probs.mul_(inv_total)
                grad[arange, t] -= 1
                if softcap:
                    grad *= 1 - capped * capped
                grad = grad.to(h.dtype)
                grad_hidden[rows] = (grad.to(low) @ matmul_weight).to(h.dtype)
                grad_index = grad[:, index] if delta is not None else None
                if grad_weight is not None:
                    grad_weight += (grad.t() @ h).to(grad_weight.dtype)
            else:
                grad_hidden[rows] = (probs.to(low) @ matmul_weight).to(h.dtype) * inv_total.to(h.dtype) \
                    - weight[t].to(h.dtype)
                if delta is not None:
                    grad_index = probs[:, index] * inv_total - (t[:, None] == index[None, :]).to(probs.dtype)
                    grad_index = grad_index.to(h.dtype)
            if delta is not None:
                grad_hidden[rows] += grad_index @ delta_minus_base
                grad_delta += (grad_index.t() @ h).to(grad_delta.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_delta)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = tuple(None if grad is None else grad * grad_loss for grad in ctx.saved_tensors)
        return *grads, None, None, None, None, None, None


class PrefixReuse:
    """The last shared prefix's keys/values, kept through windows of `refresh_steps` optimizer steps
    (`training.prefix_refresh_steps`): computed at the window's first batch, reused until the next window.

    Why: without prefix gradients the prefix pass is a forward of ~1.3k tokens per step, and consecutive steps'
    weights barely differ. With 1, only the micro-batches of one optimizer step share it (the weights are the same:
    exact). With more, keys/values are up to `refresh_steps - 1` updates old, so the loss is not the exact one: a
    speed/fidelity trade (bench/prefix_reuse.py). The trainer sets `step`. A run resumed inside a window starts it
    with a fresh pass, so it does not end exactly where an uninterrupted run would."""

    def __init__(self, refresh_steps: int):
        if refresh_steps < 1:
            raise ValueError(f"training.prefix_refresh_steps must be >= 1, got {refresh_steps}")
        self.refresh_steps = refresh_steps
        self.step = 0
        self.computed = 0  # prefix passes run, for tests and logs
        self._ids: torch.Tensor | None = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._at = 0

    def lookup(self, prefix_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        fresh = self._ids is not None and self.step // self.refresh_steps == self._at // self.refresh_steps
        return self._layers if fresh and torch.equal(self._ids, prefix_ids) else None

    def store(self, prefix_ids: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._ids, self._layers, self._at = prefix_ids.clone(), layers, self.step
        self.computed += 1


def _prefix_layers(causal_lm: PreTrainedModel, prefix_ids: torch.Tensor, prefix_gradients: bool,
                   reuse: PrefixReuse | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of the prefix, cut to the positions some suffix token can still see."""
    reusable = reuse is not None and not prefix_gradients and torch.is_grad_enabled()
    if reusable and (layers := reuse.lookup(prefix_ids)) is not None:
        return layers
    cache = DynamicCache()
    with torch.set_grad_enabled(torch.is_grad_enabled() and prefix_gradients):
        causal_lm.get_decoder()(inputs_embeds=input_embeddings(causal_lm, prefix_ids), cache=cache, use_cache=True)
    # Sliding layers drop the prefix keys no suffix token can reach (position <= prefix_len - window): exact, and
    # 15 of Gemma 3's 18 layers then attend over ~0.5k prefix keys instead of ~1.3k.
    starts = visible_prefix_starts(causal_lm.config, prefix_ids.shape[1])
    layers = [(layer.keys[..., start:, :], layer.values[..., start:, :])
              for layer, start in zip(cache.layers, (starts[kind] for kind in causal_lm.config.layer_types))]
    if reusable:
        reuse.store(prefix_ids, layers)
    return layers


def _shared_prefix_hidden(causal_lm: PreTrainedModel, batch: dict, prefix_gradients: bool = True,
                          reuse: PrefixReuse | None = None, split_attention: bool = True) -> torch.Tensor:
    """Suffix hidden states (B, S, H) computed on top of one prefix pass (1, P) that every row shares.

    The suffixes run packed into one row (their padding dropped): each token sees the whole prefix and its own
    sample's earlier tokens, within the sliding window where the layer has one. The prefix keys/values are used
    once, not copied B times: at batch 16 that copy (and its backward) was ~1/5 of a step. `split_attention` scores
    only those keys (prefix_attention, 1.35x faster per step); without it a block mask over the whole packed row
    through the model's own attention gives the same result."""
    decoder = causal_lm.get_decoder()
    if torch.is_grad_enabled() and decoder.training and any(
        getattr(layer, "gradient_checkpointing", False) for layer in decoder.layers
    ):
        # HF's checkpointed layers replace `cache` with None: the suffix would silently train without its prefix.
        raise ValueError(
            "shared-prefix batches cannot run with gradient checkpointing (it drops the prefix cache); "
            "disable model.lora.use_gradient_checkpointing or training.shared_prefix"
        )
    prefix_ids, input_ids, attention_mask = batch["prefix_ids"], batch["input_ids"], batch["attention_mask"]
    if batch["labels"][:, 0].ne(IGNORE_INDEX).any():
        raise ValueError("the first suffix token must not be a loss target (it is predicted from the prefix)")
    prefix_len = prefix_ids.shape[1]
    keep = attention_mask.bool()
    if (keep.long().cummin(dim=1).values != keep.long()).any():
        raise ValueError("shared-prefix batches must be right-padded")
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: sample by sample, in order

    prefix = _prefix_layers(causal_lm, prefix_ids, prefix_gradients, reuse)
    starts = visible_prefix_starts(causal_lm.config, prefix_len)
    position_ids = (prefix_len + cols)[None]
    embeds = input_embeddings(causal_lm, input_ids[rows, cols][None])
    if split_attention:
        layouts = suffix_layouts(causal_lm.config, prefix, rows, cols, *input_ids.shape, prefix_len, starts)
        with suffix_attention(causal_lm.config):
            packed = decoder(inputs_embeds=embeds, attention_mask=layouts, position_ids=position_ids,
                             use_cache=False).last_hidden_state[0]
    else:
        cache = DynamicCache()
        for index, (keys, values) in enumerate(prefix):
            cache.update(keys, values, index)  # the suffix pass appends to new tensors: a kept prefix stays intact
        masks = _packed_masks(causal_lm.config, rows, position_ids[0], prefix_len, starts, causal_lm.dtype)
        packed = decoder(inputs_embeds=embeds, attention_mask=masks, position_ids=position_ids, cache=cache,
                         use_cache=True).last_hidden_state[0]
    hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1])
    hidden = hidden.index_put((rows, cols), packed)
    return hidden


def _packed_masks(config, sample: torch.Tensor, position: torch.Tensor, prefix_len: int, starts: dict[str, int],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{layer type: (1, 1, T, visible prefix + T) mask} for T packed suffix tokens (`sample`, `position` per token)
    after a prefix of which each layer type keeps positions `starts[type]`..: causal within a sample, blind across
    samples, sliding layers limited to the window."""
    k_sample = {kind: torch.cat([sample.new_full((prefix_len - start,), PREFIX), sample])
                for kind, start in starts.items()}
    k_pos = {kind: torch.cat([torch.arange(start, prefix_len, device=position.device), position])
             for kind, start in starts.items()}
    return block_masks(config, sample, position, k_sample, k_pos, dtype)
