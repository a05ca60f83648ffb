"""Optional distractor augmentation: the router should pick by meaning, not by a tool's position or the catalog size.

Off by default. Each augmented copy gets its catalog shuffled and N irrelevant generic tools mixed in; the target
call is unchanged, so the copy stays valid against its own (larger) catalog.
"""
from __future__ import annotations

import copy
import random

from src.data_engine.formatter import normalize_tools


def _tool(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


def _s(description: str, enum: list[str] | None = None) -> dict:
    out = {"type": "string", "description": description}
    if enum:
        out["enum"] = enum
    return out


# Everyday assistant tools: plausible in an office assistant, never the answer to an HR request.
GENERIC_TOOLS = [
    _tool("get_weather", "Get the current weather for a city.", {"city": _s("City name.")}, ["city"]),
    _tool("send_email", "Send an email.", {"to": _s("Recipient address."), "subject": _s("Subject line."),
                                             "body": _s("Message text.")}, ["to", "subject"]),
    _tool("create_calendar_event", "Create a calendar event.", {"title": _s("Event title."),
          "date": _s("Day, YYYY-MM-DD."), "time": _s("Start time, HH:MM.")}, ["title", "date"]),
    _tool("search_web", "Search the web.", {"query": _s("Search terms.")}, ["query"]),
    _tool("translate_text", "Translate text into another language.", {"text": _s("Text to translate."),
          "target_language": _s("Target language code, e.g. en, zh.")}, ["text", "target_language"]),
    _tool("set_reminder", "Set a reminder.", {"message": _s("What to remind about."),
          "time": _s("When, YYYY-MM-DD HH:MM.")}, ["message", "time"]),
    _tool("get_stock_price", "Get the latest price of a stock.", {"symbol": _s("Ticker symbol.")}, ["symbol"]),
    _tool("book_meeting_room", "Book a meeting room.", {"room": _s("Room name."), "date": _s("Day, YYYY-MM-DD."),
          "start_time": _s("HH:MM."), "end_time": _s("HH:MM.")}, ["room", "date", "start_time"]),
    _tool("calculate", "Evaluate an arithmetic expression.", {"expression": _s("Expression, e.g. 2*(3+4).")}, ["expression"]),
    _tool("convert_currency", "Convert an amount between currencies.", {
          "amount": {"type": "number", "description": "Amount to convert."},
          "from_currency": _s("ISO code."), "to_currency": _s("ISO code.")}, ["amount", "from_currency", "to_currency"]),
    _tool("get_news", "Get top news headlines.", {"topic": _s("Topic.", ["business", "tech", "sports", "world"])}, []),
    _tool("create_it_ticket", "Open an IT support ticket.", {"summary": _s("Problem summary."),
          "priority": _s("Priority.", ["low", "medium", "high"])}, ["summary"]),
    _tool("order_food", "Order food delivery.", {"restaurant": _s("Restaurant name."), "items": {
          "type": "array", "items": {"type": "string"}, "description": "Dishes."}}, ["restaurant", "items"]),
    _tool("play_music", "Play a song or playlist.", {"query": _s("Song, artist or playlist.")}, ["query"]),
    _tool("get_directions", "Get directions between two places.", {"origin": _s("Start."),
          "destination": _s("End."), "mode": _s("Travel mode.", ["driving", "walking", "transit"])}, ["destination"]),
]


def add_distractors(record: dict, n: int, rng: random.Random, pool: list[dict] | None = None,
                    shuffle: bool = True) -> dict:
    """A copy of `record` with up to n pool tools whose names are not already in its catalog, order shuffled."""
    out = copy.deepcopy(record)
    tools = out.get("tools") or []
    names = {t["name"] for t in normalize_tools(tools)}
    extra = [t for t in (pool or GENERIC_TOOLS) if normalize_tools([t])[0]["name"] not in names]
    tools = tools + copy.deepcopy(rng.sample(extra, min(n, len(extra))))
    if shuffle:
        rng.shuffle(tools)
    out["tools"] = tools
    return out


def augment_distractors(records: list[dict], n_distractors: int = 3, copies: int = 1, seed: int = 0,
                        pool: list[dict] | None = None, keep_original: bool = True) -> list[dict]:
    """Originals (optionally) followed by `copies` augmented versions of each record; deterministic for a seed."""
    rng = random.Random(seed)
    out = list(records) if keep_original else []
    for _ in range(copies):
        out.extend(add_distractors(r, n_distractors, rng, pool) for r in records)
    return out
