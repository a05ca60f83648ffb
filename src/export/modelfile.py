"""An Ollama Modelfile that prompts the GGUF exactly as the model was trained (FunctionGemma turns, our catalog).

Choices:
- The developer turn is rendered by our formatter from the catalog the model was trained on and baked into the
  TEMPLATE: Go templates cannot reproduce the declaration grammar (sorted keys, upper-cased types, <escape>
  quoting), and a fine-tuned router is only meant for its own catalog. Tools sent in an API request are therefore
  not rendered (Ollama then reports that the model does not take tools, rather than prompting it wrongly).
- A system message (or .System) replaces the developer context text before the declarations, as in
  `render_conversation`; without one the trained context is used.
- No `<bos>` in the template: Ollama adds it (the GGUF says add_bos_token), so writing it would double it.
- Stops: `<end_of_turn>` after a text answer, `<start_function_response>` after calls (FunctionGemma ends a call
  turn with it); `<eos>` stops on its own as the end-of-generation token. Greedy (temperature 0) like evaluation.
- The output is FunctionGemma call text (`<start_function_call>call:...`): parse it with `parse_output`.
"""
from __future__ import annotations

from src.data_engine.formatter import (
    BOS, END_OF_TURN, GENERATION_PROMPT, render_conversation, render_declarations, routing_messages,
    split_shared_prefix,
)
from src.utils.errors import UserError

STOPS = ("<end_of_turn>", "<start_function_response>")
NUM_CTX = 4096  # the ~1.3k-token developer turn plus a query must fit; Ollama's small default would cut it


def _go_literal(text: str) -> str:
    """Template text that Go prints verbatim: only `{{` starts an action."""
    return text.replace("{{", '{{ "{{" }}')


def developer_turn(tools, system_prompt: str | None = None) -> tuple[str, str]:
    """(context text, declarations) of the trained developer turn, checked against the formatter's rendering."""
    context = routing_messages("x", system_prompt)[0]["content"].strip()
    declarations = render_declarations(tools)
    prefix, _ = split_shared_prefix(render_conversation(routing_messages("x", system_prompt), tools, True))
    if prefix != f"{BOS}<start_of_turn>developer\n{context}{declarations}{END_OF_TURN}\n":
        raise AssertionError("the formatter's developer turn changed shape; update src/export/modelfile.py")
    return context, declarations


def template(tools, system_prompt: str | None = None) -> str:
    """Go template text; no `{{-` trim markers, since they would also eat the newlines the format needs."""
    context, declarations = developer_turn(tools, system_prompt)
    return "".join([
        '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}',
        "<start_of_turn>developer\n",
        "{{ if $system }}{{ $system }}{{ else if .System }}{{ .System }}{{ else }}",
        _go_literal(context), "{{ end }}", _go_literal(declarations), END_OF_TURN, "\n",
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{ if eq .Role "user" }}<start_of_turn>user\n{{ .Content }}', END_OF_TURN, "\n",
        '{{ else if eq .Role "assistant" }}', GENERATION_PROMPT, "{{ .Content }}",
        "{{ if not $last }}", END_OF_TURN, "\n{{ end }}{{ end }}",
        '{{ if and $last (ne .Role "assistant") }}', GENERATION_PROMPT, "{{ end }}",
        "{{ end }}",
    ])


def render_modelfile(gguf_name: str, tools, system_prompt: str | None = None, title: str = "") -> str:
    body = template(tools, system_prompt)
    if '"""' in body:
        raise UserError('tools: a description contains """, which an Ollama Modelfile cannot quote')
    lines = [
        f"# Ollama Modelfile for {title or gguf_name} (FunctionGemma format, catalog baked into TEMPLATE).",
        "# Create: ollama create <name> -f Modelfile   Output: FunctionGemma call text (parse with parse_output).",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{body}"""',
        *[f'PARAMETER stop "{stop}"' for stop in STOPS],
        "PARAMETER temperature 0",
        f"PARAMETER num_ctx {NUM_CTX}",
    ]
    return "\n".join(lines) + "\n"
