"""Dataset statistics that answer the guide's questions before training: enough samples per function? which preset?
what max_seq_length? Lengths are of the fully rendered FunctionGemma text (declarations included), since that is
what the model sees.
"""
from __future__ import annotations

import io
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Callable

from src.data_engine.convert import load_records
from src.data_engine.validate import NO_CALL, ToolCatalog
from src.utils.io import atomic_write_bytes

MIN_PER_FUNCTION = 50  # the guide: fewer than 50 samples per function is a mistake to avoid
MAX_LISTED = 30  # longer per-function listings are summarised
HEADROOM = 1.10  # room for longer user queries at serving time than any seen in the data
# Presets by sample count, from the guide's hyperparameter section (configs/experiments/preset_*.yaml).
PRESETS = {
    "small": {"epochs": "5-10", "learning_rate": 1.0e-4, "per_device_train_batch_size": 4, "lora_rank": 8, "lora_alpha": 8},
    "medium": {"epochs": "3-5", "learning_rate": 2.0e-4, "per_device_train_batch_size": 8, "lora_rank": 16, "lora_alpha": 16},
    "large": {"epochs": "2-3", "learning_rate": 5.0e-5, "per_device_train_batch_size": 16, "lora_rank": 32, "lora_alpha": 32},
}
_CONTROL = re.compile(r"<[a-z_]+>")
_CJK = re.compile(r"[\u3000-\u9fff\uf900-\ufaff\uff00-\uffef]")


def approx_tokens(text: str) -> int:
    """Rough Gemma token count when no tokenizer is given: control tokens 1, CJK chars 1, other text ~4 chars/token."""
    n_control = len(_CONTROL.findall(text))
    rest = _CONTROL.sub("", text)
    n_cjk = len(_CJK.findall(rest))
    return n_control + n_cjk + math.ceil((len(rest) - n_cjk) / 4)


def preset_for(n_samples: int) -> str:
    if n_samples < 1000:
        return "small"
    return "medium" if n_samples <= 10000 else "large"


def suggest_max_seq_length(max_len: int) -> int:
    """Longest sample plus headroom, rounded up to a multiple of 64 (kernel-friendly shapes)."""
    return max(64, math.ceil(max_len * HEADROOM / 64) * 64)


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def dataset_stats(
    path: str | Path,
    tools_file: str | Path | None = None,
    count_tokens: Callable[[str], int] | None = None,
    columns: dict | None = None,
) -> dict:
    """Counts, coverage and rendered lengths of a processed, simple or test file (invalid rows counted, not fatal)."""
    from src.data_engine.formatter import render_conversation

    records, report = load_records(path, tools_file, columns, on_error="drop", allow_test=True)
    per_function: Counter = Counter()
    enum_counts: dict[str, Counter] = {}
    catalog_names: list[str] = []
    catalogs_seen: set[int] = set()
    for rec in records:
        if id(rec["tools"]) not in catalogs_seen:
            catalogs_seen.add(id(rec["tools"]))
            catalog = ToolCatalog(rec["tools"])
            for name, params in catalog.params.items():
                if name not in catalog_names:
                    catalog_names.append(name)
                for arg, schema in (params.get("properties") or {}).items():
                    if isinstance(schema, dict) and isinstance(schema.get("enum"), list):
                        enum_counts.setdefault(f"{name}.{arg}", Counter({v: 0 for v in schema["enum"]}))
        calls = rec["messages"][-1].get("tool_calls") or []
        if not calls:
            per_function[NO_CALL] += 1
        for c in calls:
            fn = c["function"]
            per_function[fn["name"]] += 1
            for arg, value in fn["arguments"].items():
                key = f"{fn['name']}.{arg}"
                if key in enum_counts and isinstance(value, str):
                    enum_counts[key][value] += 1
    unit = "tokens" if count_tokens else "approx_tokens"
    count = count_tokens or approx_tokens
    lengths = [count(render_conversation(r["messages"], r["tools"])) for r in records]
    ordered = sorted(lengths)
    n = len(records)
    duplicates = sum(1 for e in report.errors if e.reason.startswith("duplicate"))
    preset = preset_for(n)
    functions = {name: per_function.get(name, 0) for name in catalog_names}
    functions.update({k: v for k, v in per_function.items() if k not in functions and k != NO_CALL})
    few = [name for name, c in functions.items() if c < MIN_PER_FUNCTION]
    if len(few) > MAX_LISTED:  # many-catalog data (e.g. glaive): one line, not thousands
        warnings = [f"{len(few)} of {len(functions)} functions have fewer than {MIN_PER_FUNCTION} samples"]
    else:
        warnings = [f"{name}: only {functions[name]} samples (the guide recommends at least {MIN_PER_FUNCTION} per function)"
                    for name in few]
    for key, cnt in enum_counts.items():
        unused = [v for v, c in cnt.items() if c == 0]
        if unused and functions.get(key.split(".")[0]):
            warnings.append(f"{key}: never used: {', '.join(map(str, unused))}")
    if report.errors:
        warnings.append(f"{len(report.errors)} invalid or duplicate rows skipped; first: {report.errors[0]}")
    if per_function[NO_CALL] == 0:
        warnings.append("no text-answer (no-call) samples: the model will call a function for every input")
    return {
        "path": str(path),
        "n_rows": report.n_rows,
        "n_samples": n,
        "n_invalid": len(report.errors) - duplicates,
        "duplicates": duplicates,
        "per_function": functions,
        "n_no_call": per_function[NO_CALL],
        "no_call_share": per_function[NO_CALL] / n if n else 0.0,
        "enum_counts": {k: dict(v) for k, v in enum_counts.items()},
        "length_unit": unit,
        "lengths": lengths,
        "length": {"min": ordered[0], "median": int(statistics.median(ordered)), "p95": _percentile(ordered, 0.95),
                   "max": ordered[-1]},
        "suggested_max_seq_length": suggest_max_seq_length(ordered[-1]),
        "preset": preset,
        "preset_experiment": f"preset_{preset}",
        "preset_settings": PRESETS[preset],
        "errors": [str(e) for e in report.errors[:20]],
        "warnings": warnings,
    }


def print_stats(stats: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Samples per function ({stats['path']})")
    table.add_column("function")
    table.add_column("samples", justify="right")
    ranked = sorted(stats["per_function"].items(), key=lambda kv: -kv[1])
    for name, c in ranked[:MAX_LISTED]:
        table.add_row(name, f"[red]{c}[/red]" if c < MIN_PER_FUNCTION else str(c))
    if len(ranked) > MAX_LISTED:
        table.add_row(f"... {len(ranked) - MAX_LISTED} more", str(sum(c for _, c in ranked[MAX_LISTED:])))
    table.add_row(NO_CALL, f"{stats['n_no_call']} ({stats['no_call_share']:.1%})")
    console.print(table)

    length = stats["length"]
    summary = Table(title="Summary", show_header=False)
    summary.add_column("key")
    summary.add_column("value", justify="right")
    summary.add_row("valid samples", f"{stats['n_samples']} of {stats['n_rows']} rows")
    summary.add_row("duplicates skipped", str(stats["duplicates"]))
    summary.add_row("invalid rows skipped", str(stats["n_invalid"]))
    summary.add_row(f"length ({stats['length_unit']}) min / median / p95 / max",
                    f"{length['min']} / {length['median']} / {length['p95']} / {length['max']}")
    summary.add_row("suggested max_seq_length", str(stats["suggested_max_seq_length"]))
    summary.add_row("preset", f"{stats['preset']} (--experiment {stats['preset_experiment']})")
    console.print(summary)
    for w in stats["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}", markup=True, highlight=False)


def write_length_histogram(stats: dict, png_path: str | Path) -> Path:
    """PNG of rendered lengths with p95 and the suggested max_seq_length marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.hist(stats["lengths"], bins=min(50, max(5, len(set(stats["lengths"])))), color="#4c72b0")
        ax.axvline(stats["length"]["p95"], color="orange", linestyle="--", label=f"p95 = {stats['length']['p95']}")
        ax.axvline(stats["suggested_max_seq_length"], color="red", label=f"suggested max_seq_length = {stats['suggested_max_seq_length']}")
        ax.set_xlabel(f"rendered length ({stats['length_unit']})")
        ax.set_ylabel("samples")
        ax.set_title(f"{Path(stats['path']).name}: {stats['n_samples']} samples")
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(png_path, buf.getvalue())
