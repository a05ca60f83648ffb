"""Atomic writes and strict JSONL reading: an interrupted run never leaves a file that looks complete."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from src.utils.errors import UserError, where

MAX_LINE_BYTES = 1_000_000  # a JSONL line larger than this is a broken export, not a training sample


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """mkstemp creates 0600 files; the final file gets the usual umask-derived mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `path`; rename it to `path` only when the block finishes without error."""
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise UserError(f"{path}: output exists; choose another path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_text_strict(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; binary or wrongly encoded files become one-line UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise UserError(f"{path}: binary file, expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{where(path, line)}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, object) for each non-blank line; a bad line raises UserError naming file and line."""
    text = read_text_strict(path)
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line.encode("utf-8")) > MAX_LINE_BYTES:
            raise UserError(f"{where(path, no)}: line longer than {MAX_LINE_BYTES} bytes")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where(path, no)}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where(path, no)}: expected a JSON object, got {type(obj).__name__}")
        yield no, obj


def read_json(path: str | os.PathLike):
    text = read_text_strict(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where(path, exc.lineno)}: not JSON ({exc.msg} at column {exc.colno})") from None
