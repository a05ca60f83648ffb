"""Run the CLI on mimalloc instead of glibc's malloc: training steps on 2 CPU cores took half the time.

A training step allocates and frees thousands of tensors of many sizes (activations, bf16 casts, masks, logit
chunks). glibc's heap fragments under that churn and the step slows down as a run goes on: profiled on the HR main
job, 10-17% of the samples were in `_int_malloc`, and the second OpenMP thread spent much of the step waiting for
the first one to leave it. mimalloc with purging off (it keeps the pages it got instead of handing them back and
faulting them in, zeroed, again) brought a batch-16 step from 10-14 s to 6-7 s with the same losses
(bench/train_speed.py shows the allocator it ran on). The allocator has to be in place before the process starts,
hence LD_PRELOAD and one re-exec of the same command line, done before torch is imported.

`FUNCTIONGEMMA_ALLOCATOR=system` keeps glibc's malloc. Linux only; elsewhere, or when the library is missing, the
process runs as it was started.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

ENV_CHOICE = "FUNCTIONGEMMA_ALLOCATOR"  # "mimalloc" (default) or "system"
_REEXEC_MARK = "FUNCTIONGEMMA_ALLOCATOR_REEXEC"  # set for the re-exec'd process: never exec twice
# mimalloc's own options (set only when the user has not): keep freed pages (no purge, no re-zeroing on reuse),
# commit arena memory up front.
MIMALLOC_DEFAULTS = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ARENA_EAGER_COMMIT": "1"}


def mimalloc_library() -> Path | None:
    """libmimalloc.so from the `cmeel-mimalloc` wheel in this environment, if it is installed."""
    lib = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib" / "libmimalloc.so"
    return lib if lib.is_file() else None


def active_allocator() -> str:
    """"mimalloc" when its library is mapped into this process, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


def preload_environment(environ: dict, library: Path) -> dict:
    """The environment to re-exec with: `library` first in LD_PRELOAD, mimalloc's defaults, the re-exec mark."""
    env = dict(environ)
    preload = [p for p in env.get("LD_PRELOAD", "").split() if p and p != str(library)]
    env["LD_PRELOAD"] = " ".join([str(library), *preload])
    for key, value in MIMALLOC_DEFAULTS.items():
        env.setdefault(key, value)
    env[_REEXEC_MARK] = "1"
    return env


def use_fast_allocator() -> None:
    """Re-exec this command line on mimalloc unless it is already loaded, opted out, or not available.

    In the re-exec'd process the library is taken out of LD_PRELOAD again, so that subprocesses (wandb's service,
    compilers) start on their own allocator.
    """
    if os.environ.pop(_REEXEC_MARK, None) is not None:
        library = mimalloc_library()
        kept = [p for p in os.environ.get("LD_PRELOAD", "").split() if library is None or p != str(library)]
        if kept:
            os.environ["LD_PRELOAD"] = " ".join(kept)
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    if os.environ.get(ENV_CHOICE, "mimalloc").lower() == "system" or not sys.platform.startswith("linux"):
        return
    library = mimalloc_library()
    if library is None or active_allocator() == "mimalloc":
        return
    argv = [sys.executable, *sys.orig_argv[1:]]  # the interpreter's own flags (-u, -X ...) included
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, preload_environment(os.environ, library))
