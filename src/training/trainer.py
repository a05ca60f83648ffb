"""LoRA fine-tuning of FunctionGemma into a function router: `FunctionGemmaTrainer` (the training guide's Python
API) and `run_training` (the `train` command).

The loop is HF `transformers.Trainer`, specialised only where our data differs (as TRL's SFTTrainer does):
- loss: `shared_prefix.completion_loss`: completion tokens only, the lm_head only at those positions, and the
  shared developer turn (~97% of every HR sample) run once per batch;
- batches: `batching.PrefixGroupedBatchSampler`, so a batch never mixes prefixes; its order is a function of
  (seed, epoch), which is what lets `--resume` after a kill -9 end on the weights of an uninterrupted run;
- evaluation: token-weighted eval loss, plus routing accuracy from greedy generation on a sample of the eval split.
Checkpoints, resume, early stopping, TensorBoard/W&B and `accelerate launch` come from Trainer.

Several GPUs: `accelerate launch main.py train ...` (or `torchrun --nproc_per_node N main.py train ...`) runs DDP.
`completion_loss` calls the decoder directly (it needs hidden states, not full-vocabulary logits), which bypasses
DDP's forward and with it DDP's gradient hooks; so this trainer all-reduces the trainable gradients itself, once per
optimizer step. FSDP and DeepSpeed rely on that wrapped forward to gather sharded weights and are refused: the
270M model with LoRA fits on any single GPU, and DDP is the tool for more throughput.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.utils.data import DataLoader, Sampler
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from src.data_engine.augment import add_distractors
from src.data_engine.convert import load_records
from src.data_engine.copied_arguments import learn_copied_arguments, read_copied_arguments, write_copied_arguments
from src.data_engine.formatter import CONTROL_TOKENS, normalize_tools, parse_output, split_prompt_completion
from src.data_engine.split import train_eval_split
from src.evaluation.metrics import Expected, Predicted, score_case
from src.evaluation.router import Router, inference_options, load_tools, served_copies
from src.training.batching import PrefixGroupedBatchSampler, SharedPrefixCollator, tokenize_record
from src.training.callbacks import LogLinesCallback, MallocTrimCallback, RichProgressCallback, SamplerEpochCallback
from src.training.monitoring import (LOG_FILE, LOSS_CURVE_FILE, SAMPLE_COLUMNS, TrainingLog, finish_wandb,
                                     log_samples_to_wandb, save_loss_curve, start_wandb, tensorboard_callback)
from src.training.precision import LowPrecisionFrozenWeights
from src.training.shared_prefix import IGNORE_INDEX, PrefixReuse, completion_loss
from src.utils.config_loader import resolve_experiment_path, to_yaml
from src.utils.config_schema import Config
from src.utils.errors import UserError
from src.utils.io import atomic_write_json, atomic_write_text
from src.utils.model_loader import OFFLINE_BASE, default_device, load_model, load_tokenizer, resolve_model_source

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
CONTROL_TOKEN_IDS = sorted(CONTROL_TOKENS.values())
# The guide's dataset-size presets: below 1000 samples small, below 10000 medium, else large.
PRESET_LIMITS = (("small", 1000), ("medium", 10000), ("large", math.inf))


class RoutingResult(dict):
    """`inference()`'s answer: the dict the `inference` command prints (`kind`, `tool_calls` or `text`), where
    `name in result` also asks "did the model call `name`?".

    The guide scores with `case["expected_tool"] in result`, so a tool name is "in" the result when one of the
    calls has that name, and `None in result` is True for a text answer (a no-call case, `expected_tool: null`).
    Dict keys keep working (`"tool_calls" in result`).
    """

    def __contains__(self, item) -> bool:
        if item is None:
            return self.get("kind") == "text"
        return dict.__contains__(self, item) or any(c["name"] == item for c in self.get("tool_calls", ()))


def _as_config(config) -> DictConfig:
    """Schema defaults under whatever was given, so a partial dict (tests, user scripts) is a full config."""
    return OmegaConf.merge(OmegaConf.structured(Config), config)


def pick_preset(n_samples: int) -> str:
    return next(name for name, limit in PRESET_LIMITS if n_samples < limit)


def apply_auto_preset(cfg: DictConfig, n_samples: int) -> tuple[DictConfig, str]:
    """Merge configs/experiments/preset_<size>.yaml over `cfg` (its epochs, lr, batch size, LoRA rank/alpha win)."""
    name = pick_preset(n_samples)
    layer = OmegaConf.load(resolve_experiment_path(f"preset_{name}"))
    layer.pop("experiment", None)
    return OmegaConf.merge(cfg, layer), name


def last_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """Newest `checkpoint-N` whose trainer_state.json (written last by Trainer) parses: a kill -9 during a save
    leaves a partial directory that must not be resumed from."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = []
    for path in checkpoints_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and step.isdigit():
            candidates.append((int(step), path))
    for _, path in sorted(candidates, reverse=True):
        try:
            json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return path
    return None


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (or None); refuses to mix a new run into a non-empty dir."""
    if resume and overwrite:
        raise UserError(f"{out}: --resume continues the run in this dir, --overwrite deletes it; pass one of them")
    if resume:
        checkpoint = last_complete_checkpoint(out / CHECKPOINTS_DIR)
        if checkpoint is None:
            finished = (out / "adapter_config.json").is_file()
            reason = "training already finished there" if finished else f"no checkpoint in {out / CHECKPOINTS_DIR}"
            raise UserError(f"{out}: nothing to resume ({reason}); run without --resume")
        return checkpoint
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out}: output exists and is not empty; pass --overwrite to replace it, "
                        "--resume to continue its run, or choose another --output")
    return None


def init_control_token_embeddings(model, tokenizer) -> None:
    """Start each trainable control-token row (ids 46-52) at the mean embedding of its text form's pieces.

    In the Gemma 3 base these ids are untrained `<unusedNN>` rows, which is most of the offline base's high
    starting loss; "<start_function_call>" spelled with ordinary tokens is a far better start. The rows live in
    peft's trainable-token delta, so they are saved with the adapter; the base weights stay untouched.
    """
    adapter = model.get_input_embeddings().token_adapter
    name = model.active_adapter
    base = adapter.base_layer.weight
    with torch.no_grad():
        delta = adapter.trainable_tokens_delta[name]
        for row, token_id in enumerate(adapter.token_indices[name]):
            text = tokenizer.convert_ids_to_tokens(token_id)
            pieces = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            delta[row] = base[pieces].float().mean(dim=0).to(delta.dtype)


@contextmanager
def token_rows_merged(model):
    """The trained control-token rows written into the embedding (and the head tied to it) for the block, then the
    original rows put back, bit for bit (peft keeps them). Unmerged, peft's wrapper copies the whole 262k x 640
    matrix on every forward pass: 3 sample generations took ~41 s of an epoch-end evaluation that way."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
    with torch.no_grad():
        for layer in layers:
            layer.merge()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer in reversed(layers):
                layer.unmerge()


def _routing_case(record: dict, feature: dict) -> dict:
    """What a sample generation needs from one eval sample: its prompt ids and the expected call."""
    _, completion = split_prompt_completion(record["messages"], record.get("tools"))
    target = parse_output(completion)
    call = target.calls[0] if target.kind == "calls" else None
    query = next((m.get("content") for m in reversed(record["messages"]) if m.get("role") == "user"), "")
    return {
        "prompt_ids": list(feature["prefix_ids"]) + list(feature["suffix_ids"][:-feature["n_completion"]]),
        "expected": Expected(call["name"] if call else None, call["arguments"] if call else None),
        "expected_text": _summary(target),
        "query": query,
    }


def _summary(parsed) -> str:
    """One cell of the sample table: `name({arguments})` per call, else the kind and the text."""
    if parsed.kind == "calls":
        return " + ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in parsed.calls)
    return f"({parsed.kind}) {parsed.text}".strip()


class _RankShard(Sampler):
    """This process's share of a batch sampler: every world_size-th batch.

    With `even`, the batch list is padded by cycling so that every rank runs the same number of steps (a rank with
    one step more would wait forever in the gradient all-reduce); evaluation needs no padding, which would count
    some samples twice.
    """

    def __init__(self, batch_sampler: PrefixGroupedBatchSampler, num_replicas: int, rank: int, even: bool):
        self.batch_sampler, self.num_replicas, self.rank, self.even = batch_sampler, num_replicas, rank, even

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __iter__(self):
        batches = list(self.batch_sampler)
        if self.even:
            batches += [batches[i % len(batches)] for i in range(-len(batches) % self.num_replicas)]
        yield from batches[self.rank::self.num_replicas]

    def __len__(self) -> int:
        n = len(self.batch_sampler)
        return -(-n // self.num_replicas) if self.even else len(range(self.rank, n, self.num_replicas))


class CompletionTrainer(Trainer):
    """HF Trainer with our loss, prefix-grouped batches, and routing accuracy in `evaluate`."""

    # completion_loss divides by the completion-token count of the whole accumulated (and all-rank) batch.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, routing_cases=(), router_options=None, on_samples=None, prefix_gradients=True,
                 prefix_refresh_steps=1, group_by_length=False, mixed_precision="no", **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_gradients = prefix_gradients
        self.prefix_reuse = None if prefix_gradients else PrefixReuse(prefix_refresh_steps)
        self.mixed_precision = mixed_precision
        self.group_by_length = group_by_length
        self.routing_cases = list(routing_cases)
        self.router_options = router_options or {}
        self.on_samples = on_samples
        self._frozen = LowPrecisionFrozenWeights(self.model, enabled=False)  # the real one while `train` runs
        self.train_batch_sampler = None if self.train_dataset is None else self._batch_sampler(
            self.train_dataset, self.args.per_device_train_batch_size, training=True)

    # ---- data
    def _batch_sampler(self, dataset, batch_size: int, training: bool) -> _RankShard:
        """Training batches are shuffled per epoch and even across ranks; eval batches are neither."""
        sampler = PrefixGroupedBatchSampler([tuple(f["prefix_ids"]) for f in dataset],
                                            [len(f["suffix_ids"]) for f in dataset], batch_size,
                                            self.args.seed, shuffle=training,
                                            by_length=self.group_by_length or not training)
        return _RankShard(sampler, max(self.args.world_size, 1), self.args.process_index, even=training)

    def _loader(self, dataset, batch_sampler) -> DataLoader:
        # A plain DataLoader: accelerate's BatchSamplerShard assumes equal batch sizes and would drop the short
        # last batch of each prefix group; _RankShard shards instead and Trainer moves tensors to the device.
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self.data_collator,
                          num_workers=self.args.dataloader_num_workers)

    def get_train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.train_batch_sampler)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        return self._loader(dataset, self._batch_sampler(dataset, self.args.per_device_eval_batch_size, training=False))

    # ---- loss
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Count completion tokens over the accumulated micro-batches of all ranks: the loss denominator."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in batches)
        return batches, self._sum_over_ranks(torch.tensor(count, dtype=torch.long, device=device))

    def _autocast(self):
        """bf16 matrix products, fp32 weights, softmax and loss (`training.mixed_precision`). Entered here because
        `completion_loss` calls the decoder directly, past the forward that accelerate would wrap."""
        return torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision == "bf16")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.prefix_reuse is not None:
            self.prefix_reuse.step = self.state.global_step
        with self._autocast():
            loss, _ = completion_loss(self.accelerator.unwrap_model(model), inputs, num_items_in_batch,
                                      prefix_gradients=self.prefix_gradients, reuse=self.prefix_reuse)
        if self.args.world_size > 1:
            loss = loss * self.args.world_size  # ranks' gradients are averaged; the denominator counts all ranks
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.world_size > 1 and self.accelerator.sync_gradients:
            self._average_gradients()
        return loss

    def _average_gradients(self) -> None:
        """One all-reduce over all trainable gradients, flattened in parameter order (the same on every rank)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.args.world_size
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.args.world_size > 1 else tensor

    def get_decay_parameter_names(self, model) -> list[str]:
        # peft's trainable-token "delta" holds the rows' absolute values: decay would pull the embeddings to zero.
        return [n for n in super().get_decay_parameter_names(model) if "trainable_tokens_delta" not in n]

    def train(self, *args, **kwargs):
        with LowPrecisionFrozenWeights(self.model, enabled=self.mixed_precision == "bf16") as self._frozen:
            return super().train(*args, **kwargs)

    # ---- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict[str, float]:
        """Eval loss weighted by completion tokens (not a mean of batch means), and routing accuracy from the same
        pass: a sample is routed right when the argmax is right at every position up to its function name's `{`
        (or at the first token of a text answer), and is an exact call when it is right at every completion
        position. Under teacher forcing that is exactly what greedy decoding would write, so the whole eval split
        is scored for the price of its loss. Then a few sample generations, printed and logged."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.args.device)
        with torch.no_grad(), self._autocast():
            for batch in self.get_eval_dataloader(eval_dataset):
                batch = self._prepare_inputs(batch)
                hits: list[torch.Tensor] = []
                loss, n_tokens = completion_loss(model, batch, hits=hits)
                routes = batch["n_route"].tolist()
                routed = sum(bool(h[:n].all()) for h, n in zip(hits, routes))
                # A text answer (route length 1) is scored by its kind only, as `evaluate` scores test cases.
                exact = sum(bool(h.all() if n > 1 else h[:1].all()) for h, n in zip(hits, routes))
                sums += torch.tensor([loss.item() * n_tokens, n_tokens, routed, exact], dtype=torch.float64,
                                     device=sums.device)
        loss_sum, n_tokens, routed, exact = self._sum_over_ranks(sums).tolist()
        n_samples = len(self.eval_dataset if eval_dataset is None else eval_dataset)
        metrics = {f"{metric_key_prefix}_loss": loss_sum / max(n_tokens, 1.0),
                   f"{metric_key_prefix}_routing_accuracy": routed / max(n_samples, 1),
                   f"{metric_key_prefix}_exact_call_accuracy": exact / max(n_samples, 1)}
        self._sample_generations(model)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _sample_generations(self, model) -> None:
        """Greedy generation for the first few eval queries: expected vs generated call, for the log and W&B."""
        if not self.routing_cases or self.on_samples is None or not self.is_world_process_zero():
            return
        rows = []
        with self._frozen.full_precision(), token_rows_merged(model):  # decoded as served: fp32
            router = Router(model, **self.router_options)  # fresh: the prefix cache depends on the current weights
            generated = [router.generate_ids(case["prompt_ids"], draft_source=case["query"])[0]
                         for case in self.routing_cases]
            router.close()
        for case, new_ids in zip(self.routing_cases, generated):
            parsed = parse_output(router.tokenizer.decode(new_ids, skip_special_tokens=False))
            score = score_case(case["expected"], Predicted(parsed.kind, tuple(parsed.calls)))
            verdict = "exact" if score.exact_call else ("tool only" if score.tool_correct else "wrong")
            rows.append((case["query"], case["expected_text"], _summary(parsed), verdict))
        self.on_samples(rows, self.state.global_step)


class FunctionGemmaTrainer:
    """The training guide's API: `load_model()`, `load_dataset(path)`, `train(resume)`, `save_model(path)`,
    `inference(text)`. Each step loads what it needs if an earlier one was skipped.

    `config` is the merged config (`load_config()`) or any dict-like subset of it; missing keys take the schema
    defaults. Outputs go to `output_dir` (default `output.dir`).
    """

    def __init__(self, config, output_dir: str | os.PathLike | None = None, overwrite: bool = False):
        self.cfg = _as_config(config)
        self.output_dir = Path(output_dir or self.cfg.output.dir)
        self.overwrite = overwrite
        self.model = self.tokenizer = None
        self.tools: list[dict] | None = None
        self.copied: dict[str, list[str]] | None = None  # arguments the data always copies (copied_arguments.py)
        self.train_features: list[dict] | None = None
        self.eval_features: list[dict] = []
        self.routing_cases: list[dict] = []
        self.n_samples = 0
        self.state = None  # HF TrainerState of the last train()
        self._data_summary = ""
        self._callbacks = []
        self._router = None

    def add_callback(self, callback) -> None:
        """Extra `transformers.TrainerCallback`s for `train()` (the HF extension point)."""
        self._callbacks.append(callback)

    # ---- loading
    def load_model(self, name_or_dir: str | os.PathLike | None = None, device=None):
        """Base model (or a trained model dir) and its tokenizer; default `model.name` from the config."""
        name = str(name_or_dir or self.cfg.model.name)
        self.model, self.tokenizer = load_model(name, dtype=self.cfg.model.dtype, device=device,
                                                attn_implementation=self.cfg.model.attn_implementation)
        if (Path(name) / "tools.json").is_file():
            self.tools = load_tools(name, None)
            self.copied = read_copied_arguments(name)
        self._router = None
        return self.model, self.tokenizer

    def load_dataset(self, path: str | os.PathLike, eval_path: str | os.PathLike | None = None):
        """Read and validate processed JSONL, split off the eval set (near-duplicates never straddle the split),
        augment the training side if configured, and tokenize. `eval_path` gives the eval set from its own file."""
        cfg = self.cfg
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(cfg.model.name)
        tools_file = cfg.data.tools_file if Path(cfg.data.tools_file).is_file() else None
        records, _ = load_records(path, tools_file=tools_file, on_error=cfg.data.on_error)
        if eval_path is not None:
            train_records, eval_records = records, load_records(eval_path, tools_file=tools_file,
                                                                on_error=cfg.data.on_error)[0]
        else:
            train_records, eval_records = train_eval_split(records, cfg.data.eval_split, cfg.training.seed,
                                                           threshold=cfg.data.near_dup_threshold)
        self.n_samples = len(records)
        self.tools = self._catalog(records)
        self.copied = learn_copied_arguments(records, self.tools)
        augment = cfg.data.augment
        n_original = len(train_records)
        if augment.distractor_tools > 0 or augment.shuffle_tools:
            rng = random.Random(cfg.training.seed)
            train_records = train_records + [add_distractors(r, augment.distractor_tools, rng,
                                                             shuffle=augment.shuffle_tools) for r in train_records]

        prefix_cache: dict = {}

        def tokenize(recs, source):
            return [tokenize_record(self.tokenizer, r, cfg.model.max_seq_length, source=f"{source}: sample {i + 1}",
                                    prefix_cache=prefix_cache) for i, r in enumerate(recs)]

        self.train_features = tokenize(train_records, path)
        self.eval_features = tokenize(eval_records, eval_path or path)
        n_shown = min(cfg.training.sample_generations, len(eval_records))
        self.routing_cases = [_routing_case(r, f) for r, f in zip(eval_records[:n_shown], self.eval_features)]
        augmented = len(train_records) - n_original
        self._data_summary = (f"data: {path}: {len(records)} samples -> train {n_original}"
                              f"{f' (+{augmented} augmented)' if augmented else ''}, eval {len(eval_records)} "
                              f"(routing accuracy on all of it, {n_shown} sample generations), {len(prefix_cache)} distinct developer turn(s)")
        return self.train_features, self.eval_features

    @staticmethod
    def _catalog(records: list[dict]) -> list[dict]:
        """Every tool the data declares, first-seen order: the catalog the model is served with (tools.json)."""
        seen: dict[str, dict] = {}
        for record in records:
            for tool, bare in zip(record.get("tools") or [], normalize_tools(record.get("tools"))):
                seen.setdefault(bare["name"], tool)
        return list(seen.values())

    # ---- training
    def train(self, resume: bool = False) -> Path:
        """Train into `output_dir`; `resume=True` continues from its last complete checkpoint. Returns the dir."""
        cfg, out = self.cfg, self.output_dir
        checkpoint = check_output_dir(out, resume, self.overwrite)
        if self.train_features is None:
            self.load_dataset(cfg.data.train_file)
        preset = None
        if cfg.training.auto_preset:
            self.cfg, preset = apply_auto_preset(cfg, self.n_samples)
            cfg = self.cfg
        if cfg.training.early_stopping and not self.eval_features:
            raise UserError("training.early_stopping: needs an eval split; set data.eval_split > 0")
        if cfg.model.lora.use_gradient_checkpointing:
            cfg.training.shared_prefix = False  # checkpointed layers would drop the shared prefix's cache

        args = self._training_arguments(out, has_eval=bool(self.eval_features))
        _refuse_sharded_backends(args)
        main = args.process_index == 0
        if main and out.exists() and checkpoint is None:
            shutil.rmtree(out) if out.is_dir() else out.unlink()  # --overwrite (check_output_dir refused otherwise)
        args.distributed_state.wait_for_everyone()
        out.mkdir(parents=True, exist_ok=True)
        if main:
            atomic_write_text(out / "config.yaml", to_yaml(cfg))  # a killed run still says how it was started

        console = Console()
        log = TrainingLog(out / LOG_FILE, console, enabled=main)
        run, finished = None, False
        try:
            log.write(self._data_summary)
            if preset:
                log.write(f"auto preset: {preset} ({self.n_samples} samples): epochs {cfg.training.epochs}, "
                          f"lr {cfg.training.learning_rate}, batch {cfg.training.per_device_train_batch_size}, "
                          f"LoRA rank {cfg.model.lora.rank} alpha {cfg.model.lora.alpha}")
            if cfg.model.lora.use_gradient_checkpointing:
                log.write("gradient checkpointing on: training on full sequences (the shared-prefix path needs "
                          "its cache, which checkpointed layers drop)")
            self._prepare_model(args.device, log)
            run = start_wandb(cfg, log) if main else None
            self.state = self._fit(args, checkpoint, console, log, run)
            self._router = None
            if main:
                self.save_model(out)
                atomic_write_text(out / TRAINER_STATE_FILE,
                                  json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n")
                if save_loss_curve(self.state.log_history, out / LOSS_CURVE_FILE):
                    log.write(f"loss curve: {out / LOSS_CURVE_FILE}")
                shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)  # the model is saved; optimizer states go
                log.write(f"model saved: {out}")
            args.distributed_state.wait_for_everyone()
            finished = True
        finally:
            finish_wandb(run, log, exit_code=0 if finished else 1)
            log.close()
        return out

    def _fit(self, args: TrainingArguments, checkpoint: Path | None, console: Console, log: TrainingLog, run):
        """Run HF's loop with our trainer and callbacks; an out-of-memory error becomes the guide's advice."""
        cfg = self.cfg
        progress = RichProgressCallback(console)
        hf = CompletionTrainer(
            model=self.model, args=args, train_dataset=self.train_features,
            eval_dataset=self.eval_features or None,
            data_collator=SharedPrefixCollator(self.tokenizer.pad_token_id, shared_prefix=cfg.training.shared_prefix),
            callbacks=self._hf_callbacks(progress, log, args.process_index == 0, run),
            routing_cases=self.routing_cases, prefix_gradients=cfg.training.prefix_gradients,
            prefix_refresh_steps=cfg.training.prefix_refresh_steps,
            mixed_precision=cfg.training.mixed_precision,
            group_by_length=cfg.training.group_by_length,
            router_options={"tokenizer": self.tokenizer, "tools": self.tools, "system_prompt": cfg.data.system_prompt,
                            "prefix_cache": True, "max_new_tokens": cfg.inference.max_new_tokens,
                            "constrain": cfg.inference.constrain, "draft": cfg.inference.draft,
                            "copied": served_copies(self.copied, cfg)},
            on_samples=lambda rows, step: (log.table(f"sample generations at step {step}", SAMPLE_COLUMNS, rows),
                                           log_samples_to_wandb(run, rows, step)),
        )
        hf.remove_callback(PrinterCallback)  # LogLinesCallback prints the same entries readably
        hf.add_callback(SamplerEpochCallback(hf.train_batch_sampler))
        try:
            with warnings.catch_warnings():
                # peft asks the hub whether the base's vocabulary changed at every checkpoint; it never does here.
                warnings.filterwarnings("ignore", message="(Unable to fetch remote file|Could not find a config file)")
                hf.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise UserError(self._oom_advice(exc)) from None
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise UserError(self._oom_advice(exc)) from None
            raise
        finally:
            progress.on_train_end(args, hf.state, hf.control)  # stop the live bar even when training failed
        return hf.state

    def _training_arguments(self, out: Path, has_eval: bool) -> TrainingArguments:
        t = self.cfg.training
        early = bool(t.early_stopping)
        try:
            return TrainingArguments(
                output_dir=str(out / CHECKPOINTS_DIR), seed=t.seed, data_seed=t.seed,
                num_train_epochs=t.epochs, max_steps=t.max_steps,
                per_device_train_batch_size=t.per_device_train_batch_size,
                per_device_eval_batch_size=t.per_device_eval_batch_size,
                gradient_accumulation_steps=t.gradient_accumulation_steps,
                learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio,
                weight_decay=t.weight_decay, optim=t.optim, max_grad_norm=t.max_grad_norm,
                activation_checkpointing=self.cfg.model.lora.use_gradient_checkpointing,
                activation_checkpointing_kwargs={"use_reentrant": False},
                logging_steps=t.logging_steps, logging_first_step=True,
                eval_strategy=t.eval_strategy if has_eval else "no",
                save_strategy=t.save_strategy, save_total_limit=t.save_total_limit,
                **({"eval_steps": t.eval_steps} if t.eval_steps else {}),
                **({"save_steps": t.save_steps} if t.save_steps else {}),
                load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None,
                greater_is_better=False if early else None, restore_callback_states_from_checkpoint=early,
                report_to="none",  # TensorBoard and W&B callbacks are added explicitly (dirs, offline mode)
                disable_tqdm=True, remove_unused_columns=False, average_tokens_across_devices=False,
                include_num_input_tokens_seen="no", ddp_find_unused_parameters=False, dataloader_num_workers=0,
                use_cpu=default_device() == "cpu",  # without it, accelerate sees no multi-process CPU run
            )
        except ValueError as exc:
            raise UserError(f"training config: {str(exc).splitlines()[0]}") from None

    def _hf_callbacks(self, progress, log, main: bool, run) -> list:
        cfg = self.cfg
        callbacks = [progress, LogLinesCallback(log)]
        if main and cfg.logging.tensorboard:
            callbacks.append(tensorboard_callback(self.output_dir))
        if run is not None:
            from transformers.integrations import WandbCallback

            callbacks.append(WandbCallback())  # reuses the run start_wandb opened (mode, name, offline dir)
        if cfg.training.early_stopping:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
        trim = MallocTrimCallback.for_this_platform()
        return callbacks + ([trim] if trim else []) + self._callbacks

    def _prepare_model(self, device, log: TrainingLog) -> None:
        """LoRA (and trainable control-token rows) on the base model, seeded so every rank and a resume start
        from the same adapter."""
        from peft import LoraConfig, get_peft_model

        cfg = self.cfg
        if self.model is None:
            self.load_model(device=device)
        if _is_peft(self.model):
            raise UserError(f"{self.model.peft_config[self.model.active_adapter].base_model_name_or_path}: "
                            "model already carries a LoRA adapter; train from the base (model.name)")
        lora = cfg.model.lora
        set_seed(cfg.training.seed)
        peft_config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
            trainable_token_indices={"embed_tokens": CONTROL_TOKEN_IDS} if lora.train_control_tokens else None,
        )
        try:
            self.model = get_peft_model(self.model, peft_config)
        except ValueError as exc:
            raise UserError(f"model.lora: {str(exc).splitlines()[0]}") from None
        # Inference, evaluate and export rebuild the model from the dir alone through this name.
        self.model.peft_config[self.model.active_adapter].base_model_name_or_path = cfg.model.name
        if lora.train_control_tokens and resolve_model_source(cfg.model.name).kind == "offline":
            init_control_token_embeddings(self.model, self.tokenizer)
            log.write(f"control tokens {CONTROL_TOKEN_IDS[0]}-{CONTROL_TOKEN_IDS[-1]}: trainable, started from the "
                      f"mean embedding of their text pieces ({OFFLINE_BASE} has untrained rows there)")
        trainable, total = self.model.get_nb_trainable_parameters()
        log.write(f"model: {cfg.model.name}, LoRA rank {lora.rank} alpha {lora.alpha} on "
                  f"{', '.join(lora.target_modules)}: {trainable:,} trainable of {total:,} parameters")

    def _oom_advice(self, exc: BaseException) -> str:
        t = self.cfg.training
        batch, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
        return (f"out of memory ({type(exc).__name__}) at per_device_train_batch_size={batch}: retry with "
                f"training.per_device_train_batch_size={max(batch // 2, 1)} "
                f"training.gradient_accumulation_steps={accum * 2} (same effective batch), or "
                "--experiment low_memory (batch 2, accumulation 8, gradient checkpointing); "
                f"--resume continues from the last checkpoint in {self.output_dir / CHECKPOINTS_DIR}")

    # ---- saving and using
    def save_model(self, path: str | os.PathLike) -> Path:
        """Adapter (or full weights), tokenizer with our chat template, config.yaml and tools.json: everything
        `inference`, `evaluate` and `export` need to rebuild the model from this dir alone."""
        if self.model is None:
            raise UserError("save_model: no model loaded; call load_model() or train() first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".save-", dir=path) as tmp:
            # The vocabulary is never resized, so peft need not look the base up on the hub to decide.
            self.model.save_pretrained(tmp, **({"save_embedding_layers": False} if _is_peft(self.model) else {}))
            self.tokenizer.save_pretrained(tmp)
            atomic_write_text(Path(tmp) / "config.yaml", to_yaml(self.cfg))
            if self.tools:
                atomic_write_json(Path(tmp) / "tools.json", self.tools)
            if self.copied is not None:
                write_copied_arguments(tmp, self.copied)
            for item in Path(tmp).iterdir():
                if item.name != "README.md":  # peft's empty model-card template
                    os.replace(item, path / item.name)
        return path

    def inference(self, text: str) -> RoutingResult:
        """Route one request (greedy by default, `inference.*` config); see `RoutingResult` for the result."""
        if self.model is None:
            self.load_model()
        if self._router is None:
            tools = self.tools or load_tools(None, self.cfg.data.tools_file)
            self._router = Router(self.model, self.tokenizer, tools, system_prompt=self.cfg.data.system_prompt,
                                  copied=served_copies(self.copied, self.cfg), **inference_options(self.cfg))
        return RoutingResult(self._router.route(text).to_json())


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _refuse_sharded_backends(args: TrainingArguments) -> None:
    from accelerate.utils import DistributedType

    if args.distributed_state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(f"accelerate: {args.distributed_state.distributed_type.value} is not supported (the "
                        "completion loss runs the decoder outside the wrapped forward); use plain multi-GPU "
                        "(DDP): `accelerate launch --multi_gpu --num_processes N main.py train ...`")


def run_training(config, data_path: str | os.PathLike, output_dir: str | os.PathLike, resume: bool = False,
                 overwrite: bool = False) -> Path:
    """The `train` command: train on `data_path` into `output_dir` and return it."""
    cfg = _as_config(config)
    cfg.data.train_file = str(data_path)
    try:
        result = FunctionGemmaTrainer(cfg, output_dir=output_dir, overwrite=overwrite).train(resume=resume)
    except BaseException:
        leave_process_group(wait_for_others=False)
        raise
    leave_process_group()
    return result


def leave_process_group(wait_for_others: bool = True) -> None:
    """End a `torchrun` process's share of the process group before the interpreter exits. Left to exit with the
    group still up, gloo's threads were sometimes still running when it was torn down, and torch aborted the
    process (`terminate called without an active exception`, exit -6): 2 of ~70 two-process test runs. The
    barrier lets every rank finish its last collective first; after an error the other ranks may be gone, so the
    group is only destroyed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_others:
        dist.barrier()
    dist.destroy_process_group()
