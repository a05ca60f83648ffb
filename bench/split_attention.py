"""Training step time with the suffixes' attention split into prefix and own-sample parts (prefix_attention) vs the
packed block mask through sdpa, which scores every other sample's tokens only to mask them.

Both arms train the same LoRA from the same initial weights on the same batches, as exp_hr_routing trains (prefix
without autograd and kept for 2 steps, bf16 products, sdpa for the prefix pass), in one process and in the order
mask, split, mask, split. Reports seconds per step of each arm, the ratio, and each arm's held-out completion loss
after its steps (the same attention, so equal up to bf16 rounding). Ends with one JSON line.

  flock /tmp/realmodel.lock .venv/bin/python bench/split_attention.py            # real offline base, ~6 min
  .venv/bin/python bench/split_attention.py --tiny                               # tiny random model, seconds
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from src.utils.allocator import use_fast_allocator
    use_fast_allocator()

from bench.prefix_reuse import arguments, compare  # noqa: E402


def main() -> None:
    args = arguments(__doc__.splitlines()[0], refresh=2)
    compare(args, ("mask", (args.refresh, False)), ("split", (args.refresh, True)))


if __name__ == "__main__":
    main()
