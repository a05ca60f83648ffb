"""dataset_stats numbers on a small hand-made file, the printer and the histogram."""
from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from src.data_engine.stats import approx_tokens, dataset_stats, preset_for, print_stats, suggest_max_seq_length, write_length_histogram

TOOLS = Path(__file__).resolve().parents[1] / "data/tools/hr_tools.json"


def _write(tmp_path: Path) -> Path:
    rows = [
        {"user_content": "查询张三的年假", "tool_name": "get_leave_balance", "tool_arguments": {"employee_name": "张三", "leave_type": "annual"}},
        {"user_content": "李四还有几天病假", "tool_name": "get_leave_balance", "tool_arguments": {"employee_name": "李四", "leave_type": "sick"}},
        {"user_content": "王五的假期余额", "tool_name": "get_leave_balance", "tool_arguments": {"employee_name": "王五"}},
        {"user_content": "张三2026年3月工资条", "tool_name": "get_payslip", "tool_arguments": {"employee_name": "张三", "month": "2026-03"}},
        {"user_content": "讲个笑话", "tool_name": ""},
        {"user_content": "查询张三的年假", "tool_name": "get_leave_balance", "tool_arguments": {"employee_name": "张三", "leave_type": "annual"}},
        {"user_content": "订会议室", "tool_name": "book_room"},
    ]
    src = tmp_path / "small.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return src


def test_stats_numbers(tmp_path):
    stats = dataset_stats(_write(tmp_path), TOOLS, count_tokens=len)
    assert stats["n_rows"] == 7 and stats["n_samples"] == 5
    assert stats["duplicates"] == 1 and stats["n_invalid"] == 1
    assert stats["per_function"]["get_leave_balance"] == 3 and stats["per_function"]["get_payslip"] == 1
    assert stats["per_function"]["cancel_leave"] == 0  # catalog functions without samples are listed
    assert stats["n_no_call"] == 1 and stats["no_call_share"] == 0.2
    assert stats["enum_counts"]["get_leave_balance.leave_type"] == {"annual": 1, "sick": 1, "personal": 0, "compensatory": 0}
    lengths = sorted(stats["lengths"])
    assert stats["length"] == {"min": lengths[0], "median": lengths[2], "p95": lengths[-1], "max": lengths[-1]}
    assert stats["length_unit"] == "tokens"
    assert stats["suggested_max_seq_length"] % 64 == 0 and stats["suggested_max_seq_length"] >= lengths[-1] * 1.1
    assert stats["preset"] == "small" and stats["preset_experiment"] == "preset_small"
    assert any("get_payslip: only 1 samples" in w for w in stats["warnings"])
    assert any("get_leave_balance.leave_type: never used: personal, compensatory" in w for w in stats["warnings"])


def test_presets_and_rounding():
    assert [preset_for(n) for n in (10, 999, 1000, 10000, 10001)] == ["small", "small", "medium", "medium", "large"]
    assert suggest_max_seq_length(1403) == 1600
    assert suggest_max_seq_length(10) == 64
    assert approx_tokens("<bos>你好 abcd") == 1 + 2 + 2


def test_printer_and_histogram(tmp_path):
    stats = dataset_stats(_write(tmp_path), TOOLS)
    assert stats["length_unit"] == "approx_tokens"
    buf = io.StringIO()
    print_stats(stats, Console(file=buf, width=120))
    text = buf.getvalue()
    assert "get_leave_balance" in text and "suggested max_seq_length" in text and "warning" in text
    png = write_length_histogram(stats, tmp_path / "plots" / "lengths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
