"""From records to tensors: prompt format, tokenisation with the prompt masked out, mixed-domain batches.

Records are dicts (or `data.Record`) with `instruction`, `response` and a domain index. A batch is
`{"input_ids", "attention_mask", "labels": [B, T], "expert": [B]}`; `labels` is -100 on the prompt and
padding so the LM loss counts response tokens only.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import TrainConfig

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CUDA when train.precision is bf16 (float32 weights, optimizer and loss reduction);
    a no-op elsewhere."""
    if cfg.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def format_prompt(tokenizer: Any, instruction: str) -> str:
    """The model's own chat template when it has one (SmolLM2: ChatML), else a plain instruction template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(instruction=instruction)


def _field(rec: Any, name: str) -> str:
    return rec[name] if isinstance(rec, dict) else getattr(rec, name)


def encode(tokenizer: Any, rec: Any, max_length: int) -> dict[str, list[int]]:
    """One record -> input_ids and labels (prompt masked). The prompt is cut from the left and the
    response from the right so that at least a quarter of the budget stays for the response."""
    prompt = tokenizer(format_prompt(tokenizer, _field(rec, "instruction")), add_special_tokens=False)["input_ids"]
    response = tokenizer(_field(rec, "response"), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    keep_prompt = min(len(prompt), max_length - min(len(response), max(1, max_length // 4)))
    prompt = prompt[len(prompt) - keep_prompt:]
    response = response[: max_length - len(prompt)]
    return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}


def encode_prompt(tokenizer: Any, instruction: str, max_length: int) -> list[int]:
    ids = tokenizer(format_prompt(tokenizer, instruction), add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int, experts: Sequence[int] | None = None,
            left_pad: bool = False) -> dict[str, Tensor]:
    """Pad a list of encoded examples -> batch tensors [B, T] (+ expert [B] when given)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        sl = slice(T - n, T) if left_pad else slice(0, n)
        ids[i, sl] = torch.tensor(e["input_ids"])
        mask[i, sl] = 1
        if "labels" in e:
            labels[i, sl] = torch.tensor(e["labels"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if experts is not None:
        batch["expert"] = torch.tensor(list(experts), dtype=torch.long)
    return batch


def _reshuffled(n: int, rng: random.Random) -> Iterator[int]:
    """0..n-1 forever, in a fresh order from `rng` each epoch (shuffled in place, first when first drawn)."""
    order = list(range(n))
    while True:
        rng.shuffle(order)
        yield from order


def _collated(draws: Iterator[tuple[int, dict[str, list[int]]]], batch_size: int, pad_id: int,
              start_step: int, by_domain: bool = False) -> Iterator[dict[str, Tensor]]:
    """Batches of `batch_size` (domain, example) draws, ordered by domain (stably) with `by_domain`; those before
    `start_step` are drawn and dropped, so a resumed run sees the batches an uninterrupted run would have seen."""
    step = 0
    while True:
        drawn = [next(draws) for _ in range(batch_size)]
        if by_domain:
            drawn.sort(key=lambda kr: kr[0])
        if step >= start_step:
            yield collate([row for _, row in drawn], pad_id, [k for k, _ in drawn])
        step += 1


def _check_domains(encoded: Sequence[Sequence[Any]]) -> None:
    if not encoded or any(len(d) == 0 for d in encoded):
        raise ValueError("every domain needs at least one training example")


def balanced_batches(
    encoded: Sequence[Sequence[dict[str, list[int]]]], batch_size: int, seed: int, pad_id: int,
    start_step: int = 0, expert_major: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Endless mixed-domain batches: `encoded[k]` holds domain k's examples. Each batch draws the
    domains round-robin (so every domain is equally represented however large it is), each domain's
    examples in a reshuffled order per epoch. Deterministic in (seed, step): a resumed run at
    `start_step` sees the batches an uninterrupted run would have seen.

    expert_major: each batch's rows ordered by domain (the same rows; the drawing order within a domain kept).
    When the domains divide `batch_size` every batch is then one equal block per domain, in domain order: what
    `MixtureModel.forward(expert_blocks=True)` takes (see `expert_blocks`)."""
    _check_domains(encoded)
    rng = random.Random(seed)
    orders = [_reshuffled(len(d), rng) for d in encoded]

    def draws() -> Iterator[tuple[int, dict[str, list[int]]]]:
        while True:
            for k, d in enumerate(encoded):
                yield k, d[next(orders[k])]

    return _collated(draws(), batch_size, pad_id, start_step, by_domain=expert_major)


def expert_blocks(n_domains: int, batch_size: int) -> bool:
    """Whether `balanced_batches(expert_major=True)` gives every batch as one equal block per domain."""
    return batch_size % n_domains == 0


def natural_batches(
    encoded: Sequence[Sequence[dict[str, list[int]]]], batch_size: int, seed: int, pad_id: int,
    start_step: int = 0,
) -> Iterator[dict[str, Tensor]]:
    """Endless batches from the pooled rows of every domain, reshuffled each epoch: each domain appears in
    proportion to its size (one LoRA trained on the concatenated data, LLaMA-Factory's `mix_strategy: concat`).
    Deterministic in (seed, step) like `balanced_batches`, and with one domain the very same batches."""
    _check_domains(encoded)
    pool = [(k, row) for k, d in enumerate(encoded) for row in d]
    return _collated((pool[i] for i in _reshuffled(len(pool), random.Random(seed))), batch_size, pad_id, start_step)


BATCHES = {"balanced": balanced_batches, "natural": natural_batches}  # train.mixed_sampling -> batch source


def fixed_batches(encoded: Sequence[dict[str, list[int]]], experts: Sequence[int], batch_size: int, pad_id: int,
                  left_pad: bool = False) -> Iterator[dict[str, Tensor]]:
    """Evaluation batches in the given order (no shuffling, no repetition)."""
    for i in range(0, len(encoded), batch_size):
        yield collate(encoded[i:i + batch_size], pad_id, experts[i:i + batch_size], left_pad=left_pad)
