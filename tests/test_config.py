"""The config contract: merge order, typo suggestions, type errors, and the CLI's exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

from src.utils.config_loader import load_config
from src.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_base_has_the_guides_keys():
    cfg = load_config()
    for key in ("model.name", "model.max_seq_length", "model.dtype", "model.lora.rank", "model.lora.alpha",
                "model.lora.target_modules", "model.lora.use_gradient_checkpointing", "training.epochs",
                "training.learning_rate", "training.per_device_train_batch_size",
                "training.gradient_accumulation_steps", "training.lr_scheduler_type", "training.warmup_ratio",
                "training.weight_decay", "training.early_stopping", "training.early_stopping_patience",
                "logging.wandb.enabled", "logging.wandb.project", "logging.wandb.entity", "logging.wandb.name"):
        node, *rest = key.split(".")
        value = cfg[node]
        for part in rest:
            value = value[part]
        assert value is not None or key == "logging.wandb.entity" or key == "logging.wandb.name", key


def test_merge_order_base_then_experiment_then_override(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("training:\n  epochs: 7\n  learning_rate: 0.5\nmodel:\n  lora:\n    rank: 4\n")
    base = load_config()
    cfg = load_config(experiment=str(exp), overrides=["training.epochs=9"])
    assert cfg.training.epochs == 9            # override beats experiment
    assert cfg.training.learning_rate == 0.5   # experiment beats base
    assert cfg.model.lora.rank == 4
    assert cfg.model.lora.alpha == base.model.lora.alpha  # untouched keys keep the base value
    assert cfg.experiment == "exp"


def test_named_experiment_and_presets_load():
    assert load_config(experiment="exp_hr_routing").output.dir == "outputs/models/hr_v1"
    small = load_config(experiment="preset_small")
    assert (small.training.epochs, small.model.lora.rank, small.training.learning_rate) == (5, 8, 1e-4)
    assert load_config(experiment="preset_large").training.per_device_train_batch_size == 16
    low = load_config(experiment="low_memory")
    assert low.model.lora.use_gradient_checkpointing and low.training.gradient_accumulation_steps == 8


@pytest.mark.parametrize("override, message", [
    ("training.epocs=3", "unknown config key 'training.epocs' (did you mean 'training.epochs'?)"),
    ("model.lora.rnak=8", "did you mean 'model.lora.rank'?"),
    ("training.epochs=three", "config key 'training.epochs'"),
    ("model.dtype=float8", "'float8' is not one of"),
    ("training.per_device_train_batch_size=0", "must be >= 1"),
    ("training.prefix_refresh_steps=0", "'training.prefix_refresh_steps': must be >= 1"),
    ("novalue", "expected key.path=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config(experiment="exp_hr_routing", overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_prefix_reuse_needs_a_prefix_without_gradients():
    assert load_config(experiment="exp_hr_routing", overrides=["training.prefix_refresh_steps=4"])
    with pytest.raises(UserError, match="needs training.prefix_gradients=false"):
        load_config(experiment="exp_hr_routing",
                    overrides=["training.prefix_refresh_steps=4", "training.prefix_gradients=true"])


def test_unknown_key_in_experiment_file_names_file(tmp_path):
    exp = tmp_path / "typo.yaml"
    exp.write_text("training:\n  learning_rte: 0.1\n")
    with pytest.raises(UserError) as info:
        load_config(experiment=str(exp))
    assert str(exp) in str(info.value) and "training.learning_rate" in str(info.value)


def _cli(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_config_prints_merged_yaml():
    res = _cli("config", "--experiment", "exp_hr_routing", "training.epochs=4")
    assert res.returncode == 0, res.stderr
    assert "experiment: exp_hr_routing" in res.stdout and "epochs: 4" in res.stdout


def test_cli_typo_is_one_line_exit_2():
    res = _cli("config", "--experiment", "exp_hr_routing", "training.epocs=3")
    assert res.returncode == 2
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "training.epochs" in lines[0] and "Traceback" not in res.stderr


def test_cli_unknown_experiment_and_command_exit_2():
    assert _cli("config", "--experiment", "exp_hr_routng").returncode == 2
    assert _cli("no-such-command").returncode == 2
