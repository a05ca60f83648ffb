"""Base + LoRA -> one plain Hugging Face model, so deployment needs neither peft nor the base checkpoint.

The merge runs in float32 (the offline base is stored in float32, so the merged weights are exact) and folds in
everything the adapter trained: the LoRA deltas and, when `train_control_tokens` was on, the trained embedding rows
of the control tokens (peft's trainable tokens; with tied embeddings they are also the output rows).
The saved directory carries the tokenizer with our chat template, and the run's tools.json and config.yaml, so the
merged model routes exactly like the adapter it came from.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from src.data_engine.copied_arguments import COPIED_FILE
from src.utils.io import atomic_dir

# What routing needs besides weights: the catalog, the system prompt, the arguments kept to copies of the request.
RUN_FILES = ("tools.json", "config.yaml", COPIED_FILE)


def load_merged(model_ref, device: str = "cpu"):
    """(model, tokenizer) in float32 with any adapter merged in; a plain model dir or name loads unchanged."""
    from src.utils.model_loader import load_model

    model, tokenizer = load_model(str(model_ref), dtype="float32", device=device)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def safetensors_bytes(model) -> int:
    """Bytes of tensor data a safetensors save of `model` holds (tied weights stored once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def write_merged(model, tokenizer, directory, run_dir=None) -> None:
    """Safetensors + tokenizer (with the chat template) + the run files routing needs, into `directory`."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if run_dir is not None and Path(run_dir).is_dir():
        for name in RUN_FILES:
            if (Path(run_dir) / name).is_file():
                shutil.copy2(Path(run_dir) / name, directory / name)


def merge_adapter(adapter_dir, out_dir, overwrite: bool = False) -> Path:
    """Merge the adapter in `adapter_dir` into its base and save the result to `out_dir`."""
    model, tokenizer = load_merged(adapter_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_merged(model, tokenizer, tmp, run_dir=adapter_dir)
    return Path(out_dir)
