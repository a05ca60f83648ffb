"""`compare`: one table of the key metrics and final losses across training runs, plus their loss curves overlaid.

A run dir is what `train --output` writes: `trainer_state.json` (Trainer's `log_history`) and, once evaluated,
`eval/report.json`. A run with only one of them still gets a row; the missing cells say n/a.
"""
from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from src.utils.errors import UserError
from src.utils.io import atomic_write_bytes, read_json

COLUMNS = [  # (row key, header, kind)
    ("tool_accuracy", "tool acc", "pct"),
    ("exact_call_accuracy", "exact call", "pct"),
    ("argument_accuracy", "arg acc", "pct"),
    ("no_call_precision", "no-call P", "pct"),
    ("no_call_recall", "no-call R", "pct"),
    ("malformed_rate", "malformed", "pct"),
    ("latency_p50_ms", "p50 ms", "ms"),
    ("final_train_loss", "train loss", "loss"),
    ("final_eval_loss", "eval loss", "loss"),
    ("best_eval_loss", "best eval", "loss"),
]


def load_run(run_dir) -> dict:
    """Metrics and loss history of one run; a dir with neither file is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    report_path, state_path = run_dir / "eval" / "report.json", run_dir / "trainer_state.json"
    if not report_path.is_file() and not state_path.is_file():
        raise UserError(f"{run_dir}: not a training run (no trainer_state.json and no eval/report.json)")
    row = {"run": str(run_dir), "train_curve": [], "eval_curve": []}
    if report_path.is_file():
        report = read_json(report_path)
        for key, _, kind in COLUMNS:
            if kind == "pct":
                row[key] = report.get(key)
        row["latency_p50_ms"] = (report.get("latency_ms") or {}).get("p50")
    if state_path.is_file():
        state = read_json(state_path)
        if not isinstance(state, dict):
            raise UserError(f"{state_path}: expected a JSON object with log_history")
        history = [h for h in state.get("log_history") or [] if isinstance(h, dict)]
        row["train_curve"] = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        row["eval_curve"] = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
        row["final_train_loss"] = row["train_curve"][-1][1] if row["train_curve"] else None
        row["final_eval_loss"] = row["eval_curve"][-1][1] if row["eval_curve"] else None
        row["best_eval_loss"] = min((v for _, v in row["eval_curve"]), default=None)
    return row


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    return {"pct": f"{100 * value:.1f}%", "ms": f"{value:.0f}", "loss": f"{value:.4f}"}[kind]


def loss_curves_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(rows):
        color = f"C{i % 10}"
        name = Path(row["run"]).name or row["run"]
        if row["train_curve"]:
            ax.plot(*zip(*row["train_curve"]), color=color, label=f"{name} train")
        if row["eval_curve"]:
            ax.plot(*zip(*row["eval_curve"]), color=color, linestyle="--", marker="o", markersize=3,
                    label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss curves")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compare_runs(run_dirs, output_png=None) -> list[dict]:
    """CLI `compare`: print the table, write the overlaid loss curves (default ./compare_loss.png)."""
    if not run_dirs:
        raise UserError("compare: give at least one run directory")
    rows = [load_run(d) for d in run_dirs]
    names = [Path(r["run"]).name for r in rows]
    names = names if len(set(names)) == len(names) else [r["run"] for r in rows]
    table = Table(title="runs")
    table.add_column("run", no_wrap=True)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, row in zip(names, rows):
        table.add_row(name, *(_fmt(row.get(key), kind) for key, _, kind in COLUMNS))
    console = Console()
    if not console.is_terminal:  # piped to a file: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)
    png = Path(output_png) if output_png else Path("compare_loss.png")
    atomic_write_bytes(png, loss_curves_png(rows))
    console.print(f"loss curves: {png}")
    return rows
