"""`doctor`: everything that decides whether training will run here, and how fast, on one screen."""
from __future__ import annotations

import importlib
import platform

import psutil
from rich.console import Console
from rich.table import Table


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _checks() -> list[tuple[str, bool, str]]:
    import torch

    rows = [("Python", True, platform.python_version()),
            ("torch", True, f"{torch.__version__} (threads: {torch.get_num_threads()})")]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        bf16 = "bf16 ok" if torch.cuda.is_bf16_supported() else "no bf16: fp32"
        rows.append(("CUDA", True, f"{name}, {_gib(free)} free of {_gib(total)}, {bf16}"))
    else:
        rows.append(("CUDA", False, "not available: training runs on the CPU in fp32"))
    mps = getattr(torch.backends, "mps", None)
    rows.append(("MPS", bool(mps and mps.is_available()), "available" if mps and mps.is_available() else "no"))
    from src.utils.allocator import ENV_CHOICE, active_allocator, mimalloc_library
    allocator = active_allocator()
    rows.append(("allocator", allocator == "mimalloc",
                 "mimalloc (src/utils/allocator.py)" if allocator == "mimalloc" else
                 f"glibc malloc ({ENV_CHOICE}=system)" if mimalloc_library() else
                 "glibc malloc: cmeel-mimalloc not installed (make setup), training steps are ~2x slower"))
    mem = psutil.virtual_memory()
    rows.append(("CPU / RAM", True, f"{psutil.cpu_count(logical=True)} cores, {_gib(mem.available)} free of "
                 f"{_gib(mem.total)}"))
    for pkg in ("transformers", "peft", "accelerate", "trl", "gguf", "wandb"):
        try:
            rows.append((pkg, True, importlib.import_module(pkg).__version__))
        except Exception as exc:  # a missing optional piece is a finding, not a crash
            rows.append((pkg, False, f"not importable: {exc}"))
    try:
        import llama_cpp
        features = llama_cpp.llama_print_system_info().decode()
        simd = "AVX-512" if "AVX512 = 1" in features else "AVX2" if "AVX2 = 1" in features else "no AVX2"
        rows.append(("llama.cpp bindings", True, f"llama-cpp-python {llama_cpp.__version__}, {simd} build"))
    except Exception as exc:
        rows.append(("llama.cpp bindings", False, f"not importable ({exc}); GGUF verification and q4_k_m need "
                     "them: make setup"))
    try:
        from src.utils.model_loader import describe_offline_base
        info = describe_offline_base()
        rows.append(("offline base model", bool(info.get("ready")),
                     f"ready at {info.get('path')}" if info.get("ready")
                     else f"not prepared yet ({info.get('path')}): make base (≈1 min, once)"))
    except Exception as exc:
        rows.append(("offline base model", False, f"cannot check: {exc}"))
    return rows


def run_doctor() -> int:
    table = Table(title="functiongemma-router doctor", show_header=False)
    for name, ok, detail in _checks():
        table.add_row(name, "[green]ok[/green]" if ok else "[yellow]--[/yellow]", detail)
    Console().print(table)
    return 0
