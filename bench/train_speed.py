"""Training speed: the standard stack (TRL SFTTrainer as Google's FunctionGemma guide runs it) vs our shared-prefix path.

Same model, same data, same LoRA (r16, alpha 16, all 7 projections), same learning rate, constant schedule, same
number of optimizer steps, each side at its own batch size (the baseline at the guide's 4, ours at the fastest per
sample that stays under the baseline's memory), so throughput is reported per sample. Each side runs in its own
subprocess, so peak RSS (ru_maxrss, model load included) is its own. Tokens/s counts every token of every trained sample (prefix + suffix) on both sides.
Both trained models are then scored the same way: `completion_loss` under no_grad on the same held-out samples.
Ends with one JSON line.

  flock /tmp/realmodel.lock .venv/bin/python bench/train_speed.py            # real offline base, ~10 min
  .venv/bin/python bench/train_speed.py --tiny                               # tiny random model, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if __name__ == "__main__":  # the allocator the CLI runs on (src/utils/allocator.py), for both sides alike
    from src.utils.allocator import use_fast_allocator
    use_fast_allocator()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from src.data_engine.formatter import routing_messages, split_prompt_completion  # noqa: E402
from src.training.batching import SharedPrefixCollator, group_batches, tokenize_record  # noqa: E402
from src.training.shared_prefix import completion_loss  # noqa: E402
from src.utils.allocator import active_allocator  # noqa: E402
from src.utils.io import read_json, read_jsonl  # noqa: E402

DATA = ROOT / "data" / "processed" / "hr_functions.jsonl"
TOOLS = ROOT.parent / "shared" / "hr_tools.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_BATCH = 8
SIDES = ("baseline", "ours")


def _lora_config() -> LoraConfig:
    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------ data


def _synthetic_records(n: int, n_tools: int | None = None) -> list[dict]:
    """Call samples over the HR catalog: for development before the processed dataset exists, and for `--tiny`
    (whose byte-level tokenizer makes the full catalog too long for its 4096 positions)."""
    tools = read_json(TOOLS)[:n_tools]
    names = ["张三", "李四", "王五", "Alice Chen", "Bob Smith", "赵六"]
    records = []
    for i in range(n):
        fn = tools[i % len(tools)]["function"]
        name = names[i % len(names)]
        args = {}
        for key in fn["parameters"].get("required", []):
            spec = fn["parameters"]["properties"][key]
            args[key] = (name if key == "employee_name" else spec["enum"][i % len(spec["enum"])] if "enum" in spec
                         else 1 + i % 8 if spec.get("type") == "number" else f"2024-0{1 + i % 9}-1{i % 10}")
        user = f"帮{name}处理一下 {fn['name'].replace('_', ' ')}" if i % 2 else f"Please {fn['description'][:40]} for {name}"
        messages = routing_messages(user) + [
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": fn["name"], "arguments": args}}]}]
        records.append({"messages": messages, "tools": tools})
    return records


def _records(data: Path, needed: int, seed: int, tiny: bool) -> list[dict]:
    if tiny:
        records = _synthetic_records(needed, n_tools=3)
    elif data.exists():
        records = [obj for _, obj in read_jsonl(data)]
    else:
        print(f"{data} not found: using {needed} synthetic samples over {TOOLS.name}", file=sys.stderr)
        records = _synthetic_records(needed)
    random.Random(seed).shuffle(records)
    if len(records) < needed:
        sys.exit(f"{data}: {len(records)} samples, the run needs {needed}")
    return records


# ------------------------------------------------------------------------------------------------ one side


def _load(tiny: bool, attn: str):
    if tiny:
        from tests.tiny_model import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        model = make_tiny_model(len(tokenizer))
    else:
        from src.utils.model_loader import OFFLINE_BASE, load_model

        model, tokenizer = load_model(OFFLINE_BASE, dtype="float32", for_training=True)
    model.set_attn_implementation(attn)
    return model, tokenizer


def _malloc_trim() -> None:
    """glibc keeps freed heap memory otherwise, and RSS creeps up step after step."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _train_baseline(model, tokenizer, records, args) -> tuple[object, list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], 0.0

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start)

    rows = []
    for record in records:
        prompt, completion = split_prompt_completion(record["messages"], record.get("tools"))
        rows.append({"prompt": prompt, "completion": completion})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.baseline_batch,
            learning_rate=args.lr, lr_scheduler_type="constant", max_length=args.max_seq_length, bf16=args.bf16,
            use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=args.seed,
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=_lora_config(), callbacks=[timer])
        trainer.train()
    return trainer.model, timer.times


def _train_ours(model, features, args) -> tuple[object, list[float]]:
    model = get_peft_model(model, _lora_config())
    model.train()
    collate = SharedPrefixCollator(pad_id=args.pad_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    batches = group_batches([tuple(f["prefix_ids"]) for f in features], [len(f["suffix_ids"]) for f in features],
                            args.batch, seed=args.seed, epoch=0)
    times = []
    for step, indices in enumerate(batches):
        start = time.perf_counter()
        profile = args.profile and step == len(batches) - 1
        with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):  # as training.mixed_precision=bf16
                loss, _ = completion_loss(model, collate([features[i] for i in indices]),
                                          prefix_gradients=not args.no_prefix_gradients)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # what HF Trainer does for the baseline
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _malloc_trim()
        times.append(time.perf_counter() - start)
        if profile:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return model, times


def _eval_loss(model, features, pad_id: int) -> float:
    """Token-weighted completion loss over the held-out samples, identical for both sides."""
    model.eval()
    collate = SharedPrefixCollator(pad_id=pad_id)
    batches = group_batches([tuple(f["prefix_ids"]) for f in features], [len(f["suffix_ids"]) for f in features],
                            EVAL_BATCH, seed=0, epoch=0, shuffle=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for indices in batches:
            loss_sum, n = completion_loss(model, collate([features[i] for i in indices]), num_items_in_batch=1)
            total, count = total + loss_sum.item(), count + n
    return total / count


def _worker(args) -> dict:
    torch.manual_seed(args.seed)
    model, tokenizer = _load(args.tiny, args.attn)
    args.pad_id = tokenizer.pad_token_id
    batch = args.baseline_batch if args.worker == "baseline" else args.batch
    records = _records(args.data, args.eval_samples + args.steps * max(args.batch, args.baseline_batch), args.seed,
                       args.tiny)
    evals, train = records[:args.eval_samples], records[args.eval_samples:][:args.steps * batch]
    prefix_cache: dict = {}
    features = [tokenize_record(tokenizer, r, args.max_seq_length, source=f"{args.data.name}[{i}]",
                                prefix_cache=prefix_cache) for i, r in enumerate(train + evals)]
    train_features, eval_features = features[:len(train)], features[len(train):]

    result = {}
    if args.worker == "ours":
        result["initial_eval_loss"] = _eval_loss(model, eval_features, args.pad_id)
        model, times = _train_ours(model, train_features, args)
    else:
        model, times = _train_baseline(model, tokenizer, train, args)
    seconds = sum(times)
    tokens = sum(len(f["prefix_ids"]) + len(f["suffix_ids"]) for f in train_features)
    result.update({
        "batch": batch, "steps": len(times), "samples": len(train), "train_seconds": seconds,
        "step_seconds": times, "samples_per_s": len(train) / seconds, "tokens_per_s": tokens / seconds,
        "eval_loss": _eval_loss(model, eval_features, args.pad_id),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_avg_1min": os.getloadavg()[0],  # other work on the machine skews the timings; reported, not hidden
        "allocator": active_allocator(),
    })
    return result


# ------------------------------------------------------------------------------------------------ driver


def _run_side(side: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, *argv, "--worker", side, "--result", out.name], check=True)
        return json.loads(Path(out.name).read_text())


def _table(results: dict) -> str:
    rows = [("", *SIDES), ("batch", *(f"{results[s]['batch']}" for s in SIDES)),
            ("optimizer steps", *(f"{results[s]['steps']}" for s in SIDES)),
            ("samples", *(f"{results[s]['samples']}" for s in SIDES)),
            ("s / step", *(f"{results[s]['train_seconds'] / results[s]['steps']:.1f}" for s in SIDES)),
            ("samples / s", *(f"{results[s]['samples_per_s']:.3f}" for s in SIDES)),
            ("tokens / s", *(f"{results[s]['tokens_per_s']:.0f}" for s in SIDES)),
            ("peak RSS (MiB)", *(f"{results[s]['peak_rss_mb']:.0f}" for s in SIDES)),
            ("eval loss", *(f"{results[s]['eval_loss']:.4f}" for s in SIDES)),
            ("load avg (1 min)", *(f"{results[s]['load_avg_1min']:.1f}" for s in SIDES))]
    return "\n".join(f"{a:<16}{b:>12}{c:>12}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (tests/tiny_model.py) instead of the base")
    parser.add_argument("--data", type=Path, default=DATA, help="processed JSONL (falls back to synthetic HR samples)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps on each side")
    parser.add_argument("--baseline-batch", type=int, default=4)
    # 24: of 16/24/32 (2026-11-30, 3 steps, exact mode), the fastest per sample whose peak RSS stays below the
    # baseline's: 1.449 / 1.691 / 1.689 samples/s, 5741 / 6612 / 7986 MiB against TRL's ~7460 MiB.
    parser.add_argument("--batch", type=int, default=24, help="our batch size")
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-prefix-gradients", action="store_true",
                        help="our side as exp_hr_routing trains: the shared prefix without autograd")
    parser.add_argument("--bf16", action="store_true",
                        help="both sides with bf16 matrix products (TRL: bf16=True; ours: training.mixed_precision=bf16)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table for our last step")
    parser.add_argument("--only", choices=SIDES, help="run one side (for profiling)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = _worker(args)
        args.result.write_text(json.dumps(result))
        return
    argv = [a for a in sys.argv[1:] if a not in ("--only", args.only, f"--only={args.only}")]
    results = {side: _run_side(side, argv) for side in SIDES if args.only in (None, side)}
    print(json.dumps(results, indent=1), file=sys.stderr)
    if args.only:
        return
    print(_table(results))
    base, ours = results["baseline"], results["ours"]
    print(f"initial eval loss (before training): {ours['initial_eval_loss']:.4f}")
    print(json.dumps({
        "baseline_samples_per_s": round(base["samples_per_s"], 4), "ours_samples_per_s": round(ours["samples_per_s"], 4),
        "speedup": round(ours["samples_per_s"] / base["samples_per_s"], 2),
        "baseline_peak_rss_mb": round(base["peak_rss_mb"]), "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
        "baseline_eval_loss": round(base["eval_loss"], 4), "ours_eval_loss": round(ours["eval_loss"], 4),
        "allocator": ours["allocator"],
    }))


if __name__ == "__main__":
    main()
