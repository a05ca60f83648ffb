"""Shared-prefix training must give HF's own completion-only loss and gradients, or fall back to the plain path."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from src.data_engine.formatter import CONTROL_TOKENS, split_prompt_completion
from src.training.batching import (
    PrefixGroupedBatchSampler,
    SharedPrefixCollator,
    group_batches,
    tokenize_record,
)
from src.training import shared_prefix
from src.training.precision import LowPrecisionFrozenWeights, frozen_projections
from src.training.shared_prefix import IGNORE_INDEX, completion_loss
from src.utils.errors import UserError
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer

SLIDING_WINDOW = 16

TOOLS = [
    {"type": "function", "function": {
        "name": "get_leave_balance", "description": "查询员工假期余额",
        "parameters": {"type": "object", "required": ["employee_name"], "properties": {
            "employee_name": {"type": "string", "description": "员工姓名"},
            "leave_type": {"type": "string", "enum": ["annual", "sick"], "description": "假期类型"}}}}},
    {"type": "function", "function": {
        "name": "get_payslip", "description": "Get an employee's payslip",
        "parameters": {"type": "object", "properties": {"month": {"type": "string"}}}}},
]
OTHER_TOOLS = TOOLS[:1]  # a different developer turn, as distractor augmentation produces


def _record(user: str, tools=TOOLS, call: tuple | None = None, answer: str | None = None) -> dict:
    developer = {"role": "developer",
                 "content": "You are a model that can do function calling with the following functions"}
    if call:
        assistant = {"role": "assistant",
                     "tool_calls": [{"type": "function", "function": {"name": call[0], "arguments": call[1]}}]}
    else:
        assistant = {"role": "assistant", "content": answer}
    return {"messages": [developer, {"role": "user", "content": user}, assistant], "tools": tools}


RECORDS = [
    _record("张三年假", call=("get_leave_balance", {"employee_name": "张三", "leave_type": "annual"})),
    _record("payslip for March please, I need it for the bank", call=("get_payslip", {"month": "2024-03"})),
    _record("hi", answer="Hello! How can I help?"),
    _record("李四还有多少病假？", call=("get_leave_balance", {"employee_name": "李四", "leave_type": "sick"})),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def features(tokenizer):
    cache: dict = {}
    return [tokenize_record(tokenizer, r, 4096, source=f"t.jsonl:{i}", prefix_cache=cache) for i, r in enumerate(RECORDS)]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ tokenization


def test_parts_equal_whole_tokenization_with_one_bos(tokenizer, features):
    for record, feat in zip(RECORDS, features):
        prompt, completion = split_prompt_completion(record["messages"], record["tools"])
        whole = _ids(tokenizer, prompt + completion)
        assert feat["prefix_ids"] + feat["suffix_ids"] == whole
        assert whole.count(tokenizer.bos_token_id) == 1 and whole[0] == tokenizer.bos_token_id
        assert tokenizer.decode(feat["suffix_ids"][-feat["n_completion"]:]) == completion


def test_identical_developer_turns_give_one_prefix(features):
    assert len(features[0]["prefix_ids"]) > SLIDING_WINDOW
    assert all(f["prefix_ids"] is features[0]["prefix_ids"] for f in features)  # held once via prefix_cache
    suffix_lengths = {len(f["suffix_ids"]) for f in features}
    assert len(suffix_lengths) == len(features) and min(suffix_lengths) > SLIDING_WINDOW


def test_too_long_sample_names_the_sample(tokenizer):
    with pytest.raises(UserError, match=r"^data\.jsonl:7: messages: \d+ tokens, over model\.max_seq_length=64"):
        tokenize_record(tokenizer, RECORDS[0], 64, source="data.jsonl:7")


def test_second_bos_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match=r"^x\.jsonl:2: messages: .*exactly one <bos> \(found 2\)"):
        tokenize_record(tokenizer, _record("<bos>年假", answer="好的"), 4096, source="x.jsonl:2")


def test_sample_without_assistant_is_a_user_error(tokenizer):
    record = {"messages": RECORDS[0]["messages"][:2], "tools": TOOLS}
    with pytest.raises(UserError, match=r"^x\.jsonl:3: messages: cannot render"):
        tokenize_record(tokenizer, record, 4096, source="x.jsonl:3")


# ------------------------------------------------------------------------------------------------ batching


def test_labels_mark_exactly_the_completion(tokenizer, features):
    for shared in (True, False):
        batch = SharedPrefixCollator(tokenizer.pad_token_id, shared_prefix=shared)(features)
        assert ("prefix_ids" in batch) is shared
        for row, record in enumerate(RECORDS):
            completion = split_prompt_completion(record["messages"], record["tools"])[1]
            labels = batch["labels"][row]
            mask = labels != IGNORE_INDEX
            assert tokenizer.decode(labels[mask].tolist()) == completion
            assert torch.equal(labels[mask], batch["input_ids"][row][mask])
            assert int(batch["attention_mask"][row].sum()) == len(features[row]["suffix_ids"]) + (
                0 if shared else len(features[row]["prefix_ids"]))


def test_mixed_prefixes_collate_to_full_sequences(tokenizer, features):
    other = tokenize_record(tokenizer, _record("年假", tools=OTHER_TOOLS, answer="好的"), 4096)
    batch = SharedPrefixCollator(tokenizer.pad_token_id)([features[0], other])
    assert "prefix_ids" not in batch
    assert batch["input_ids"][1, :len(other["prefix_ids"])].tolist() == other["prefix_ids"]


def test_group_batches_never_mixes_prefixes_and_is_deterministic():
    keys = [("a",), ("b",), "c"] * 30 + [("a",)] * 7
    lengths = [(i * 37) % 23 for i in range(len(keys))]
    batches = group_batches(keys, lengths, 4, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert all(len({keys[i] for i in b}) == 1 and 1 <= len(b) <= 4 for b in batches)
    assert batches == group_batches(keys, lengths, 4, seed=3, epoch=0)
    assert batches != group_batches(keys, lengths, 4, seed=3, epoch=1)
    assert batches != group_batches(keys, lengths, 4, seed=4, epoch=0)
    sampler = PrefixGroupedBatchSampler(keys, lengths, 4, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) == group_batches(keys, lengths, 4, seed=3, epoch=1)
    assert len(sampler) == len(batches)


def test_group_batches_without_length_grouping_mixes_lengths():
    """Routing data's suffix length tracks the function: unsorted batches must mix lengths (and so functions)."""
    keys, lengths = ["p"] * 64, list(range(64))
    sorted_spans = [max(b) - min(b) for b in group_batches(keys, lengths, 8, seed=0, epoch=0)]
    random_batches = group_batches(keys, lengths, 8, seed=0, epoch=0, by_length=False)
    assert max(sorted_spans) == 7  # indices == lengths: sorted batches are runs of 8 neighbours
    assert sorted(i for b in random_batches for i in b) == list(range(64))
    assert sum(max(b) - min(b) for b in random_batches) / len(random_batches) > 30


def test_group_batches_sorts_lengths_within_a_group():
    keys = ["p"] * 12
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0, 11, 10]
    ordered = group_batches(keys, lengths, 4, seed=0, epoch=0, shuffle=False)
    assert [[lengths[i] for i in b] for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    shuffled = group_batches(keys, lengths, 4, seed=0, epoch=0)
    assert sorted(sorted(lengths[i] for i in b) for b in shuffled) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


# ------------------------------------------------------------------------------------------------ loss and gradients


def _model(tokenizer, kind: str, attn: str, softcap: float | None = 5.0):
    model = make_tiny_model(len(tokenizer), sliding_window=SLIDING_WINDOW)
    # 5.0 is small enough to change the loss, so skipping it would show; None (Gemma 3's own value) takes the
    # head's fast path, which never builds softmax - onehot element by element.
    model.config.final_logit_softcapping = softcap
    model.set_attn_implementation(attn)
    if kind == "peft":
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # non-zero B: gradients reach every matrix
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            trainable_token_indices={"embed_tokens": sorted(CONTROL_TOKENS.values())})
        model = get_peft_model(model, config)
        with torch.no_grad():  # trained token rows, so they differ from the frozen rows they replace
            for name, param in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.add_(torch.randn_like(param))
    model.train()
    return model


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference(model, full_batch):
    """HF's own loss: full-vocabulary logits at every position, labels -100 outside the completion."""
    return model(input_ids=full_batch["input_ids"], attention_mask=full_batch["attention_mask"],
                 labels=full_batch["labels"]).loss


def _assert_same_grads(got: dict, want: dict):
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        assert grad.norm() > 0, name
        assert (got[name] - grad).norm() <= 1e-5 * grad.norm(), name


@pytest.fixture
def small_logit_chunks(monkeypatch, tokenizer):
    """7 rows per lm_head chunk, so the chunk loop runs several times and ends on a partial chunk."""
    monkeypatch.setattr(shared_prefix, "_LOGIT_CHUNK_ELEMENTS", 7 * len(tokenizer))


@pytest.mark.parametrize("softcap", [5.0, None])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["plain", "peft"])
def test_shared_and_plain_paths_equal_hf_loss_and_gradients(tokenizer, features, small_logit_chunks, kind, attn,
                                                            softcap):
    model = _model(tokenizer, kind, attn, softcap)
    shared = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    full = SharedPrefixCollator(tokenizer.pad_token_id, shared_prefix=False)(features)
    assert "prefix_ids" in shared and "prefix_ids" not in full

    want_loss, want_grads = _loss_and_grads(model, lambda: _reference(model, full))
    for batch in (shared, full):
        loss, grads = _loss_and_grads(model, lambda: completion_loss(model, batch)[0])
        assert loss == pytest.approx(want_loss, abs=1e-5)
        _assert_same_grads(grads, want_grads)

    if kind == "peft":
        delta = next(g for n, g in want_grads.items() if "trainable_tokens_delta" in n)
        # 46 only ever appears as input (declarations), 50 only as a target: both sides of the tied head train.
        rows = sorted(CONTROL_TOKENS.values())
        assert delta[rows.index(46)].norm() > 0 and delta[rows.index(50)].norm() > 0


@pytest.mark.parametrize("softcap", [5.0, None])
def test_prefix_without_gradients_trains_through_the_suffix_only(tokenizer, features, small_logit_chunks, softcap):
    """prefix_gradients=False: same loss; gradients are those of a model whose prefix pass is a frozen copy."""
    model = _model(tokenizer, "peft", "eager", softcap)
    batch = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    full_loss, full_grads = _loss_and_grads(model, lambda: completion_loss(model, batch)[0])

    frozen = copy.deepcopy(model).requires_grad_(False)
    causal, batch_size, prefix_len = model.get_base_model(), len(features), batch["prefix_ids"].shape[1]

    def reference():
        cache = DynamicCache(config=causal.config)
        frozen.get_base_model().get_decoder()(input_ids=batch["prefix_ids"], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(batch_size)
        mask = torch.cat([batch["attention_mask"].new_ones(batch_size, prefix_len), batch["attention_mask"]], dim=1)
        positions = torch.arange(prefix_len, prefix_len + batch["input_ids"].shape[1]).expand(batch_size, -1)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX)

    want_loss, want_grads = _loss_and_grads(model, reference)
    loss, grads = _loss_and_grads(model, lambda: completion_loss(model, batch, prefix_gradients=False)[0])
    assert loss == pytest.approx(want_loss, abs=1e-5) and loss == pytest.approx(full_loss, abs=1e-5)
    _assert_same_grads(grads, want_grads)
    differs = [n for n in grads if (grads[n] - full_grads[n]).norm() > 1e-3 * full_grads[n].norm()]
    assert differs  # the prefix's share of the gradient is really gone


def test_prefix_reuse_serves_kept_keys_until_the_refresh_step(tokenizer, features):
    """training.prefix_refresh_steps: within the window the loss is computed on the kept (older) prefix, so it equals
    a fresh pass with the old weights and not one with the new weights; at the refresh step it is fresh again."""
    from src.training.shared_prefix import PrefixReuse

    model = _model(tokenizer, "peft", "eager")
    batch = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    reuse = PrefixReuse(refresh_steps=3)
    old = completion_loss(model, batch, prefix_gradients=False, reuse=reuse)[0].item()
    with torch.no_grad():  # a weight update between steps
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))

    def fresh() -> float:
        return completion_loss(model, batch, prefix_gradients=False)[0].item()

    def stale() -> float:  # the new weights on the suffix, the old prefix keys/values
        loss = completion_loss(model, batch, prefix_gradients=False, reuse=reuse)[0]
        loss.backward()  # the kept tensors have no autograd history: backward works on every reuse
        return loss.item()

    reuse.step = 2
    kept = stale()
    assert reuse.computed == 1 and kept != pytest.approx(fresh(), abs=1e-4) and kept != pytest.approx(old, abs=1e-4)
    assert stale() == pytest.approx(kept, abs=1e-6)  # the suffix pass did not append to the kept keys
    reuse.step = 3
    assert stale() == pytest.approx(fresh(), abs=1e-6) and reuse.computed == 2
    with torch.no_grad():  # evaluation never reuses
        completion_loss(model, batch, prefix_gradients=False, reuse=reuse)
    assert reuse.computed == 2
    per_step = PrefixReuse(refresh_steps=1)  # the default: micro-batches of one optimizer step share the pass
    for step, computed in ((5, 1), (5, 1), (6, 2)):
        per_step.step = step
        completion_loss(model, batch, prefix_gradients=False, reuse=per_step)
        assert per_step.computed == computed
    other = SharedPrefixCollator(tokenizer.pad_token_id)(features[:2])
    other["prefix_ids"] = other["prefix_ids"].clone()
    other["prefix_ids"][0, -1] = 7  # another prefix: computed, not served
    completion_loss(model, other, prefix_gradients=False, reuse=reuse)
    assert reuse.computed == 3


def test_mixed_prefix_batch_gives_reference_loss(tokenizer, features, small_logit_chunks):
    model = _model(tokenizer, "peft", "eager")
    other = tokenize_record(tokenizer, _record("年假", tools=OTHER_TOOLS, answer="好的"), 4096)
    batch = SharedPrefixCollator(tokenizer.pad_token_id)([features[1], other, features[2]])
    assert "prefix_ids" not in batch
    want_loss, want_grads = _loss_and_grads(model, lambda: _reference(model, batch))
    loss, grads = _loss_and_grads(model, lambda: completion_loss(model, batch)[0])
    assert loss == pytest.approx(want_loss, abs=1e-5)
    _assert_same_grads(grads, want_grads)


def test_token_count_and_external_normaliser(tokenizer, features):
    model = _model(tokenizer, "plain", "eager")
    batch = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    with torch.no_grad():
        mean, n_tokens = completion_loss(model, batch)
        summed_over_twice, _ = completion_loss(model, batch, num_items_in_batch=2 * n_tokens)
    assert n_tokens == sum(f["n_completion"] for f in features)
    assert summed_over_twice.item() == pytest.approx(mean.item() / 2, rel=1e-6)


def test_shared_path_refuses_gradient_checkpointing(tokenizer, features):
    model = _model(tokenizer, "peft", "eager")
    model.activation_checkpointing_enable()
    batch = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        completion_loss(model, batch)
    with torch.no_grad():  # evaluation is unaffected: without gradients HF keeps the cache
        assert torch.isfinite(completion_loss(model, batch)[0])


@pytest.mark.parametrize("softcap", [5.0, None])
def test_bf16_autocast_stays_close_to_fp32_and_converts_the_head_once(tokenizer, features, softcap):
    """training.mixed_precision=bf16: the same loss and gradients up to bf16 rounding, with the head's products
    really in bf16 (from one cached copy of the frozen weight, not a conversion per chunk)."""
    model = _model(tokenizer, "peft", "eager", softcap)
    batch = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    want_loss, want = _loss_and_grads(model, lambda: completion_loss(model, batch)[0])
    shared_prefix._FROZEN_COPIES.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_loss, got = _loss_and_grads(model, lambda: completion_loss(model, batch)[0])
    assert got_loss != want_loss and abs(got_loss - want_loss) < 2e-2 * abs(want_loss)
    for name, grad in want.items():
        cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name
    (copy,) = shared_prefix._FROZEN_COPIES.values()
    head = model.get_base_model().get_output_embeddings().token_adapter.base_layer.weight
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, head.detach().bfloat16())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bf16_frozen_weights_give_the_same_autocast_products_and_are_restored(tokenizer, features, attn):
    """training.mixed_precision=bf16 stores the frozen projections in bf16 while training: autocast rounds them the
    same way, so loss and gradients are bit-identical to autocast over fp32 weights; afterwards the fp32 tensors are
    back, untouched."""
    model = _model(tokenizer, "peft", attn, None)
    batch = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    frozen = frozen_projections(model)
    before = [(w.data_ptr(), w.detach().clone()) for w in frozen]
    assert len(frozen) == 7 * model.config.num_hidden_layers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _loss_and_grads(model, lambda: completion_loss(model, batch)[0])
        with LowPrecisionFrozenWeights(model) as low:
            assert low.weights == frozen and {w.dtype for w in frozen} == {torch.bfloat16}
            with low.full_precision():
                assert {w.dtype for w in frozen} == {torch.float32}
            assert {w.dtype for w in frozen} == {torch.bfloat16}
            trainable = {p.dtype for p in model.parameters() if p.requires_grad}
            assert trainable == {torch.float32}
            assert model.get_base_model().get_input_embeddings().token_adapter.base_layer.weight.dtype == torch.float32
            got_loss, got = _loss_and_grads(model, lambda: completion_loss(model, batch)[0])
    assert got_loss == want_loss
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name
    assert all(w.data_ptr() == ptr and torch.equal(w, value) for w, (ptr, value) in zip(frozen, before))


# ------------------------------------------------------------------------------------------------ split attention


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (4, 2)])
def test_split_attention_equals_the_block_mask_and_really_runs(tokenizer, features, monkeypatch, heads, kv_heads):
    """The prefix/own-sample split (prefix_attention) gives the packed block mask's loss and gradients, with grouped
    key/value heads laid out as HF's repeat_kv does (4 heads on 2: a wrong grouping would mix heads), and the split
    function is what actually ran: once per layer, with the model's own attention restored afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from src.training import prefix_attention

    model = make_tiny_model(len(tokenizer), sliding_window=SLIDING_WINDOW, heads=heads, kv_heads=kv_heads)
    model.set_attn_implementation("sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    batch = SharedPrefixCollator(tokenizer.pad_token_id)(features)
    calls = []
    real = ALL_ATTENTION_FUNCTIONS[prefix_attention.NAME]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, prefix_attention.NAME,
                        lambda module, *a, **k: calls.append(module.layer_idx) or real(module, *a, **k))
    for gradients in (True, False):
        want_loss, want = _loss_and_grads(model, lambda: completion_loss(model, batch, prefix_gradients=gradients,
                                                                         split_attention=False)[0])
        assert calls == []
        got_loss, got = _loss_and_grads(model, lambda: completion_loss(model, batch, prefix_gradients=gradients)[0])
        assert calls == [0, 1]
        calls.clear()
        assert got_loss == pytest.approx(want_loss, abs=1e-5)
        _assert_same_grads(got, want)
    assert model.config._attn_implementation == "sdpa"


def test_split_attention_restores_the_model_attention_on_error_and_refuses_other_masks(tokenizer, features):
    from src.training.prefix_attention import NAME, SuffixLayout, _attention, suffix_attention

    model = _model(tokenizer, "plain", "eager")
    with pytest.raises(RuntimeError, match="boom"), suffix_attention(model.config):
        assert model.config._attn_implementation == NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    layer = model.get_decoder().layers[0].self_attn
    q = torch.zeros(1, 2, 3, 32)
    with pytest.raises(TypeError, match="only on shared-prefix suffix batches"):
        _attention(layer, q, q[:, :1], q[:, :1], torch.ones(1, 1, 3, 3, dtype=torch.bool))
    layout = SuffixLayout(prefix=[], slot=torch.arange(3), batch=1, width=3, blocked=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no dropout or logit softcapping"):
        _attention(layer, q, q[:, :1], q[:, :1], layout, softcap=50.0)
