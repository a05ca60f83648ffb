"""Arguments that the training data always copies verbatim from the request: names, reasons, search topics.

A router that writes "coco Huang" or "Dong Hao" for the "Coco Huang" / "Deng Hao" of the request makes a call that
finds nobody. When every training call of a function writes a string argument as a piece of the user's own words,
that is the rule the model was meant to learn, so decoding can hold it to the rule (constrain.py keeps such values
to substrings of the request). The rule is read from the data, not declared: a string key without an enum whose
value is a non-empty substring of the request, with no space at either end, in every one of its (at least
MIN_SAMPLES) training calls. Dates written "2026-06-17" for "June 17", or values a user's data normalises, are
never copies and stay free.
Training writes the result as MODEL/copied_arguments.json; merged and GGUF exports carry it along.
"""
from __future__ import annotations

import json
from pathlib import Path

from src.data_engine.formatter import normalize_tools
from src.utils.errors import UserError
from src.utils.io import atomic_write_json, read_json

COPIED_FILE = "copied_arguments.json"
MIN_SAMPLES = 5  # fewer calls than this prove nothing about a key


def is_trimmed_piece(value, source) -> bool:
    """The copy rule, for str (training data) and bytes (constrained decoding) alike: a non-empty piece of `source`
    with no space at either end."""
    return bool(value) and value == value.strip() and value in source


def learn_copied_arguments(records: list[dict], tools) -> dict[str, list[str]]:
    """{function: [keys]} of the string keys (no enum) copied verbatim from the request in all their calls."""
    free = {}
    for tool in normalize_tools(tools):
        props = (tool.get("parameters") or {}).get("properties") or {}
        free[tool["name"]] = {k for k, s in props.items() if isinstance(s, dict)
                              and str(s.get("type", "")).lower() == "string" and not s.get("enum")}
    seen: dict[tuple[str, str], int] = {}
    broken: set[tuple[str, str]] = set()
    for record in records:
        messages = record.get("messages") or []
        request = next((m.get("content") for m in messages if m.get("role") == "user"), None)
        if not isinstance(request, str):
            continue
        for message in messages:
            for call in message.get("tool_calls") or []:
                function = call.get("function", call)
                name, arguments = function.get("name"), function.get("arguments")
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        continue
                if not isinstance(arguments, dict):
                    continue
                for key, value in arguments.items():
                    if key not in free.get(name, ()):
                        continue
                    seen[(name, key)] = seen.get((name, key), 0) + 1
                    if not (isinstance(value, str) and is_trimmed_piece(value, request)):
                        broken.add((name, key))
    copied: dict[str, list[str]] = {}
    for (name, key), count in sorted(seen.items()):
        if count >= MIN_SAMPLES and (name, key) not in broken:
            copied.setdefault(name, []).append(key)
    return copied


def write_copied_arguments(directory: str | Path, copied: dict[str, list[str]]) -> None:
    atomic_write_json(Path(directory) / COPIED_FILE, copied)


def read_copied_arguments(directory: str | Path | None) -> dict[str, list[str]]:
    """The model dir's copied arguments; {} when it has none (a base model, a run from before this file)."""
    path = Path(directory) / COPIED_FILE if directory is not None else None
    if path is None or not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(k, list) and all(isinstance(x, str) for x in k)
                                             for k in data.values()):
        raise UserError(f"{path}: expected {{function: [argument names]}}")
    return data
