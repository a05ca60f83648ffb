"""Routing latency with the weights in the checkpoint file's mapping vs in memory of their own, in one process.

transformers keeps CPU weights as views of the mapped safetensors file; `load_model` copies them out
(src/utils/model_loader.copy_out_of_checkpoint). This bench loads the model once with the copy skipped, makes the
copy beside it, and routes the test queries with both, taking turns query by query (each weight set with its own
draft history), with and without the prefix cache, as served (catalog-constrained greedy with drafts). Prints p50
per mode, the speed-ups, how many outputs agree, and one JSON line.

    flock /tmp/realmodel.lock .venv/bin/python bench/weight_memory.py --limit 30
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # the allocator the CLI runs on (src/utils/allocator.py)
    from src.utils.allocator import use_fast_allocator
    use_fast_allocator()

import torch  # noqa: E402

from src.evaluation.draft import CallDrafter  # noqa: E402
from src.evaluation.metrics import percentile  # noqa: E402
from src.evaluation.report import load_test_cases  # noqa: E402
from src.evaluation.router import Router, load_tools  # noqa: E402
from src.utils import model_loader  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/models/hr_v1")
    parser.add_argument("--data", default="data/test.jsonl")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tools = load_tools(args.model, None)
    queries = [c.user_content for c in load_test_cases(args.data, tools)][: args.limit]
    copy = model_loader.copy_out_of_checkpoint
    model_loader.copy_out_of_checkpoint = lambda model: None  # load as transformers leaves it
    try:
        model, tokenizer = model_loader.load_model(args.model, dtype="float32")
    finally:
        model_loader.copy_out_of_checkpoint = copy
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    params = list(model.parameters())
    weights = {"mapped": [p.data for p in params]}
    copy(model)
    weights["copied"] = [p.data for p in params]

    def use(name: str) -> None:
        for param, data in zip(params, weights[name]):
            param.data = data

    router = Router(model, tokenizer, tools, draft=True, constrain=True)
    modes = [(name, cache) for name in weights for cache in (True, False)]
    drafters = {mode: CallDrafter(router.tools) for mode in modes}
    latency = {mode: [] for mode in modes}
    raws = {mode: [] for mode in modes}
    router.route("warm-up query, not timed")
    for i, query in enumerate(queries):
        for name in (("mapped", "copied") if i % 2 == 0 else ("copied", "mapped")):
            use(name)
            for cache in (True, False):
                router.drafter = drafters[(name, cache)]
                result = router.route(query, use_prefix_cache=cache)
                latency[(name, cache)].append(result.latency_ms)
                raws[(name, cache)].append(result.raw)
    p50 = {f"{name}_{'cache' if cache else 'nocache'}_p50_ms": round(percentile(latency[(name, cache)], 50), 1)
           for name, cache in modes}
    for key, value in p50.items():
        print(f"{key:28s} {value:8.1f}")
    figures = {**p50, "cache_speedup": round(p50["mapped_cache_p50_ms"] / p50["copied_cache_p50_ms"], 2),
               "nocache_speedup": round(p50["mapped_nocache_p50_ms"] / p50["copied_nocache_p50_ms"], 2),
               "same_output": sum(a == b for a, b in zip(raws[("mapped", True)], raws[("copied", True)])),
               "queries": len(queries)}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
