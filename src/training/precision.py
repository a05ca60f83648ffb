"""bf16 storage of the frozen projection weights while `training.mixed_precision: bf16` trains.

Autocast converts a linear layer's fp32 weight to bf16 on every pass and caches the copy only for weights that
require grad, so with LoRA every frozen projection was converted again in every forward (and again for the
backward's products): ~1.2 s of a 7 s step at batch 16 on 2 CPU cores went to those copies. Holding the frozen
weights in bf16 for the length of training gives bit-identical products (autocast rounds the same weight the same
way) without the copies; the fp32 tensors are put back afterwards, so saving, merging and inference see the model
exactly as it was loaded.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import PeftModel


def frozen_projections(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen fp32 weights of the decoder's linear layers (LoRA's base layers among them). The output
    projection is left out: Gemma ties it to the input embedding, which must stay fp32."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return [module.weight for module in causal_lm.get_decoder().modules()
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
            and module.weight.dtype == torch.float32]


class LowPrecisionFrozenWeights:
    """`with` block in which the frozen projections hold `dtype` copies (forward passes must then run under
    autocast); `full_precision()` puts the fp32 tensors back for a nested block (the epoch-end sample generations
    decode as served, in fp32). Disabled, both are no-ops."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
        self.model, self.dtype, self.enabled = model, dtype, enabled
        self.weights, self.originals, self.copies = [], [], []

    def __enter__(self) -> "LowPrecisionFrozenWeights":
        if self.enabled:
            self.weights = frozen_projections(self.model)
            self.originals = [weight.data for weight in self.weights]
            self.copies = [original.to(self.dtype) for original in self.originals]
            self._hold(self.copies)
        return self

    def __exit__(self, *exc) -> None:
        self._hold(self.originals)
        self.weights, self.originals, self.copies = [], [], []

    @contextmanager
    def full_precision(self):
        self._hold(self.originals)
        try:
            yield
        finally:
            self._hold(self.copies)

    def _hold(self, tensors: list[torch.Tensor]) -> None:
        for weight, tensor in zip(self.weights, tensors):
            weight.data = tensor
