"""Route one user query to a function call with a PyTorch model, reusing the KV cache of the shared developer turn.

Every query of a catalog starts with the same `<bos>` + developer turn (~1.3k tokens with the 10 HR declarations,
~97% of the prompt), so the router runs it through the model once and each query only prefills its short user turn.
The decoding loop is our own (not `generate`) so the cached prefix can be reused and the timing split into prefill
and decode; greedy by default, which the tests hold equal to `model.generate` token for token. With `draft=True`
the grammar's forced tokens are verified in one forward pass each step (src/evaluation/draft.py): same greedy tokens,
fewer sequential steps. With `constrain=True` greedy calls keep to the catalog's names, keys and enum values
(src/evaluation/constrain.py); drafts are then verified against the constrained choice, so drafting still changes
only the number of steps. `route_many` decodes many queries at once, packed into one row per forward pass
(src/evaluation/batch_decode.py): what `evaluate` and export's reference use.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import DynamicCache

from src.data_engine.copied_arguments import read_copied_arguments
from src.data_engine.formatter import (
    CALL_OPEN, normalize_tools, parse_output, render_conversation, routing_messages, split_shared_prefix, STOP_STRINGS,
)
from src.evaluation.argmax_head import ScreenedArgmax
from src.evaluation.batch_decode import PackedGreedy, token_log_probs
from src.evaluation.constrain import CatalogConstraint, scores_of, tokenizer_table
from src.evaluation.draft import CallDrafter
from src.evaluation.optional_rescore import rescore
from src.utils.config_schema import EvaluationConfig
from src.utils.errors import UserError
from src.utils.io import read_json


@dataclass
class RouteResult:
    kind: str  # "calls" | "text" | "malformed"
    calls: list[dict]
    text: str
    raw: str
    latency_ms: float
    n_prompt_tokens: int
    n_new_tokens: int
    error: str | None = None
    timings: dict = field(default_factory=dict, repr=False)  # prefill/decode ms, prefill tokens, forward steps

    def to_json(self, raw: bool = False) -> dict:
        """What `inference` prints and `FunctionGemmaTrainer.inference` returns."""
        if self.kind == "calls":
            calls = [{"name": c["name"], "arguments": c["arguments"]} for c in self.calls]
            out = {"kind": "calls", "tool_calls": calls}
        elif self.kind == "text":
            out = {"kind": "text", "text": self.text}
        else:
            out = {"kind": "malformed", "error": self.error, "text": self.text}
        if raw:
            out["raw"] = self.raw
        return out


def config_value(config, key: str, default):
    """Read `a.b` from an OmegaConf/dict config (or None) without requiring every key."""
    node = config
    for part in key.split("."):
        if node is None:
            return default
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


def render_prompt(user_content: str, tools: list[dict], system_prompt: str | None = None) -> str:
    return render_conversation(routing_messages(user_content, system_prompt), tools, add_generation_prompt=True)


def check_user_content(user_content) -> str:
    if not isinstance(user_content, str) or not user_content.strip():
        raise UserError(f"user_content: expected a non-empty string, got {user_content!r:.40}")
    return user_content


def load_tools(model_ref: str | Path | None, tools_file: str | Path | None) -> list[dict]:
    """The catalog: `--tools` if given, else MODEL/tools.json; both given must describe the same functions."""
    home = _model_home(model_ref)
    bundled = home / "tools.json" if home is not None and (home / "tools.json").is_file() else None
    if tools_file is None and bundled is None:
        raise UserError(f"{model_ref}: no tools.json beside the model; pass the catalog with --tools FILE")
    tools = _read_tools(tools_file or bundled)
    if tools_file is not None and bundled is not None:
        trained = _read_tools(bundled)
        if trained != tools:
            raise UserError(f"{tools_file}: tools do not match the catalog the model was trained on ({bundled}): "
                            f"{_catalog_diff(trained, tools)}")
    return tools


def _model_home(model_ref) -> Path | None:
    """The directory whose tools.json and config.yaml belong to the model (a .gguf file's own folder)."""
    path = Path(str(model_ref)) if model_ref is not None else None
    if path is not None and path.is_dir():
        return path
    return path.parent if path is not None and path.suffix == ".gguf" else None


def _read_tools(path) -> list[dict]:
    data = read_json(path)
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON list of tools")
    try:
        return normalize_tools(data)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


def _catalog_diff(trained: list[dict], given: list[dict]) -> str:
    a, b = {t["name"]: t for t in trained}, {t["name"]: t for t in given}
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        return f"missing {missing}, extra {extra}"
    changed = [name for name in a if a[name] != b[name]]
    return f"{changed[0]!r} differs" if changed else "function order differs"


class BaseRouter:
    """What both runtimes (`Router` here, `GgufRouter` over llama.cpp) do alike around their own decoding loops:
    render and route a query, and decide per call whether drafts and the catalog constraint apply."""

    batch_size = 1  # queries routed together by `route_many`; this default routes them one by one
    rescore_optional = False  # greedy calls' optional arguments judged by the whole call's probability

    def render(self, user_content: str) -> str:
        return render_prompt(user_content, self.tools, self.system_prompt)

    def _greedy_aids(self, use_draft: bool | None, use_constrain: bool | None) -> tuple[bool, bool]:
        """(drafted, constrained) for one call: the router's settings unless overridden, greedy decoding only.
        The constraint's token table is built on its first use."""
        greedy = self.temperature <= 0
        drafted = (self.drafter is not None if use_draft is None else use_draft) and greedy
        constrained = (self.constrainer is not None if use_constrain is None else use_constrain) and greedy
        if constrained and self.constrainer is None:
            self.constrainer = self._constraint()
        return drafted, constrained

    def _bound_constraint(self, request: str, constrained: bool):
        """The catalog constraint bound to `request` (its copied arguments are pieces of it), or None."""
        return self.constrainer.for_source(request) if constrained else None

    def _rescored(self, prompts: list[list[int]], raws: list[str], use_rescore: bool | None = None,
                  use_cache: bool = True) -> list[str]:
        """Greedy outputs with the optional arguments that make their call less probable left out
        (src/evaluation/optional_rescore.py), scored with or without the prefix cache; sampled outputs as they are."""
        wanted = self.rescore_optional if use_rescore is None else use_rescore
        if not (wanted and self.temperature <= 0):
            return raws
        return rescore(prompts, raws, self.tools, self.encode, lambda items: self._log_likelihoods(items, use_cache))

    def decoding(self) -> dict:
        """How tokens are chosen by default; drafts, the catalog constraint and the rescoring of optional arguments
        act on greedy decoding only."""
        greedy = self.temperature <= 0
        out = {"temperature": float(self.temperature), "constrain": greedy and self.constrainer is not None,
               "draft": greedy and self.drafter is not None,
               "rescore_optional": greedy and self.rescore_optional}
        if out["constrain"] and self.copied:
            out["copied_arguments"] = {name: sorted(keys) for name, keys in sorted(self.copied.items())}
        return out

    def route(self, user_content: str, use_prefix_cache: bool | None = None, use_draft: bool | None = None,
              use_constrain: bool | None = None, use_rescore: bool | None = None) -> RouteResult:
        check_user_content(user_content)
        t0 = time.perf_counter()
        prompt_ids = self.encode(self.render(user_content))
        new, timings = self.generate_ids(prompt_ids, use_prefix_cache, use_draft, draft_source=user_content,
                                         use_constrain=use_constrain)
        if self.drafter is not None and self.temperature <= 0:
            self.drafter.remember(new)  # later queries' drafts may be looked up in it (lookup_draft.py)
        raw = self._rescored([prompt_ids], [self.decode(new)], use_rescore,
                             self.prefix_cache if use_prefix_cache is None else use_prefix_cache)[0]
        parsed = parse_output(raw)
        latency = (time.perf_counter() - t0) * 1e3
        return RouteResult(parsed.kind, parsed.calls, parsed.text, raw, latency, len(prompt_ids), len(new),
                           parsed.error, timings)

    def route_many(self, queries: list[str], batch_size: int | None = None, progress=None) -> list[RouteResult]:
        """One `route` per query, in order; `progress(n)` is called as each n more are done."""
        results = []
        for query in queries:
            results.append(self.route(query))
            if progress is not None:
                progress(1)
        return results

    def _chunk_results(self, prompts: list[list[int]], new: list[list[int]], timings: dict,
                       t0: float) -> list[RouteResult]:
        """The results of a chunk decoded together since `t0` (perf_counter): `new` ids after each prompt's ids.
        Each latency is the chunk's wall time, parsing included, divided by its rows."""
        raws = self._rescored(prompts, [self.decode(ids) for ids in new])
        parsed = [parse_output(raw) for raw in raws]
        share = (time.perf_counter() - t0) * 1e3 / len(new)
        timings = {**timings, "batched": True, "batch_rows": len(new), "cached_prefix": True}
        return [RouteResult(p.kind, p.calls, p.text, raw, share, len(prompt), len(ids), p.error,
                            {**timings, "prefill_tokens": len(prompt) - len(self.prefix_ids)})
                for prompt, ids, raw, p in zip(prompts, new, raws, parsed)]


class Router(BaseRouter):
    """Prompt → call with one model and one catalog; the prefix KV cache is built once, when the router is made."""

    runtime = "pytorch"

    def __init__(self, model, tokenizer, tools, system_prompt: str | None = None, prefix_cache: bool = True,
                 max_new_tokens: int = 96, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, draft: bool = False, constrain: bool = False,
                 batch_size: int = EvaluationConfig.batch_size, copied: dict[str, list[str]] | None = None,
                 rescore_optional: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.rescore_optional = rescore_optional
        self.tools = normalize_tools(tools)
        self.copied = copied or {}  # keys whose values the constraint keeps to pieces of the request
        self.system_prompt = system_prompt
        self.prefix_cache = prefix_cache
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.batch_size = batch_size
        self.stop_ids = self._stop_ids(tokenizer)
        self.drafter = CallDrafter(self.tools) if draft else None
        self.call_open_id = tokenizer.convert_tokens_to_ids(CALL_OPEN)
        self.constrainer = self._constraint() if constrain else None
        prefix, _ = split_shared_prefix(self.render("x"))
        self.prefix_ids = self.encode(prefix)
        self._prefix_kv: DynamicCache | None = None
        self._packed: PackedGreedy | None = None  # route_many's own prefix pass, made on its first use
        if prefix_cache:
            self._prefix()  # built now so that the first query's latency is like every other's

    @staticmethod
    def _stop_ids(tokenizer) -> set[int]:
        ids = set()
        for token in STOP_STRINGS:
            idx = tokenizer.convert_tokens_to_ids(token)
            if idx is None or idx == tokenizer.unk_token_id:
                raise UserError(f"tokenizer: no {token} token; this is not a FunctionGemma-format tokenizer")
            ids.add(idx)
        return ids

    @classmethod
    def from_model_dir(cls, path_or_name, tools_file=None, config=None) -> "Router":
        """Load a model dir (adapter or merged) or model name with the catalog it was trained on."""
        from src.utils.model_loader import load_model, resolve_model_source

        resolve_model_source(path_or_name)  # a missing dir fails here, before the catalog is looked for
        tools = load_tools(path_or_name, tools_file)
        model, tokenizer = load_model(str(path_or_name), dtype=config_value(config, "model.dtype", "auto"))
        if hasattr(model, "merge_and_unload"):  # a LoRA adapter: fold it in once, decoding is then plain matmuls
            model = model.merge_and_unload()
        return cls(model, tokenizer, tools, system_prompt=trained_system_prompt(path_or_name, config),
                   batch_size=batch_size_of(config), copied=copied_arguments_of(path_or_name, config),
                   **inference_options(config))

    def close(self) -> None:
        """Drop the prefix cache (the model itself is the caller's); GgufRouter frees llama.cpp here."""
        self._prefix_kv = self._packed = None

    def _constraint(self) -> CatalogConstraint:
        """Made with the router (the token table takes ~0.5 s for Gemma, once per tokenizer) or on first use."""
        table = tokenizer_table(self.tokenizer, int(self.model.config.vocab_size))
        return CatalogConstraint(self.tools, table, self.copied)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefix(self) -> DynamicCache:
        if self._prefix_kv is None:
            kv = DynamicCache(config=self.model.config)  # sliding layers keep only their window, as in generate
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([self.prefix_ids]), cache=kv, use_cache=True, logits_to_keep=1)
            self._prefix_kv = kv
        return self._prefix_kv

    def _fresh_cache(self) -> DynamicCache:
        """A private copy of the prefix cache: decoding appends to (and slides) the cache it is given."""
        return copy.deepcopy(self._prefix())

    def _pick(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(logits.argmax())
        logits = logits / self.temperature
        if self.top_k and self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @torch.inference_mode()
    def _log_likelihoods(self, items: list[tuple[list[int], list[int], int]], use_cache: bool = True) -> list[float]:
        """optional_rescore's scores: packed on the shared prefix's cache when the prompts start with it, else one by
        one over the whole prompt."""
        n = len(self.prefix_ids)
        if use_cache and self.prefix_cache and all(p[:n] == self.prefix_ids and len(p) > n for p, _, _ in items):
            return self._packed_greedy().log_likelihoods([(p[n:], c, first) for p, c, first in items])
        scores = []
        for prompt, completion, first in items:
            ids = prompt + completion
            keep = len(completion) - first + 1  # logits from the token before completion[first] on
            logits = self.model(input_ids=torch.tensor([ids]), logits_to_keep=keep).logits[0, :-1].float()
            scores.append(float(token_log_probs(logits, torch.tensor(completion[first:])).sum()))
        return scores

    def _decode_plain(self, kv: DynamicCache, logits: torch.Tensor, constraint) -> tuple[list[int], int]:
        new, steps = [], 0
        while True:
            row = logits[0, -1].float()
            token = self._pick(row)
            new.append(constraint.pick(new, token, scores_of(row.numpy())) if constraint is not None else token)
            if new[-1] in self.stop_ids or len(new) >= self.max_new_tokens:
                return new, steps
            logits = self.model(input_ids=torch.tensor([new[-1:]]), cache=kv, use_cache=True).logits
            steps += 1

    def _decode_drafted(self, kv: DynamicCache, logits: torch.Tensor, source: str,
                        constraint) -> tuple[list[int], int]:
        """Greedy decoding that verifies the grammar's draft with each step (see draft.py); same tokens, fewer steps.

        A drafted token is kept when it is the token plain decoding would choose there (constrained or not); the
        choice is made position by position, up to the first mismatch. The rejected part of a draft is cropped from
        the cache; sliding layers must record their past for that.
        """
        kv.activate_past_recording()
        new, steps = [], 0
        row = logits[0, -1].float()
        token = int(row.argmax())
        if constraint is not None:
            token = constraint.pick(new, token, scores_of(row.numpy()))
        while True:
            new.append(token)
            if token in self.stop_ids or len(new) >= self.max_new_tokens:
                return new, steps
            draft = self.drafter.draft_ids(new, self.call_open_id, self.encode, self.decode, source)
            draft = draft[: self.max_new_tokens - len(new)]
            among = [constraint.among(new + draft[:i]) for i in range(len(draft) + 1)] \
                if constraint is not None and self._screened_head is not None else None  # the screened head's
            best, logits_at = self._verify([token, *draft], kv, among)
            steps += 1
            accepted = 0
            while True:
                token = constraint.pick(new, best[accepted], logits_at(accepted)) if constraint is not None \
                    else best[accepted]
                if accepted == len(draft) or token != draft[accepted]:
                    break
                new.append(token)
                accepted += 1
                if token in self.stop_ids or len(new) >= self.max_new_tokens:
                    return new, steps
            kv.crop(-(len(draft) - accepted))

    @cached_property
    def _screened_head(self) -> ScreenedArgmax | None:
        """Made on first use (a drafted step, `route_many`): it keeps a bf16 copy of the output layer (~335 MB for
        Gemma)."""
        return ScreenedArgmax.for_model(self.model)

    def _verify(self, tokens: list[int], kv: DynamicCache, among: list | None = None) -> tuple[list[int], object]:
        """Greedy next token after each of `tokens` (fed in one pass); bf16-screened head when the model allows.

        Also returns `logits_at(i)`, the logits of position i for a constrained choice: with the screened head only
        the rows and tokens asked for are computed in fp32, and a position's argmax is taken `among` the tokens the
        constraint allows there (CatalogConstraint.among; None where it allows any).
        """
        if self._screened_head is not None:
            hidden = self.model.get_decoder()(input_ids=torch.tensor([tokens]), cache=kv, use_cache=True)
            rows, weight = hidden.last_hidden_state[0].float(), self._screened_head.weight

            def logits_at(i):
                def logits(ids):
                    return (weight @ rows[i] if ids is None else weight[torch.from_numpy(ids)] @ rows[i]).numpy()
                return logits

            return self._screened_head(rows, among), logits_at
        out = self.model(input_ids=torch.tensor([tokens]), cache=kv, use_cache=True, logits_to_keep=len(tokens))
        rows = out.logits[0].float()
        return rows.argmax(-1).tolist(), lambda i: scores_of(rows[i].numpy())

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], use_prefix_cache: bool | None = None,
                     use_draft: bool | None = None, draft_source: str = "",
                     use_constrain: bool | None = None) -> tuple[list[int], dict]:
        """Decode from prompt ids until a stop token; returns new ids (stop token included) and timings.

        `draft_source` (the user's query) is where drafts of string values are copied from, and the piece of text
        the constraint keeps copied arguments to. Drafts and the catalog constraint apply to greedy decoding only.
        """
        use_cache = self.prefix_cache if use_prefix_cache is None else use_prefix_cache
        drafted, constrained = self._greedy_aids(use_draft, use_constrain)
        n_prefix = len(self.prefix_ids)
        cached = use_cache and n_prefix and prompt_ids[:n_prefix] == self.prefix_ids and len(prompt_ids) > n_prefix
        t0 = time.perf_counter()
        if cached:
            kv, feed = self._fresh_cache(), prompt_ids[n_prefix:]
        else:
            kv, feed = DynamicCache(config=self.model.config), prompt_ids
        logits = self.model(input_ids=torch.tensor([feed]), cache=kv, use_cache=True, logits_to_keep=1).logits
        t1 = time.perf_counter()
        constraint = self._bound_constraint(draft_source, constrained)
        new, steps = (self._decode_drafted(kv, logits, draft_source, constraint) if drafted
                      else self._decode_plain(kv, logits, constraint))
        t2 = time.perf_counter()
        return new, {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "prefill_tokens": len(feed),
                     "cached_prefix": bool(cached), "forward_steps": steps}

    def route_many(self, queries: list[str], batch_size: int | None = None, progress=None) -> list[RouteResult]:
        """Route `queries` greedily, `batch_size` at a time (default: the router's), each chunk decoded packed into
        one row per forward pass on the shared prefix (src/evaluation/batch_decode.py): the tokens `route` gives,
        up to float rounding. Drafts are not used (one token per row and step); the catalog constraint is.

        A batched result's `latency_ms` is its chunk's wall time divided by the chunk's batched rows: a share of the
        throughput, not the latency of one query routed alone (`route` measures that); `timings` holds the chunk's
        prefill/decode ms and steps, with `batched: True`. Sampling, a router without its prefix cache, or a prompt
        that does not start with the prefix are routed one by one with `route`. `progress(n)` is called as each n
        more queries are done.
        """
        for query in queries:
            check_user_content(query)
        if self.temperature > 0 or not self.prefix_cache:
            return super().route_many(queries, progress=progress)
        _, constrained = self._greedy_aids(None, None)
        size, n_prefix = max(1, int(batch_size or self.batch_size)), len(self.prefix_ids)
        packer = self._packed_greedy()  # its prefix pass (first call only) is not part of a chunk's time
        results: list[RouteResult | None] = [None] * len(queries)
        for start in range(0, len(queries), size):
            t0 = time.perf_counter()
            chunk = range(start, min(start + size, len(queries)))
            prompts = {i: self.encode(self.render(queries[i])) for i in chunk}
            packed = [i for i in chunk if prompts[i][:n_prefix] == self.prefix_ids and len(prompts[i]) > n_prefix]
            if packed:
                new, timings = packer([prompts[i][n_prefix:] for i in packed], self.stop_ids, self.max_new_tokens,
                                      [self.constrainer.for_source(queries[i]) for i in packed] if constrained
                                      else None)
                done = self._chunk_results([prompts[i] for i in packed], new, timings, t0)
                for i, result in zip(packed, done):
                    results[i] = result
            for i in chunk:
                if results[i] is None:
                    results[i] = self.route(queries[i])
            if progress is not None:
                progress(len(chunk))
        return results

    def _packed_greedy(self) -> PackedGreedy:
        if self._packed is None:
            self._packed = PackedGreedy(self.model, self.prefix_ids, self._screened_head)
        return self._packed


def trained_system_prompt(model_ref, config=None) -> str | None:
    """The developer context the model was trained with (MODEL/config.yaml) so the served prefix matches it."""
    home = _model_home(model_ref)
    saved = home / "config.yaml" if home is not None else None
    if saved is not None and saved.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(saved), "data.system_prompt", default=None)
    return config_value(config, "data.system_prompt", None)


def copied_arguments_of(model_ref, config=None) -> dict[str, list[str]]:
    """The arguments the model's training data always copied from the request (MODEL/copied_arguments.json), which
    the constraint then keeps to pieces of it; {} with `inference.copy_arguments: false` or none saved."""
    return served_copies(read_copied_arguments(_model_home(model_ref)), config)


def served_copies(copied: dict[str, list[str]] | None, config=None) -> dict[str, list[str]]:
    """`copied` as decoding uses it: {} when `inference.copy_arguments` is off."""
    return (copied or {}) if bool(config_value(config, "inference.copy_arguments", True)) else {}


def batch_size_of(config) -> int:
    """Queries `route_many` decodes together (`evaluation.batch_size`)."""
    size = int(config_value(config, "evaluation.batch_size", EvaluationConfig.batch_size))
    if size < 1:
        raise UserError(f"config key 'evaluation.batch_size': must be >= 1, got {size}")
    return size


def inference_options(config) -> dict:
    return {
        "prefix_cache": bool(config_value(config, "inference.prefix_cache", True)),
        "max_new_tokens": int(config_value(config, "inference.max_new_tokens", 96)),
        "temperature": float(config_value(config, "inference.temperature", 0.0)),
        "top_p": float(config_value(config, "inference.top_p", 1.0)),
        "top_k": int(config_value(config, "inference.top_k", 0)),
        "draft": bool(config_value(config, "inference.draft", False)),
        "constrain": bool(config_value(config, "inference.constrain", True)),
        "rescore_optional": bool(config_value(config, "inference.rescore_optional", True)),
    }


def open_router(model_ref, tools_file=None, config=None):
    """Router for a model dir or name, GgufRouter for a .gguf file (run through llama.cpp)."""
    if str(model_ref).endswith(".gguf"):
        from src.evaluation.gguf_router import GgufRouter

        return GgufRouter.from_model_file(model_ref, tools_file=tools_file, config=config)
    return Router.from_model_dir(model_ref, tools_file=tools_file, config=config)


def run_inference(model, prompt=None, tools_file=None, raw: bool = False, interactive: bool = False,
                  config=None) -> int:
    """CLI `inference`: JSON of the routed call on stdout, latency on stderr; a REPL with --interactive."""
    if prompt is None and not interactive:
        raise UserError("inference: give --prompt TEXT or --interactive")
    router = open_router(model, tools_file=tools_file, config=config)

    def answer(text: str) -> None:
        result = router.route(text)
        print(json.dumps(result.to_json(raw=raw), ensure_ascii=False), flush=True)
        print(f"latency {result.latency_ms:.0f} ms ({result.n_prompt_tokens} prompt tokens, "
              f"{result.n_new_tokens} generated, prefix cache {'on' if router.prefix_cache else 'off'})",
              file=sys.stderr, flush=True)

    try:
        if prompt is not None:
            answer(prompt)
        while interactive:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                break
            if line.strip() in ("exit", "quit"):
                break
            if line.strip():
                answer(line)
    finally:
        router.close()
    return 0

