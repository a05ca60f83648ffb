"""Layered configuration: base_config.yaml <- experiment YAML <- `key.path=value` overrides, checked against a schema.

Users call `load_config()` from their own scripts (the training guide does), so errors are `UserError`s with one
line naming the key, never an OmegaConf traceback.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from src.utils.config_schema import Config
from src.utils.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"

ALLOWED_VALUES = {
    "model.dtype": {"auto", "float32", "bfloat16", "float16"},
    "model.attn_implementation": {"eager", "sdpa"},
    "training.lr_scheduler_type": {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                   "constant_with_warmup"},
    "training.eval_strategy": {"no", "steps", "epoch"},
    "training.mixed_precision": {"no", "bf16"},
    "training.save_strategy": {"no", "steps", "epoch"},
    "data.on_error": {"fail", "drop"},
    "logging.wandb.mode": {"auto", "online", "offline", "disabled"},
}


def _all_keys(node, prefix="") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, (dict, DictConfig)):
            keys.extend(_all_keys(value, path + "."))
    return keys


_SCHEMA_KEYS = _all_keys(OmegaConf.to_container(OmegaConf.structured(Config)))


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _SCHEMA_KEYS, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(schema: DictConfig, layer, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except ConfigKeyError as exc:
        key = exc.full_key or str(exc.key)
        raise UserError(f"{source}: unknown config key '{key}'{_suggest(key)}") from None
    except ValidationError as exc:
        key = exc.full_key or str(exc.key)
        raise UserError(f"{source}: config key '{key}': {exc.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as exc:
        raise UserError(f"{source}: {str(exc).splitlines()[0]}") from None


def _load_yaml(path: Path) -> DictConfig:
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: show where, in one line
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(layer, DictConfig):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return layer


def resolve_experiment_path(experiment: str) -> Path:
    """An experiment is a name under configs/experiments/ or a path to a YAML file."""
    candidate = Path(experiment)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.is_file():
            raise UserError(f"{candidate}: experiment file not found")
        return candidate
    path = CONFIG_DIR / "experiments" / f"{experiment}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "experiments").glob("*.yaml"))
        close = difflib.get_close_matches(experiment, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}"
        raise UserError(f"experiment '{experiment}' not found in {CONFIG_DIR / 'experiments'}{hint}")
    return path


def _check_values(cfg: DictConfig) -> None:
    for key, allowed in ALLOWED_VALUES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise UserError(f"config key '{key}': '{value}' is not one of {', '.join(sorted(allowed))}")
    if not 0.0 <= cfg.data.eval_split < 1.0:
        raise UserError(f"config key 'data.eval_split': {cfg.data.eval_split} must be in [0, 1)")
    for key in ("training.per_device_train_batch_size", "training.gradient_accumulation_steps",
                "model.max_seq_length", "model.lora.rank", "training.prefix_refresh_steps"):
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"config key '{key}': must be >= 1")
    if cfg.training.prefix_refresh_steps > 1 and cfg.training.prefix_gradients:
        raise UserError("config key 'training.prefix_refresh_steps': reusing the prefix needs "
                        "training.prefix_gradients=false (with gradients the prefix is part of every step's backward)")


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides or [])
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}': expected key.path=value")
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as exc:
        raise UserError(f"overrides: {' '.join(str(exc).split())}") from None


def load_config(config_name: str = "base_config", experiment: str | None = None,
                overrides: Iterable[str] | None = None) -> DictConfig:
    """Merged, validated config. Later layers win: base file, experiment file, then overrides."""
    cfg = OmegaConf.structured(Config)
    base_path = Path(config_name) if config_name.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{config_name}.yaml"
    if not base_path.is_file():
        raise UserError(f"{base_path}: base config not found")
    cfg = _merge(cfg, _load_yaml(base_path), str(base_path))
    if experiment:
        exp_path = resolve_experiment_path(experiment)
        cfg = _merge(cfg, _load_yaml(exp_path), str(exp_path))
        if cfg.experiment is None:
            cfg.experiment = exp_path.stem
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "override")
    _check_values(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
