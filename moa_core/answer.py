"""Prompts in, answers out: the one path from instruction text to generated text with the expert that
answered it and the router's confidence. The served model (pyfunc), `moa generate` and the tests use it.

MoA's router decides per prompt; MoDULA's routes every token, and its confidence is pooled over the prompt
(moa_core.fallback). Below the fallback threshold a prompt is answered by the base model (MoA, expert "base")
or by MoDULA's universal expert alone (expert "universal"). A forced expert skips the router: an expert name
(MoA), "universal" (MoDULA), or "base" (any method).
"""

from __future__ import annotations

from .routing import Routing

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .batching import collate, encode_prompt, to_device
from .fallback import FALLBACK, NO_EXPERT, UNIVERSAL, confidences, fallback_name
from .model import MixtureModel

TOKEN_LEVEL = "(token-level mixture)"
"""The expert reported where the experts were mixed per token (MoSLD, MoDULA above the threshold)."""


@dataclass
class Answer:
    text: str
    expert: str
    confidence: float | None  # the router's; None where the expert was forced, or for MoSLD (no confidence)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Plan:
    """How one prompt is answered: `kind` in base | expert | universal | mixed (token-level routing)."""

    kind: str
    expert: int = NO_EXPERT


def expert_names(mm: MixtureModel) -> list[str]:
    """Names `forced` accepts: a MoA mixture's experts, MoDULA's "universal", and "base"."""
    if mm.spec.routing == Routing.SEQUENCE:
        return [*mm.spec.experts, FALLBACK]
    return [UNIVERSAL, FALLBACK] if fallback_name(mm.spec) == UNIVERSAL else [FALLBACK]


def _forced_plan(mm: MixtureModel, name: str) -> _Plan:
    if name not in expert_names(mm):
        raise ValueError(f"unknown expert {name!r}; this model can be asked with {expert_names(mm)}"
                         + ("" if mm.spec.routing == Routing.SEQUENCE else f" ({mm.spec.method} mixes its experts per token)"))
    if name == FALLBACK:
        return _Plan("base")
    if name == UNIVERSAL and mm.spec.routing != Routing.SEQUENCE:
        return _Plan("universal")
    return _Plan("expert", mm.spec.experts.index(name))


@torch.no_grad()
def answer(mm: MixtureModel, tokenizer: Any, prompts: Sequence[str], *, max_length: int, max_new_tokens: int,
           threshold: float | None = None, forced: Sequence[str | None] | None = None,
           batch_size: int = 16) -> list[Answer]:
    """Greedy answers to instructions. `forced[i]` (see `expert_names`, or None = route) skips the router for
    prompt i; `threshold` is the fallback threshold (None: never fall back)."""
    if forced is not None and len(forced) != len(prompts):
        raise ValueError(f"{len(forced)} forced experts for {len(prompts)} prompts; give one per prompt (None = route)")
    plans = [None if f is None else _forced_plan(mm, f) for f in (forced or [None] * len(prompts))]
    device = next(mm.model.parameters()).device
    out: list[Answer] = []
    for i in range(0, len(prompts), batch_size):
        out += _answer_batch(mm, tokenizer, list(prompts[i:i + batch_size]), plans[i:i + batch_size],
                             max_length, max_new_tokens, threshold, device)
    return out


def _answer_batch(mm: MixtureModel, tok: Any, prompts: list[str], forced: list[_Plan | None], max_length: int,
                  max_new_tokens: int, threshold: float | None, device: torch.device) -> list[Answer]:
    encoded = [{"input_ids": encode_prompt(tok, p, max_length)} for p in prompts]
    plans: list[_Plan] = [p or _Plan("mixed") for p in forced]
    confidence: list[float | None] = [None] * len(prompts)
    routed = [i for i, p in enumerate(forced) if p is None]
    if routed and fallback_name(mm.spec) is not None:
        experts, confs = confidences(mm, [encoded[i] for i in routed], tok.pad_token_id, device)
        for i, e, c in zip(routed, experts, confs):
            confidence[i] = c
            unsure = threshold is not None and c < threshold
            if e is not None:  # MoA: the router's expert, or the base model
                plans[i] = _Plan("base") if unsure else _Plan("expert", e)
            elif unsure:  # MoDULA: the universal expert alone
                plans[i] = _Plan("universal")
    texts: list[str] = [""] * len(prompts)
    for kind in ("base", "expert", "universal", "mixed"):  # one generate call per kind of row
        rows = [i for i, p in enumerate(plans) if p.kind == kind]
        if rows:
            for i, t in zip(rows, _generate(mm, tok, [encoded[i] for i in rows], [plans[i] for i in rows],
                                            kind, max_new_tokens, device)):
                texts[i] = t
    names = {"base": FALLBACK, "universal": UNIVERSAL, "mixed": TOKEN_LEVEL}
    return [Answer(texts[i], names.get(p.kind) or mm.spec.experts[p.expert], confidence[i])
            for i, p in enumerate(plans)]


def _generate(mm: MixtureModel, tok: Any, encoded: list[dict[str, list[int]]], plans: list[_Plan], kind: str,
              max_new_tokens: int, device: torch.device) -> list[str]:
    b = to_device(collate(encoded, tok.pad_token_id, left_pad=True), device)
    n = b["input_ids"].shape[0]
    route: dict[str, Any] = {}
    if kind == "base":
        route["adapters_off"] = True
    elif kind == "expert":
        route["expert"] = torch.tensor([p.expert for p in plans], device=device)
    elif kind == "universal":  # MoDULA-Flan: expert 0 is the universal one; MoDULA-Res: it sits outside the stack
        if UNIVERSAL in mm.spec.experts:
            route["expert"] = torch.full((n,), mm.spec.experts.index(UNIVERSAL), device=device)
        else:
            route["experts_off"] = True
    seqs, _ = mm.generate(b["input_ids"], b["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **route)
    return [t.strip() for t in tok.batch_decode(seqs[:, b["input_ids"].shape[1]:], skip_special_tokens=True)]
