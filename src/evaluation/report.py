"""`evaluate`: run a router over a test set and write report.json, report.md, the confusion matrix PNG and
predictions.json (every case's output, fingerprinted so that export can reuse it as its PyTorch reference).

With `baseline=True` the untrained base model is run on the same cases with the same catalog and prompt, and its
numbers sit beside the fine-tuned model's in both reports, so the gain from training is visible in one place.
"""
from __future__ import annotations

import gc
import io
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from src.evaluation.metrics import MALFORMED, NO_CALL, Expected, Predicted, aggregate, score_case, severity
from src.evaluation.predictions import FILE as PREDICTIONS, predictions_of
from src.evaluation.router import (
    Router, batch_size_of, config_value, inference_options, load_tools, open_router,
)
from src.utils.config_schema import EvaluationConfig
from src.utils.errors import UserError, where
from src.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_jsonl

HEADLINE = [  # (report key, label) in the order the tables show them
    ("tool_accuracy", "tool accuracy"),
    ("exact_call_accuracy", "exact call (name + arguments)"),
    ("normalized_exact_call_accuracy", "exact call, normalised strings"),
    ("argument_accuracy", "argument accuracy"),
    ("normalized_argument_accuracy", "argument accuracy, normalised"),
    ("no_call_precision", "no-call precision"),
    ("no_call_recall", "no-call recall"),
    ("malformed_rate", "malformed output rate"),
]
MAX_MISTAKES = 25


@dataclass(frozen=True)
class TestCase:
    line: int
    user_content: str
    expected: Expected


def load_test_cases(path, tools: list[dict]) -> list[TestCase]:
    """Read test JSONL and check it against the catalog, so a typo fails before any model is loaded."""
    params = {t["name"]: set(((t.get("parameters") or {}).get("properties") or {})) for t in tools}
    cases = []
    for no, obj in read_jsonl(path):
        content = obj.get("user_content")
        if not isinstance(content, str) or not content.strip():
            reason = "missing" if "user_content" not in obj else "expected a non-empty string"
            raise UserError(f"{where(path, no, 'user_content')}: {reason}")
        if "expected_tool" not in obj:
            raise UserError(f"{where(path, no, 'expected_tool')}: missing (use null for a case that needs no call)")
        tool, args = obj["expected_tool"], obj.get("expected_arguments")
        if tool is not None and tool not in params:
            raise UserError(f"{where(path, no, 'expected_tool')}: {tool!r} is not in the tool catalog "
                            f"({', '.join(sorted(params))})")
        if args is not None and not isinstance(args, dict):
            raise UserError(f"{where(path, no, 'expected_arguments')}: expected an object, got {type(args).__name__}")
        if tool is None and args:
            raise UserError(f"{where(path, no, 'expected_arguments')}: given for a case whose expected_tool is null")
        unknown = sorted(set(args or {}) - params.get(tool, set()))
        if unknown:
            raise UserError(f"{where(path, no, 'expected_arguments')}: {unknown[0]!r} is not a parameter of {tool}")
        cases.append(TestCase(no, content, Expected(tool, args if tool is not None else None)))
    if not cases:
        raise UserError(f"{path}: no test cases")
    return cases


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))


def run_cases(router, cases: list[TestCase], label: str,
              latency_samples: int = EvaluationConfig.latency_samples) -> tuple[dict, list]:
    """Route every case and score it: (report with the metrics and the worst mistakes, one RouteResult per case).

    The cases go through `router.route_many` (batched where the router can). A batched result's latency is a share
    of its chunk's time, so the latency percentiles come from the first `latency_samples` cases routed again one at
    a time with `route` (a result already routed alone is not routed twice); `batched` has the whole run's wall time.
    """
    queries = [c.user_content for c in cases]
    with _progress() as progress:
        task = progress.add_task(f"evaluating {label}", total=len(cases))
        t0 = time.perf_counter()
        raws = router.route_many(queries, progress=lambda n: progress.advance(task, n))
        wall_s = time.perf_counter() - t0
        sample = range(min(max(0, latency_samples), len(cases)))
        again = [i for i in sample if raws[i].timings.get("batched")]
        singles = {}
        if again:
            task = progress.add_task("latency, one query at a time", total=len(again))
            for i in again:
                singles[i] = router.route(queries[i])
                progress.advance(task)
    predictions = [Predicted(r.kind, tuple(r.calls)) for r in raws]
    latencies = [singles[i].latency_ms if i in singles else raws[i].latency_ms for i in sample]
    scores = [score_case(c.expected, p) for c, p in zip(cases, predictions)]
    report = aggregate(scores, latencies, [t["name"] for t in router.tools])
    report["latency_samples"] = len(latencies)
    report["batched"] = {"batch_size": int(router.batch_size), "wall_s": round(wall_s, 3),
                         "cases_per_s": round(len(cases) / wall_s, 3) if wall_s > 0 else None,
                         "checked_single": len(singles),
                         "same_as_single": sum(singles[i].raw == raws[i].raw for i in singles)}
    wrong = sorted((i for i, s in enumerate(scores) if not (s.exact_call if s.exact_scored else s.tool_correct)),
                   key=lambda i: (severity(scores[i]), i))
    report["mistakes"] = [_mistake(cases[i], scores[i], raws[i]) for i in wrong[:MAX_MISTAKES]]
    report["n_mistakes"] = len(wrong)
    return report, raws


def _problem(score) -> str:
    if score.predicted_label == MALFORMED:
        return "malformed output"
    if score.expected_label == NO_CALL:
        return "called a function where a text answer was expected"
    if score.predicted_label == NO_CALL:
        return "answered in text where a call was expected"
    if not score.tool_correct:
        return "wrong function"
    if score.wrong_args:
        return "wrong arguments: " + ", ".join(score.wrong_args)
    return "extra call or extra argument"


def _mistake(case: TestCase, score, result) -> dict:
    expected = None if case.expected.tool is None else {"name": case.expected.tool,
                                                        "arguments": case.expected.arguments}
    if result.kind == "calls":
        got = [{"name": c["name"], "arguments": c["arguments"]} for c in result.calls]
    else:
        got = {"kind": result.kind, "text": result.text, **({"error": result.error} if result.error else {})}
    return {"line": case.line, "query": case.user_content, "problem": _problem(score), "expected": expected,
            "got": got, "raw": result.raw}


def baseline_ref(model_ref) -> str:
    """The untrained model behind a model dir: the adapter's base, else the model the run config names."""
    model_dir = Path(str(model_ref))
    if model_dir.suffix == ".gguf" or not model_dir.is_dir():
        raise UserError(f"{model_ref}: --baseline needs a trained model dir (adapter or merged)")
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        base = read_json(adapter).get("base_model_name_or_path")
        if base:
            return str(base)
    run_config = model_dir / "config.yaml"
    if run_config.is_file():
        from omegaconf import OmegaConf

        name = OmegaConf.select(OmegaConf.load(run_config), "model.name", default=None)
        if name:
            return str(name)
    raise UserError(f"{model_dir}: --baseline: cannot tell the base model (no adapter_config.json "
                    "base_model_name_or_path, no config.yaml model.name)")


def default_output_dir(model_ref) -> Path:
    path = Path(str(model_ref))
    if path.is_dir():
        return path / "eval"
    if path.suffix == ".gguf":
        return path.parent / f"eval_{path.stem}"
    return Path("outputs") / "eval" / re.sub(r"[^\w.-]+", "_", str(model_ref))


def evaluate_model(model_ref, data_path, output_dir=None, tools_file=None, baseline: bool = False,
                   config=None, limit: int | None = None) -> dict:
    """CLI `evaluate`: metrics of MODEL on DATA (and of its base model with --baseline), written to DIR.

    `limit` keeps the first N cases (a quick look; the report says how many were run).
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit: expected a positive number of cases, got {limit}")
    from src.utils.model_loader import resolve_model_source

    data_path = Path(data_path)
    resolve_model_source(model_ref)  # a missing model fails before the catalog and the data are checked
    tools = load_tools(model_ref, tools_file)
    cases = load_test_cases(data_path, tools)[:limit]
    base = baseline_ref(model_ref) if baseline else None
    out_dir = Path(output_dir) if output_dir else default_output_dir(model_ref)

    router = open_router(model_ref, tools_file=tools_file, config=config)
    try:
        report, results = run_cases(router, cases, str(model_ref), _latency_samples(config))
        per_case = predictions_of(router, cases, results)  # hashes the weights, tokenizes the prompts: before close
    finally:
        router.close()
    report.update(model=str(model_ref), data=str(data_path), runtime=router.runtime,
                  prefix_cache=router.prefix_cache, decoding=router.decoding(),
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    system_prompt = router.system_prompt
    del router
    gc.collect()  # the model under test leaves memory before the baseline model is loaded
    if base is not None:
        from src.utils.model_loader import load_model

        model, tokenizer = load_model(base, dtype=config_value(config, "model.dtype", "auto"))
        base_router = Router(model, tokenizer, tools, system_prompt=system_prompt, batch_size=batch_size_of(config),
                             **inference_options(config))
        report["baseline"], _ = run_cases(base_router, cases, f"baseline {base}", _latency_samples(config))
        report["baseline"].update(model=base, data=str(data_path), runtime=base_router.runtime,
                                  prefix_cache=base_router.prefix_cache, decoding=base_router.decoding())
    write_report(report, out_dir, per_case)
    print_summary(report, out_dir)
    return report


def _latency_samples(config) -> int:
    return max(0, int(config_value(config, "evaluation.latency_samples", EvaluationConfig.latency_samples)))


def write_report(report: dict, out_dir: Path, per_case: dict | None = None) -> None:
    """report.json/.md, the confusion matrix PNGs and, given `per_case`, predictions.json (each file atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if per_case is not None:
        atomic_write_json(out_dir / PREDICTIONS, per_case)
    atomic_write_bytes(out_dir / "confusion_matrix.png", confusion_png(report["confusion_matrix"], report["model"]))
    if "baseline" in report:
        atomic_write_bytes(out_dir / "confusion_matrix_baseline.png",
                           confusion_png(report["baseline"]["confusion_matrix"], report["baseline"]["model"]))
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    atomic_write_json(out_dir / "report.json", report)


def confusion_png(cm: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = cm["labels"], cm["matrix"]
    size = max(5.0, 0.55 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(f"confusion matrix: {Path(title).name or title}", fontsize=10)
    peak = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _cell(obj) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`" if text else ""


def render_markdown(report: dict) -> str:
    base = report.get("baseline")
    head = ["metric", "model"] + (["baseline", "gain"] if base else [])
    constrained = (report.get("decoding") or {}).get("constrain")
    copied = sorted({k for keys in ((report.get("decoding") or {}).get("copied_arguments") or {}).values()
                     for k in keys})
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"Test set `{report['data']}`: {report['n']} cases ({report['counts']['expected_no_call']} expect no "
             f"call); runtime {report['runtime']}, prefix cache {'on' if report['prefix_cache'] else 'off'}, "
             f"catalog-constrained decoding {'on' if constrained else 'off'}"
             + (f", copied arguments kept to pieces of the request ({', '.join(copied)})" if copied else "")
             + (", optional arguments kept only when they make the call more probable"
                if (report.get("decoding") or {}).get("rescore_optional") else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in HEADLINE:
        row = [label, _pct(report[key])]
        if base:
            row += [_pct(base[key]), f"{100 * (report[key] - base[key]):+.1f} pt"]
        lines.append("| " + " | ".join(row) + " |")
    for q in ("p50", "p95"):
        row = [f"latency {q}", _ms(report["latency_ms"][q])]
        if base:
            row += [_ms(base["latency_ms"][q]), ""]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", _timing_note(report)]
    lines += ["", "Exact call needs the right function, exactly one call and every argument equal (strings trimmed, "
              "numbers numerically); an expected `null` only requires the key. Normalised rows also ignore case, "
              "full/half width, spaces and punctuation.", "",
              "## Per function", "", "| function | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, m in report["per_function"].items():
        lines.append(f"| {name} | {_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['f1'])} | {m['support']} |")
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              f"## Worst mistakes ({len(report['mistakes'])} of {report['n_mistakes']})", ""]
    if report["mistakes"]:
        lines += ["| line | query | problem | expected | got | raw |", "|---|---|---|---|---|---|"]
        for m in report["mistakes"]:
            expected = m["expected"] if m["expected"] is not None else NO_CALL
            lines.append(f"| {m['line']} | {_cell(m['query'])} | {m['problem']} | {_cell(expected)} | "
                         f"{_cell(m['got'])} | {_cell(m['raw'])} |")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _timing_note(report: dict) -> str:
    """How the cases were routed and where the latency figures come from."""
    batched = report["batched"]
    speed = f"{batched['cases_per_s']:.2f} cases/s" if batched.get("cases_per_s") else "n/a"
    note = (f"Routed {report['n']} cases in {batched['wall_s']:.1f} s ({speed}, batches of {batched['batch_size']}). "
            f"Latency: {report.get('latency_samples', 0)} cases routed one at a time")
    if batched.get("checked_single"):
        note += (f"; {batched['same_as_single']} of {batched['checked_single']} wrote the same output alone as in "
                 "their batch")
    return note + "."


def print_summary(report: dict, out_dir: Path) -> None:
    console = Console(stderr=True)
    base = report.get("baseline")
    table = Table(title=f"{report['model']} on {report['data']} ({report['n']} cases)")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if base:
        table.add_column("baseline", justify="right")
    for key, label in HEADLINE:
        table.add_row(label, _pct(report[key]), *([_pct(base[key])] if base else []))
    table.add_row("latency p50", _ms(report["latency_ms"]["p50"]), *([_ms(base["latency_ms"]["p50"])] if base else []))
    console.print(table)
    console.print(_timing_note(report), highlight=False)
    console.print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}, {out_dir / 'confusion_matrix.png'}")
