"""Two CPU processes (gloo, as `torchrun`/`accelerate launch` start them) train one model: same weights on both."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from src.training.trainer import _RankShard
from tests.test_trainer import data_file, tiny_config, tiny_dir  # noqa: F401 (pytest fixtures)

PROJECT = Path(__file__).resolve().parents[1]

# Runs on every rank; rank 0 writes what the test checks. Weights are compared through an all_gather.
CHILD = """
import json, sys
import torch, torch.distributed as dist
from src.training.trainer import FunctionGemmaTrainer, leave_process_group

cfg, out = json.loads(sys.argv[1]), sys.argv[2]
trainer = FunctionGemmaTrainer(cfg, output_dir=out)
trainer.train()
flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters() if p.requires_grad])
copies = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(copies, flat)
if dist.get_rank() == 0:
    print("RESULT", json.dumps({"world": dist.get_world_size(), "max_diff": max(
        (c - copies[0]).abs().max().item() for c in copies), "steps": trainer.state.global_step}))
leave_process_group()  # as the train command does: no rank exits with the group still up
"""


def test_two_processes_end_with_identical_weights_and_lower_loss(tiny_dir, data_file, tmp_path):
    # 12 training samples in 3 batches of 2 per rank, accumulation 2: 2 optimizer steps per epoch.
    cfg = tiny_config(tiny_dir, data_file, epochs=3, learning_rate=2e-2, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, sample_generations=1)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--no-python", sys.executable, "-c", CHILD, json.dumps(cfg), str(out)],
        cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result == {"world": 2, "max_diff": 0.0, "steps": 6}

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert losses[-1] < losses[0] and len(evals) == 3 and evals[-1] < evals[0]
    log = (out / "training_log.txt").read_text()
    assert log.count("model saved") == 1 and "x 2 process(es)" in log  # rank 0 alone writes


def test_rank_shards_cover_every_batch_with_equal_step_counts():
    class Batches:
        def __init__(self, n):
            self.batches = [[i] for i in range(n)]

        def __iter__(self):
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    for n_batches in (1, 4, 5, 7):
        for world in (1, 2, 3):
            shards = [list(_RankShard(Batches(n_batches), world, rank, even=True)) for rank in range(world)]
            assert len({len(s) for s in shards}) == 1 == len({len(_RankShard(Batches(n_batches), world, r,
                                                                             even=True)) for r in range(world)})
            assert sorted({b[0] for s in shards for b in s}) == list(range(n_batches))
            uneven = [list(_RankShard(Batches(n_batches), world, rank, even=False)) for rank in range(world)]
            assert sorted(b[0] for s in uneven for b in s) == list(range(n_batches))
            assert [len(s) for s in uneven] == [len(_RankShard(Batches(n_batches), world, r, even=False))
                                                for r in range(world)]
