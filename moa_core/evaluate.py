"""Evaluating one system (a mixture with a routing rule) on the held-out test split of every domain.

A "system" is a `MixtureModel` plus how its expert is chosen (an `EvalRouting`, or an int):
- OFF:    adapters off, i.e. the base model;
- GOLD:   each row's own domain expert (Single-LoRA, label known; the MoA paper's oracle row);
- int k:  expert k for every row (LoRA-mixed: a one-expert mixture);
- ROUTER: MoA inference: the router decides once per prompt, the label is unknown;
- TOKEN:  token-level routers (MoSLD, MoDULA) decide per token.
`learned_routing(spec)` is the one a trained mixture answers unlabeled prompts with (ROUTER or TOKEN).

Per domain: perplexity of the response given the prompt over the whole test split, and BLEU/ROUGE-L
of greedy generations on the first `evaluate.max_samples` test rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

from . import metrics
from .batching import autocast, collate, encode, encode_prompt, to_device
from .config import MoAConfig
from .model import MixtureModel, MixtureSpec
from .routing import Routing
from .stats import RowStats
from .stopping import raise_if_stop_requested


class EvalRouting(StrEnum):
    OFF = "off"
    GOLD = "gold"
    ROUTER = "router"
    TOKEN = "token"


def learned_routing(spec: MixtureSpec) -> EvalRouting:
    """How a trained mixture routes a prompt whose domain is unknown: its sequence router, or per token."""
    return EvalRouting.ROUTER if spec.routing == Routing.SEQUENCE else EvalRouting.TOKEN


@dataclass
class SystemEval:
    per_domain: dict[str, dict[str, float]]
    gold: list[str] = field(default_factory=list)  # per test row, for router accuracy
    routed: list[str] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)  # a few generations to read
    rows: dict[str, RowStats] = field(default_factory=dict)  # per domain, per test row: for confidence intervals

    @property
    def router_accuracy(self) -> float | None:
        return metrics.router_accuracy(self.gold, self.routed) if self.routed else None

    @property
    def router_accuracy_by_domain(self) -> dict[str, float]:
        return metrics.router_accuracy_by_domain(self.gold, self.routed) if self.routed else {}


def _field(rec: Any, name: str) -> str:
    return rec[name] if isinstance(rec, dict) else getattr(rec, name)


def _on(mm: MixtureModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A collated batch on the model's device."""
    return to_device(batch, next(mm.model.parameters()).device)


@torch.no_grad()
def _route_rows(mm: MixtureModel, tokenizer: Any, prompts: list[list[int]], routing: EvalRouting | int, domain_idx: int,
                batch_size: int) -> list[int] | None:
    """Expert index per row, or None for OFF/TOKEN."""
    if routing in (EvalRouting.OFF, EvalRouting.TOKEN):
        return None
    if routing == EvalRouting.GOLD:
        return [domain_idx] * len(prompts)
    if isinstance(routing, int):
        return [routing] * len(prompts)
    chosen: list[int] = []
    for i in range(0, len(prompts), batch_size):
        b = _on(mm, collate([{"input_ids": p} for p in prompts[i:i + batch_size]], tokenizer.pad_token_id, left_pad=True))
        idx, _ = mm.route(b["input_ids"], b["attention_mask"])
        chosen.extend(idx.tolist())
    return chosen


def evaluate_system(
    mm: MixtureModel, tokenizer: Any, test_by_domain: dict[str, list[Any]], cfg: MoAConfig, routing: EvalRouting | int,
    progress: Callable[[str], None] | None = None,
) -> SystemEval:
    with torch.no_grad(), autocast(cfg.train, next(mm.model.parameters()).device):
        return _evaluate_system(mm, tokenizer, test_by_domain, cfg, routing, progress)


def _evaluate_system(
    mm: MixtureModel, tokenizer: Any, test_by_domain: dict[str, list[Any]], cfg: MoAConfig, routing: Routing,
    progress: Callable[[str], None] | None = None,
) -> SystemEval:
    mm.eval()
    ev = cfg.evaluate
    max_len = cfg.train.max_length
    result = SystemEval(per_domain={})
    off = routing == EvalRouting.OFF
    for name, records in test_by_domain.items():
        raise_if_stop_requested(f"evaluation stopped before domain {name!r}")
        if progress:
            progress(name)
        dom_idx = mm.spec.experts.index(name) if name in mm.spec.experts else -1
        if routing == EvalRouting.GOLD and dom_idx < 0:
            raise ValueError(f"domain {name!r} has no expert in this mixture ({mm.spec.experts})")
        prompts = [encode_prompt(tokenizer, _field(r, "instruction"), max_len) for r in records]
        experts = _route_rows(mm, tokenizer, prompts, routing, dom_idx, ev.batch_size)
        if routing == EvalRouting.ROUTER and experts is not None:
            result.gold += [name] * len(records)
            result.routed += [mm.spec.experts[e] for e in experts]
        # perplexity of the response given the prompt
        row_stats = RowStats()
        if routing == EvalRouting.ROUTER and experts is not None:
            row_stats.routed_ok = [float(e == dom_idx) for e in experts]
        enc = [encode(tokenizer, r, max_len) for r in records]
        for i in range(0, len(enc), ev.batch_size):
            # a domain of every test row takes minutes on a GPU: a stop request is honoured between batches
            raise_if_stop_requested(f"evaluation stopped in domain {name!r} (perplexity)")
            b = _on(mm, collate(enc[i:i + ev.batch_size], tokenizer.pad_token_id,
                                None if experts is None else experts[i:i + ev.batch_size]))
            out = mm(b["input_ids"], b["attention_mask"], expert=b.get("expert"), adapters_off=off,
                     pool_mask=b["attention_mask"] * (b["labels"] == -100))
            s, n = metrics.token_nll(out.logits, b["labels"])
            row_stats.nll += s.tolist()
            row_stats.tokens += n.tolist()
        # generation (max_samples 0: every test row)
        k = min(ev.max_samples or len(records), len(records))
        preds: list[str] = []
        for i in range(0, k, ev.batch_size):
            raise_if_stop_requested(f"evaluation stopped in domain {name!r} (generation)")
            j = min(k, i + ev.batch_size)
            b = _on(mm, collate([{"input_ids": p} for p in prompts[i:j]], tokenizer.pad_token_id, left_pad=True))
            expert = None if experts is None else torch.tensor(experts[i:j], device=b["input_ids"].device)
            seqs, _ = mm.generate(
                b["input_ids"], b["attention_mask"], expert=expert, adapters_off=off,
                max_new_tokens=ev.max_new_tokens, do_sample=ev.do_sample, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = seqs[:, b["input_ids"].shape[1]:]
            preds += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        refs = [_field(r, "response") for r in records[:k]]
        # references are cut to about the generation budget so BLEU's brevity penalty measures content,
        # not the length cap
        refs_cut = [tokenizer.decode(tokenizer(r, add_special_tokens=False)["input_ids"][: ev.max_new_tokens]) for r in refs]
        row_stats.bleu = metrics.bleu_statistics(preds, refs_cut)
        row_stats.rougeL = metrics.rouge_l_rows(preds, refs_cut)
        result.rows[name] = row_stats
        result.per_domain[name] = {
            "ppl": metrics.perplexity(sum(row_stats.nll), sum(row_stats.tokens)),
            "bleu": metrics.bleu(preds, refs_cut),
            "rougeL": metrics.rouge_l(preds, refs_cut),
        }
        result.samples += [
            {"domain": name, "instruction": _field(r, "instruction")[:300], "reference": ref[:300], "prediction": p[:300]}
            for r, ref, p in list(zip(records, refs_cut, preds))[:2]
        ]
    return result
