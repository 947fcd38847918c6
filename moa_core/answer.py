"""Prompts in, answers out: the one path from instruction text to generated text with the expert that
answered it and the router's confidence. The served model (pyfunc), `moa generate` and the tests use it.

For MoA the router decides per prompt; a prompt whose confidence is below the fallback threshold is answered
by the base model and reported as expert "base" (moa_core.fallback). A forced expert (a name, or "base")
skips the router. Token-level mixtures (MoSLD, MoDULA) route inside generation, so they report no single
expert and no confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .batching import collate, encode_prompt, to_device
from .fallback import FALLBACK, NO_EXPERT, decide
from .model import MixtureModel

TOKEN_LEVEL = "(token-level mixture)"
"""The expert reported by methods that mix experts per token."""


@dataclass
class Answer:
    text: str
    expert: str
    confidence: float | None  # the router's, for routed MoA prompts; None when forced or token-level

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expert_names(mm: MixtureModel) -> list[str]:
    """Names `forced` accepts: the experts of a sequence-routed mixture, and "base"."""
    return [*mm.spec.experts, FALLBACK] if mm.spec.routing == "sequence" else [FALLBACK]


def _expert_index(mm: MixtureModel, name: str) -> int:
    if name == FALLBACK:
        return NO_EXPERT
    if mm.spec.routing != "sequence":
        raise ValueError(f"{mm.spec.method} mixes its experts per token; only {FALLBACK!r} (the base model) can be forced")
    if name not in mm.spec.experts:
        raise ValueError(f"unknown expert {name!r}; this model has experts {expert_names(mm)}")
    return mm.spec.experts.index(name)


@torch.no_grad()
def answer(mm: MixtureModel, tokenizer: Any, prompts: Sequence[str], *, max_length: int, max_new_tokens: int,
           threshold: float | None = None, forced: Sequence[str | None] | None = None,
           batch_size: int = 16) -> list[Answer]:
    """Greedy answers to instructions. `forced[i]` (an expert name, "base", or None = route) skips the router
    for prompt i; `threshold` is the fallback threshold (None: never fall back)."""
    if forced is not None and len(forced) != len(prompts):
        raise ValueError(f"{len(forced)} forced experts for {len(prompts)} prompts; give one per prompt (None = route)")
    wanted = [None if f is None else _expert_index(mm, f) for f in (forced or [None] * len(prompts))]
    device = next(mm.model.parameters()).device
    out: list[Answer] = []
    for i in range(0, len(prompts), batch_size):
        out += _answer_batch(mm, tokenizer, list(prompts[i:i + batch_size]), wanted[i:i + batch_size],
                             max_length, max_new_tokens, threshold, device)
    return out


def _answer_batch(mm: MixtureModel, tok: Any, prompts: list[str], wanted: list[int | None], max_length: int,
                  max_new_tokens: int, threshold: float | None, device: torch.device) -> list[Answer]:
    encoded = [{"input_ids": encode_prompt(tok, p, max_length)} for p in prompts]
    experts: list[int | None] = list(wanted)
    confidence: list[float | None] = [None] * len(prompts)
    routed = [i for i, w in enumerate(wanted) if w is None]
    if mm.spec.routing == "sequence" and routed:
        b = to_device(collate([encoded[i] for i in routed], tok.pad_token_id, left_pad=True), device)
        idx, conf = decide(mm, b["input_ids"], b["attention_mask"], threshold)
        for j, i in enumerate(routed):
            experts[i], confidence[i] = int(idx[j]), float(conf[j])
    texts: list[str] = [""] * len(prompts)
    # one generate call per kind of row: the base model (adapters off), the chosen experts, token-level routing
    groups = {"base": [i for i, e in enumerate(experts) if e == NO_EXPERT],
              "expert": [i for i, e in enumerate(experts) if e is not None and e != NO_EXPERT],
              "token": [i for i, e in enumerate(experts) if e is None]}
    for kind, rows in groups.items():
        if not rows:
            continue
        b = to_device(collate([encoded[i] for i in rows], tok.pad_token_id, left_pad=True), device)
        expert = torch.tensor([experts[i] for i in rows], device=device) if kind == "expert" else None
        seqs, _ = mm.generate(b["input_ids"], b["attention_mask"], expert=expert, adapters_off=kind == "base",
                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
        for i, t in zip(rows, tok.batch_decode(seqs[:, b["input_ids"].shape[1]:], skip_special_tokens=True)):
            texts[i] = t.strip()

    def name(e: int | None) -> str:
        return TOKEN_LEVEL if e is None else FALLBACK if e == NO_EXPERT else mm.spec.experts[e]

    return [Answer(texts[i], name(experts[i]), confidence[i]) for i in range(len(prompts))]
