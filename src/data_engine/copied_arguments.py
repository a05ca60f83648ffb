"""Arguments that the training data always takes from the request: names, reasons, topics copied verbatim, and
amounts or hours that are numbers the request states.

A router that writes "coco Huang" or "Dong Hao" for the "Coco Huang" / "Deng Hao" of the request makes a call that
finds nobody. When every training call of a function writes a string argument as a piece of the user's own words,
that is the rule the model was meant to learn, so decoding can hold it to the rule (constrain.py keeps such values
to substrings of the request). The rule is read from the data, not declared: a string key without an enum whose
value is a non-empty substring of the request, with no space at either end, in every one of its (at least
MIN_SAMPLES) training calls. Dates written "2026-06-17" for "June 17", or values a user's data normalises, are
never copies and stay free.
Numbers are held to the same kind of rule: a number key (no enum) whose value is, in every training call, one of the
numbers the request states (digits with or without thousands separators, Chinese numerals such as 五百四十 or
两个半, English number words): "五百四十块" must become 540, not a number the model half-remembers.
Training writes the result as MODEL/copied_arguments.json; merged and GGUF exports carry it along.
"""
from __future__ import annotations

import json
import re
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


_DIGITS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_CN_DIGIT = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNIT = {"十": 10, "百": 100, "千": 1000}
_CN = re.compile(r"(?P<whole>[零〇一二两三四五六七八九十百千万]+)(?:点(?P<decimals>[零〇一二三四五六七八九]+))?"
                 r"(?:(?P<half>个半)|块(?P<jiao>[一二三四五六七八九])(?![十百千万]))?")
_EN_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                         "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_EN_WORDS.update({"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                  "ninety": 90})
_EN = re.compile(r"(?<![a-z])(" + "|".join(sorted(_EN_WORDS, key=len, reverse=True)) + r")(?![a-z])(\s+and\s+a\s+half)?",
                 re.I)  # not \b: Chinese characters are word characters, and "的five" must still read five
# A lone 一 before these is a word, not the number one: 记一下 (note it), 一共 (in total), 一直, 一样, 一般, 一起...
_YI_WORDS = frozenset("下共直样般起些切定致律旦向同并边会")
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?|oct(?:ober)?"
          r"|nov(?:ember)?|dec(?:ember)?)\.?")
_CN_NUM = "[零〇一二两三四五六七八九十]"
# A date's numbers are its day, month and year, never an amount or hours: "6 hours OT on July 22, 2026" states 6.
_DATES = re.compile(
    r"\d{4}\s*[-/.年]\s*\d{1,2}\s*[-/.月]\s*\d{1,2}\s*[日号]?"  # 2026-07-22, 2026/7/22, 2026年7月22日
    rf"|(?:\d{{4}}\s*年\s*)?(?:\d{{1,2}}|{_CN_NUM}{{1,3}})\s*月\s*(?:\d{{1,2}}|{_CN_NUM}{{1,3}})\s*[日号]"  # 7月22号, 三月十号
    rf"|(?<![a-z]){_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?(?![\d.])"  # July 22, 2026
    rf"|(?<![\d.])\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}(?![a-z])(?:,?\s+\d{{4}})?",  # 22nd of July 2026
    re.I)
_YUAN_JIAO = re.compile(r"([零〇一二两三四五六七八九十百千万]+)元([一二三四五六七八九])角")
_HALF = re.compile(r"半(?:个)?小时|half an hour|half-hour", re.I)


def _cn_digits(text: str) -> str:
    return "".join(str(_CN_DIGIT[c]) for c in text)


def _cn_integer(text: str) -> int:
    """五百四十 -> 540, 两万零五 -> 20005, 十二 -> 12, 三五 (digit by digit) -> 35."""
    if not any(c in _CN_UNIT or c == "万" for c in text):
        return int(_cn_digits(text))
    total, section, digit = 0, 0, None
    for c in text:
        if c in _CN_DIGIT:
            digit = _CN_DIGIT[c]
        elif c in _CN_UNIT:
            section += (1 if digit is None else digit) * _CN_UNIT[c]
            digit = None
        elif c == "万":
            total += (section + (digit or 0)) * 10000
            section, digit = 0, None
    return total + section + (digit or 0)


def _render(number: float) -> str:
    """As the formatter writes a number argument: integers without a decimal point, other values' shortest repr."""
    return str(int(number)) if float(number).is_integer() else str(float(number))


def stated_numbers(text: str) -> frozenset[str]:
    """The numbers `text` states, rendered as a call writes them: every digit run (1,850 -> 1850; 1280.50 ->
    1280.5), Chinese numerals (五百四十 -> 540, 三点五 -> 3.5, 两个半 -> 2 and 2.5, 三块五 -> 3 and 3.5, 八十元五角 ->
    80 and 80.5) and English number words (three -> 3, eight and a half -> 8.5); 半小时 / half an hour -> 0.5. Not
    the numbers of a date (2026-07-22, 7月22号, July 22, 2026) nor the 一 of words such as 一下 or 一共."""
    text = _DATES.sub(" ", text)
    found: set[float] = {float(m.group().replace(",", "")) for m in _DIGITS.finditer(text)}
    for match in _CN.finditer(text):
        if match.group() == "一" and text[match.end():match.end() + 1] in _YI_WORDS:
            continue
        number = _cn_integer(match["whole"])
        found.add(float(number))
        for tail in (match["decimals"] and _cn_digits(match["decimals"]), match["half"] and "5",
                     match["jiao"] and _cn_digits(match["jiao"])):
            if tail:
                found.add(float(f"{number}.{tail}"))
    for match in _YUAN_JIAO.finditer(text):  # 一千二百八十元五角 -> 1280.5
        found.add(_cn_integer(match.group(1)) + _CN_DIGIT[match.group(2)] / 10)
    for match in _EN.finditer(text):
        number = _EN_WORDS[match.group(1).lower()]
        found.add(float(number) + (0.5 if match.group(2) else 0.0))
    if _HALF.search(text):
        found.add(0.5)
    return frozenset(_render(n) for n in found)


def _is_stated(value, request: str) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _render(value) in stated_numbers(request)


def taken_kind(schema) -> str:
    """How a value taken from the request is held, by its key's schema: "stated" for a number (one the request
    states), "copy" otherwise (a piece of the request, which only a string value can be)."""
    kind = str(schema.get("type", "")).lower() if isinstance(schema, dict) else ""
    return "stated" if kind in ("number", "integer") else "copy"


def _taken_keys(tools) -> dict[str, dict[str, str]]:
    """{function: {key: taken_kind}}: the string and number keys (no enum) whose values could be taken from the
    request."""
    out = {}
    for tool in normalize_tools(tools):
        props = (tool.get("parameters") or {}).get("properties") or {}
        out[tool["name"]] = {k: taken_kind(s) for k, s in props.items() if isinstance(s, dict) and not s.get("enum")
                             and str(s.get("type", "")).lower() in ("string", "number", "integer")}
    return out


def learn_copied_arguments(records: list[dict], tools) -> dict[str, list[str]]:
    """{function: [keys]} of the string keys (no enum) copied verbatim from the request in all their calls, and of
    the number keys whose value the request states in all their calls."""
    free = _taken_keys(tools)
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
                    taken = (_is_stated(value, request) if free[name][key] == "stated"
                             else isinstance(value, str) and is_trimmed_piece(value, request))
                    if not taken:
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
