"""How sure the MoA router is, and what happens when it is not sure enough: the out-of-domain fallback.

The confidence of a MoA routing decision is the softmax probability of the chosen expert under the router
that decides: the last layer's router (`router.inference: last`), or the mean over the layers' routers of the
chosen expert's probability (`vote`). MoDULA routes every token: its confidence is the last layer's router's
top probability, averaged over the prompt's tokens. A prompt whose confidence is below the threshold is
answered by the base model (MoA: adapters off; reported as expert "base") or by MoDULA's universal expert
alone (reported as "universal"). MoSLD has no general expert to fall back to.

`router.fallback_threshold: auto` calibrates the threshold on the validation split: the highest value that
still keeps at least `FALLBACK_KEEP` of the in-domain validation prompts routed (not fallen back).
"""

from __future__ import annotations

from .routing import Routing

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .batching import collate, encode_prompt, to_device
from .config import MoAConfig, SourceConfig
from .model import MixtureError, MixtureModel

FALLBACK = "base"
"""The expert name reported for a prompt answered by the base model (MoA's fallback)."""
UNIVERSAL = "universal"
"""The expert name reported for a prompt answered by MoDULA's universal expert alone (MoDULA's fallback)."""
NO_EXPERT = -1
"""Expert index of a fallen-back row in `decide`'s output."""
FALLBACK_KEEP = 0.99
"""`auto` calibration: the share of in-domain validation prompts that must stay routed."""


def fallback_name(spec: Any) -> str | None:
    """What answers a prompt the router is unsure of: "base" for sequence routing (MoA: adapters off),
    "universal" for dense routing (MoDULA: its universal expert alone), None for top-k routing (MoSLD: every
    expert is a routed one, none is general, so it has no fallback)."""
    return {Routing.SEQUENCE: FALLBACK, Routing.DENSE: UNIVERSAL}.get(spec.routing)


def routing_confidence(logits: Tensor, expert: Tensor, inference: str) -> Tensor:
    """logits [L, B, E] (one router per layer), expert [B] chosen -> confidence [B] in (0, 1]."""
    probs = logits.float().softmax(-1)  # [L, B, E]
    chosen = probs.gather(-1, expert.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)  # [L, B]
    return chosen[-1] if inference == "last" else chosen.mean(0)


def check_fallback_capable(mm: MixtureModel) -> None:
    if fallback_name(mm.spec) is None:
        raise MixtureError(
            f"{mm.spec.method} routes every token over routed experts only, so it has nothing to fall back to; "
            "set router.fallback_threshold: off, or use method: moa or modula-*")


@torch.no_grad()
def decide(mm: MixtureModel, input_ids: Tensor, attention_mask: Tensor,
           threshold: float | None) -> tuple[Tensor, Tensor]:
    """MoA: left-padded prompts [B, T] -> (expert [B], NO_EXPERT where the router fell back; confidence [B])."""
    if mm.spec.routing != Routing.SEQUENCE:
        raise MixtureError(f"{mm.spec.method} routes per token; it has no expert per prompt (use token_confidence)")
    expert, logits = mm.route(input_ids, attention_mask)
    conf = routing_confidence(logits, expert, mm.spec.inference)
    if threshold is not None:
        expert = torch.where(conf < threshold, torch.full_like(expert, NO_EXPERT), expert)
    return expert, conf


@torch.no_grad()
def token_confidence(mm: MixtureModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Token-level routing (MoDULA): right-padded prompts [B, T] -> confidence [B]: per prompt token, the
    deciding (last) layer's router's top softmax probability, averaged over the prompt's tokens as MoA pools."""
    captured: list[Tensor] = []
    hook = mm.routers[-1].register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        mm(input_ids, attention_mask)
    finally:
        hook.remove()
    top = captured[-1].float().softmax(-1).max(-1).values  # [B, T]
    m = attention_mask.to(top.dtype)
    return (top * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def confidences(mm: MixtureModel, encoded: Sequence[dict[str, list[int]]], pad_id: int,
                device: torch.device) -> tuple[list[int | None], list[float]]:
    """Encoded prompts -> (the routed expert per prompt, None for token-level routing; confidence per prompt)."""
    check_fallback_capable(mm)
    if mm.spec.routing == Routing.SEQUENCE:
        b = to_device(collate(list(encoded), pad_id, left_pad=True), device)
        idx, conf = decide(mm, b["input_ids"], b["attention_mask"], None)
        return idx.tolist(), conf.tolist()
    b = to_device(collate(list(encoded), pad_id), device)  # right-padded: positions count from each prompt's start
    return [None] * len(encoded), token_confidence(mm, b["input_ids"], b["attention_mask"]).tolist()


@torch.no_grad()
def prompt_confidences(mm: MixtureModel, tokenizer: Any, instructions: Sequence[str], max_length: int,
                       batch_size: int) -> tuple[list[int | None], list[float]]:
    """Route instructions (no threshold) -> (expert index per prompt, None if token-level; confidence per prompt)."""
    device = next(mm.model.parameters()).device
    experts: list[int | None] = []
    confs: list[float] = []
    for i in range(0, len(instructions), batch_size):
        enc = [{"input_ids": encode_prompt(tokenizer, s, max_length)} for s in instructions[i:i + batch_size]]
        e, c = confidences(mm, enc, tokenizer.pad_token_id, device)
        experts += e
        confs += c
    return experts, confs


def calibrate_threshold(in_domain_confidences: Sequence[float], keep: float = FALLBACK_KEEP) -> float:
    """The highest threshold under which at least `keep` of the in-domain prompts stay routed
    (confidence >= threshold)."""
    if not in_domain_confidences:
        raise ValueError("no in-domain validation prompts to calibrate the fallback threshold on")
    ordered = sorted(in_domain_confidences)
    may_drop = math.floor((1.0 - keep) * len(ordered) + 1e-9)  # prompts allowed below the threshold
    return float(ordered[may_drop])


def resolve_threshold(mm: MixtureModel, tokenizer: Any, val_by_domain: dict[str, Sequence[Any]],
                      cfg: MoAConfig) -> float | None:
    """router.fallback_threshold for this mixture: None (off, or a method without a fallback: MoSLD), the number
    given, or with `auto` the calibrated value on the validation prompts."""
    setting = cfg.router.fallback_threshold
    if setting == "off" or fallback_name(mm.spec) is None:
        return None
    if setting != "auto":
        return float(setting)
    instructions = [r["instruction"] if isinstance(r, dict) else r.instruction
                    for recs in val_by_domain.values() for r in recs]
    _, confs = prompt_confidences(mm, tokenizer, instructions, cfg.train.max_length, cfg.evaluate.batch_size)
    return calibrate_threshold(confs)


@dataclass
class FallbackReport:
    """Fallback on in-domain test prompts and on out-of-domain prompts, at one threshold.

    precision: share of fallen-back prompts that were out of domain (None when none fell back); recall: share of out-of-domain prompts
    that fell back; in_domain_kept: share of in-domain prompts still routed; router_accuracy: share of
    in-domain prompts routed to their own expert with the fallback on (router_accuracy_no_fallback: off)."""

    threshold: float
    precision: float | None
    recall: float
    in_domain_kept: float
    router_accuracy: float | None  # None for token-level routing: no expert per prompt to score
    router_accuracy_no_fallback: float | None
    in_domain: int
    out_of_domain: int

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def fallback_report(threshold: float, gold: Sequence[str], routed: Sequence[str | None], in_conf: Sequence[float],
                    ood_conf: Sequence[float]) -> FallbackReport:
    """gold/routed/in_conf: per in-domain prompt (routed without fallback; routed None: token-level routing);
    ood_conf: per out-of-domain prompt."""
    if not gold or not ood_conf:
        raise ValueError("a fallback report needs in-domain and out-of-domain prompts")
    in_fell = [c < threshold for c in in_conf]
    ood_fell = sum(c < threshold for c in ood_conf)
    fell = ood_fell + sum(in_fell)
    per_prompt = all(r is not None for r in routed)
    correct = [g == r and not f for g, r, f in zip(gold, routed, in_fell)]
    return FallbackReport(
        threshold=threshold,
        precision=ood_fell / fell if fell else None,
        recall=ood_fell / len(ood_conf),
        in_domain_kept=1.0 - sum(in_fell) / len(gold),
        router_accuracy=sum(correct) / len(gold) if per_prompt else None,
        router_accuracy_no_fallback=sum(g == r for g, r in zip(gold, routed)) / len(gold) if per_prompt else None,
        in_domain=len(gold),
        out_of_domain=len(ood_conf),
    )


def out_of_domain_instructions(cfg: MoAConfig, per_category: int, seed: int = 0) -> dict[str, list[str]]:
    """Prompts from packaged text that is in no domain: the BBC news categories no domain uses (e.g. politics,
    entertainment, tech when business and sport are domains), `per_category` each, drawn with `seed`."""
    import random

    from .sources import BBC_CATEGORIES, load_source

    used = {d.source.category for d in cfg.domains if d.source.kind == "builtin" and d.source.name == "bbc"}
    free = [c for c in BBC_CATEGORIES if c not in used]
    if not free:
        raise ValueError("every BBC category is a domain, so no packaged text is out of domain; "
                         "the fallback evaluation needs one BBC category that no domain uses")
    out: dict[str, list[str]] = {}
    for category in free:
        rows = [r["instruction"] for r in load_source(SourceConfig(kind="builtin", name="bbc", category=category)).rows
                if isinstance(r["instruction"], str)]  # a row that is not UTF-8 text stays out
        out[category] = random.Random(f"{seed}-{category}").sample(rows, min(per_category, len(rows)))
    return out


def evaluate_fallback(mm: MixtureModel, tokenizer: Any, test_by_domain: dict[str, Sequence[Any]],
                      ood_by_category: dict[str, Sequence[str]], threshold: float, cfg: MoAConfig) -> FallbackReport:
    """Route every in-domain test prompt and every out-of-domain prompt once and score the fallback at `threshold`."""
    gold: list[str] = []
    instructions: list[str] = []
    for name, recs in test_by_domain.items():
        gold += [name] * len(recs)
        instructions += [r["instruction"] if isinstance(r, dict) else r.instruction for r in recs]
    size, bs = cfg.train.max_length, cfg.evaluate.batch_size
    routed, in_conf = prompt_confidences(mm, tokenizer, instructions, size, bs)
    _, ood_conf = prompt_confidences(mm, tokenizer, [p for ps in ood_by_category.values() for p in ps], size, bs)
    return fallback_report(threshold, gold, [None if i is None else mm.spec.experts[i] for i in routed], in_conf, ood_conf)
