"""FunctionGemmaTrainer end to end on the tiny model: what it learns, what it writes, and how it fails."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from src.data_engine.formatter import ACTIVATION_SENTENCE, CONTROL_TOKENS, normalize_tools, split_prompt_completion
from src.training.batching import SharedPrefixCollator, tokenize_record
from src.training.shared_prefix import completion_loss
from src.training.trainer import (CONTROL_TOKEN_IDS, CompletionTrainer, FunctionGemmaTrainer, RoutingResult,
                                  apply_auto_preset, check_output_dir, init_control_token_embeddings,
                                  last_complete_checkpoint, pick_preset, token_rows_merged)
from src.utils.errors import UserError
from src.utils.io import atomic_write_jsonl
from tests.tiny_model import make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "send_email", "description": "Send an email", "parameters": {
        "type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]}}},
]
PROJECT = Path(__file__).resolve().parents[1]
CITIES = ["Paris", "Berlin", "Tokyo", "Rome", "Oslo", "Lima", "Cairo", "Delhi"]
PEOPLE = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]


def record(query: str, name: str, arguments: dict) -> dict:
    return {"messages": [{"role": "developer", "content": ACTIVATION_SENTENCE}, {"role": "user", "content": query},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                             "name": name, "arguments": arguments}}]}],
            "tools": TOOLS}


def two_tool_records() -> list[dict]:
    return ([record(f"weather in {c}?", "get_weather", {"city": c}) for c in CITIES]
            + [record(f"mail {p} now", "send_email", {"to": p}) for p in PEOPLE])


def tiny_config(model_dir: Path, data_file: Path | None = None, **training) -> dict:
    """Small and fast: rank-4 LoRA on two projections, no TensorBoard/W&B unless a test turns them on."""
    return {
        "model": {"name": str(model_dir), "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"eval_split": 0.25, **({"train_file": str(data_file)} if data_file else {})},
        "training": {"epochs": 2, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 1, "logging_steps": 1,
                     "sample_generations": 1, **training},
        "logging": {"tensorboard": False},
        "inference": {"max_new_tokens": 8},
    }


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    return atomic_write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", two_tool_records())


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- training


def test_loss_goes_down_and_the_dir_holds_a_loadable_model(tiny_dir, data_file, tmp_path):
    out = tmp_path / "model"
    cfg = tiny_config(tiny_dir, data_file, epochs=3, learning_rate=2e-2)
    cfg["logging"]["tensorboard"] = True
    trainer = FunctionGemmaTrainer(cfg, output_dir=out)
    assert trainer.train() == out

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_losses = [e["loss"] for e in history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(train_losses) == 9 and train_losses[-1] < train_losses[0] - 0.3
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0]
    assert all("eval_routing_accuracy" in e for e in history if "eval_loss" in e)

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json",
            "config.yaml", "tools.json", "training_log.txt", "loss_curve.png", "runs"} <= names
    assert "checkpoints" not in names and "README.md" not in names
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    assert json.loads((out / "tools.json").read_text()) == TOOLS
    # every city and person is written as the request writes it: both keys are served as copies
    assert json.loads((out / "copied_arguments.json").read_text()) == {"get_weather": ["city"], "send_email": ["to"]}
    assert OmegaConf.load(out / "config.yaml").training.learning_rate == 2e-2
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "training_log.txt").read_text()
    assert "step 9/9" in log and "eval_loss" in log and "sample generations" in log
    saved = load_file(out / "adapter_model.safetensors")
    assert any("trainable_tokens_delta" in k for k in saved)  # control-token rows travel with the adapter

    # The guide's flow: a fresh trainer loads the dir alone and routes with it, same answer as the trained one.
    reloaded = FunctionGemmaTrainer(tiny_config(tiny_dir))
    reloaded.load_model(out)
    assert reloaded.tools == normalize_tools(TOOLS)
    assert reloaded.inference("weather in Oslo?") == trainer.inference("weather in Oslo?")


def test_eval_routing_accuracy_is_what_greedy_decoding_writes(tmp_path):
    """The eval pass scores routing by teacher-forced argmax, which must be exactly greedy decoding: targets equal to
    the model's own greedy output are all hits; a target changed at position k is a miss from k on, and counts as
    routed only when k is past its route tokens."""
    tok = make_tiny_tokenizer()
    model = make_tiny_model(len(tok)).eval()
    feature = tokenize_record(tok, record("weather in Oslo?", "get_weather", {"city": "Oslo"}), 4096)
    prompt = list(feature["prefix_ids"]) + list(feature["suffix_ids"][:-feature["n_completion"]])
    greedy = []
    with torch.no_grad():
        for _ in range(12):
            greedy.append(int(model(torch.tensor([prompt + greedy])).logits[0, -1].argmax()))

    def case(changed_at: int | None) -> dict:
        target = list(greedy)
        if changed_at is not None:
            target[changed_at] = (target[changed_at] + 1) % len(tok)
        return {"prefix_ids": feature["prefix_ids"], "suffix_ids": prompt[len(feature["prefix_ids"]):] + target,
                "n_completion": len(target), "n_route": 5}

    cases = [case(None), case(8), case(2), case(None)]
    hits: list[torch.Tensor] = []
    with torch.no_grad():
        completion_loss(model, SharedPrefixCollator(tok.pad_token_id)(cases), hits=hits)
    assert [int(h.long().cumprod(0).sum()) for h in hits] == [12, 8, 2, 12]

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none", use_cpu=True)
    hf = CompletionTrainer(model=model, args=args, eval_dataset=cases,
                           data_collator=SharedPrefixCollator(tok.pad_token_id))
    metrics = hf.evaluate()
    assert metrics["eval_routing_accuracy"] == pytest.approx(3 / 4)
    assert metrics["eval_exact_call_accuracy"] == pytest.approx(2 / 4)


def test_route_length_ends_at_the_function_name(tiny_dir):
    tok = make_tiny_tokenizer()
    call = tokenize_record(tok, record("weather in Oslo?", "get_weather", {"city": "Oslo"}), 4096)
    completion = call["suffix_ids"][-call["n_completion"]:]
    assert tok.decode(completion[:call["n_route"]]) == "<start_function_call>call:get_weather{"
    answer = {"messages": [{"role": "developer", "content": ACTIVATION_SENTENCE}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "Hello!"}], "tools": TOOLS}
    assert tokenize_record(tok, answer, 4096)["n_route"] == 1


def test_labels_are_exactly_the_completion_tokens(tiny_dir, data_file, tmp_path):
    """Through load_dataset, the prefix-grouped sampler and the collator, on both paths: every training sample's
    loss targets decode to its completion, each sample once per epoch."""
    trainer = FunctionGemmaTrainer(tiny_config(tiny_dir, per_device_train_batch_size=3))
    trainer.load_dataset(data_file)
    tok = trainer.tokenizer
    expected = Counter(split_prompt_completion(r["messages"], r["tools"])[1] for r in two_tool_records())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none", use_cpu=True)
    for shared in (True, False):
        hf = CompletionTrainer(model=make_tiny_model(len(tok)), args=args, train_dataset=trainer.train_features,
                               data_collator=SharedPrefixCollator(tok.pad_token_id, shared_prefix=shared))
        seen = Counter()
        for batch in hf.get_train_dataloader():
            assert ("prefix_ids" in batch) == shared
            if shared:
                assert tok.decode(batch["prefix_ids"][0]).startswith("<bos><start_of_turn>developer\n")
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                kept = labels[labels != -100]
                assert torch.equal(kept, ids[labels != -100])
                seen[tok.decode(kept)] += 1
        assert len(seen) > 0 and seen <= expected and sum(seen.values()) == len(trainer.train_features)


def test_early_stopping_keeps_the_best_checkpoint(tiny_dir, tmp_path):
    """Eval asks for send_email where training teaches get_weather on the same queries: the shared call syntax
    makes eval loss fall at first, then the conflicting targets make it rise and patience 1 stops the run."""
    train = [record(f"weather in {c}?", "get_weather", {"city": c}) for c in CITIES]
    evals = [record(f"weather in {c}?", "send_email", {"to": c}) for c in ("Paris", "Rome")]
    train_file = atomic_write_jsonl(tmp_path / "train.jsonl", train)
    eval_file = atomic_write_jsonl(tmp_path / "eval.jsonl", evals)
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = trainable_weights(model)

    max_epochs = 20
    trainer = FunctionGemmaTrainer(tiny_config(tiny_dir, epochs=max_epochs, learning_rate=2e-2, warmup_ratio=0.0,
                                               sample_generations=0, early_stopping=True, early_stopping_patience=1),
                                   output_dir=tmp_path / "out")
    trainer.add_callback(Snapshot())
    trainer.load_dataset(train_file, eval_path=eval_file)
    trainer.train()

    evals_logged = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    best_step, best_loss = min(evals_logged, key=lambda e: e[1])
    assert trainer.state.epoch < max_epochs
    assert evals_logged[-1][1] > best_loss and evals_logged[-2][0] == best_step  # stopped at the first rise
    assert trainer.state.best_global_step == best_step
    final = trainable_weights(trainer.model)
    assert all(torch.equal(final[n], snapshots[best_step][n]) for n in final)
    assert not all(torch.equal(final[n], snapshots[evals_logged[-1][0]][n]) for n in final)


def test_gradient_checkpointing_trains_on_the_plain_path(tiny_dir, data_file, tmp_path):
    cfg = tiny_config(tiny_dir, data_file, max_steps=1, sample_generations=0)
    cfg["model"]["lora"]["use_gradient_checkpointing"] = True
    out = FunctionGemmaTrainer(cfg, output_dir=tmp_path / "gc").train()
    assert OmegaConf.load(out / "config.yaml").training.shared_prefix is False
    assert "gradient checkpointing on" in (out / "training_log.txt").read_text()


def test_bf16_mixed_precision_trains_with_bf16_products(tiny_dir, data_file, tmp_path, monkeypatch):
    """training.mixed_precision=bf16 reaches the loss (autocast on, frozen projections held in bf16), it still
    learns, and the model is fp32 again afterwards."""
    from src.training import shared_prefix
    from src.training.precision import frozen_projections

    seen = []
    real = shared_prefix._head_cross_entropy
    def frozen_dtype(causal_lm):
        return next(m.weight.dtype for m in causal_lm.get_decoder().modules()
                    if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)

    monkeypatch.setattr(shared_prefix, "_head_cross_entropy", lambda *a, **k: seen.append(
        (torch.is_autocast_enabled("cpu"), frozen_dtype(a[0]))) or real(*a, **k))
    cfg = tiny_config(tiny_dir, data_file, epochs=3, learning_rate=2e-2, mixed_precision="bf16")
    trainer = FunctionGemmaTrainer(cfg, output_dir=tmp_path / "bf16")
    out = trainer.train()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert seen and set(seen) == {(True, torch.bfloat16)} and losses[-1] < losses[0] - 0.3
    assert len(frozen_projections(trainer.model)) == 7 * 2  # tiny model: 2 layers, all fp32 again
    assert "sample generations" in (out / "training_log.txt").read_text()


def test_auto_preset_follows_dataset_size(tiny_dir, data_file, tmp_path):
    assert [pick_preset(n) for n in (1, 999, 1000, 9999, 10000)] == ["small", "small", "medium", "medium", "large"]
    cfg, name = apply_auto_preset(OmegaConf.create(tiny_config(tiny_dir)), 20000)
    assert name == "large" and cfg.training.learning_rate == 5e-5 and cfg.model.lora.rank == 32
    assert cfg.training.per_device_train_batch_size == 16 and cfg.training.epochs == 2

    out = FunctionGemmaTrainer(tiny_config(tiny_dir, data_file, auto_preset=True, max_steps=1, sample_generations=0),
                               output_dir=tmp_path / "preset").train()
    saved = OmegaConf.load(out / "config.yaml")
    assert (saved.training.epochs, saved.training.learning_rate, saved.model.lora.rank) == (5, 1e-4, 8)
    assert "auto preset: small (16 samples)" in (out / "training_log.txt").read_text()


def test_out_of_memory_becomes_advice(tiny_dir, data_file, tmp_path):
    class RunOutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer = FunctionGemmaTrainer(tiny_config(tiny_dir, data_file), output_dir=tmp_path / "oom")
    trainer.add_callback(RunOutOfMemory())
    with pytest.raises(UserError) as err:
        trainer.train()
    message = str(err.value)
    assert "per_device_train_batch_size=2" in message and "gradient_accumulation_steps=2" in message
    assert "low_memory" in message and "--resume" in message


def test_wandb_goes_offline_without_a_login(tiny_dir, data_file, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tiny_dir, data_file, max_steps=2, sample_generations=0)
    cfg["logging"]["wandb"] = {"enabled": True, "project": "test"}
    out = FunctionGemmaTrainer(cfg, output_dir=tmp_path / "wb").train()
    runs = list((tmp_path / "wandb_root" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert f"wandb sync {runs[0]}" in (out / "training_log.txt").read_text()


# ------------------------------------------------------------------------------------------- inputs and dirs


def test_output_dir_rules(tmp_path):
    out = tmp_path / "model"
    assert check_output_dir(out, resume=False, overwrite=False) is None
    out.mkdir()
    assert check_output_dir(out, resume=False, overwrite=False) is None  # empty is fine
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        check_output_dir(out, resume=False, overwrite=False)
    assert check_output_dir(out, resume=False, overwrite=True) is None
    with pytest.raises(UserError, match="training already finished"):
        check_output_dir(out, resume=True, overwrite=False)
    with pytest.raises(UserError, match="pass one of them"):
        check_output_dir(out, resume=True, overwrite=True)


def test_non_empty_output_dir_is_left_untouched(tiny_dir, data_file, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        FunctionGemmaTrainer(tiny_config(tiny_dir, data_file), output_dir=out).train()
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_resume_skips_a_half_written_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step, state in ((2, "{}"), (4, "{}"), (6, '{"trunc')):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (ckpts / "checkpoint-8").mkdir()  # killed before its trainer_state.json was written
    assert last_complete_checkpoint(ckpts) == ckpts / "checkpoint-4"
    assert check_output_dir(tmp_path, resume=True, overwrite=False) == ckpts / "checkpoint-4"


def test_empty_data_is_a_user_error(tiny_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        FunctionGemmaTrainer(tiny_config(tiny_dir)).load_dataset(empty)


def test_early_stopping_without_eval_split_is_refused(tiny_dir, data_file, tmp_path):
    cfg = tiny_config(tiny_dir, data_file, early_stopping=True)
    cfg["data"]["eval_split"] = 0.0
    with pytest.raises(UserError, match="data.eval_split"):
        FunctionGemmaTrainer(cfg, output_dir=tmp_path / "x").train()


# ----------------------------------------------------------------------------------------------- pieces


def test_routing_result_answers_the_guides_membership_check():
    call = RoutingResult({"kind": "calls", "tool_calls": [{"name": "get_leave_balance", "arguments": {}}]})
    assert "get_leave_balance" in call and "request_leave" not in call and None not in call
    assert "tool_calls" in call and call["tool_calls"][0]["name"] == "get_leave_balance"
    text = RoutingResult({"kind": "text", "text": "Hello"})
    assert None in text and "get_leave_balance" not in text
    assert None not in RoutingResult({"kind": "malformed", "error": "x", "text": "<escape>"})


def test_control_token_rows_start_from_their_text_pieces(tiny_dir):
    from peft import LoraConfig, get_peft_model

    tok = make_tiny_tokenizer()
    model = get_peft_model(make_tiny_model(len(tok)), LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": CONTROL_TOKEN_IDS}))
    base = model.get_input_embeddings().token_adapter.base_layer.weight
    before = base.detach().clone()
    init_control_token_embeddings(model, tok)

    rows = model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    for row, (text, idx) in zip(rows, sorted(CONTROL_TOKENS.items(), key=lambda kv: kv[1])):
        pieces = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert len(pieces) > 1 and idx not in pieces
        assert torch.allclose(row, before[pieces].mean(dim=0))
    assert torch.equal(base, before)
    # Tied weights: the lm_head scores a control token with the same new row.
    head = model.get_output_embeddings()
    hidden = torch.randn(1, base.shape[1])
    assert torch.allclose(head(hidden)[0, CONTROL_TOKEN_IDS], hidden @ rows.T, atol=1e-5)


def test_cloud_script_trains_detached_from_the_terminal(tiny_dir, data_file, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(data_file), "OUTPUT": str(tmp_path / "model"),
           "LOG_DIR": str(tmp_path / "logs")}
    started = subprocess.run(
        ["bash", str(PROJECT / "scripts" / "run_cloud_train.sh"), "exp_hr_routing", f"model.name={tiny_dir}",
         "model.lora.rank=4", "training.max_steps=1", "data.eval_split=0", "logging.tensorboard=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    pid = int(re.search(r"pid (\d+)", started).group(1))
    log = next((tmp_path / "logs").glob("exp_hr_routing_*.log"))
    assert f"tail -f {log}" in started
    deadline = time.monotonic() + 120
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] != [b"main.py"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)  # the forked shell is still on its way through setsid -> nohup -> python
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session: closing the terminal sends it no SIGHUP
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "model saved" in log.read_text()
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()


def test_sample_generations_with_merged_token_rows_route_alike_and_restore_the_rows():
    """The epoch-end sample generations merge the trained control-token rows for speed: same tokens as the unmerged
    peft model, and the embedding's original rows are back bit for bit afterwards."""
    from peft import LoraConfig, get_peft_model

    from src.evaluation.router import Router

    tokenizer = make_tiny_tokenizer()
    model = get_peft_model(make_tiny_model(len(tokenizer)), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        trainable_token_indices={"embed_tokens": CONTROL_TOKEN_IDS}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    weight = model.get_input_embeddings().token_adapter.base_layer.weight
    before = weight.detach().clone()
    queries = ["查询张三的年假", "hello there", "Bob wants leave on Friday"]

    def generate():
        router = Router(model, tokenizer, TOOLS, draft=True, constrain=True, max_new_tokens=12)
        return [router.generate_ids(router.encode(router.render(q)))[0] for q in queries]

    want = generate()
    with token_rows_merged(model):
        assert model.get_input_embeddings().token_adapter.merged
        assert not torch.equal(weight, before)
        got = generate()
    assert got == want
    assert not model.get_input_embeddings().token_adapter.merged and torch.equal(weight, before)
