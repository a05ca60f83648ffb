"""Does the export answer like the model we trained? Same prompts, same greedy decoding, compare the parsed calls.

Agreement = share of test cases where llama.cpp and PyTorch route identically: the same kind (calls / text /
malformed) and, for calls, the same list of {name, arguments} (argument values compared as parsed JSON). Accuracy is
scored against the expected calls with the evaluation's own rules (src/evaluation/metrics.py). Also reported:
`identical_output`, the share of byte-identical generations (stricter; informative, not judged).

Thresholds (an export below its threshold is reported FAILED; `export.agreement_threshold` overrides them all):
- f32 / f16 / bf16: 0.98. Float exports differ from PyTorch only by rounding; a few near-tied greedy choices
  may flip, more than 2% means the conversion is wrong.
- q8_0, q6_k: 0.95. 8-bit weights move logits by ~1%; the guide targets q8_0 within 1 accuracy point.
- q5_*: 0.90. q4_* (q4_0, q4_k_m, q4_k_s): 0.85, the guide accepts ~3 points of accuracy at 4 bits and routing
  decisions that flip are not all errors. Lower bit widths: 0.75.
Beside agreement, every GGUF must pass exact checks: each control token is one token with FunctionGemma's id and
is CONTROL (parsed only when special tokens are allowed), turn/BOS/EOS ids equal the Hugging Face tokenizer's,
the prompts tokenize to the same ids as in PyTorch, exactly one BOS reaches the model both through the router and
through the GGUF's own chat template (which must render our prompt byte for byte).
"""
from __future__ import annotations

import json
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from src.data_engine.formatter import CONTROL_TOKENS, routing_messages
from src.evaluation.metrics import Predicted, aggregate, score_case
from src.evaluation.predictions import predictions_file, reuse
from src.evaluation.router import Router, batch_size_of, config_value, inference_options

FLOAT_TYPES = ("f32", "f16", "bf16")
MAX_EXAMPLES = 10
MERGE_ATOL = 1e-3  # merged vs base+adapter logits, float32: observed <2e-4 (sdpa vs eager); a bad merge: >0.1
TURN_TOKENS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")


def threshold_for(quant: str, config=None) -> float:
    """Minimum agreement for `quant` (see the module docstring)."""
    override = config_value(config, "export.agreement_threshold", None)
    if override is not None:
        return float(override)
    if quant in FLOAT_TYPES:
        return 0.98
    if quant in ("q8_0", "q6_k"):
        return 0.95
    if quant.startswith("q5"):
        return 0.90
    if quant.startswith("q4"):
        return 0.85
    return 0.75


def sample_cases(cases: list, config=None) -> list:
    """`export.verify_samples` cases spread evenly over the file (0 = all), so every tool stays represented."""
    n = int(config_value(config, "export.verify_samples", 0) or 0)
    if n <= 0 or n >= len(cases):
        return list(cases)
    return [cases[i * len(cases) // n] for i in range(n)]


def greedy_options(config) -> dict:
    """Evaluation's decoding options, forced greedy: agreement is only meaningful without sampling."""
    return {**inference_options(config), "temperature": 0.0}


def run_router(router, cases: list, label: str) -> list:
    """`router.route_many` over the cases, batched as `evaluate` routes them (packed rows in PyTorch, sequences of
    one context in llama.cpp)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=len(cases))
        return router.route_many([c.user_content for c in cases], progress=lambda n: progress.advance(task, n))


def reference_results(model, tokenizer, tools, system_prompt, cases: list, config=None,
                      evaluation=None, copied=None) -> tuple[list, dict]:
    """PyTorch routing of `cases` by the merged model: the answers every export is compared with, and where they
    came from. Taken from the evaluation's predictions at `evaluation` (an eval dir or its predictions.json) when
    they are provably this computation (src/evaluation/predictions.py), else computed; one line says which."""
    router = Router(model, tokenizer, tools, system_prompt=system_prompt, batch_size=batch_size_of(config),
                    copied=copied, **greedy_options(config))
    results, detail = reuse(evaluation, router, cases) if evaluation is not None else (None, "export.reference=off")
    source = {"reused": results is not None, "path": str(predictions_file(evaluation)) if evaluation else None,
              "detail": detail}
    Console(stderr=True).print(reference_line(source), highlight=False, soft_wrap=True)
    if results is None:
        results = run_router(router, cases, "PyTorch reference")
    return results, source


def reference_line(source: dict) -> str:
    if source["reused"]:
        return f"PyTorch reference: reused from {source['path']} ({source['detail']})"
    return f"PyTorch reference: computed ({source['detail']})"


def decision(result) -> str:
    """Canonical form of a routing decision (kind + calls, argument keys sorted)."""
    calls = result.calls if result.kind == "calls" else []
    return json.dumps([result.kind, calls], sort_keys=True, ensure_ascii=False)


def scores(cases: list, results: list, tools) -> dict:
    predicted = [score_case(c.expected, Predicted(r.kind, tuple(r.calls))) for c, r in zip(cases, results)]
    report = aggregate(predicted, [r.latency_ms for r in results], [t["name"] for t in tools])
    keep = ("tool_accuracy", "exact_call_accuracy", "argument_accuracy", "malformed_rate", "latency_ms")
    return {k: report[k] for k in keep}


def compare(cases: list, reference: list, results: list) -> dict:
    same = [decision(a) == decision(b) for a, b in zip(reference, results)]
    examples = [{"line": c.line, "user_content": c.user_content, "pytorch": a.raw, "gguf": b.raw}
                for c, a, b, ok in zip(cases, reference, results, same) if not ok]
    identical = sum(a.raw == b.raw for a, b in zip(reference, results))
    return {"agreement": sum(same) / len(same) if same else 1.0, "n": len(same),
            "identical_output": identical / len(same) if same else 1.0,
            "disagreements": len(examples), "examples": examples[:MAX_EXAMPLES]}


def tokenizer_checks(router, tokenizer, cases: list, tools, system_prompt) -> dict:
    """Exact checks of the GGUF's vocabulary and prompt handling against the Hugging Face tokenizer."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm, bos = router.llm, router.llm.token_bos()

    def check(ok: bool, detail: str) -> dict:
        return {"ok": bool(ok), "detail": "" if ok else detail}

    checks = {}
    bad = [t for t, i in CONTROL_TOKENS.items() if llm.tokenize(t.encode(), add_bos=False, special=True) != [i]]
    checks["control_token_ids"] = check(not bad, f"not one token with FunctionGemma's id: {bad}")
    loose = [t for t, i in CONTROL_TOKENS.items() if llm.tokenize(t.encode(), add_bos=False, special=False) == [i]]
    checks["control_tokens_are_control"] = check(not loose, f"matched without special=True (not CONTROL): {loose}")
    hf_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TURN_TOKENS}
    gg_ids = {t: (llm.tokenize(t.encode(), add_bos=False, special=True) or [None])[0] for t in TURN_TOKENS}
    ids_ok = hf_ids == gg_ids and (bos, llm.token_eos()) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    checks["special_token_ids"] = check(ids_ok, f"gguf {gg_ids} vs hf {hf_ids}")

    prompts = [router.render(c.user_content) for c in cases]
    encoded = [router.encode(p) for p in prompts]
    differ = sum(ids != tokenizer(p, add_special_tokens=False)["input_ids"] for p, ids in zip(prompts, encoded))
    checks["prompt_tokenization"] = check(not differ, f"{differ} of {len(prompts)} prompts tokenize differently")

    template = llm.metadata.get("tokenizer.chat_template", "")
    formatter = Jinja2ChatFormatter(template, eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                                    bos_token=llm.detokenize([bos], special=True).decode())
    chat = formatter(messages=routing_messages(cases[0].user_content, system_prompt), tools=tools)
    chat_ids = llm.tokenize(chat.prompt.encode(), add_bos=not chat.added_special, special=True)
    single = all(ids[:1] == [bos] and ids[:2].count(bos) == 1 for ids in [*encoded, chat_ids])
    checks["single_bos"] = check(single, "a prompt reaches the model with no BOS or a doubled BOS")
    same = template == (tokenizer.chat_template or "") and chat.prompt == prompts[0]
    checks["chat_template"] = check(same, "tokenizer.chat_template differs from the model's or renders another prompt")
    return checks


def verify_gguf(router, quant: str, cases: list, reference: list, tokenizer, tools, system_prompt,
                config=None) -> dict:
    """Run `cases` through the GGUF behind `router` (a GgufRouter) and judge it against `reference`."""
    started = time.monotonic()
    checks = tokenizer_checks(router, tokenizer, cases, tools, system_prompt)
    results = run_router(router, cases, f"llama.cpp {quant}")
    comparison = compare(cases, reference, results)
    threshold = threshold_for(quant, config)
    ok = comparison["agreement"] >= threshold and all(c["ok"] for c in checks.values())
    return {"ok": ok, "threshold": threshold, **comparison, "accuracy": scores(cases, results, tools),
            "checks": checks, "seconds": round(time.monotonic() - started, 1)}


@torch.no_grad()
def merged_logits_check(merged_dir, reference_model, tokenizer, prompts: list[str]) -> dict:
    """The saved merged model, loaded with plain transformers, against base+adapter on the same prompts."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    worst = 0.0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        worst = max(worst, float((plain(ids).logits - reference_model(ids).logits).abs().max()))
    return {"ok": worst <= MERGE_ATOL, "max_abs_logit_diff": worst, "tolerance": MERGE_ATOL, "n": len(prompts)}
