"""Merge, the export command end to end on a tiny run, its bad-input errors, atomicity and the Ollama Modelfile."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("llama_cpp")

from src.data_engine.formatter import (  # noqa: E402
    BOS, CHAT_TEMPLATE, CONTROL_TOKENS, render_conversation, routing_messages,
)
from src.evaluation.report import evaluate_model, load_test_cases  # noqa: E402
from src.evaluation.router import load_tools  # noqa: E402
from src.export import exporter, verify  # noqa: E402
from src.export.exporter import export_model, parse_quantizations  # noqa: E402
from src.export.merge import load_merged, merge_adapter  # noqa: E402
from src.export.modelfile import render_modelfile  # noqa: E402
from src.export.verify import MERGE_ATOL, reference_results, threshold_for  # noqa: E402
from src.utils.errors import UserError  # noqa: E402
from src.utils.model_loader import load_model  # noqa: E402
from tests.test_export_gguf import llama_cpp_tiny_model  # noqa: E402
from tests.tiny_model import make_tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {
    "name": "get_leave_balance", "description": "Leave days left.",
    "parameters": {"type": "object", "properties": {"employee_name": {"type": "string"}},
                   "required": ["employee_name"]}}}]
CASES = [{"user_content": "查询张三的年假", "expected_tool": "get_leave_balance",
          "expected_arguments": {"employee_name": "张三"}},
         {"user_content": "thanks", "expected_tool": None}]
PROMPT = "<bos><start_of_turn>user\n<start_function_call>call:x{a:<escape>1<escape>}<end_of_turn>\n"
FAST = {"inference": {"max_new_tokens": 4}, "data": {"tools_file": None}}
COPIED = {"get_leave_balance": ["employee_name"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A trained-run directory as `train` leaves it: LoRA + trained control-token rows, tokenizer, tools, config."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = make_tiny_tokenizer()
    base = root / "base"
    llama_cpp_tiny_model(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                      trainable_token_indices=list(CONTROL_TOKENS.values()))
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # trained control-token rows differ from the base's
        for name, param in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    run_dir = root / "hr_v1"
    peft_model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    (run_dir / "tools.json").write_text(json.dumps(TOOLS), encoding="utf-8")
    (run_dir / "config.yaml").write_text("data:\n  system_prompt: null\n", encoding="utf-8")
    (run_dir / "copied_arguments.json").write_text(json.dumps(COPIED), encoding="utf-8")
    (root / "test.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CASES), "utf-8")
    return run_dir


def _logits(model, tokenizer, text=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])).logits


def test_merged_model_matches_base_plus_adapter(run, tmp_path):
    reference, tokenizer = load_model(str(run), dtype="float32", device="cpu")
    base, _ = load_model(str(run.parent / "base"), dtype="float32", device="cpu")
    assert (_logits(base, tokenizer) - _logits(reference, tokenizer)).abs().max() > 0.1  # the adapter matters

    out = merge_adapter(run, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (_logits(plain, tokenizer) - _logits(reference, tokenizer)).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    assert json.loads((out / "tools.json").read_text()) == TOOLS and (out / "config.yaml").is_file()
    assert json.loads((out / "copied_arguments.json").read_text()) == COPIED
    assert not list(out.glob("adapter_*"))


def test_plain_model_dir_merges_to_itself(run):
    merged, tokenizer = load_merged(run.parent / "base")
    base = AutoModelForCausalLM.from_pretrained(run.parent / "base", dtype=torch.float32,
                                                attn_implementation="eager").eval()
    assert torch.equal(_logits(merged, tokenizer), _logits(base, tokenizer))


def test_gguf_export_end_to_end(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the terminal width
    out = run.parent / "hr_gguf"
    report = export_model(run, out, fmt="gguf", quantization="q8_0,q4_k_m", config=OmegaConf.create(FAST),
                          test_file=run.parent / "test.jsonl")
    assert report["ok"] and json.loads((out / "export_report.json").read_text())["ok"] is True
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile", "Modelfile.q4_k_m", "config.yaml", "copied_arguments.json", "export_report.json",
                     "hr_v1-q4_k_m.gguf", "hr_v1-q8_0.gguf", "tools.json"]  # no float intermediate left behind
    for entry in report["files"]:
        v = entry["verify"]
        assert entry["bytes"] == (out / entry["file"]).stat().st_size
        assert v["n"] == len(CASES) and 0.0 <= v["identical_output"] <= v["agreement"] <= 1.0
        assert v["threshold"] == threshold_for(entry["quantization"])
        assert all(c["ok"] for c in v["checks"].values())
    assert "FROM ./hr_v1-q8_0.gguf" in (out / "Modelfile").read_text()
    printed = capsys.readouterr().out
    assert "hr_v1-q8_0.gguf" in printed and "GGUF q4_k_m" in printed and "PyTorch" in printed
    assert "export ok" in printed


def test_export_below_threshold_is_kept_but_failed(run):
    out = run.parent / "strict"
    config = OmegaConf.create({**FAST, "export": {"agreement_threshold": 1.01}})
    report = export_model(run, out, quantization="f16", config=config, test_file=run.parent / "test.jsonl")
    assert report["ok"] is False and report["files"][0]["verify"]["threshold"] == 1.01
    assert json.loads((out / "export_report.json").read_text())["ok"] is False
    assert (out / "hr_v1-f16.gguf").is_file()

    # The same failure in a quantization named advisory is still reported, but does not fail the export.
    config = OmegaConf.create({**FAST, "export": {"agreement_threshold": 1.01, "advisory": ["F16"]}})
    report = export_model(run, run.parent / "advisory", quantization="f16", config=config,
                          test_file=run.parent / "test.jsonl")
    assert report["ok"] is True and report["files"][0]["advisory"] is True
    assert report["files"][0]["verify"]["ok"] is False


def test_advisory_does_not_forgive_a_failed_exact_check(run, monkeypatch):
    from src.export import verify

    real = verify.tokenizer_checks

    def broken_bos(*args, **kwargs):
        checks = real(*args, **kwargs)
        first = next(iter(checks))
        checks[first] = {**checks[first], "ok": False}
        return checks

    monkeypatch.setattr(verify, "tokenizer_checks", broken_bos)
    config = OmegaConf.create({**FAST, "export": {"advisory": ["f16"]}})
    report = export_model(run, run.parent / "advisory_broken", quantization="f16", config=config,
                          test_file=run.parent / "test.jsonl")
    assert report["files"][0]["advisory"] is True and report["ok"] is False


def test_unverified_export_says_so(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the terminal width
    out = run.parent / "unverified"
    report = export_model(run, out, quantization="q4_0", verify=False, test_file=None)
    assert report["ok"] and report["verified"] is False and "verify" not in report["files"][0]
    assert "not verified" in capsys.readouterr().out


def test_pytorch_export_checks_logits(run):
    out = run.parent / "hr_merged"
    report = export_model(run, out, fmt="pytorch", config=OmegaConf.create(FAST), test_file=run.parent / "test.jsonl")
    check = report["files"][0]["verify"]
    assert report["ok"] and check["ok"] and check["max_abs_logit_diff"] < check["tolerance"] == MERGE_ATOL
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gemma3_text"


def test_interrupted_export_leaves_nothing(run, monkeypatch):
    out = run.parent / "interrupted"

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "verify_gguf", die)
    with pytest.raises(KeyboardInterrupt):
        export_model(run, out, quantization="q8_0", config=OmegaConf.create(FAST), test_file=run.parent / "test.jsonl")
    assert not out.exists()
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".interrupted")]


# ---------------------------------------------------------------- the evaluation's results as the PyTorch reference

EVAL = {"inference": {"max_new_tokens": 12}, "data": {"tools_file": None}}


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory) -> Path:
    """A copy of the run with RUN/eval written by `evaluate` (test.jsonl beside it), as `make run` leaves it."""
    root = tmp_path_factory.mktemp("evaluated")
    copy = shutil.copytree(run, root / "hr_v1")
    shutil.copy2(run.parent / "test.jsonl", root / "test.jsonl")
    evaluate_model(str(copy), root / "test.jsonl", config=OmegaConf.create(EVAL))
    return copy


@pytest.fixture
def passes(monkeypatch) -> list:
    """Labels of the routing passes an export runs ("PyTorch reference" is the one reuse saves)."""
    labels, real = [], verify.run_router

    def spy(router, cases, label):
        labels.append(label)
        return real(router, cases, label)

    monkeypatch.setattr(verify, "run_router", spy)
    return labels


def _verdicts(report) -> dict:
    """What the reference decides in a report (latencies and timings aside)."""
    v = {k: x for k, x in report["files"][0]["verify"].items() if k != "seconds"}
    v["accuracy"] = {k: x for k, x in v["accuracy"].items() if k != "latency_ms"}
    return {"pytorch": {k: x for k, x in report["pytorch_accuracy"].items() if k != "latency_ms"}, "gguf": v}


def test_export_reuses_the_evaluation_as_its_reference(evaluated, tmp_path, passes, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long lines to the terminal width
    data, predictions = evaluated.parent / "test.jsonl", evaluated / "eval" / "predictions.json"
    reused = export_model(evaluated, tmp_path / "reused", quantization="q8_0", config=OmegaConf.create(EVAL),
                          test_file=data)
    assert reused["reference"] == {"reused": True, "path": str(predictions),
                                   "detail": "same weights, runtime, decoding and prompts for all 2 cases"}
    assert passes == ["llama.cpp q8_0"]  # no PyTorch pass
    assert json.loads((tmp_path / "reused" / "export_report.json").read_text())["reference"]["reused"] is True
    assert f"PyTorch reference: reused from {predictions}" in capsys.readouterr().out

    off = OmegaConf.create({**EVAL, "export": {"reference": "off"}})
    fresh = export_model(evaluated, tmp_path / "fresh", quantization="q8_0", config=off, test_file=data)
    assert fresh["reference"] == {"reused": False, "path": None, "detail": "export.reference=off"}
    assert passes[1:] == ["PyTorch reference", "llama.cpp q8_0"]
    assert _verdicts(reused) == _verdicts(fresh)

    explicit = OmegaConf.create({**EVAL, "export": {"reference": str(predictions)}})
    elsewhere = shutil.copytree(evaluated, tmp_path / "elsewhere", ignore=shutil.ignore_patterns("eval"))
    report = export_model(elsewhere, tmp_path / "explicit", quantization="q8_0", config=explicit, test_file=data)
    assert report["reference"]["reused"] is True and report["reference"]["path"] == str(predictions)


def test_reused_reference_equals_a_fresh_pass_matched_by_text(evaluated):
    model, tokenizer = load_merged(evaluated)
    cases = load_test_cases(evaluated.parent / "test.jsonl", load_tools(evaluated, None))[::-1]  # not file order
    config = OmegaConf.create(EVAL)
    got, source = reference_results(model, tokenizer, TOOLS, None, cases, config, evaluation=evaluated / "eval",
                                    copied=COPIED)  # the evaluation decoded with the run's copied arguments
    want, computed = reference_results(model, tokenizer, TOOLS, None, cases, config, copied=COPIED)
    assert source["reused"] and not computed["reused"]
    _, uncopied = reference_results(model, tokenizer, TOOLS, None, cases, config, evaluation=evaluated / "eval")
    assert not uncopied["reused"] and "copied_arguments" in uncopied["detail"]  # another decoding: not reused

    def key(r):
        return r.kind, r.calls, r.text, r.raw, r.error, r.n_prompt_tokens, r.n_new_tokens

    assert [key(r) for r in got] == [key(r) for r in want]
    assert want[0].raw != want[1].raw  # so a case matched to the wrong result would show


def _change_weights(run_dir: Path) -> None:
    path = run_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[name] = tensors[name] + 1e-3  # small: the outputs may not change, the weights have
    save_file(tensors, path)


@pytest.mark.parametrize("change, detail", [
    ("weights", "weights differ from the evaluated model's"),
    ("decoding", "decoding differs (evaluation vs export): max_new_tokens 12 vs 11"),
    ("batch size", "decoding differs (evaluation vs export): batch_size 96 vs 5"),
    ("cases", "1 of 2 cases were not evaluated"),
    ("prompts", "2 of 2 prompts differ in token ids"),
    ("runtime", "runtime differs (evaluation vs export): threads"),
])
def test_export_recomputes_a_reference_from_another_run(evaluated, tmp_path, passes, change, detail):
    run_dir = shutil.copytree(evaluated, tmp_path / "hr_v1")  # with its eval/
    cases, config = list(CASES), EVAL
    if change == "weights":
        _change_weights(run_dir)
    elif change == "decoding":
        config = {**EVAL, "inference": {"max_new_tokens": 11}}
    elif change == "batch size":
        config = {**EVAL, "evaluation": {"batch_size": 5}}
    elif change == "cases":
        cases[1] = {**CASES[1], "user_content": "thank you"}
    elif change == "prompts":
        (run_dir / "config.yaml").write_text("data:\n  system_prompt: You route HR requests.\n", encoding="utf-8")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    threads = torch.get_num_threads()
    if change == "runtime":
        torch.set_num_threads(threads + 1)
    try:
        report = export_model(run_dir, tmp_path / "out", quantization="q8_0", config=OmegaConf.create(config),
                              test_file=data)
    finally:
        torch.set_num_threads(threads)
    assert report["reference"]["reused"] is False and detail in report["reference"]["detail"]
    assert report["reference"]["path"] == str(run_dir / "eval" / "predictions.json")
    assert passes[0] == "PyTorch reference"


def test_bad_inputs_are_user_errors(run, tmp_path):
    test_file = run.parent / "test.jsonl"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="not a model directory"):
        export_model(tmp_path / "notes", tmp_path / "o1", test_file=test_file)
    with pytest.raises(UserError, match="unknown 'q3_x'"):
        export_model(run, tmp_path / "o2", quantization="q8_0,q3_x", test_file=test_file)
    with pytest.raises(UserError, match="output exists"):
        export_model(run, tmp_path / "notes", test_file=test_file)
    with pytest.raises(UserError, match="--format"):
        export_model(run, tmp_path / "o3", fmt="onnx", test_file=test_file)
    with pytest.raises(UserError, match="test file not found"):
        export_model(run, tmp_path / "o4", test_file=tmp_path / "missing.jsonl")
    assert parse_quantizations(" Q8_0 ,q4_k_m,q8_0") == ["q8_0", "q4_k_m"]


@pytest.mark.parametrize("args,message", [
    (["--quantization", "q9"], "unknown 'q9'"),
    (["--format", "onnx"], "--format"),
])
def test_cli_bad_input_is_one_line_exit_2(run, tmp_path, args, message):
    proc = subprocess.run([sys.executable, "main.py", "export", str(run), str(tmp_path / "out"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_modelfile_bakes_the_trained_developer_turn():
    text = render_modelfile("hr_v1-q8_0.gguf", TOOLS, title="hr_v1")
    lines = text.splitlines()
    assert "FROM ./hr_v1-q8_0.gguf" in lines
    assert {'PARAMETER stop "<end_of_turn>"', 'PARAMETER stop "<start_function_response>"',
            "PARAMETER temperature 0"} <= set(lines)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    prompt = render_conversation(routing_messages("x"), TOOLS, add_generation_prompt=True)
    developer = prompt[len(BOS):prompt.index("<start_of_turn>user")]
    context = "You are a model that can do function calling with the following functions"
    system_or_context = ("{{ if $system }}{{ $system }}{{ else if .System }}{{ .System }}{{ else }}"
                         + context + "{{ end }}")
    assert developer.replace(context, system_or_context) in template
    assert BOS not in template  # Ollama adds BOS itself (add_bos_token), a second one would be doubled
    assert "{{-" not in template and "-}}" not in template  # trim markers would eat the format's newlines
    assert template.endswith('{{ if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}{{ end }}')


def test_modelfile_escapes_go_actions_in_descriptions():
    tools = [{"name": "f", "description": "use {{braces}}", "parameters": {"type": "object", "properties": {}}}]
    assert 'use {{ "{{" }}braces}}' in render_modelfile("m.gguf", tools)
