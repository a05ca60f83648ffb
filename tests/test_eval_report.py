"""`evaluate` end to end on the tiny model: files, keys, ranges, the baseline column, and bad test files."""
from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model

from src.evaluation.report import evaluate_model, load_test_cases
from src.evaluation.router import load_tools
from src.utils.errors import UserError
from tests.tiny_model import make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer, save_adapter_dir

TOOLS = [
    {"type": "function", "function": {
        "name": "get_leave_balance", "description": "Leave days left.",
        "parameters": {"type": "object", "properties": {
            "employee_name": {"type": "string"}, "leave_type": {"type": "string", "enum": ["annual", "sick"]}},
            "required": ["employee_name"]}}},
    {"type": "function", "function": {"name": "search_policy", "description": "HR rules.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
]
CASES = [
    {"user_content": "查询张三的年假", "expected_tool": "get_leave_balance",
     "expected_arguments": {"employee_name": "张三", "leave_type": "annual"}},
    {"user_content": "病假怎么请", "expected_tool": "search_policy", "expected_arguments": {"query": None}},
    {"user_content": "谢谢", "expected_tool": None, "expected_arguments": {}},
    {"user_content": "李四还有几天假", "expected_tool": "get_leave_balance"},
]
FRACTIONS = ["tool_accuracy", "exact_call_accuracy", "argument_accuracy", "normalized_argument_accuracy",
             "no_call_precision", "no_call_recall", "malformed_rate"]
REQUIRED = ["n", *FRACTIONS, "latency_ms", "per_function", "confusion_matrix", "mistakes", "model", "data"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter over the tiny base dir, laid out as `train` writes it (tools.json beside it)."""
    root = tmp_path_factory.mktemp("run")
    base_dir = make_tiny_model_dir(root / "base")
    tokenizer = make_tiny_tokenizer()
    peft_model = get_peft_model(make_tiny_model(len(tokenizer)),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return save_adapter_dir(peft_model, root / "hr_v1", base_dir, TOOLS)


@pytest.fixture(scope="module")
def evaluated(adapter_dir, tmp_path_factory):
    data = write_jsonl(tmp_path_factory.mktemp("data") / "test.jsonl", CASES)
    report = evaluate_model(str(adapter_dir), data, baseline=True, config={"inference": {"max_new_tokens": 12}})
    return report, adapter_dir / "eval"


def test_report_files_are_written_to_model_eval(evaluated):
    report, out = evaluated
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "confusion_matrix.png",
                                               "confusion_matrix_baseline.png", "predictions.json"}
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == json.loads(json.dumps(report))


@pytest.mark.parametrize("which", ["model", "baseline"])
def test_report_keys_and_ranges(evaluated, which):
    report = evaluated[0] if which == "model" else evaluated[0]["baseline"]
    assert set(REQUIRED) <= set(report)
    assert report["n"] == len(CASES)
    for key in FRACTIONS:
        assert 0.0 <= report[key] <= 1.0, key
    assert set(report["latency_ms"]) == {"p50", "p95"}
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p95"]
    assert set(report["per_function"]) == {"get_leave_balance", "search_policy"}
    cm = report["confusion_matrix"]
    assert sum(map(sum, cm["matrix"])) == len(CASES)
    # a case without expected_arguments is scored on the tool only
    assert report["counts"]["exact_scored"] == 3 and report["counts"]["arguments"] == 3


def test_predictions_hold_every_case_and_the_run_fingerprint(evaluated, adapter_dir):
    report, out = evaluated
    saved = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    rows = saved["cases"]
    assert saved["runtime"] == "pytorch" and len(rows) == report["n"] == len(CASES)
    assert [(r["line"], r["user_content"]) for r in rows] == [(i + 1, c["user_content"]) for i, c in enumerate(CASES)]
    assert report["mistakes"]
    for mistake in report["mistakes"]:  # the model's own rows (not the baseline's): same raw output per line
        assert rows[mistake["line"] - 1]["raw"] == mistake["raw"]
    assert len({r["prompt_sha256"] for r in rows}) == len(CASES)  # one digest per distinct prompt
    fingerprint = saved["fingerprint"]
    assert fingerprint["decoding"] == {"temperature": 0.0, "max_new_tokens": 12, "prefix_cache": True,
                                       "constrain": True, "draft": False, "rescore_optional": True, "batch_size": 96}
    assert fingerprint["runtime"]["device"] == "cpu" and len(fingerprint["weights_sha256"]) == 64


def test_baseline_is_the_adapter_base(evaluated, adapter_dir):
    report = evaluated[0]
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert report["baseline"]["model"] == base and report["model"] == str(adapter_dir)


def test_markdown_has_the_tables_and_mistakes(evaluated):
    report, out = evaluated
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | model | baseline | gain |" in md
    assert "| exact call (name + arguments) |" in md and "latency p95" in md
    assert "## Per function" in md and "| get_leave_balance |" in md
    assert f"## Worst mistakes ({len(report['mistakes'])} of {report['n_mistakes']})" in md
    for mistake in report["mistakes"]:
        assert set(mistake) == {"line", "query", "problem", "expected", "got", "raw"}


def test_report_says_how_tokens_were_chosen(evaluated, adapter_dir, tmp_path):
    report, out = evaluated
    greedy = {"temperature": 0.0, "constrain": True, "draft": False, "rescore_optional": True}  # the config's defaults
    assert report["decoding"] == report["baseline"]["decoding"] == greedy
    assert ("prefix cache on, catalog-constrained decoding on, optional arguments kept only when they make the call "
            "more probable.") in (out / "report.md").read_text(encoding="utf-8")
    data = write_jsonl(tmp_path / "t.jsonl", CASES[:1])
    off = evaluate_model(str(adapter_dir), data, output_dir=tmp_path / "out",
                         config={"inference": {"max_new_tokens": 4, "constrain": False, "draft": True,
                                               "rescore_optional": False}})
    assert off["decoding"] == {"temperature": 0.0, "constrain": False, "draft": True, "rescore_optional": False}
    assert "catalog-constrained decoding off." in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_output_dir_and_limit_options(adapter_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", CASES)
    evaluate_model(str(adapter_dir), data, output_dir=tmp_path / "out", config={"inference": {"max_new_tokens": 4}},
                   limit=2)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n"] == 2 and "baseline" not in report
    with pytest.raises(UserError, match="--limit"):
        evaluate_model(str(adapter_dir), data, limit=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, message", [
    ({"expected_tool": None}, r"t.jsonl:2: user_content: missing"),
    ({"user_content": "", "expected_tool": None}, r"t.jsonl:2: user_content: expected a non-empty string"),
    ({"user_content": "x"}, r"t.jsonl:2: expected_tool: missing"),
    ({"user_content": "x", "expected_tool": "fly"}, r"t.jsonl:2: expected_tool: 'fly' is not in the tool catalog"),
    ({"user_content": "x", "expected_tool": "search_policy", "expected_arguments": []},
     r"t.jsonl:2: expected_arguments: expected an object"),
    ({"user_content": "x", "expected_tool": "search_policy", "expected_arguments": {"q": "a"}},
     r"t.jsonl:2: expected_arguments: 'q' is not a parameter of search_policy"),
    ("{broken", r"t.jsonl:2: not JSON"),
])
def test_bad_test_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "t.jsonl", [CASES[2], line])
    with pytest.raises(UserError, match=message):
        load_test_cases(path, load_tools(None, _tools_file(tmp_path)))


def test_empty_test_file(tmp_path):
    with pytest.raises(UserError, match="no test cases"):
        load_test_cases(write_jsonl(tmp_path / "t.jsonl", []), load_tools(None, _tools_file(tmp_path)))


def test_bad_input_fails_before_any_model_is_run(adapter_dir, tmp_path):
    bad = write_jsonl(tmp_path / "t.jsonl", [{"expected_tool": None}])
    with pytest.raises(UserError, match="user_content: missing"):
        evaluate_model(str(adapter_dir), bad, output_dir=tmp_path / "out")
    good = write_jsonl(tmp_path / "good.jsonl", CASES)
    with pytest.raises(UserError, match="no such file"):
        evaluate_model(str(tmp_path / "missing_model"), good)
    other = tmp_path / "other_tools.json"
    other.write_text(json.dumps(TOOLS[:1]))
    with pytest.raises(UserError, match="do not match"):
        evaluate_model(str(adapter_dir), good, tools_file=other)
    assert not (tmp_path / "out").exists()


def _tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    return path
