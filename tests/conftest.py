"""Fixtures shared by several test modules (opt-in: a module asks for them by name)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model is ~30x slower on 2 threads than on 1 when other jobs share the 2 cores (OpenMP spin-waits).
    Opt-in per module (`pytestmark`): the resume test compares in-process and subprocess runs, which must use the
    same thread count to give bit-identical losses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
