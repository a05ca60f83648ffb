"""A run killed with SIGKILL and resumed ends on the same weights and losses as one that never stopped."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from src.training.trainer import FunctionGemmaTrainer
from tests.test_trainer import data_file, tiny_config, tiny_dir  # noqa: F401 (pytest fixtures)

PROJECT = Path(__file__).resolve().parents[1]
KILL_AT_STEP = 4  # 3 steps per epoch: dies one step into epoch 2, so the resume skips a batch mid-epoch

# Trains in a child process and kills it (SIGKILL: no cleanup, no finally) right after checkpoint KILL_AT_STEP.
CHILD = """
import json, os, signal, sys
from transformers import TrainerCallback
from src.training.trainer import FunctionGemmaTrainer

cfg, out, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

trainer = FunctionGemmaTrainer(cfg, output_dir=out)
trainer.add_callback(KillAfterSave())
trainer.train()
"""


def _config(tiny_dir, data_file) -> dict:
    # Saves every step (as a kill can come at any time); two epochs with an eval at each epoch end.
    return tiny_config(tiny_dir, data_file, epochs=2, learning_rate=1e-2, save_strategy="steps", save_steps=1,
                       save_total_limit=2)


def _train_losses(out: Path) -> list[tuple[int, float]]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_dir, data_file, tmp_path):
    cfg = _config(tiny_dir, data_file)
    straight = FunctionGemmaTrainer(cfg, output_dir=tmp_path / "straight").train()

    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(killed), str(KILL_AT_STEP)],
                           cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (killed / "adapter_model.safetensors").exists()
    assert (killed / "checkpoints" / f"checkpoint-{KILL_AT_STEP}").is_dir()

    resumed = FunctionGemmaTrainer(cfg, output_dir=killed).train(resume=True)
    assert "resumed at step 4/6" in (resumed / "training_log.txt").read_text()

    want, got = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], rtol=0, atol=1e-7), name
    assert _train_losses(resumed) == _train_losses(straight)
    assert len(_train_losses(straight)) == 6
