"""Turn user files (.jsonl, .json, .csv, .xlsx, or a directory of them) into raw rows that remember where they came from.

Readers never judge a row's content: a row that cannot even be parsed comes back with `error` set, so the caller's
policy (fail or drop) decides. Whole-file problems (missing, empty, binary, wrong encoding) are fatal UserErrors.
"""
from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from src.utils.errors import UserError, where
from src.utils.io import MAX_LINE_BYTES, read_json, read_text_strict

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".xlsx")
# Canonical spreadsheet columns; users map their own headers onto these with `columns`.
DEFAULT_COLUMNS = {
    "user_content": "user_content",
    "tool_name": "tool_name",
    "tool_arguments": "tool_arguments",
    "answer": "answer",
    "system": "system",
}
REQUIRED_COLUMNS = ("user_content", "tool_name")
OPTIONAL_ALIASES = {"answer": ("response",)}  # accepted without configuration


@dataclass
class RawRow:
    """One input record and its position; `line` is the text line (JSONL/JSON/CSV) or sheet row (xlsx)."""

    file: str
    line: int
    data: dict | None
    error: str | None = None  # set when the row could not even be parsed
    tabular: bool = False  # from a spreadsheet/CSV: always the simple shape


def list_inputs(path: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """A file is itself; a directory is every supported file directly inside it (batch conversion).

    `exclude` is the output file: converting a directory into itself must not read last run's output back in.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_file():
        if path.suffix.lower() == ".xls":
            raise UserError(f"{path}: old .xls format is not supported; save it as .xlsx")
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith((".", "~$"))
        and (exclude is None or p.resolve() != Path(exclude).resolve())
    )
    if not files:
        raise UserError(f"{path}: directory has no {', '.join(SUPPORTED_SUFFIXES)} files")
    return files


def read_rows(path: str | Path, columns: dict | None = None, exclude: str | Path | None = None) -> Iterator[RawRow]:
    """Yield raw rows from a file or every supported file in a directory, in a stable order."""
    for file in list_inputs(path, exclude):
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(file)
        elif suffix == ".json":
            yield from _read_json_array(file)
        elif suffix == ".csv":
            yield from _read_csv(file, columns)
        else:
            yield from _read_xlsx(file, columns)


def load_tools(path: str | Path) -> list:
    """A catalog file: a JSON list of tools, or an object with a "tools" list."""
    obj = read_json(path)
    if isinstance(obj, dict) and isinstance(obj.get("tools"), list):
        obj = obj["tools"]
    if not isinstance(obj, list):
        raise UserError(f"{path}: tools file must be a JSON list of tools, got {type(obj).__name__}")
    if not obj:
        raise UserError(f"{path}: tools file has no tools")
    return obj


def _text(path: Path) -> str:
    text = read_text_strict(path)
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return text


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    # Own loop rather than io.read_jsonl: under on_error="drop" a broken line is a dropped row, not the end.
    for no, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if len(line.encode("utf-8")) > MAX_LINE_BYTES:
            yield RawRow(str(path), no, None, f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(str(path), no, None, f"not JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield RawRow(str(path), no, None, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield RawRow(str(path), no, obj)


def _read_json_array(path: Path) -> Iterator[RawRow]:
    """A .json file holding a list of records (LLaMA-Factory style); each item is reported at its starting line."""
    text = _text(path)
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if text[pos] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where(path, exc.lineno)}: not JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(obj, dict):
            yield RawRow(str(path), text.count("\n", 0, pos) + 1, obj)
            return
        raise UserError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
    pos = _skip_ws(text, pos + 1)
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Inside an array one broken item desynchronises the rest: report it and stop.
            raise UserError(f"{where(path, exc.lineno)}: not JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(obj, dict):
            yield RawRow(str(path), line, obj)
        else:
            yield RawRow(str(path), line, None, f"expected a JSON object, got {type(obj).__name__}")
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    if pos >= len(text):
        raise UserError(f"{where(path, text.count(chr(10)) + 1)}: not JSON (unterminated list)")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _column_map(path: Path, header: list, columns: dict | None) -> dict[str, int]:
    """Map canonical names to column indexes; a missing required column is fatal (every row would fail)."""
    wanted = dict(DEFAULT_COLUMNS)
    unknown = set(columns or {}) - set(wanted)
    if unknown:
        raise UserError(f"columns: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(wanted)}")
    wanted.update(columns or {})
    names = [str(h).strip().lower() if h is not None else "" for h in header]
    found: dict[str, int] = {}
    for key, col in wanted.items():
        candidates = [str(col).strip().lower()] + ([] if columns and key in columns else list(OPTIONAL_ALIASES.get(key, ())))
        for cand in candidates:
            if cand in names:
                found[key] = names.index(cand)
                break
    for key in REQUIRED_COLUMNS:
        if key not in found:
            shown = ", ".join(str(h) for h in header if h not in (None, "")) or "none"
            raise UserError(
                f"{where(path, 1)}: missing column '{wanted[key]}' (found: {shown}); "
                f"name your columns with --columns {key}=YOUR_HEADER"
            )
    return found


def _cell_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    return text if text.strip() else None


def _table_rows(path: Path, rows: Iterator[tuple[int, list]], columns: dict | None) -> Iterator[RawRow]:
    header = None
    for no, cells in rows:
        if all(_cell_text(c) is None for c in cells):
            continue
        if header is None:
            header = cells
            colmap = _column_map(path, header, columns)
            continue
        data = {key: _cell_text(cells[idx]) if idx < len(cells) else None for key, idx in colmap.items()}
        yield RawRow(str(path), no, data, tabular=True)
    if header is None:
        raise UserError(f"{path}: file is empty")


def _read_csv(path: Path, columns: dict | None) -> Iterator[RawRow]:
    text = _text(path)
    first = text.splitlines()[0] if text else ""
    delimiter = max(",;\t", key=first.count) if any(d in first for d in ",;\t") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)

    def numbered():
        start = 1
        try:
            for cells in reader:
                yield start, cells
                start = reader.line_num + 1
        except csv.Error as exc:
            raise UserError(f"{where(path, reader.line_num)}: broken CSV ({exc})") from None

    yield from _table_rows(path, numbered(), columns)


def _read_xlsx(path: Path, columns: dict | None) -> Iterator[RawRow]:
    # openpyxl directly (pandas uses it underneath): we need exact sheet row numbers for error messages.
    import openpyxl

    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not an .xlsx workbook (not a zip archive); save it as .xlsx")
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for damaged files
        raise UserError(f"{path}: cannot open workbook ({type(exc).__name__}: {exc})") from None
    try:
        sheet = wb.worksheets[0]
        rows = ((no, list(cells)) for no, cells in enumerate(sheet.iter_rows(values_only=True), start=1))
        yield from _table_rows(path, rows, columns)
    finally:
        wb.close()
