"""The CLI re-execs itself on mimalloc (src/utils/allocator.py), once, and keeps it out of its subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.utils import allocator

ROOT = Path(__file__).resolve().parents[1]


def test_preload_environment_puts_the_library_first_once_and_keeps_user_settings():
    lib = Path("/opt/lib/libmimalloc.so")
    env = allocator.preload_environment(
        {"LD_PRELOAD": f"/x/libfoo.so {lib}", "MIMALLOC_PURGE_DELAY": "50", "PATH": "/bin"}, lib)
    assert env["LD_PRELOAD"] == f"{lib} /x/libfoo.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "50"  # the user's own choice wins
    assert env["MIMALLOC_ARENA_EAGER_COMMIT"] == "1"
    assert env["PATH"] == "/bin" and env[allocator._REEXEC_MARK] == "1"


def test_the_reexeced_process_takes_the_library_out_of_ld_preload(monkeypatch):
    lib = allocator.mimalloc_library() or Path("/nonexistent/libmimalloc.so")
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: lib)
    monkeypatch.setenv(allocator._REEXEC_MARK, "1")
    monkeypatch.setenv("LD_PRELOAD", f"{lib} /x/libfoo.so")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-exec'd twice"))
    allocator.use_fast_allocator()
    assert os.environ["LD_PRELOAD"] == "/x/libfoo.so"
    assert allocator._REEXEC_MARK not in os.environ


def test_opting_out_never_reexecs(monkeypatch):
    monkeypatch.setenv(allocator.ENV_CHOICE, "system")
    monkeypatch.delenv(allocator._REEXEC_MARK, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-exec'd although opted out"))
    allocator.use_fast_allocator()


def _doctor(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_CHOICE)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "main.py", "doctor"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if "allocator" in line)


def test_the_library_is_installed():
    assert allocator.mimalloc_library() is not None, "cmeel-mimalloc is in requirements.lock: run make setup"


def test_main_runs_on_mimalloc_and_opts_out_on_request():
    assert "mimalloc" in _doctor({}) and "glibc" not in _doctor({})
    assert "glibc" in _doctor({allocator.ENV_CHOICE: "system"})


def test_subprocesses_of_the_cli_start_without_the_preload():
    code = ("import os, sys; sys.argv = ['main.py']; from src.utils.allocator import use_fast_allocator, "
            "active_allocator; use_fast_allocator(); print(active_allocator(), repr(os.environ.get('LD_PRELOAD')))")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_CHOICE)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mimalloc", "None"]
