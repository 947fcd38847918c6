"""The exported MoA router on its own: prompt -> (expert name, confidence), from a `moa export` folder.

It needs torch, transformers, safetensors and this package's model code, not Prefect or MLflow, so it can
run in front of a multi-LoRA server (vLLM, SGLang, LoRAX) that serves the exported adapters by name:

    router = StandaloneRouter.load("models/export/moa")
    decision = router.route(["What is fever?"])[0]   # RouteDecision(expert="medicine", confidence=0.97)
    # then ask the server for model=decision.expert (or the base model when decision.expert == "base")

MoA routes with the whole stack: each layer's router reads the hidden states its layer receives, and those
already passed through the experts the lower layers chose. So the router runs the base model with the
exported adapters (one routing forward over the prompt, no generation), and its decisions are the trained
mixture's own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .batching import collate, encode_prompt, to_device
from .export import ROUTER_CONFIG, ROUTER_WEIGHTS
from .fallback import FALLBACK, NO_EXPERT, decide
from .model import MixtureError, MixtureModel, MixtureSpec


@dataclass(frozen=True)
class RouteDecision:
    expert: str  # an exported adapter's name, or "base" when the router fell back
    confidence: float


class StandaloneRouter:
    def __init__(self, mm: MixtureModel, tokenizer: Any, threshold: float | None, max_length: int = 256) -> None:
        self.mm, self.tok, self.threshold, self.max_length = mm, tokenizer, threshold, max_length

    @classmethod
    def load(cls, export_dir: str | Path, base_model_path: str | None = None, device: str = "cpu",
             threshold: float | None | str = "exported", max_length: int = 256) -> "StandaloneRouter":
        """`base_model_path`: the base model to route with (default: the path recorded at export).
        `threshold`: "exported" (the one recorded at export), a number, or None (never fall back)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = Path(export_dir)
        if not (d / ROUTER_CONFIG).exists() or not (d / ROUTER_WEIGHTS).exists():
            raise MixtureError(f"{d} is not a `moa export` folder ({ROUTER_CONFIG} + {ROUTER_WEIGHTS}); run `moa export`")
        meta = json.loads((d / ROUTER_CONFIG).read_text())
        path = base_model_path or meta.get("base_model_path") or meta["base_model"]
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        mm = MixtureModel(base, MixtureSpec(**meta["spec"]))
        for k, name in enumerate(meta["experts"]):
            mm.load_peft_expert(k, d / meta["adapters"][name])
        mm.load_state_dict(load_file(str(d / ROUTER_WEIGHTS), device=str(device)), strict=False)
        return cls(mm.eval(), tok, meta.get("fallback_threshold") if threshold == "exported" else threshold, max_length)

    @property
    def experts(self) -> list[str]:
        return list(self.mm.spec.experts)

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> list[RouteDecision]:
        """Instructions -> one decision each (the chat template is applied as in training)."""
        enc = [{"input_ids": encode_prompt(self.tok, p, self.max_length)} for p in prompts]
        b = to_device(collate(enc, self.tok.pad_token_id, left_pad=True), next(self.mm.parameters()).device)
        idx, conf = decide(self.mm, b["input_ids"], b["attention_mask"], self.threshold)
        return [RouteDecision(FALLBACK if int(i) == NO_EXPERT else self.experts[int(i)], float(c))
                for i, c in zip(idx, conf)]
