"""Trainer callbacks: a rich progress bar with loss/lr/ETA, log lines for humans, the sampler's epoch, and
returning freed heap memory to the OS.

The first two replace HF's tqdm bar and dict printer (`disable_tqdm=True`), which write unreadable lines into the
`nohup` log of a cloud run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from transformers import TrainerCallback

from src.training.monitoring import TrainingLog

# Keys HF adds to the final log entry that say nothing a human needs in the per-step line.
_QUIET_KEYS = {"total_flos", "train_samples_per_second", "train_steps_per_second", "epoch", "step"}


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class RichProgressCallback(TrainerCallback):
    """One bar over optimizer steps, showing the last logged loss and learning rate and the ETA."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="-", lr="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=_fmt(logs["loss"]), lr=_fmt(logs.get("learning_rate", 0.0)))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class LogLinesCallback(TrainerCallback):
    """Each HF log entry as one line (`step 10/120 | epoch 0.42 | loss 1.2345 | ...`) on console and in the log."""

    def __init__(self, log: TrainingLog):
        self.log = log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step:
            self.log.write(f"resumed at step {state.global_step}/{state.max_steps} (epoch {state.epoch:.2f})")
        else:
            self.log.write(f"training: {state.max_steps} optimizer steps, {state.num_train_epochs} "
                           f"epoch(s) max, batch {args.per_device_train_batch_size} x accumulation "
                           f"{args.gradient_accumulation_steps} x {args.world_size} process(es)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}", f"epoch {state.epoch or 0:.2f}"]
        parts += [f"{k} {_fmt(v)}" for k, v in logs.items() if k not in _QUIET_KEYS]
        self.log.write(" | ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if state.best_model_checkpoint:
            self.log.write(f"best checkpoint: {state.best_model_checkpoint} "
                           f"(eval_loss {_fmt(state.best_metric)}), loaded for the final model")


class SamplerEpochCallback(TrainerCallback):
    """Tell the batch sampler which epoch starts, from the trainer state.

    The epoch fixes the batch order, so a resumed run must see the same epoch numbers as an uninterrupted one.
    HF's loop reaches a batch sampler's `set_epoch` only by peeking through wrapper attributes (an internal
    detail, laid out for accelerate's BatchSamplerShard); this sets it explicitly on every path. After a resume
    `state.epoch` is already restored (int() of e.g. 1.5 is epoch 1).
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))


class MallocTrimCallback(TrainerCallback):
    """Return freed heap memory to the OS after every optimizer step.

    glibc keeps the memory of the large per-step activations; on CPU with full sequences (the plain path) RSS was
    measured creeping past 20 GiB without this and staying flat with it (shared/notes/shared_prefix_training.md).
    """

    def __init__(self, malloc_trim):
        self._malloc_trim = malloc_trim

    @classmethod
    def for_this_platform(cls) -> "MallocTrimCallback | None":
        """None where there is no glibc `malloc_trim` (macOS, musl)."""
        if not sys.platform.startswith("linux"):
            return None
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return cls(libc.malloc_trim) if hasattr(libc, "malloc_trim") else None

    def on_step_end(self, args, state, control, **kwargs):
        self._malloc_trim(0)
