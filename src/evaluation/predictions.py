"""`eval/predictions.json`: every case an evaluation routed, with what proves a later run would route it the same.

A PyTorch router's output for a query is fixed by the weights that run (base + adapter as merged, in the dtype
loaded), the runtime (torch version, device, thread count, attention implementation), the decoding options (batch
size included) and the prompt's token ids. The file records the first three once and, per case, a sha256 of the
prompt ids (it covers the catalog, the system prompt, the chat template and the tokenizer) beside the raw output.
Export reuses the cases as its PyTorch reference when all of these equal its own (`reuse`), instead of routing the
test set a second time.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from src.data_engine.formatter import parse_output
from src.evaluation.router import RouteResult

FILE = "predictions.json"
FORMAT = 1
ROW_KEYS = {"user_content", "prompt_sha256", "raw", "latency_ms", "n_prompt_tokens", "n_new_tokens"}


def weights_sha256(model) -> str:
    """sha256 over the state dict: names, dtypes, shapes and bytes (a tied tensor's bytes once). ~1 s per GB."""
    digest, seen = hashlib.sha256(), {}
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in seen:
            digest.update(f"={seen[key]};".encode())
            continue
        seen[key] = name
        digest.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def runtime_of(router) -> dict:
    model = router.model
    return {"torch": torch.__version__, "device": str(next(model.parameters()).device),
            "threads": torch.get_num_threads(), "attention": getattr(model.config, "_attn_implementation", None)}


def decoding_of(router) -> dict:
    """The options that decide greedy outputs (top_p, top_k and the seed act only when sampling). The batch size is
    among them: `route_many` packs a chunk's queries into one row, and products of another shape can round
    differently."""
    return {**router.decoding(), "max_new_tokens": int(router.max_new_tokens),
            "prefix_cache": bool(router.prefix_cache), "batch_size": int(router.batch_size)}


def prompt_sha256(router, user_content: str) -> str:
    ids = router.encode(router.render(user_content))
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def predictions_of(router, cases: list, results: list) -> dict:
    """The file's content for `results` (one RouteResult per case) of `router`; fingerprinted for PyTorch only."""
    fingerprint = None
    if router.runtime == "pytorch":
        fingerprint = {"weights_sha256": weights_sha256(router.model), "runtime": runtime_of(router),
                       "decoding": decoding_of(router)}
    rows = [{"line": c.line, "user_content": c.user_content, "prompt_sha256": prompt_sha256(router, c.user_content),
             **r.to_json(raw=True), "latency_ms": r.latency_ms, "n_prompt_tokens": r.n_prompt_tokens,
             "n_new_tokens": r.n_new_tokens} for c, r in zip(cases, results)]
    return {"format": FORMAT, "runtime": router.runtime, "fingerprint": fingerprint, "cases": rows}


def predictions_file(path) -> Path:
    """An eval dir or the file itself."""
    path = Path(path)
    return path / FILE if path.is_dir() or not path.suffix else path


def _result(row: dict) -> RouteResult:
    """The RouteResult `route` returned: parsed again from the raw output, as `route` parses it."""
    parsed = parse_output(row["raw"])
    return RouteResult(parsed.kind, parsed.calls, parsed.text, row["raw"], float(row["latency_ms"]),
                       int(row["n_prompt_tokens"]), int(row["n_new_tokens"]), parsed.error)


def _differ(saved: dict, own: dict) -> str:
    keys = [k for k in sorted(set(saved) | set(own)) if saved.get(k) != own.get(k)]
    return ", ".join(f"{k} {saved.get(k)!r} vs {own.get(k)!r}" for k in keys)


def reuse(path, router, cases: list) -> tuple[list[RouteResult] | None, str]:
    """`router`'s results for `cases` taken from the predictions at `path` when they are provably the same
    computation (same weights, runtime, decoding and prompt ids; cases matched by their text), else None.
    The string says why, in one line. The weights are hashed last: every other check is cheap."""
    path = predictions_file(path)
    if not path.is_file():
        return None, f"no evaluation predictions at {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        saved = data.get("fingerprint") or {}
        by_text = {row["user_content"]: row for row in data["cases"] if ROW_KEYS <= set(row)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"{path}: unreadable ({type(exc).__name__})"
    if data.get("format") != FORMAT:
        return None, f"{path}: format {data.get('format')!r}, expected {FORMAT}"
    if not saved:
        return None, f"the evaluation ran {data.get('runtime')}, not PyTorch"
    for what, own in (("decoding", decoding_of(router)), ("runtime", runtime_of(router))):
        if saved.get(what) != own:
            return None, f"{what} differs (evaluation vs export): {_differ(saved.get(what) or {}, own)}"
    missing = [c for c in cases if c.user_content not in by_text]
    if missing:
        return None, f"{len(missing)} of {len(cases)} cases were not evaluated (first: {missing[0].user_content!r:.60})"
    changed = sum(by_text[c.user_content]["prompt_sha256"] != prompt_sha256(router, c.user_content) for c in cases)
    if changed:
        return None, f"{changed} of {len(cases)} prompts differ in token ids (catalog, system prompt or tokenizer)"
    if saved.get("weights_sha256") != weights_sha256(router.model):
        return None, "weights differ from the evaluated model's (adapter retrained or changed)"
    results = [_result(by_text[c.user_content]) for c in cases]
    return results, f"same weights, runtime, decoding and prompts for all {len(cases)} cases"
