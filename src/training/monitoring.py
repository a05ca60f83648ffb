"""Where a training run reports: console + `training_log.txt`, TensorBoard, Weights & Biases, and the loss curve.

Every sink here is optional and local-first: W&B falls back to offline mode when nobody is logged in (a cloud run
must never block on a login prompt), and the log file and the loss curve need nothing but the output dir.
"""
from __future__ import annotations

import io
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from src.utils.io import atomic_write_bytes

LOG_FILE = "training_log.txt"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "runs"
SAMPLE_COLUMNS = ("query", "expected", "generated", "ok")


class TrainingLog:
    """Human-readable run log: each line goes to the console and is appended to `training_log.txt`.

    Appending (not rewriting) keeps the history of an interrupted run when it is resumed. Only the main process
    writes (`enabled=False` elsewhere), so multi-GPU runs do not print every line N times.
    """

    def __init__(self, path: str | os.PathLike, console: Console | None = None, enabled: bool = True):
        self.path = Path(path)
        self.console = console or Console()
        self.enabled = enabled
        self._fh = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, message: str, style: str | None = None) -> None:
        if not self.enabled:
            return
        self.console.print(escape(message), style=style, highlight=False, soft_wrap=True)
        self._fh.write(message + "\n")
        self._fh.flush()

    def table(self, title: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        """Rich table on the console, tab-separated lines in the file (greppable, no box drawing)."""
        if not self.enabled:
            return
        table = Table(title=title, show_lines=True)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(escape(str(cell)) for cell in row))
        self.console.print(table)
        self._fh.write(f"{title}\n" + "".join("\t".join(map(str, row)) + "\n" for row in [columns, *rows]))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _wandb_api_key_configured() -> bool:
    """Logged in = an API key in the environment or in netrc (where `wandb login` stores it); no network call."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(requested: str) -> str:
    """`auto` honours an explicit WANDB_MODE, else goes online only when an API key is configured."""
    if requested != "auto":
        return requested
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if _wandb_api_key_configured() else "offline"


def start_wandb(cfg, log: TrainingLog):
    """Start the W&B run ourselves (HF's WandbCallback then reuses it), so mode, project and name come from config."""
    wandb_cfg = cfg.logging.wandb
    if not wandb_cfg.enabled:
        return None
    mode = resolve_wandb_mode(wandb_cfg.mode)
    if mode == "disabled":
        log.write("W&B: disabled (logging.wandb.mode or WANDB_MODE)")
        return None
    import wandb

    run = wandb.init(
        project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or cfg.get("experiment"),
        mode=mode, config=OmegaConf.to_container(cfg, resolve=True),
    )
    log.write(f"W&B: {mode} run, saved in {Path(run.dir).parent}")
    return run


def finish_wandb(run, log: TrainingLog, exit_code: int = 0) -> None:
    if run is None:
        return
    offline = run.settings.mode == "offline"
    run_dir = Path(run.dir).parent
    run.finish(exit_code=exit_code)
    if offline:
        log.write(f"W&B run saved offline; upload it with: wandb sync {run_dir}")


def log_samples_to_wandb(run, rows: list[tuple], step: int) -> None:
    if run is None:
        return
    import wandb

    run.log({"eval/samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=[list(map(str, r)) for r in rows]),
             "train/global_step": step})


def tensorboard_callback(output_dir: str | os.PathLike):
    """TensorBoard events in `<model dir>/runs`, next to the model they describe (not inside checkpoints/)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR)))


def save_loss_curve(log_history: list[dict], path: str | os.PathLike) -> Path | None:
    """Train and eval loss against the optimizer step; None when nothing was logged (e.g. zero steps)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a training server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("completion loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
