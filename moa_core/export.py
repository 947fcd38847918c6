"""Taking a trained MoA mixture elsewhere: each expert as a standard PEFT LoRA adapter folder, and the router
as a small file of its own.

    <out>/adapters/<expert>/adapter_config.json      one PEFT LoRA per expert, all of rank `spec.r` on the
    <out>/adapters/<expert>/adapter_model.safetensors  same target modules (what multi-LoRA servers need)
    <out>/router.safetensors                          the per-layer router weights, `routers.<layer>.weight` [E, H]
    <out>/router.json                                 the mixture spec, the expert names, the fallback threshold

vLLM, SGLang and LoRAX load the adapter folders by name; `moa_core.standalone_router` maps a prompt to one
of those names (with a confidence) from the export folder alone, so the router can sit in front of such a
server. Only sequence routing (MoA) exports: there one expert serves the whole request, which is exactly
what a server that selects one adapter per request runs. MoSLD and MoDULA mix several experts per token,
which no per-request adapter reproduces.
"""

from __future__ import annotations

from .routing import Routing

import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .incremental import sort_adapter_config
from .model import MIXTURE_CONFIG, MIXTURE_WEIGHTS, MixtureError, MixtureSpec, atomic_dir_write, read_spec

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router.json"
ADAPTERS = "adapters"
_EXPERT_KEY = re.compile(r"^model\.(.+)\.lora_([AB])$")  # mixture state-dict key of a stacked A [E, r, d] / B [E, d_out, r]
_ROUTER_KEY = re.compile(r"^routers\.(\d+)\.weight$")


class ExportError(MixtureError):
    """A mixture that cannot be exported as per-request adapters."""


def check_exportable(spec: MixtureSpec) -> None:
    """Raise, saying why, unless one expert per request reproduces the mixture (MoA's sequence routing)."""
    if spec.routing != Routing.SEQUENCE:
        raise ExportError(
            f"method {spec.method!r} mixes several experts per token ({spec.routing} routing), so no single "
            "adapter per request reproduces it and a multi-LoRA server could not serve it. Export a MoA mixture "
            "(method: moa) instead.")
    if spec.shared_a or spec.universal_r:
        raise ExportError(f"method {spec.method!r} shares weights between its experts; only MoA experts export")


def _read_state(mixture_dir: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(mixture_dir / MIXTURE_WEIGHTS), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise MixtureError(f"cannot read {mixture_dir / MIXTURE_WEIGHTS}: {exc}. The file is damaged; retrain.") from None


def expert_adapter_state(state: dict[str, Tensor], k: int) -> tuple[dict[str, Tensor], float]:
    """Expert k of a mixture state dict -> (PEFT adapter state dict, its scaling alpha / r).

    PEFT names a LoRA `base_model.model.<module path>.lora_A.weight` ([r, d_in]) and `...lora_B.weight`
    ([d_out, r]); the mixture stacks them as `model.<module path>.lora_A` [E, r, d_in] and `lora_B` [E, d_out, r]."""
    out: dict[str, Tensor] = {}
    scalings: set[float] = set()
    for key, t in state.items():
        m = _EXPERT_KEY.match(key)
        if m:
            out[f"base_model.model.{m.group(1)}.lora_{m.group(2)}.weight"] = t[k].contiguous()
            scalings.add(float(state[f"model.{m.group(1)}.scaling"][k]))
    if not out:
        raise ExportError("the mixture holds no expert weights to export")
    if len(scalings) != 1:  # PEFT's lora_alpha is one number per adapter
        raise ExportError(f"expert {k} has different scalings on different projections ({sorted(scalings)})")
    return out, scalings.pop()


def export_mixture(mixture_dir: str | Path, out_dir: str | Path, base_model_path: str = "",
                   fallback_threshold: float | None = None) -> dict[str, Any]:
    """Write every expert of a MoA mixture as a PEFT adapter folder and its router as router.safetensors +
    router.json under `out_dir` (replaced atomically). `base_model_path` is where the standalone router
    finds the base model by default. Returns router.json's contents."""
    d = Path(mixture_dir)
    if not (d / MIXTURE_CONFIG).exists() or not (d / MIXTURE_WEIGHTS).exists():
        raise MixtureError(f"{d} holds no saved mixture ({MIXTURE_CONFIG} + {MIXTURE_WEIGHTS}); run the train_router stage")
    spec = read_spec(d)
    check_exportable(spec)
    state = _read_state(d)
    routers = {int(m.group(1)): t for k, t in state.items() if (m := _ROUTER_KEY.match(k))}
    from peft import LoraConfig

    meta = {
        "format": "moa-router/1",
        "experts": list(spec.experts),
        "adapters": {name: f"{ADAPTERS}/{name}" for name in spec.experts},
        "base_model": spec.base_model,
        "base_model_path": base_model_path,
        "fallback_threshold": fallback_threshold,
        "spec": json.loads(spec.to_json()),
    }

    def write(tmp: Path) -> None:
        for k, name in enumerate(spec.experts):
            adapter, scaling = expert_adapter_state(state, k)
            folder = tmp / ADAPTERS / name
            # lora_alpha = scaling * r gives PEFT's scaling alpha / r back; dropout only acts in training
            LoraConfig(r=spec.r, lora_alpha=scaling * spec.r, lora_dropout=0.0, target_modules=list(spec.target_modules),
                       task_type="CAUSAL_LM", base_model_name_or_path=spec.base_model).save_pretrained(str(folder))
            sort_adapter_config(folder)
            save_file(adapter, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_file({f"routers.{i}.weight": routers[i].contiguous() for i in sorted(routers)},
                  str(tmp / ROUTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ROUTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))

    atomic_dir_write(Path(out_dir), write)
    return meta
