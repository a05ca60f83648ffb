"""FunctionGemma router: convert → data → render → train → evaluate → export, one command each.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. Bad input is reported in one line, never as a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if __name__ == "__main__":  # before torch is imported: src/utils/allocator.py
    from src.utils.allocator import use_fast_allocator
    use_fast_allocator()

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from src.utils.errors import EXIT_BAD_INPUT, EXIT_FAILURE, UserError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Turn FunctionGemma into a domain function router: train, evaluate, export.")
data_app = typer.Typer(no_args_is_help=True, help="Check and describe a dataset.")
app.add_typer(data_app, name="data")
err = Console(stderr=True)

ExperimentOpt = typer.Option(None, "--experiment", "-e",
                             help="Experiment name in configs/experiments/ or a path to a YAML file.")
OverridesArg = typer.Argument(None, help="Config overrides: key.path=value ...", show_default=False)


def _config(experiment: Optional[str], overrides: Optional[List[str]] = None):
    from src.utils.config_loader import load_config
    return load_config(experiment=experiment, overrides=overrides or [])


@app.command()
def config(experiment: Optional[str] = ExperimentOpt, overrides: Optional[List[str]] = OverridesArg):
    """Print the merged configuration (base ← experiment ← overrides).

    Example: python main.py config --experiment exp_hr_routing training.epochs=5
    """
    from src.utils.config_loader import to_yaml
    typer.echo(to_yaml(_config(experiment, overrides)), nl=False)


@app.command()
def convert(
    inp: Path = typer.Argument(..., metavar="IN", help="Excel/CSV/JSONL file, or a directory of them."),
    out: Path = typer.Argument(..., metavar="OUT", help="Processed JSONL to write (atomically)."),
    tools: Optional[Path] = typer.Option(None, help="Tool catalog JSON (default: data.tools_file)."),
    on_error: str = typer.Option("fail", help="fail: stop at the first bad row; drop: skip bad rows, report them."),
    column: Optional[List[str]] = typer.Option(None, help="Spreadsheet column mapping, e.g. user_content=问题."),
    max_seq_length: Optional[int] = typer.Option(None, help="Reject rows longer than this after rendering."),
    experiment: Optional[str] = ExperimentOpt,
):
    """Convert raw Excel/CSV/JSONL into processed FunctionGemma JSONL, validating every row.

    Example: python main.py convert data/raw/hr_functions.xlsx data/processed/hr_functions.jsonl
    """
    from src.data_engine.convert import convert as run_convert
    cfg = _config(experiment)
    columns = dict(_split_pair(c) for c in column or [])
    report = run_convert(inp, out, tools_file=tools or cfg.data.tools_file, columns=columns or None,
                         on_error=on_error, max_seq_length=max_seq_length)
    typer.echo(str(report))


def _split_pair(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise UserError(f"--column '{item}': expected FIELD=COLUMN")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="Processed, simple or test JSONL (or Excel/CSV)."),
    tools: Optional[Path] = typer.Option(None, help="Tool catalog JSON (default: data.tools_file)."),
    on_error: str = typer.Option("fail", help="fail: exit 2 at the first bad row; drop: list every bad row."),
    max_seq_length: Optional[int] = typer.Option(None, help="Flag rows longer than this after rendering."),
    experiment: Optional[str] = ExperimentOpt,
):
    """Validate a dataset against its tool catalog; every bad row is named by file, line and field.

    Example: python main.py data check data/processed/hr_functions.jsonl
    """
    from src.data_engine.validate import check_file
    cfg = _config(experiment)
    report = check_file(file, tools_file=tools or cfg.data.tools_file, on_error=on_error,
                        max_seq_length=max_seq_length)
    typer.echo(str(report))
    if report.errors:
        raise typer.Exit(EXIT_BAD_INPUT)


@data_app.command("stats")
def data_stats(
    file: Path = typer.Argument(..., help="Dataset to describe."),
    tools: Optional[Path] = typer.Option(None, help="Tool catalog JSON (default: data.tools_file)."),
    histogram: Optional[Path] = typer.Option(None, help="Histogram PNG (default: outputs/stats/<name>_lengths.png)."),
    tokenizer: Optional[str] = typer.Option(None, help="Model whose tokenizer counts tokens (default: model.name)."),
    experiment: Optional[str] = ExperimentOpt,
):
    """Samples per function, no-call share, duplicates, token lengths, suggested max_seq_length and preset.

    Example: python main.py data stats data/processed/hr_functions.jsonl
    """
    from src.data_engine.stats import dataset_stats, print_stats, write_length_histogram
    from src.utils.model_loader import load_tokenizer
    cfg = _config(experiment)
    tok = load_tokenizer(tokenizer or cfg.model.name)
    stats = dataset_stats(file, tools_file=tools or cfg.data.tools_file,
                          count_tokens=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]))
    print_stats(stats)
    png = histogram or Path("outputs/stats") / f"{file.stem}_lengths.png"
    write_length_histogram(stats, png)
    typer.echo(f"histogram: {png}")


@app.command()
def render(
    data: Path = typer.Option(..., "--data", help="Processed JSONL (or test JSONL) to render from."),
    tools: Optional[Path] = typer.Option(None, help="Tool catalog, for samples that carry none."),
    index: int = typer.Option(0, help="0-based sample index."),
    highlight: bool = typer.Option(False, help="Colour control tokens (for people; not for diffing)."),
    experiment: Optional[str] = ExperimentOpt,
):
    """Print the exact FunctionGemma text of one sample (nothing added: pipe it, diff it).

    Example: python main.py render --data data/processed/hr_functions.jsonl --index 3
    """
    from src.data_engine.render import render_sample, highlight_control_tokens
    cfg = _config(experiment)
    text = render_sample(data, index=index, tools_file=tools, default_tools_file=cfg.data.tools_file,
                         system_prompt=cfg.data.system_prompt)
    if highlight:
        Console().print(highlight_control_tokens(text), end="")
    else:
        sys.stdout.write(text)


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, "--data", help="Processed JSONL (default: data.train_file)."),
    experiment: Optional[str] = ExperimentOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Model dir (default: output.dir)."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in OUTPUT/checkpoints."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output dir."),
    overrides: Optional[List[str]] = OverridesArg,
):
    """LoRA fine-tuning. Writes adapter, tokenizer, trainer_state.json, logs and a loss curve to OUTPUT.

    Example: python main.py train --data data/processed/hr_functions.jsonl --experiment exp_hr_routing
    --output outputs/models/hr_v1
    """
    from src.training.trainer import run_training
    cfg = _config(experiment, overrides)
    run_training(cfg, data_path=data or Path(cfg.data.train_file), output_dir=output or Path(cfg.output.dir),
                 resume=resume, overwrite=overwrite)


@app.command()
def inference(
    model: str = typer.Argument(..., help="Adapter dir, merged dir, .gguf file or model name."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The user's request."),
    tools: Optional[Path] = typer.Option(None, help="Tool catalog (default: MODEL/tools.json)."),
    raw: bool = typer.Option(False, help="Also print the raw generated text."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Read requests in a loop."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (default)."),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    max_new_tokens: Optional[int] = typer.Option(None),
    experiment: Optional[str] = ExperimentOpt,
):
    """Route one request and print the parsed call as JSON.

    Example: python main.py inference outputs/models/hr_v1 --prompt "查询张三的年假"
    """
    from src.evaluation.router import run_inference
    cfg = _config(experiment)
    for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                       ("max_new_tokens", max_new_tokens)):
        if value is not None:
            cfg.inference[key] = value
    if not prompt and not interactive:
        raise UserError("inference: give --prompt TEXT or --interactive")
    raise typer.Exit(run_inference(model, prompt, tools_file=tools, raw=raw, interactive=interactive, config=cfg))


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Adapter dir, merged dir, .gguf file or model name."),
    data: Optional[Path] = typer.Option(None, "--data", help="Test JSONL (default: data.test_file)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report dir (default: MODEL/eval)."),
    tools: Optional[Path] = typer.Option(None, help="Tool catalog (default: MODEL/tools.json)."),
    baseline: bool = typer.Option(False, help="Also evaluate the untrained base model, in the same report."),
    limit: Optional[int] = typer.Option(None, help="Only the first N cases."),
    experiment: Optional[str] = ExperimentOpt,
    overrides: Optional[List[str]] = OverridesArg,
):
    """Tool/exact-call/argument accuracy, no-call P/R, per-function F1, confusion matrix, latency.

    Example: python main.py evaluate outputs/models/hr_v1 --data data/test.jsonl --baseline
    """
    from src.evaluation.report import evaluate_model
    cfg = _config(experiment, overrides)
    evaluate_model(model, data or Path(cfg.data.test_file), output, tools_file=tools, baseline=baseline,
                   config=cfg, limit=limit)


@app.command()
def compare(
    runs: List[Path] = typer.Argument(..., help="Model dirs to compare (each with eval/report.json)."),
    plot: Path = typer.Option(Path("outputs/compare_loss.png"), help="Overlaid loss curves PNG."),
):
    """Key metrics and losses of several runs side by side, plus overlaid loss curves.

    Example: python main.py compare outputs/models/hr_v1 outputs/models/hr_v2
    """
    from src.evaluation.compare import compare_runs
    compare_runs(runs, output_png=plot)


@app.command()
def export(
    inp: Path = typer.Argument(..., metavar="IN", help="Trained model dir (adapter) or merged HF dir."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output dir."),
    format: str = typer.Option("gguf", "--format", "-f", help="gguf or pytorch (merged safetensors)."),
    quantization: str = typer.Option("q8_0", "--quantization", "-q",
                                     help="f16, bf16, q8_0, q4_k_m, q4_0 (comma-separated for several)."),
    verify: bool = typer.Option(True, help="Run the test set through the export and compare with PyTorch."),
    data: Optional[Path] = typer.Option(None, "--data", help="Test JSONL for verification (default: data.test_file)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output dir."),
    experiment: Optional[str] = ExperimentOpt,
    overrides: Optional[List[str]] = OverridesArg,
):
    """Merge LoRA into the base (pytorch) or write GGUF for llama.cpp/Ollama, then verify it routes the same.

    Example: python main.py export outputs/models/hr_v1 outputs/models/hr_gguf --format gguf --quantization q8_0
    """
    from src.export.exporter import export_model
    cfg = _config(experiment, overrides)
    report = export_model(inp, out, fmt=format, quantization=quantization, verify=verify, config=cfg,
                          test_file=data or Path(cfg.data.test_file), overwrite=overwrite)
    if report and not report.get("ok", True):
        raise typer.Exit(EXIT_FAILURE)


@app.command()
def doctor():
    """Python, torch, device, memory, bundled base model, llama.cpp bindings: one screen."""
    from src.utils.doctor import run_doctor
    raise typer.Exit(run_doctor())


def main() -> int:
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit raised inside a command
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except Exception as exc:  # usage errors (typer's vendored click) know how to show themselves, exit 2
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
