"""Per-query routing latency: PyTorch without / with the prefix cache, and GGUF q8_0 in llama.cpp with it.

Run it alone (it loads the real model; other heavy jobs distort the timings):
    flock /tmp/realmodel.lock .venv/bin/python bench/route_latency.py --limit 40
    flock /tmp/realmodel.lock .venv/bin/python bench/route_latency.py --model gemma3-270m-offline \\
        --tools data/tools/hr_tools.json --limit 20
Every mode runs twice: as served (the config defaults: catalog-constrained greedy with drafts verified in one
forward pass, the grammar's continued by a lookup in the mode's own earlier calls, optional arguments rescored;
src/evaluation/{constrain,draft,lookup_draft,optional_rescore}.py) and as plain greedy (one token per forward pass,
no constraint, no rescoring). Prints p50/p95 per mode, decode
steps per query, prefill and decode tokens/s, how often each mode's output equals PyTorch's uncached one in the
same decoding, and ends with one JSON line: torch_nocache_p50_ms, torch_cache_p50_ms, gguf_q8_0_p50_ms,
gguf_q8_0_p95_ms (served decoding; null when no q8_0 GGUF was found), plus the *_plain_* figures (null with
--served-only, which skips the plain-greedy modes: half the time, e.g. for all 165 test queries).
The modes run one after the other, each alone as a server would: taking turns query by query was tried, and every
mode got slower (each query then starts with the other model's weights in the CPU caches).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # the allocator the CLI runs on (src/utils/allocator.py), for both sides alike
    from src.utils.allocator import use_fast_allocator
    use_fast_allocator()

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from src.evaluation.metrics import percentile  # noqa: E402
from src.evaluation.report import load_test_cases  # noqa: E402
from src.evaluation.router import Router, copied_arguments_of, load_tools  # noqa: E402
from src.utils.errors import UserError  # noqa: E402
from src.utils.model_loader import load_model, resolve_model_source  # noqa: E402



def run_mode(route, queries: list[str], router) -> dict:
    """Time `route` over the queries after one warm-up call (first-call allocations are not per-query cost).
    Each mode starts with no earlier calls to draft from (src/evaluation/lookup_draft.py); they build up as
    the mode routes the queries, as in a server's first queries."""
    if router.drafter is not None:
        router.drafter.forget()
    route("warm-up query, not timed")  # not a test query: llama.cpp would find it fully cached
    results = [route(q) for q in queries]
    lat = [r.latency_ms for r in results]
    prefill_tok = sum(r.timings["prefill_tokens"] for r in results)
    prefill_s = sum(r.timings["prefill_ms"] for r in results) / 1e3
    decode_tok = sum(max(r.n_new_tokens - 1, 0) for r in results)  # the first token comes out of the prefill
    decode_s = sum(r.timings["decode_ms"] for r in results) / 1e3
    steps = sum(r.timings["forward_steps"] for r in results) / len(results)
    return {"p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "mean_new_tokens": decode_tok / len(lat) + 1,
            "decode_steps": steps,
            "prefill_tok_s": prefill_tok / prefill_s if prefill_s else None,
            "decode_tok_s": decode_tok / decode_s if decode_s else None, "raws": [r.raw for r in results]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/models/hr_v1", help="adapter/merged dir or model name")
    parser.add_argument("--gguf", default=None, help="q8_0 GGUF (default: outputs/models/hr_gguf/*q8_0.gguf)")
    parser.add_argument("--tools", default=None, help="tool catalog (default: MODEL/tools.json)")
    parser.add_argument("--data", default="data/test.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="first N test queries only")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (2: the target the 700 ms goal is for)")
    parser.add_argument("--served-only", action="store_true",
                        help="skip the plain-greedy modes (half the time: for all 165 test queries)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if not console.is_terminal:  # redirected to a file: keep the table on one line per mode
        console = Console(stderr=True, width=140)
    torch.set_num_threads(args.threads)

    resolve_model_source(args.model)
    tools = load_tools(args.model, args.tools)
    queries = [c.user_content for c in load_test_cases(args.data, tools)][: args.limit]
    model, tokenizer = load_model(args.model, dtype="float32")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # Served decoding (the config defaults): greedy, catalog-constrained, grammar drafts verified in one pass,
    # optional arguments rescored.
    copied = copied_arguments_of(args.model)  # served: copied arguments kept to pieces of the request
    router = Router(model, tokenizer, tools, max_new_tokens=args.max_new_tokens, draft=True, constrain=True,
                    copied=copied, rescore_optional=True)
    console.print(f"{len(queries)} queries, prefix {len(router.prefix_ids)} tokens, {args.threads} threads")
    plain = {"use_draft": False, "use_constrain": False, "use_rescore": False}

    rows = {}
    rows["torch, no cache"] = run_mode(lambda q: router.route(q, use_prefix_cache=False), queries, router)
    rows["torch, prefix cache"] = run_mode(lambda q: router.route(q, use_prefix_cache=True), queries, router)
    if not args.served_only:
        rows["torch, no cache, plain greedy"] = run_mode(lambda q: router.route(q, use_prefix_cache=False, **plain),
                                                         queries, router)
        rows["torch, prefix cache, plain greedy"] = run_mode(lambda q: router.route(q, **plain), queries, router)

    gguf = args.gguf or next(iter(sorted(glob.glob("outputs/models/hr_gguf/*q8_0.gguf"))), None)
    if gguf and Path(gguf).is_file():
        from src.evaluation.gguf_router import GgufRouter

        g = GgufRouter(gguf, tools, system_prompt=router.system_prompt, max_new_tokens=args.max_new_tokens,
                       n_threads=args.threads, draft=True, constrain=True, copied=copied, rescore_optional=True)
        try:
            rows["gguf q8_0, prefix cache"] = run_mode(lambda q: g.route(q), queries, g)
            if not args.served_only:
                rows["gguf q8_0, prefix cache, plain greedy"] = run_mode(lambda q: g.route(q, **plain), queries, g)
        finally:
            g.close()
    else:
        console.print(f"skipping GGUF q8_0: {gguf or 'outputs/models/hr_gguf/*q8_0.gguf'} not found (export one with: "
                      "python main.py export MODEL outputs/models/hr_gguf --quantization q8_0)")

    served = rows["torch, no cache"]["raws"]
    plain_ref = rows.get("torch, no cache, plain greedy", {}).get("raws")
    table = Table(title=f"routing latency per query ({args.model})")
    for col in ("mode", "p50 ms", "p95 ms", "new tok/query", "decode steps", "prefill tok/s", "decode tok/s",
                "same output*"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for name, r in rows.items():
        reference = plain_ref if name.endswith("plain greedy") else served
        same = sum(a == b for a, b in zip(r["raws"], reference))
        table.add_row(name, f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", f"{r['mean_new_tokens']:.1f}",
                      f"{r['decode_steps']:.1f}", f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                      f"{same}/{len(reference)}")
    console.print(table)
    console.print("modes without 'plain greedy' decode as served (constrained to the catalog, drafts verified in one "
                  "pass); * same raw output as PyTorch without cache in the same decoding")
    speedup = rows["torch, no cache"]["p50_ms"] / rows["torch, prefix cache"]["p50_ms"]
    console.print(f"prefix cache speed-up (p50): {speedup:.1f}x")
    gg, ggp = rows.get("gguf q8_0, prefix cache"), rows.get("gguf q8_0, prefix cache, plain greedy")
    tnp, tcp = rows.get("torch, no cache, plain greedy"), rows.get("torch, prefix cache, plain greedy")
    print(json.dumps({
        "torch_nocache_p50_ms": round(rows["torch, no cache"]["p50_ms"], 1),
        "torch_cache_p50_ms": round(rows["torch, prefix cache"]["p50_ms"], 1),
        "gguf_q8_0_p50_ms": round(gg["p50_ms"], 1) if gg else None,
        "gguf_q8_0_p95_ms": round(gg["p95_ms"], 1) if gg else None,
        "torch_nocache_plain_p50_ms": round(tnp["p50_ms"], 1) if tnp else None,
        "torch_cache_plain_p50_ms": round(tcp["p50_ms"], 1) if tcp else None,
        "gguf_q8_0_plain_p50_ms": round(ggp["p50_ms"], 1) if ggp else None,
        "gguf_q8_0_plain_p95_ms": round(ggp["p95_ms"], 1) if ggp else None,
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
