"""`compare` over hand-written run dirs: the numbers in the table come from the files, the PNG is written."""
from __future__ import annotations

import json

import pytest

from src.evaluation.compare import compare_runs, load_run
from src.utils.errors import UserError

STATE = {"log_history": [
    {"loss": 2.5, "step": 10, "epoch": 0.5}, {"eval_loss": 2.0, "step": 10},
    {"loss": 1.5, "step": 20, "epoch": 1.0}, {"eval_loss": 1.2, "step": 20},
    {"loss": 0.9, "step": 30, "epoch": 1.5}, {"eval_loss": 1.4, "step": 30},
    {"train_runtime": 100.0, "step": 30},
]}
REPORT = {"n": 10, "tool_accuracy": 0.9, "exact_call_accuracy": 0.7, "argument_accuracy": 0.8,
          "no_call_precision": 1.0, "no_call_recall": 0.5, "malformed_rate": 0.1,
          "latency_ms": {"p50": 320.0, "p95": 500.0}}


def make_run(root, name, state=None, report=None):
    run = root / name
    run.mkdir()
    if state is not None:
        (run / "trainer_state.json").write_text(json.dumps(state))
    if report is not None:
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(json.dumps(report))
    return run


def test_run_row_reads_metrics_and_losses(tmp_path):
    row = load_run(make_run(tmp_path, "a", STATE, REPORT))
    assert row["tool_accuracy"] == 0.9 and row["no_call_recall"] == 0.5 and row["latency_p50_ms"] == 320.0
    assert row["final_train_loss"] == 0.9
    assert row["final_eval_loss"] == 1.4 and row["best_eval_loss"] == 1.2
    assert row["train_curve"] == [(10, 2.5), (20, 1.5), (30, 0.9)]


def test_compare_prints_table_and_writes_png(tmp_path, capsys):
    a = make_run(tmp_path, "run_a", STATE, REPORT)
    b = make_run(tmp_path, "run_b", state=STATE)  # trained, not evaluated yet
    png = tmp_path / "curves.png"
    rows = compare_runs([a, b], output_png=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows[1].get("tool_accuracy") is None and rows[1]["final_train_loss"] == 0.9
    out = capsys.readouterr().out
    assert "90.0%" in out and "0.9000" in out and "n/a" in out and "run_b" in out


def test_bad_run_dirs(tmp_path):
    with pytest.raises(UserError, match="run directory not found"):
        compare_runs([tmp_path / "missing"])
    with pytest.raises(UserError, match="not a training run"):
        compare_runs([make_run(tmp_path, "empty")])
    broken = make_run(tmp_path, "broken")
    (broken / "trainer_state.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="log_history"):
        load_run(broken)
    with pytest.raises(UserError, match="at least one"):
        compare_runs([])
