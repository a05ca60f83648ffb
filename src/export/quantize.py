"""K-quants (q4_k_m, q5_k_m, q6_k, ...) through llama.cpp's own quantizer, from a float GGUF we wrote.

K-quant block packing and llama.cpp's per-tensor type mix (e.g. q6_k for the tied embedding/output, more bits for
some attention/ffn tensors in _M variants) are not reimplemented here: `llama_model_quantize` is the reference.
Output goes to a temp file beside the target and is renamed into place only when llama.cpp reports success.
llama.cpp logs a line per tensor to stderr; that log is captured and shown only when quantization fails.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path

# llama.cpp ftype for each name this module accepts (llama.h: enum llama_ftype).
K_QUANTS = {
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}


class QuantizeError(RuntimeError):
    """llama.cpp refused to quantize (not a user-input problem: the input GGUF is ours)."""


def quantize_gguf(src, dst, quant: str, threads: int | None = None) -> Path:
    """Quantize the float GGUF `src` to `quant` at `dst` (atomically)."""
    import llama_cpp

    if quant not in K_QUANTS:
        raise ValueError(f"{quant!r} is not a K-quant ({', '.join(K_QUANTS)})")
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[quant]
    params.nthread = threads or os.cpu_count() or 1
    try:
        with _captured_stderr() as log:
            status = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if status != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise QuantizeError(f"llama_model_quantize({quant}) failed with status {status} on {src}: {tail}")
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dst


@contextlib.contextmanager
def _captured_stderr():
    """Point file descriptor 2 (where C code writes) at a temp file for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryDirectory(prefix="fg-quantize-") as tmp_dir:
        log = Path(tmp_dir) / "llama.log"
        with open(log, "wb") as fh:
            os.dup2(fh.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved, 2)
                os.close(saved)
