"""`render`: the exact FunctionGemma text of one sample, the first thing to look at when a model misbehaves."""
from __future__ import annotations

from pathlib import Path

from rich.text import Text

from src.data_engine.formatter import CONTROL_TOKENS, render_conversation, routing_messages
from src.utils.errors import UserError, where
from src.utils.io import read_json, read_jsonl

_HIGHLIGHTED = ("<bos>", "<start_of_turn>", "<end_of_turn>", *CONTROL_TOKENS)


def _sample_at(path: Path, index: int) -> tuple[int, dict]:
    if index < 0:
        raise UserError(f"--index {index}: must be >= 0")
    count = 0
    for line_no, obj in read_jsonl(path):
        if count == index:
            return line_no, obj
        count += 1
    raise UserError(f"{path}: --index {index} out of range ({count} samples)")


def render_sample(path: Path, index: int = 0, tools_file: Path | None = None,
                  default_tools_file: str | None = None, system_prompt: str | None = None) -> str:
    """Processed samples render whole (prompt + target); test cases render as the prompt the model sees."""
    line_no, sample = _sample_at(Path(path), index)
    tools = sample.get("tools")
    if tools_file or not tools:
        catalog = tools_file or default_tools_file
        if not catalog:
            raise UserError(f"{where(path, line_no)}: sample has no tools; pass --tools FILE")
        tools = read_json(catalog)
    if "messages" in sample:
        return render_conversation(sample["messages"], tools)
    if "user_content" in sample:
        return render_conversation(routing_messages(sample["user_content"], system_prompt), tools,
                                   add_generation_prompt=True)
    raise UserError(f"{where(path, line_no, 'messages')}: expected 'messages' or 'user_content'")


def highlight_control_tokens(text: str) -> Text:
    out = Text(text)
    for token in _HIGHLIGHTED:
        out.highlight_words([token], style="bold magenta")
    return out
