"""`export`: a trained run (adapter dir) or a plain HF model -> merged safetensors, or GGUF files for llama.cpp/Ollama.

Flow: check every input (before any model is loaded) -> merge once in float32 -> write each requested format into a
temp dir beside OUT -> verify against PyTorch -> rename the temp dir to OUT. An interrupted export leaves no OUT. A
verification below threshold still publishes the files (they may be useful to inspect) but `export_report.json`
says `"ok": false` and the CLI exits 1.
The PyTorch answers GGUFs are compared with are the model's evaluation (IN/eval/predictions.json, or
`export.reference`) when it provably ran the same weights, runtime, decoding and prompts, else computed anew;
`reference` in the report says which and why.
GGUF layout of OUT: `<name>-<quant>.gguf` per quantization, `Modelfile` (Ollama, for the first quantization;
`Modelfile.<quant>` for the others), tools.json + config.yaml of the run, export_report.json.
"""
from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from src.evaluation.gguf_router import GgufRouter
from src.evaluation.report import load_test_cases
from src.evaluation.router import (
    config_value, copied_arguments_of, load_tools, render_prompt, trained_system_prompt,
)
from src.export.gguf_writer import DIRECT_OUTTYPES, write_gguf
from src.export.merge import RUN_FILES, load_merged, safetensors_bytes, write_merged
from src.export.modelfile import render_modelfile
from src.export.quantize import K_QUANTS, quantize_gguf
from src.export.verify import (
    greedy_options, merged_logits_check, reference_line, reference_results, sample_cases, scores, verify_gguf,
)
from src.utils.errors import UserError
from src.utils.io import atomic_dir, atomic_write_json, atomic_write_text
from src.utils.model_loader import load_model, resolve_model_source

FORMATS = ("gguf", "pytorch")
QUANTIZATIONS = (*DIRECT_OUTTYPES, *K_QUANTS)
REPORT = "export_report.json"
MERGE_CHECK_PROMPTS = 3  # prompts whose logits the pytorch export is checked on (each is a full forward pass)


def parse_quantizations(quantization) -> list[str]:
    """'q8_0,q4_k_m' or a list -> ordered unique names; unknown names are a UserError listing the choices."""
    names = quantization.split(",") if isinstance(quantization, str) else list(quantization or [])
    out = []
    for name in (str(n).strip().lower() for n in names):
        if name not in QUANTIZATIONS:
            raise UserError(f"--quantization: unknown {name!r} (choose from {', '.join(QUANTIZATIONS)})")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError("--quantization: empty")
    return out


def _check_output(in_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite and (out_dir.is_file() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: output exists; choose another path or pass --overwrite")
    if in_dir.exists() and out_dir.resolve() == in_dir.resolve():
        raise UserError(f"{out_dir}: output is the input model directory")


def _check_source(in_dir: Path) -> None:
    if resolve_model_source(in_dir).kind == "gguf":  # also raises for paths that are not a model
        raise UserError(f"{in_dir}: already a GGUF file; export takes a model directory")


def _tools_and_prompt(in_dir: Path, config):
    own = in_dir / "tools.json"
    tools_file = None if own.is_file() else config_value(config, "data.tools_file", None)
    return load_tools(in_dir, tools_file), trained_system_prompt(in_dir, config)


def _cases(test_file, tools, config) -> list:
    if test_file is None:
        raise UserError("export: no test file to verify with; pass --data FILE or --no-verify")
    if not Path(test_file).is_file():
        raise UserError(f"{test_file}: test file not found; pass --data FILE or --no-verify")
    return sample_cases(load_test_cases(test_file, tools), config)


def _evaluation(in_dir: Path, config) -> Path | None:
    """Where `evaluate` left the per-case results export may reuse: `export.reference` (off: never), else IN/eval."""
    value = config_value(config, "export.reference", None)
    if value is None:
        return in_dir / "eval"
    return None if str(value).strip().lower() in ("", "off", "none", "false") else Path(str(value))


def _metadata(in_dir: Path, model) -> dict:
    base = getattr(model.config, "name_or_path", "") or ""
    return {"name": f"{in_dir.name} (FunctionGemma router)", "run": in_dir.name, "base_model": base,
            "description": f"FunctionGemma-format function router fine-tuned from {base or 'Gemma 3'} "
                           f"(run {in_dir.name}), exported by functiongemma-router"}


def export_model(in_dir, out_dir, fmt: str = "gguf", quantization="q8_0", verify: bool = True, config=None,
                 test_file=None, overwrite: bool = False) -> dict:
    """Export `in_dir` to `out_dir`; returns the report (also written to OUT/export_report.json)."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown {fmt!r} (choose from {', '.join(FORMATS)})")
    quants = parse_quantizations(quantization) if fmt == "gguf" else []
    _check_output(in_dir, out_dir, overwrite)
    _check_source(in_dir)
    tools, system_prompt = _tools_and_prompt(in_dir, config)
    cases = _cases(test_file, tools, config) if verify else []

    started = time.monotonic()
    model, tokenizer = load_merged(in_dir)
    report = {"ok": True, "format": fmt, "source": str(in_dir), "output": str(out_dir), "verified": verify,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "pytorch_bytes": safetensors_bytes(model), "pytorch_dtype": str(model.dtype).removeprefix("torch."),
              "files": []}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if fmt == "pytorch":
            _export_pytorch(model, tokenizer, in_dir, tmp, cases, tools, system_prompt, report)
        else:
            _export_gguf(model, tokenizer, in_dir, tmp, quants, cases, tools, system_prompt, config, report)
        advisory = {str(q).lower() for q in config_value(config, "export.advisory", None) or ()}
        for f in report["files"]:
            f["advisory"] = f["quantization"].lower() in advisory
        # Advisory forgives agreement below the threshold only; a failed exact check (token ids, template) is a bug.
        report["ok"] = all(f.get("verify", {}).get("ok", True)
                           or (f["advisory"] and all(c["ok"] for c in f["verify"]["checks"].values()))
                           for f in report["files"])
        report["seconds"] = round(time.monotonic() - started, 1)
        atomic_write_json(tmp / REPORT, report)
    print_summary(report)
    return report


def _export_pytorch(model, tokenizer, in_dir, tmp: Path, cases, tools, system_prompt, report) -> None:
    t0 = time.monotonic()
    write_merged(model, tokenizer, tmp, run_dir=in_dir)
    entry = {"file": "model.safetensors", "quantization": report["pytorch_dtype"],
             "bytes": (tmp / "model.safetensors").stat().st_size, "seconds": round(time.monotonic() - t0, 1)}
    if cases:  # the reference is base + adapter, unmerged, as training left it
        reference, _ = load_model(str(in_dir), dtype="float32", device="cpu")
        prompts = [render_prompt(c.user_content, tools, system_prompt) for c in cases[:MERGE_CHECK_PROMPTS]]
        entry["verify"] = merged_logits_check(tmp, reference.eval(), tokenizer, prompts)
    report["files"].append(entry)


def _export_gguf(model, tokenizer, in_dir, tmp: Path, quants, cases, tools, system_prompt, config, report) -> None:
    for name in RUN_FILES:
        if (in_dir / name).is_file():
            shutil.copy2(in_dir / name, tmp / name)
    if not (tmp / "tools.json").is_file():
        atomic_write_json(tmp / "tools.json", tools)
    reference = []
    copied = copied_arguments_of(in_dir, config)  # the reference and every GGUF decode with the run's copies
    if cases:
        reference, report["reference"] = reference_results(model, tokenizer, tools, system_prompt, cases, config,
                                                           copied=copied,
                                                           evaluation=_evaluation(in_dir, config))
        report["pytorch_accuracy"] = scores(cases, reference, tools)
    metadata = _metadata(in_dir, model)
    float_src = None
    for i, quant in enumerate(quants):
        t0 = time.monotonic()
        path = tmp / f"{in_dir.name}-{quant}.gguf"
        if quant in DIRECT_OUTTYPES:
            write_gguf(model, tokenizer, path, quant, metadata)
        else:
            if float_src is None:  # one float32 intermediate serves every K-quant, removed below
                float_src = write_gguf(model, tokenizer, tmp / ".intermediate-f32.gguf", "f32", metadata)
            quantize_gguf(float_src, path, quant)
        modelfile = "Modelfile" if i == 0 else f"Modelfile.{quant}"
        atomic_write_text(tmp / modelfile, render_modelfile(path.name, tools, system_prompt, title=in_dir.name))
        entry = {"file": path.name, "quantization": quant, "bytes": path.stat().st_size, "modelfile": modelfile,
                 "seconds": round(time.monotonic() - t0, 1)}
        if cases:
            router = GgufRouter(path, tools, system_prompt=system_prompt, copied=copied, **greedy_options(config))
            try:
                entry["verify"] = verify_gguf(router, quant, cases, reference, tokenizer, tools, system_prompt,
                                              config)
            finally:
                router.close()
        report["files"].append(entry)
    if float_src is not None:
        float_src.unlink()


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _verdict(v: dict | None) -> str:
    if v is None:
        return "not verified"
    if v["ok"]:
        return "ok"
    if "checks" in v:
        failed = [k for k, c in v["checks"].items() if not c["ok"]]
        return "FAILED: " + (", ".join(failed) or f"agreement < {v['threshold']:.2f}")
    return f"FAILED: logits differ by {v['max_abs_logit_diff']:.2g}"


def print_summary(report: dict, console: Console | None = None) -> None:
    """The guide's size table with the real sizes, plus agreement/accuracy when verified (fits 80 columns)."""
    console = console or Console()
    table = Table(title=f"export -> {report['output']}",
                  caption="agree: routes like PyTorch; tool/exact: test-set accuracy (exact = name + arguments)")
    table.add_column("export", no_wrap=True)
    for col in ("size", "agree", "tool", "exact"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("verdict")
    if report["format"] == "gguf":  # the merged model the GGUFs come from: its safetensors size (tensor bytes)
        pt = report.get("pytorch_accuracy") or {}
        table.add_row(f"PyTorch {report['pytorch_dtype']}", _size(report["pytorch_bytes"]), "-",
                      _pct(pt.get("tool_accuracy")), _pct(pt.get("exact_call_accuracy")), "reference")
    for f in report["files"]:
        v = f.get("verify")
        acc = (v or {}).get("accuracy") or {}
        label = f"GGUF {f['quantization']}" if f["file"].endswith(".gguf") else f"PyTorch {f['quantization']}"
        table.add_row(label, _size(f["bytes"]), _pct((v or {}).get("agreement")), _pct(acc.get("tool_accuracy")),
                      _pct(acc.get("exact_call_accuracy")),
                      _verdict(v) + (" (advisory)" if f.get("advisory") and not (v or {}).get("ok", True) else ""))
    console.print(table)
    if "reference" in report:
        console.print(reference_line(report["reference"]), highlight=False, soft_wrap=True)
    for f in report["files"]:
        console.print(f"  {Path(report['output']) / f['file']}", highlight=False, soft_wrap=True)
    status = "[green]export ok[/green]" if report["ok"] else "[red]export FAILED verification[/red]"
    below = [f["quantization"] for f in report["files"] if f.get("advisory") and not f.get("verify", {}).get("ok", True)]
    if below and report["ok"]:
        status += f" [yellow]({', '.join(below)} below its threshold: kept as advisory, not recommended)[/yellow]"
    console.print(f"{status} in {report.get('seconds', 0):.0f} s; report: {Path(report['output']) / REPORT}",
                  soft_wrap=True)
