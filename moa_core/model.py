"""The mixture model: a frozen HF causal LM with `ExpertMixtureLinear` injected and one router per layer.

`MixtureModel` owns the routing context. A forward pre-hook on every transformer layer reads the
hidden states entering the layer, runs that layer's router and writes the layer's `Route` into the
`LayerSlot` its wrapped projections share. How the route is chosen depends on the method and on what
the caller asks for:

| call                          | MoA (sequence)                           | MoSLD / MoDULA (token)            |
|-------------------------------|------------------------------------------|-----------------------------------|
| `forward(..., expert=gold)`   | gold expert per row, routers get CE loss | the given expert only (staged)    |
| `forward(...)`                | each layer's own argmax                  | top-k / dense gates per token     |
| `route(...)` (inference)      | last layer's (or voted) decision         | -                                 |
| `adapters_off()` context      | base model only                          | base model only                   |
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .experts import ExpertMixtureLinear, LayerSlot, Route
from .routing import LayerRouter, load_balance_loss, pool, top_k_gates

MIXTURE_WEIGHTS = "mixture.safetensors"
MIXTURE_CONFIG = "mixture.json"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class MixtureError(ValueError):
    """A mixture or adapter that does not fit the model it is loaded onto."""


@dataclass
class MixtureSpec:
    """Everything needed to rebuild a mixture on a base model (saved as mixture.json).

    routing: "sequence" (MoA top-1 per sequence), "topk" (MoSLD), "dense" (MoDULA softmax).
    experts: expert names; for MoA/MoDULA these are the domains (MoDULA-Flan: "universal" first).
    experts_per_layer: number of routed experts in each transformer layer (MoSLD varies it by layer).
    """

    method: str
    experts: list[str]
    experts_per_layer: list[int]
    target_modules: list[str]
    r: int
    scaling: float
    routing: str = "sequence"
    dropout: float = 0.0
    shared_a: bool = False
    dropconnect_p: float = 0.0
    top_k: int = 1
    universal_r: int = 0
    universal_scaling: float = 1.0
    leaky_slope: float = 0.01
    pooling: str = "mean"
    inference: str = "last"
    base_model: str = ""
    base_config_hash: str = ""
    domains: list[str] = field(default_factory=list)
    fallback_threshold: float | None = None  # MoA: below this routing confidence the base model answers (fallback.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


@dataclass
class MixtureOutput:
    """loss = lm_loss + aux_loss. router_logits: per layer [B, E] (sequence routing only)."""

    loss: Tensor | None
    lm_loss: Tensor | None
    aux_loss: Tensor | None
    logits: Tensor
    router_logits: list[Tensor]


@dataclass
class _Context:
    adapters_off: bool = False
    experts_off: bool = False
    forced: Tensor | None = None
    pool_mask: Tensor | None = None
    token_mask: Tensor | None = None
    router_logits: list[Tensor] = field(default_factory=list)
    balance: list[Tensor] = field(default_factory=list)


def base_config_hash(config: Any) -> str:
    """Hash of the architecture fields that decide whether adapters fit (not of the weights)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
            "num_attention_heads", "num_key_value_heads", "head_dim")
    d = config.to_dict()
    return hashlib.sha256(json.dumps({k: d.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer block list of a HF causal LM (model.layers, transformer.h, ...)."""
    best: nn.ModuleList | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and re.search(r"(?:^|\.)(layers|h|blocks|layer)$", name):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise MixtureError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


def find_targets(model: nn.Module, target_modules: list[str]) -> dict[str, tuple[int, nn.Linear]]:
    """Map module path -> (layer index, nn.Linear) for every targeted projection; fail naming missing ones."""
    found: dict[str, tuple[int, nn.Linear]] = {}
    seen: set[str] = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in target_modules and isinstance(mod, nn.Linear):
            m = _LAYER_RE.search(name + ".")
            if m:
                found[name] = (int(m.group(1)), mod)
                seen.add(leaf)
    missing = sorted(set(target_modules) - seen)
    if missing:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise MixtureError(
            f"target_modules {missing} not found in {type(model).__name__}; its linear layers are {have}. "
            "Fix lora.target_modules in params.yaml."
        )
    return found


def prompt_positions(attention_mask: Tensor) -> Tensor:
    """[B, T] mask of a (left-)padded prompt -> position ids counted from each row's first real token,
    the way HF's generate derives them (padding positions get 0; attention never reads them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _cache_reusable(model: nn.Module, input_ids: Tensor, gen_kwargs: dict[str, Any]) -> bool:
    """Whether generate's prompt cache can come from the routing pass: one sequence per prompt (no beams,
    no extra return sequences), a cache generate would build itself (dynamic or static) and that the model's
    own generation config does not choose, a prompt of 2+ tokens. Settings come from the call, else the
    model's generation config."""
    return (
        input_ids.shape[1] >= 2
        and _gen_setting(model, gen_kwargs, "use_cache", True)
        and "past_key_values" not in gen_kwargs
        and "generation_config" not in gen_kwargs
        and getattr(model.generation_config, "cache_implementation", None) is None
        and gen_kwargs.get("cache_implementation") in (None, "dynamic", "static")
        and _rows_per_prompt(model, gen_kwargs) == 1
    )


def _gen_setting(model: nn.Module, gen_kwargs: dict[str, Any], key: str, default: Any) -> Any:
    """A generate setting as HF will use it: the call's, else the model's generation config, else `default`."""
    value = gen_kwargs.get(key, getattr(model.generation_config, key, None))
    return default if value is None else value


def _rows_per_prompt(model: nn.Module, gen_kwargs: dict[str, Any]) -> int:
    """How many rows HF's generate expands each prompt into (beams, or returned sequences)."""
    return max(int(_gen_setting(model, gen_kwargs, "num_beams", 1)),
               int(_gen_setting(model, gen_kwargs, "num_return_sequences", 1)))


def _hf_compiles_decode(model: nn.Module, gen_kwargs: dict[str, Any]) -> bool:
    """Whether HF's generate will torch.compile its decode step for these arguments: a static cache, on an
    accelerator or with a compile_config that compiles on every device, and compilation not disabled."""
    if gen_kwargs.get("cache_implementation") != "static" or gen_kwargs.get("disable_compile"):
        return False
    cc = gen_kwargs.get("compile_config") or model.generation_config.compile_config
    return model.device.type != "cpu" or bool(cc is not None and getattr(cc, "_compile_all_devices", False))


def _max_new_tokens(model: nn.Module, prompt_len: int, gen_kwargs: dict[str, Any]) -> int:
    gc = model.generation_config
    new = gen_kwargs.get("max_new_tokens", gc.max_new_tokens)
    if new is None:
        new = gen_kwargs.get("max_length", gc.max_length) - prompt_len
    return int(new)


class MixtureModel(nn.Module):
    def __init__(self, base: nn.Module, spec: MixtureSpec) -> None:
        super().__init__()
        self.model = base
        self.spec = spec
        for p in base.parameters():
            p.requires_grad_(False)
        layers = decoder_layers(base)
        n_layers = len(layers)
        if len(spec.experts_per_layer) != n_layers:
            raise MixtureError(f"spec has {len(spec.experts_per_layer)} layer entries, model has {n_layers} layers")
        actual = base_config_hash(base.config)
        if spec.base_config_hash and spec.base_config_hash != actual:
            raise MixtureError(
                f"this mixture was built for base model {spec.base_model!r} (config hash {spec.base_config_hash}); "
                f"the model given has config hash {actual}. Load it onto the base model it was trained on."
            )
        spec.base_config_hash = actual
        self.slots = [LayerSlot(i) for i in range(n_layers)]
        hidden = base.config.hidden_size
        device = next(base.parameters()).device  # routers stay float32 (they read RMS-normalised hidden states)
        self.routers = nn.ModuleList(LayerRouter(hidden, e) for e in spec.experts_per_layer).to(device)
        self._ctx = _Context()
        self._static: tuple[tuple[int, int], Any] | None = None  # (batch, length) -> StaticCache, see _static_cache
        self._compiled: Any = None  # the compiled decoder, see _run_decoder
        self.wrapped: dict[str, ExpertMixtureLinear] = {}
        for name, (layer, lin) in find_targets(base, spec.target_modules).items():
            wrapper = ExpertMixtureLinear(
                lin, self.slots[layer], spec.experts_per_layer[layer], spec.r, spec.scaling,
                shared_a=spec.shared_a, dropout=spec.dropout, dropconnect_p=spec.dropconnect_p,
                universal_r=spec.universal_r, universal_scaling=spec.universal_scaling,
                leaky_slope=spec.leaky_slope,
            )
            parent_name, leaf = name.rsplit(".", 1)
            setattr(base.get_submodule(parent_name), leaf, wrapper)
            self.wrapped[name] = wrapper
        self._hooks = [
            layer.register_forward_pre_hook(self._make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        self.eval()  # like from_pretrained: inference mode until a recipe calls train()

    # ----------------------------------------------------------------------------------- routing hook
    def _make_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            self._route_layer(layer, h)
        return hook

    def _route_layer(self, layer: int, h: Tensor) -> None:
        """h: [B, T, H] hidden states entering `layer`; sets the layer's route."""
        ctx, slot = self._ctx, self.slots[layer]
        slot.adapters_off = ctx.adapters_off
        if ctx.adapters_off or ctx.experts_off:
            slot.route = Route()
            return
        router = self.routers[layer]
        if self.spec.routing == "sequence":
            logits = None
            if ctx.pool_mask is not None and ctx.pool_mask.shape[1] == h.shape[1]:
                logits = router(pool(h, ctx.pool_mask, self.spec.pooling))  # [B, E]
                ctx.router_logits.append(logits)
            if ctx.forced is not None:
                if slot.route.index is not ctx.forced:  # keep the route (and its gathered weights) across decode steps
                    slot.route = Route(index=ctx.forced)
            elif logits is not None:
                slot.route = Route(index=logits.argmax(-1))
            else:
                raise RuntimeError("sequence routing needs a prompt mask or a forced expert (use generate())")
            return
        if ctx.forced is not None:  # staged training of one expert (MoDULA stages 1-2)
            slot.route = Route(index=ctx.forced)
            return
        logits = router(h)  # [B, T, E]
        if self.spec.routing == "topk":
            gates, probs = top_k_gates(logits, self.spec.top_k)
            if self.training and ctx.token_mask is not None:
                ctx.balance.append(load_balance_loss(probs, gates, ctx.token_mask))
        else:
            gates = logits.softmax(-1)
        slot.route = Route(gates=gates.to(h.dtype))

    @contextlib.contextmanager
    def _routing(self, **kw: Any) -> Iterator[_Context]:
        self._ctx = _Context(**kw)
        try:
            yield self._ctx
        finally:
            self._ctx = _Context()
            for s in self.slots:
                s.route = Route()
                s.adapters_off = False

    # ------------------------------------------------------------------------------------------ API
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        expert: Tensor | None = None,
        pool_mask: Tensor | None = None,
        eta: float = 0.0,
        balance_coef: float = 0.0,
        adapters_off: bool = False,
        experts_off: bool = False,
        num_items_in_batch: Tensor | None = None,
    ) -> MixtureOutput:
        """input_ids, attention_mask, labels: [B, T]; expert: [B] forced (gold) expert per row.

        pool_mask [B, T] marks the prompt tokens the sequence router pools (default: labels == -100 and
        attention_mask, i.e. the prompt of a training row). `eta` weights the MoA domain cross-entropy
        (mean over layers); `balance_coef` the MoSLD balance loss (mean over layers). `num_items_in_batch`
        makes the LM loss a sum over label tokens divided by it (data-parallel training: see train_loop)."""
        if pool_mask is None and self.spec.routing == "sequence":
            pool_mask = attention_mask if labels is None else attention_mask * (labels == -100)
        with self._routing(adapters_off=adapters_off, experts_off=experts_off, forced=expert,
                           pool_mask=pool_mask, token_mask=attention_mask) as ctx:
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
            aux = None
            if expert is not None and ctx.router_logits and eta > 0:
                ce = torch.stack([F.cross_entropy(lg.float(), expert) for lg in ctx.router_logits]).mean()
                aux = eta * ce
            if ctx.balance and balance_coef > 0:
                bal = balance_coef * torch.stack(ctx.balance).mean()
                aux = bal if aux is None else aux + bal
            lm = out.loss
            loss = None if lm is None else (lm if aux is None else lm + aux)
            return MixtureOutput(loss, lm, aux, out.logits, list(ctx.router_logits))

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """MoA inference routing from the prompt: -> (chosen expert [B], per-layer logits [L, B, E]).

        Each layer routes with its own decision on the way up (as in training, where earlier layers
        used the expert the later routers learned to predict); the last layer's router decides
        (`inference: last`) or the layers vote (`inference: vote`)."""
        expert, logits, _ = self._routing_pass(input_ids, attention_mask, keep_cache=False)
        return expert, logits

    def _routing_pass(self, input_ids: Tensor, attention_mask: Tensor, keep_cache: bool,
                      compiled: bool = False) -> tuple[Tensor, Tensor, Any]:
        """The forward behind `route()`; with keep_cache, also returns the pass's KV cache (else None).

        Positions are counted from each row's first real token, as `generate` counts them, so a
        left-padded prompt is routed as it was in training and its cache is the one generate would build.
        `compiled` runs the decoder through `torch.compile` (see `_run_decoder`)."""
        if self.spec.routing != "sequence":
            raise MixtureError(f"route() is for sequence-level routing; {self.spec.method} routes per token")
        with self._routing(pool_mask=attention_mask) as ctx:
            out = self._run_decoder(input_ids, attention_mask, keep_cache, compiled)
            logits = torch.stack(ctx.router_logits)  # [L, B, E]
        if self.spec.inference == "vote":
            votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)  # [B, E]
            expert = votes.argmax(-1)
        else:
            expert = logits[-1].argmax(-1)
        return expert, logits, (out.past_key_values if keep_cache else None)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, expert: Tensor | None = None,
                 adapters_off: bool = False, reuse_routing_cache: bool = True, experts_off: bool = False,
                 **gen_kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """Left-padded prompts [B, T] -> (sequences [B, T + new], expert used per row or None).

        Sequence routing decides once from the prompt and keeps the expert for every generated token.
        The routing pass is a full forward over the prompt, so with `reuse_routing_cache` its KV cache
        becomes generate's prompt cache (see `_prompt_cache_from_routing`) instead of a second prefill.
        `experts_off`: the routed experts off, the universal expert of MoDULA-Res on (its fallback)."""
        if self.spec.routing == "sequence" and expert is None and not (adapters_off or experts_off):
            if reuse_routing_cache and _cache_reusable(self.model, input_ids, gen_kwargs):
                expert, cache = self._prompt_cache_from_routing(input_ids, attention_mask, gen_kwargs)
                gen_kwargs = {k: v for k, v in gen_kwargs.items() if k != "cache_implementation"}
                gen_kwargs["past_key_values"] = cache
            else:
                expert, _ = self.route(input_ids, attention_mask)
        forced = expert
        if expert is not None and (k := _rows_per_prompt(self.model, gen_kwargs)) > 1:
            forced = expert.repeat_interleave(k)  # generate repeats each prompt k times in place (beams)
        with self._routing(adapters_off=adapters_off, experts_off=experts_off, forced=forced):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        return out, expert

    def _prompt_cache_from_routing(self, input_ids: Tensor, attention_mask: Tensor,
                                   gen_kwargs: dict[str, Any]) -> tuple[Tensor, Any]:
        """Route the prompts and keep the routing pass's KV cache as generate's prompt cache -> (expert [B], cache).

        A row whose layers all chose its final expert ran the prompt through exactly the weights generation
        uses, so its keys and values are already right (a trained MoA router agrees with itself across
        layers almost always). The other rows are run again with their final expert and their cache rows
        replaced. The cache is cut to T - 1 positions: generate then runs only the last prompt token, which
        yields the first token's logits through generate's own logits processing. With
        `cache_implementation="static"` the cache is copied into a reused `StaticCache`, so the compiled
        decode step keeps its static addresses; and where HF compiles that decode step (a static cache on
        an accelerator, or a compile_config that asks for it), the routing pass is compiled too: it stands
        in for the prefill, and eagerly its per-projection LoRA kernels and per-layer router hooks are
        launch-bound."""
        T = input_ids.shape[1]
        compiled = _hf_compiles_decode(self.model, gen_kwargs)
        expert, logits, cache = self._routing_pass(input_ids, attention_mask, keep_cache=True, compiled=compiled)
        stale = (logits.argmax(-1) != expert).any(0).nonzero().squeeze(1)  # rows that met another expert
        if stale.numel():
            with self._routing(forced=expert[stale]):
                redo = self._run_decoder(input_ids[stale], attention_mask[stale], True, compiled).past_key_values
            for mine, theirs in zip(cache.layers, redo.layers):
                mine.keys[stale] = theirs.keys
                mine.values[stale] = theirs.values
        cache.crop(-1)  # drop the last position (a negative count removes positions; a positive one is deprecated)
        if gen_kwargs.get("cache_implementation") != "static":
            return expert, cache
        static = self._static_cache(input_ids.shape[0], T + _max_new_tokens(self.model, T, gen_kwargs))
        for i, layer in enumerate(cache.layers):
            static.update(layer.keys, layer.values, i)
        return expert, static

    def _run_decoder(self, input_ids: Tensor, attention_mask: Tensor, use_cache: bool, compiled: bool) -> Any:
        """The decoder stack (no LM head) over prompts [B, T] under the current routing, positions counted as
        `generate` counts them. `compiled`: through `torch.compile`, built once, in inductor's default mode (no
        CUDA graphs, since prompt shapes vary between calls); the router hooks trace into the graph."""
        if compiled and self._compiled is None:
            self._compiled = torch.compile(self.model.base_model)
        decoder = self._compiled if compiled else self.model.base_model
        return decoder(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=prompt_positions(attention_mask), use_cache=use_cache)

    def _static_cache(self, batch: int, max_len: int) -> Any:
        """One StaticCache per (batch, length), reset between calls, as HF's generate keeps its own: a new one
        per call would give the compiled decode step new tensor addresses (a CUDA-graph re-capture)."""
        from transformers import StaticCache

        key = (batch, max_len)
        if self._static is not None and self._static[0] == key:
            self._static[1].reset()
            return self._static[1]
        cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        self._static = (key, cache)
        return cache

    # ----------------------------------------------------------------------------------- parameters
    def mixture_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters added by the mixture (experts, universal expert, routers), by name."""
        return {n: p for n, p in self.named_parameters() if ".lora_" in n or ".universal_" in n or n.startswith("routers.")}

    def set_trainable(self, experts: bool = False, routers: bool = False, universal: bool = False) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze the chosen groups; returns the trainable parameters."""
        train: list[nn.Parameter] = []
        for n, p in self.named_parameters():
            on = (
                (experts and ".lora_" in n)
                or (universal and ".universal_" in n)
                or (routers and n.startswith("routers."))
            )
            p.requires_grad_(on)
            if on:
                train.append(p)
        return train

    def mixture_state_dict(self) -> dict[str, Tensor]:
        sd = self.state_dict()
        keep = set(self.mixture_parameters()) | {n for n in sd if n.endswith(".scaling")}
        return {k: v.detach().contiguous() for k, v in sd.items() if k in keep}

    def expert_tensors(self, k: int) -> dict[str, Tensor]:
        """Expert k's own slices (A, B of every wrapped projection), for hashing and comparison."""
        out: dict[str, Tensor] = {}
        for name, w in self.wrapped.items():
            if not w.shared_a:
                out[f"{name}.A"] = w.lora_A[k]
            out[f"{name}.B"] = w.lora_B[k]
        return out

    def expert_hash(self, k: int) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.expert_tensors(k).items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------------ adapters, domains
    def load_peft_expert(self, k: int, adapter_dir: str | Path) -> None:
        """Copy a stage-1 PEFT LoRA adapter into expert slot k of every wrapped projection."""
        A, B, scaling = read_peft_adapter(adapter_dir)
        for name, w in self.wrapped.items():
            if name not in A:
                raise MixtureError(f"adapter {adapter_dir} has no LoRA for {name}; it was trained with other target_modules")
            a, b = A[name], B[name]
            expected_a = (w.in_features,)
            if a.shape[1:] != torch.Size(expected_a) or b.shape[0] != w.out_features:
                raise MixtureError(
                    f"adapter {adapter_dir} does not fit {name}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} vs "
                    f"layer in={w.in_features} out={w.out_features}. It was trained on another base model."
                )
            w.load_expert(k, a.to(w.lora_A.dtype), b.to(w.lora_B.dtype), scaling)

    def add_expert(self, name: str) -> int:
        """Append one expert (and a router row) to every layer; existing experts stay bit-identical."""
        for w in self.wrapped.values():
            w.add_expert()
        for r in self.routers:
            r.add_expert()
        self.spec.experts.append(name)
        self.spec.experts_per_layer = [e + 1 for e in self.spec.experts_per_layer]
        if self.spec.domains:
            self.spec.domains.append(name)
        return len(self.spec.experts) - 1

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------- PEFT I/O
def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """Read a PEFT LoRA adapter (safetensors only, never pickle) -> (A by module path, B by module path, scaling)."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise MixtureError(f"{d} is not a PEFT LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    try:
        with safe_open(str(w_path), framework="pt") as f:
            for key in f.keys():
                m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$", key)
                if m:
                    (A if m.group(2) == "A" else B)[m.group(1)] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise MixtureError(f"cannot read {w_path}: {exc}. The file is damaged; retrain or restore this adapter.") from None
    return A, B, scaling


# ------------------------------------------------------------------------------------ save / load
def atomic_dir_write(target: Path, write: Any) -> None:
    """Write a directory via a temporary sibling and an atomic rename, so a crash never leaves a half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    write(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_mixture(mm: MixtureModel, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write mixture.safetensors (experts, universal expert, routers) + mixture.json (spec) atomically."""
    out = Path(out_dir)

    def write(tmp: Path) -> None:
        save_file(mm.mixture_state_dict(), str(tmp / MIXTURE_WEIGHTS), metadata={"format": "pt"})
        meta = json.loads(mm.spec.to_json())
        if extra:
            meta["extra"] = extra
        (tmp / MIXTURE_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))

    atomic_dir_write(out, write)
    return out


def read_spec(mixture_dir: str | Path) -> MixtureSpec:
    meta = json.loads((Path(mixture_dir) / MIXTURE_CONFIG).read_text())
    meta.pop("extra", None)
    return MixtureSpec(**meta)


def load_mixture(base: nn.Module, mixture_dir: str | Path) -> MixtureModel:
    """Rebuild a saved mixture on `base` (which must be the base it was trained on)."""
    d = Path(mixture_dir)
    if not (d / MIXTURE_CONFIG).exists() or not (d / MIXTURE_WEIGHTS).exists():
        raise MixtureError(f"{d} holds no saved mixture ({MIXTURE_CONFIG} + {MIXTURE_WEIGHTS}); run the train_router stage")
    mm = MixtureModel(base, read_spec(d))
    try:
        with safe_open(str(d / MIXTURE_WEIGHTS), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise MixtureError(f"cannot read {d / MIXTURE_WEIGHTS}: {exc}. The file is damaged; retrain.") from None
    expected = set(mm.mixture_state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise MixtureError(f"{d} does not match its spec: missing {missing}, unexpected {unexpected}")
    own = mm.mixture_state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:  # e.g. routers saved for another expert list than mixture.json names
        raise MixtureError(f"{d}: saved tensors do not fit the spec's experts {mm.spec.experts} "
                           f"(saved vs expected: {wrong[:3]}); the mixture.json and weights are from different runs")
    mm.load_state_dict(state, strict=False)
    return mm
