"""Training step time with the prefix's keys/values fresh every step vs kept for N steps (training.prefix_refresh_steps).

Both arms train the same LoRA from the same initial weights on the same batches, as exp_hr_routing trains (prefix
without autograd, bf16 products with the frozen projections held in bf16, sdpa attention), in one process and in
the order fresh, kept, fresh, kept, so drift in the host's speed hits both arms alike. Reports seconds per step of
each arm, the ratio, and each arm's held-out completion loss after its steps (what the staleness costs). Ends with
one JSON line.

  flock /tmp/realmodel.lock .venv/bin/python bench/prefix_reuse.py            # real offline base, ~8 min
  .venv/bin/python bench/prefix_reuse.py --tiny                               # tiny random model, seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if __name__ == "__main__":
    from src.utils.allocator import use_fast_allocator
    use_fast_allocator()

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

from bench.train_speed import DATA, _eval_loss, _load, _lora_config, _malloc_trim, _records  # noqa: E402
from src.training.batching import SharedPrefixCollator, group_batches, tokenize_record  # noqa: E402
from src.training.precision import LowPrecisionFrozenWeights  # noqa: E402
from src.training.shared_prefix import PrefixReuse, completion_loss  # noqa: E402


def _steps(model, features, batches, args, refresh: int, split_attention: bool = True) -> list[float]:
    """Train `batches` from the model's current weights; seconds per optimizer step."""
    collate = SharedPrefixCollator(pad_id=args.pad_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    reuse = PrefixReuse(refresh) if refresh > 1 else None
    times = []
    model.train()
    with LowPrecisionFrozenWeights(model, enabled=not args.fp32):
        for step, indices in enumerate(batches):
            if reuse is not None:
                reuse.step = step
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                loss, _ = completion_loss(model, collate([features[i] for i in indices]), prefix_gradients=False,
                                          reuse=reuse, split_attention=split_attention)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _malloc_trim()
            times.append(time.perf_counter() - start)
    return times


def arguments(description: str, refresh: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of the offline base")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per block (each arm runs two blocks)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--refresh", type=int, default=refresh, help="training.prefix_refresh_steps (kept arm)")
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="fp32 products instead of exp_hr_routing's bf16")
    return parser.parse_args()


def run_arms(args: argparse.Namespace, arms: dict[str, tuple[int, bool]]) -> tuple[dict, dict, int]:
    """Each arm {name: (prefix_refresh_steps, split_attention)} trains the same batches from the same initial LoRA,
    in the order A, B, A, B. Returns ({arm: mean s/step}, {arm: held-out completion loss}, batches per block)."""
    torch.manual_seed(args.seed)
    base, tokenizer = _load(args.tiny, "sdpa")
    args.pad_id = tokenizer.pad_token_id
    records = _records(args.data, args.eval_samples + args.steps * args.batch, args.seed, args.tiny)
    cache: dict = {}
    features = [tokenize_record(tokenizer, r, args.max_seq_length, source=f"{args.data.name}[{i}]", prefix_cache=cache)
                for i, r in enumerate(records[:args.eval_samples + args.steps * args.batch])]
    evals, train = features[:args.eval_samples], features[args.eval_samples:]
    batches = group_batches([tuple(f["prefix_ids"]) for f in train], [len(f["suffix_ids"]) for f in train],
                            args.batch, seed=args.seed, epoch=0)
    model = get_peft_model(base, _lora_config())
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    times: dict[str, list[float]] = {arm: [] for arm in arms}
    losses: dict[str, float] = {}
    for arm in list(arms) * 2:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial:
                    param.copy_(initial[name])
        times[arm] += _steps(model, train, batches, args, *arms[arm])
        losses[arm] = _eval_loss(model, evals, args.pad_id)
        print(f"{arm:>6}: {statistics.mean(times[arm][-len(batches):]):.2f} s/step, eval loss {losses[arm]:.4f}",
              file=sys.stderr)
    return {arm: statistics.mean(t) for arm, t in times.items()}, losses, len(batches)


def compare(args: argparse.Namespace, baseline: tuple[str, tuple[int, bool]], faster: tuple[str, tuple[int, bool]]):
    """Run both arms (`run_arms`) and print the JSON line: each arm's s/step and held-out loss, the speed-up."""
    (base, base_arm), (fast, fast_arm) = baseline, faster
    per_step, losses, n_batches = run_arms(args, {base: base_arm, fast: fast_arm})
    print(json.dumps({"batch": args.batch, "steps_per_block": n_batches, "refresh": args.refresh,
                      f"{base}_s_per_step": round(per_step[base], 3), f"{fast}_s_per_step": round(per_step[fast], 3),
                      "speedup": round(per_step[base] / per_step[fast], 3),
                      f"{base}_eval_loss": round(losses[base], 4), f"{fast}_eval_loss": round(losses[fast], 4)}))


def main() -> None:
    args = arguments(__doc__.splitlines()[0], refresh=4)
    compare(args, ("fresh", (1, True)), ("kept", (args.refresh, True)))


if __name__ == "__main__":
    main()
