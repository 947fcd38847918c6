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

`generate()` (route once, then decode with the routed expert, reusing the routing pass's KV cache) lives
in moa_core.generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import atomic_dir_write
from .experts import ExpertMixtureLinear, LayerSlot, Route
from .generation import RoutedGeneration, prompt_positions  # noqa: F401  (prompt_positions: public here too)
from .lora_kernels import LoraFusion
from .routing import LayerRouter, Routing, load_balance_loss, pooler, top_k_gates

MIXTURE_WEIGHTS = "mixture.safetensors"
MIXTURE_CONFIG = "mixture.json"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class MixtureError(ValueError):
    """A mixture or adapter that does not fit the model it is loaded onto."""


@dataclass
class MixtureSpec:
    """Everything needed to rebuild a mixture on a base model (saved as mixture.json).

    routing: a `Routing` (MoA top-1 per sequence, MoSLD top-k or MoDULA dense per token); mixture.json
    holds its string value, which loads back as the enum.
    experts: expert names; for MoA/MoDULA these are the domains (MoDULA-Flan: "universal" first).
    experts_per_layer: number of routed experts in each transformer layer (MoSLD varies it by layer).
    """

    method: str
    experts: list[str]
    experts_per_layer: list[int]
    target_modules: list[str]
    r: int
    scaling: float
    routing: Routing = Routing.SEQUENCE
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

    def __post_init__(self) -> None:
        self.routing = Routing(self.routing)  # a string from mixture.json, or already the enum

    def to_json(self) -> str:
        data = asdict(self)
        if data["fallback_threshold"] is None:  # absent, as in mixtures saved before the fallback: same bytes
            del data["fallback_threshold"]
        return json.dumps(data, indent=2, sort_keys=True)


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
    fused: bool = False  # the fused routed-LoRA kernels serve this forward (see MixtureModel._routing)
    folded: bool = False  # every row's expert is folded into the weights (lora_kernels.LoraFusion.fold): no routing
    experts_off: bool = False
    forced: Tensor | None = None
    blocks: bool = False  # `forced` is E equal expert-major blocks (forward's expert_blocks): see experts.Route
    pool_mask: Tensor | None = None
    token_mask: Tensor | None = None
    pooled: tuple[torch.dtype, Callable[[Tensor], Tensor]] | None = None  # pool_mask's pooler, built at the first layer
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


class MixtureModel(RoutedGeneration, nn.Module):
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
        self._init_generation()
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
        self.lora_fusion = LoraFusion(self.wrapped)  # fused routed-LoRA kernels for inference (lora_kernels.py)
        self._hooks = [
            layer.register_forward_pre_hook(self._make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        self.eval()  # like from_pretrained: inference mode until a recipe calls train()

    def _apply(self, fn: Any, recurse: bool = True) -> "MixtureModel":
        """Module.to / .float() / .cuda() ...: the fused groups' stacked copies of weights that moved are dropped."""
        out = super()._apply(fn, recurse)
        if hasattr(self, "lora_fusion"):
            self.lora_fusion.release_stale()
        return out

    # ----------------------------------------------------------------------------------- routing hook
    def _make_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            self._route_layer(layer, h)
        return hook

    def _preset_routes(self) -> None:
        """Every layer's route as its hook would set it on a forward under the current context, without a forward:
        only a context that needs no hidden states (a forced expert, or the adapters or experts off)."""
        ctx = self._ctx
        if not (ctx.forced is not None or ctx.adapters_off or ctx.experts_off or ctx.folded) \
                or ctx.pool_mask is not None:
            raise RuntimeError("routes can be preset only for a forced or folded expert, or with the adapters or "
                               "experts off")
        for layer in range(len(self.slots)):
            self._route_layer(layer, None)

    def _route_layer(self, layer: int, h: Tensor | None) -> None:
        """h: [B, T, H] hidden states entering `layer` (read only to pool a prompt); sets the layer's route."""
        ctx, slot = self._ctx, self.slots[layer]
        slot.adapters_off = ctx.adapters_off
        slot.fused = ctx.fused
        slot.folded = ctx.folded
        if ctx.adapters_off or ctx.experts_off or ctx.folded:
            slot.route = Route()
            return
        router = self.routers[layer]
        if self.spec.routing == Routing.SEQUENCE:
            logits = None
            if ctx.pool_mask is not None and ctx.pool_mask.shape[1] == h.shape[1]:
                if ctx.pooled is None or ctx.pooled[0] != h.dtype:
                    ctx.pooled = (h.dtype, pooler(ctx.pool_mask, self.spec.pooling, h.dtype))
                logits = router(ctx.pooled[1](h))  # [B, E]
                ctx.router_logits.append(logits)
            if ctx.forced is not None:
                if slot.route.index is not ctx.forced:  # keep the route (and its gathered weights) across decode steps
                    slot.route = Route(index=ctx.forced, blocks=ctx.blocks)
            elif logits is not None:
                slot.route = Route(index=logits.argmax(-1))
            else:
                raise RuntimeError("sequence routing needs a prompt mask or a forced expert (use generate())")
            return
        if ctx.forced is not None:  # staged training of one expert (MoDULA stages 1-2)
            slot.route = Route(index=ctx.forced, blocks=ctx.blocks)
            return
        logits = router(h)  # [B, T, E]
        if self.spec.routing == Routing.TOPK:
            gates, probs = top_k_gates(logits, self.spec.top_k)
            if self.training and ctx.token_mask is not None:
                ctx.balance.append(load_balance_loss(probs, gates, ctx.token_mask))
        else:
            gates = logits.softmax(-1)
        slot.route = Route(gates=gates.to(h.dtype))

    @contextlib.contextmanager
    def _routing(self, **kw: Any) -> Iterator[_Context]:
        # inference (eval, no autograd) may take the fused kernels; decided here, outside any compiled region
        fused = not (self.training or torch.is_grad_enabled()) and self.lora_fusion.ready()
        self._ctx = _Context(fused=fused, **kw)
        try:
            yield self._ctx
        finally:
            self._ctx = _Context()
            for s in self.slots:
                s.route = Route()
                s.adapters_off = False
                s.fused = False
                s.folded = False

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
        expert_blocks: bool = False,
    ) -> MixtureOutput:
        """input_ids, attention_mask, labels: [B, T]; expert: [B] forced (gold) expert per row.

        pool_mask [B, T] marks the prompt tokens the sequence router pools (default: labels == -100 and
        attention_mask, i.e. the prompt of a training row). `eta` weights the MoA domain cross-entropy
        (mean over layers); `balance_coef` the MoSLD balance loss (mean over layers). `num_items_in_batch`
        makes the LM loss a sum over label tokens divided by it (data-parallel training: see train_loop).

        With a gold `expert` and `eta` = 0 the sequence routers are not run (nothing reads their logits; pass
        `pool_mask` to get them all the same). `expert_blocks` vouches that the rows come in E equal expert-major
        blocks, rows [k*B/E, (k+1)*B/E) through expert k for every k (what `balanced_batches(expert_major=True)`
        yields when E divides the batch): the experts then apply to views of the blocks instead of gathering a
        weight per row (`ExpertMixtureLinear._blocked`), the same sums with fewer operators. The layout is checked
        on the CPU, and asserted on the device without waiting for it (a wrong one stops the process there)."""
        if pool_mask is None and self.spec.routing == Routing.SEQUENCE and (expert is None or eta > 0):
            pool_mask = attention_mask if labels is None else attention_mask * (labels == -100)
        if expert_blocks:
            self._check_blocks(expert)
            if self.training:
                self.lora_fusion.stack_bases()  # the groups' blocked training path runs over the stacked base weights
        with self._routing(adapters_off=adapters_off, experts_off=experts_off, forced=expert, blocks=expert_blocks,
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

    def _check_blocks(self, expert: Tensor | None) -> None:
        """forward(expert_blocks=True)'s contract: expert [B] == [0]*b + [1]*b + ... + [E-1]*b, in every layer."""
        counts = set(self.spec.experts_per_layer)
        if expert is None or len(counts) != 1 or expert.shape[0] % next(iter(counts)):
            raise ValueError(f"expert_blocks needs a gold expert per row and a batch that splits into one equal block "
                             f"per expert (experts per layer: {sorted(counts)}, rows: "
                             f"{None if expert is None else expert.shape[0]})")
        E = next(iter(counts))
        ok = (expert.view(E, -1) == torch.arange(E, device=expert.device).view(E, 1)).all()
        if expert.device.type == "cpu":
            if not ok:
                raise ValueError("expert_blocks: the rows are not in expert-major blocks (row i must use expert "
                                 "i // (B / E)); order them so, or leave expert_blocks off")
        else:
            torch._assert_async(ok)  # checked on the device, no wait for it: a wrong layout stops the process there

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
        """The forward behind `route()`; with keep_cache, also returns the decoder's output (its KV cache in
        `past_key_values`, `last_hidden_state` [B, T, H]; else None).

        Positions are counted from each row's first real token, as `generate` counts them, so a
        left-padded prompt is routed as it was in training and its cache is the one generate would build.
        `compiled` runs the decoder through `torch.compile` (see `_run_decoder`)."""
        if self.spec.routing != Routing.SEQUENCE:
            raise MixtureError(f"route() is for sequence-level routing; {self.spec.method} routes per token")
        with self._routing(pool_mask=attention_mask) as ctx:
            out = self._run_decoder(input_ids, attention_mask, keep_cache, compiled)
            logits = torch.stack(ctx.router_logits)  # [L, B, E]
        return self._final_expert(logits), logits, (out if keep_cache else None)

    def _final_expert(self, logits: Tensor) -> Tensor:
        """Per-layer router logits [L, B, E] -> the expert each row generates with [B]: the last layer's choice
        (`inference: last`) or the layers' vote (`inference: vote`)."""
        if self.spec.inference == "vote":
            votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)  # [B, E]
            return votes.argmax(-1)
        return logits[-1].argmax(-1)

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

    def per_expert_parameters(self) -> list[nn.Parameter]:
        """The stacked tensors whose first dimension indexes the experts: every wrapped projection's A [E, r, d_in]
        and B [E, d_out, r]. A shared A (MoSLD: [1, r, d_in]) is not one of them."""
        out: list[nn.Parameter] = []
        for w in self.wrapped.values():
            out += [w.lora_B] if w.shared_a else [w.lora_A, w.lora_B]
        return out

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
