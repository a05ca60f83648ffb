"""Typed schema of every config key: OmegaConf checks names and types against it, so a typo fails loudly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

OFFLINE_BASE = "gemma3-270m-offline"
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    use_gradient_checkpointing: bool = False
    # Ids 46-52 are untrained in the offline base: let their embedding rows learn.
    train_control_tokens: bool = True


@dataclass
class ModelConfig:
    name: str = OFFLINE_BASE
    max_seq_length: int = 2048
    dtype: str = "auto"  # auto | float32 | bfloat16 (float16 is refused: Gemma 3 overflows)
    attn_implementation: str = "eager"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class AugmentConfig:
    shuffle_tools: bool = False
    distractor_tools: int = 0


@dataclass
class DataConfig:
    train_file: str = "data/processed/hr_functions.jsonl"
    test_file: str = "data/test.jsonl"
    tools_file: str = "data/tools/hr_tools.json"
    system_prompt: Optional[str] = None  # None = FunctionGemma's activation sentence
    eval_split: float = 0.1
    near_dup_threshold: float = 0.9
    on_error: str = "fail"  # fail | drop
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainingConfig:
    epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 2.0e-4
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    early_stopping: bool = False
    early_stopping_patience: int = 3
    seed: int = 42
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    shared_prefix: bool = True
    # false: the shared prefix runs without autograd (LoRA learns through the suffixes only): ~27% faster per step.
    prefix_gradients: bool = True
    # With prefix_gradients false: the prefix's keys/values are computed once per this many optimizer steps
    # (1: once per step, shared by its accumulated micro-batches, exact; more: faster, not exact).
    prefix_refresh_steps: int = 1
    # bf16: matrix products in bfloat16 under autocast (weights, softmax and loss stay fp32). On CPUs with AMX
    # (Sapphire Rapids and later) and on GPUs; elsewhere bf16 products can be slower than fp32.
    mixed_precision: str = "no"
    # true: length-sorted batches (less padding); on routing data they hold one function each and training swings.
    group_by_length: bool = False
    logging_steps: int = 5
    eval_strategy: str = "epoch"
    eval_steps: Optional[int] = None
    save_strategy: str = "epoch"
    save_steps: Optional[int] = None
    save_total_limit: int = 2
    sample_generations: int = 3
    auto_preset: bool = False


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "functiongemma-hr-routing"
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: str = "auto"  # auto (offline when not logged in) | online | offline | disabled


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = True
    log_dir: str = "outputs/logs"


@dataclass
class InferenceConfig:
    max_new_tokens: int = 96
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    prefix_cache: bool = True
    # Grammar drafts verified in one pass: same greedy tokens, fewer sequential steps (src/evaluation/draft.py).
    draft: bool = True
    # Greedy calls use only catalog function names, declared keys and enum values (src/evaluation/constrain.py).
    constrain: bool = True
    # With `constrain`: arguments the training data always copied from the request (MODEL/copied_arguments.json)
    # are kept to pieces of the request's text (src/data_engine/copied_arguments.py).
    copy_arguments: bool = True
    # A greedy call keeps an optional argument only when the call is more probable with it than without it
    # (src/evaluation/optional_rescore.py).
    rescore_optional: bool = True


@dataclass
class EvaluationConfig:
    # Test cases decoded together, packed into one row per forward pass (src/evaluation/batch_decode.py).
    batch_size: int = 96
    # Cases also routed one at a time for the report's latency percentiles (0 = none).
    latency_samples: int = 16


@dataclass
class ExportConfig:
    verify: bool = True
    verify_samples: int = 0  # 0 = the whole test set
    agreement_threshold: Optional[float] = None  # None = per-quantization defaults (see src/export/verify.py)
    # Quantizations exported, verified and reported, whose agreement below the threshold does not fail the export
    # (exit 0); a failed exact check (token ids, BOS, template) still does.
    advisory: List[str] = field(default_factory=list)
    # Evaluation whose per-case PyTorch results serve as the reference when provably the same run (same weights,
    # runtime, decoding, prompts): an eval dir or its predictions.json. None = IN/eval; "off" = always recompute.
    reference: Optional[str] = None


@dataclass
class OutputConfig:
    dir: str = "outputs/models/default"


@dataclass
class Config:
    experiment: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
