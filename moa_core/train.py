"""Training loops: stage-1 PEFT LoRAs (`train_peft_lora`) and one phase of a mixture (`train_mixture`).

Each method's recipe (which phases, with which parameter groups and routing) lives in moa_core.methods.
All of them share `train_loop`: AdamW, linear warm-up + cosine decay, gradient clipping, a checkpoint
every `checkpoint_every` steps (trainable tensors, optimizer, scheduler, step, loss history) written
atomically, automatic resume from it, and a hard stop on a non-finite loss that keeps the last good
checkpoint. Batches are deterministic in (seed, step), so a resumed run sees the batches an
uninterrupted run would have seen and ends at the same step count.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import Tensor, nn

from .atomic import atomic_dir_write, atomic_write
from .batching import BATCHES, autocast, balanced_batches, encode, expert_blocks, fixed_batches, to_device
from .config import MoAConfig, TrainConfig
from .distributed import DataParallel, check_sums_loss
from .incremental import sort_adapter_config
from .metrics import token_nll
from .model import MixtureModel
from .stopping import StopRequested, stop_requested

# PEFT's PeftModel reads transformers' deprecated `is_gradient_checkpointing` on every adapter it wraps: one
# FutureWarning per expert, retry and thread in a run's log, about PEFT's code, not ours. Only that message.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

LogFn = Callable[[int, dict[str, float]], None]
CKPT_FILE = "checkpoint.pt"
LM_TOKENS = "num_items_in_batch"  # batch key set by train_loop under DDP; the HF loss's own keyword


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the job stops, the last good checkpoint is kept."""


@dataclass
class TrainResult:
    steps: int  # the step budget
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per logged step
    seconds: float = 0.0
    tokens: int = 0
    trainable_params: int = 0
    resumed_from: int = 0
    # early stopping (train.eval_every > 0): validation loss per evaluated step (step 0 = before training),
    # the step whose parameters were kept, and the step training stopped at
    val_history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_at: int | None = None

    @property
    def best_val_loss(self) -> float | None:
        """The validation loss of the kept step."""
        return next((v["val_loss"] for v in self.val_history if v["step"] == self.best_step), None)

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def early_stopping_summary(result: TrainResult) -> dict[str, float | int]:
    """The early-stopping figures of a stage for its metrics file and MLflow (empty when it did not validate)."""
    if not result.val_history:
        return {}
    return {"best_step": int(result.best_step or 0), "best_val_loss": float(result.best_val_loss or 0.0),
            "steps_run": int(result.stopped_at or result.steps)}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train_loop(
    params: dict[str, nn.Parameter],
    batches: Callable[[int], Iterator[dict[str, Tensor]]],
    step_fn: Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, float]]],
    steps: int,
    lr: float,
    cfg: TrainConfig,
    ckpt_dir: Path | None = None,
    on_log: LogFn | None = None,
    fingerprint: str = "",
    lr_for: Callable[[str], float] | None = None,
    dp: DataParallel | None = None,
    validate: Callable[[], float] | None = None,
    clip: Callable[[dict[str, Tensor]], None] | None = None,
) -> TrainResult:
    """Optimise `params` for `steps` steps (`lr_for(name)` may give some parameters their own rate). `batches(start_step)` yields the batches from that step on;
    `step_fn(batch)` returns (loss, extra metrics). `clip(batch)` clips the gradients after each backward pass,
    given the step's whole batch (all ranks' rows); by default their joint norm is clipped to `cfg.grad_clip`. Resumes from `ckpt_dir/checkpoint.pt` if present and
    written for the same `fingerprint` (a hash of the settings and data); a stale one is ignored.

    With `dp` (several torchrun processes), each rank steps on its rows of every global batch through a
    DDP-wrapped model in `step_fn`; logged losses are averaged over ranks, and only rank 0 writes the
    checkpoint and calls `on_log`.

    Early stopping: with `validate` (a validation loss, lower is better) and `cfg.eval_every` > 0, the loss is
    measured before the first step and every `eval_every` steps; the parameters of the best evaluation are
    kept in memory and restored at the end, and training stops after `cfg.patience` evaluations without
    improvement. Because step 0 competes, a stage that starts from trained weights (MoA stage 2 from the
    stage-1 experts) can never end worse on validation than where it started."""
    rates: dict[float, list[nn.Parameter]] = {}
    for name, p in params.items():
        rates.setdefault(lr_for(name) if lr_for else lr, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": r} for r, ps in rates.items()], lr=lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_fraction * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    result = TrainResult(steps=steps, trainable_params=sum(p.numel() for p in params.values()))
    ckpt = ckpt_dir / CKPT_FILE if ckpt_dir else None
    start = 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt is not None and ckpt.exists() else None
    if state is not None and state.get("fingerprint") == fingerprint and set(state["params"]) == set(params):
        # weights_only=True: tensors and plain containers only, no pickled code
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = result.resumed_from = int(state["step"])
        result.history = list(state["history"])
        result.tokens = int(state["tokens"])
        result.seconds = float(state["seconds"])
    early = validate is not None and cfg.eval_every > 0
    best: dict[str, Tensor] | None = None
    if state is not None and start and early:
        result.val_history = list(state.get("val_history", []))
        result.best_step = state.get("best_step")
        best = state.get("best")
        result.stopped_at = state.get("stopped_at")

    def snapshot() -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in params.items()}

    def evaluate_and_decide(done: int) -> bool:
        """Validation at step `done`; True when patience is exhausted (stop training)."""
        nonlocal best
        val = validate()  # type: ignore[misc]
        if dp is not None:
            val = dp.mean(val)
        prev = result.best_val_loss
        result.val_history.append({"step": float(done), "val_loss": val})
        if prev is None or val < prev - cfg.min_delta:
            best, result.best_step = snapshot(), done
        if on_log and main:
            on_log(done, {"step": float(done), "val_loss": val, "best_step": float(result.best_step or 0)})
        since_best = sum(1 for v in result.val_history if v["step"] > (result.best_step or 0))
        return since_best >= cfg.patience

    t0 = time.perf_counter() - result.seconds
    it = batches(start)
    device = next(iter(params.values())).device
    main = dp is None or dp.is_main
    if dp is not None:  # dropout / DropConnect masks: each rank its own, reproducible per (seed, rank)
        torch.manual_seed(cfg.seed * 7919 + dp.rank)
    if early and start == 0:
        evaluate_and_decide(0)
    stop = result.stopped_at is not None
    for step in range(start, steps):
        if stop:
            break
        batch = whole = next(it)
        result.tokens += int(batch["attention_mask"].sum())  # the global batch's tokens, counted once
        if dp is not None:
            # Each rank's LM loss = its label tokens' loss sum / (the global batch's label tokens / world size):
            # DDP's gradient mean over ranks then equals the one-process gradient of the global token mean.
            label_tokens = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
            batch = {**dp.shard(batch), LM_TOKENS: label_tokens.float() / dp.world_size}
        batch = to_device(batch, device)
        with autocast(cfg, device):
            loss, extra = step_fn(batch)
        # every rank must see the same verdict, or the finite ones would wait forever in the all-reduce
        if not math.isfinite(dp.mean(float(loss.detach())) if dp is not None else float(loss.detach())):
            where = f"the last good checkpoint ({ckpt}) is kept" if ckpt and ckpt.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {step + 1}; {where}. Lower train.lr or check the data, then re-run to resume."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            clip(whole)
        else:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        sched.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == steps or done == 1:
            entry = {"step": float(done), "loss": float(loss.detach()), "lr": sched.get_last_lr()[0], **extra}
            if dp is not None:  # the same decision on every rank, so the collective calls line up
                entry = {k: v if k in ("step", "lr") else dp.mean(v) for k, v in entry.items()}
            result.history.append(entry)
            if on_log and main:
                on_log(done, entry)
        if early and (done % cfg.eval_every == 0 or done == steps):
            stop = evaluate_and_decide(done)
            if stop:
                result.stopped_at = done
        # a stop request (SIGINT/SIGTERM) ends the loop here, after a checkpoint; every rank must agree
        halt = done < steps and not stop and (
            stop_requested() if dp is None else dp.sum(float(stop_requested())) > 0)
        if main and ckpt is not None and (done % cfg.checkpoint_every == 0 or done == steps or stop or halt):
            result.seconds = time.perf_counter() - t0
            _save_checkpoint(ckpt, {
                "step": done, "params": snapshot(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": result.history, "tokens": result.tokens, "seconds": result.seconds,
                "fingerprint": fingerprint, "val_history": result.val_history, "best_step": result.best_step,
                "best": best, "stopped_at": result.stopped_at,
            })
        if halt:
            where = f"checkpoint {ckpt}" if main and ckpt is not None else "no checkpoint (this job keeps none)"
            raise StopRequested(f"stopped after step {done}/{steps}; {where}; re-run to resume")
    if early and best is not None:
        with torch.no_grad():  # keep the parameters of the best validation loss
            for name, p in params.items():
                p.copy_(best[name])
    result.seconds = time.perf_counter() - t0
    return result


def expert_token_shares(expert: Tensor, labels: Tensor, num_experts: int) -> Tensor:
    """[E] each expert's share of a batch's label tokens, from the rows' experts [B] and labels [B, T] (-100 =
    no loss; the first position never has one). The LM loss is a token mean over the batch, so expert e's
    gradient is its share times the gradient of the mean loss over its own rows."""
    tokens = (labels[:, 1:] != -100).sum(1).to(torch.float32)
    per_expert = torch.zeros(num_experts, dtype=torch.float32, device=labels.device).index_add_(0, expert, tokens)
    return per_expert / per_expert.sum().clamp(min=1.0)


# clip_grads_per_expert's concatenated gradients, at most this many elements at a time (128 MiB in bf16): Qwen2-0.5B's
# 8 experts at rank 8 (35M) fit in one chunk, a 7B base's 64 experts at rank 16 would take several.
CLIP_CONCAT_ELEMENTS = 1 << 26


@torch.no_grad()  # as clip_grad_norm_: in place on the gradients, also after a backward with create_graph
def clip_grads_per_expert(stacked: Sequence[Tensor], shared: Sequence[Tensor], max_norm: float, shares: Tensor,
                          concat: bool | None = None) -> None:
    """Give each expert the clipped gradient its own training job would have.

    stacked: parameters whose first dimension indexes the experts (A [E, r, d_in], B [E, d_out, r]); expert e's
    gradient is slice e of each. shares: [E] each expert's share of the batch's loss tokens
    (`expert_token_shares`). The LM loss is a token mean over the batch, so expert e's gradient is share_e x the
    gradient of its own rows' mean loss, the one its job would compute: it is divided by share_e and then its norm
    (over all of e's slices) clipped to `max_norm`, as the job clips. With the routers' loss on (router.eta > 0),
    which also reaches the experts of earlier layers through the hidden states, that part is scaled alike.
    An expert without rows (share 0) has no gradient from them and is left as it is. `shared` (routers, a
    universal expert, a shared A) are clipped together to `max_norm`.

    Cost: a 24-layer model with 7 projections has 336 stacked gradients, and on an accelerator the step is
    host-bound, so there the norms take a fixed handful of operators rather than a few per gradient: the
    gradients, viewed [E, n_i], are concatenated into [E, sum n_i] (per device and dtype, in chunks of at most
    `CLIP_CONCAT_ELEMENTS`, the temporary's bound) for one fp32 norm over dim 1 per chunk (`concat`; None: on an
    accelerator; on an H100 2.3 ms per step against 16.5 ms for the per-slice multi-tensor form it replaced,
    bench/bench_clip.py). On the CPU that copy is the cost at real sizes (SmolLM2-135M's adapters, 8 experts: 47
    ms against 12 ms on 2 cores), so there each gradient's [E] norms are taken where it lies. The scale goes on
    through one multi-tensor multiply."""
    grads = [p.grad for p in stacked if p.grad is not None]
    if grads:
        E = shares.shape[0]
        if any(g.shape[0] != E for g in grads):
            raise ValueError(f"every stacked parameter must hold {E} experts along its first dimension, got "
                             f"{sorted({g.shape[0] for g in grads})}")
        home = grads[0].device
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        if concat is None:
            concat = home.type != "cpu"

        def squared_norms(group: list[Tensor]) -> Tensor:  # [E] the experts' squared norms over the group's slices
            if not concat:
                return sum(torch.linalg.vector_norm(g.reshape(E, -1), dim=1, dtype=torch.float32).square()
                           for g in group)
            chunks: list[list[Tensor]] = [[]]
            size = 0
            for g in group:
                if chunks[-1] and size + g.numel() > CLIP_CONCAT_ELEMENTS:
                    chunks.append([])
                    size = 0
                chunks[-1].append(g.reshape(E, -1))
                size += g.numel()
            return sum(torch.linalg.vector_norm(torch.cat(rows, dim=1), dim=1, dtype=torch.float32).square()
                       for rows in chunks)

        sq = sum(squared_norms(group).to(home) for group in groups.values())  # [E] over all of each expert's slices
        shares = shares.to(home, torch.float32)
        own = sq.sqrt() / shares.clamp(min=1e-12)  # [E] the norm of each expert's own-rows gradient
        scale = torch.where(shares > 0, (max_norm / (own + 1e-6)).clamp(max=1.0) / shares.clamp(min=1e-12), 1.0)
        for (device, dtype), group in groups.items():
            # the scale written out at each gradient shape (a handful: one per projection's A and B), since torch's
            # multi-tensor multiply launches one kernel per tensor unless both tensors of each pair have one shape
            mine = scale.to(device, dtype)
            full = {shape: mine.view(-1, *[1] * (len(shape) - 1)).expand(shape).contiguous()
                    for shape in {g.shape for g in group}}
            torch._foreach_mul_(group, [full[g.shape] for g in group])
    rest = [p for p in shared if p.grad is not None]
    if rest:
        torch.nn.utils.clip_grad_norm_(rest, max_norm)


def per_expert_clip(mm: MixtureModel, params: Iterable[nn.Parameter], max_norm: float,
                    expert_of: Callable[[dict[str, Tensor]], Tensor]) -> Callable[[dict[str, Tensor]], None]:
    """`train_loop`'s `clip` for a mixture whose rows each go through one given expert (`expert_of(batch)` -> [B]):
    each trained expert's gradient as its own job would have it, clipped (`clip_grads_per_expert`), the other
    trained parameters (routers, a universal expert, a shared A) clipped together."""
    params = list(params)
    mine = {id(p) for p in mm.per_expert_parameters()}
    stacked = [p for p in params if id(p) in mine]
    shared = [p for p in params if id(p) not in mine]
    n_experts = max(w.lora_B.shape[0] for w in mm.wrapped.values())

    def clip(batch: dict[str, Tensor]) -> None:
        shares = expert_token_shares(expert_of(batch), batch["labels"], n_experts)
        clip_grads_per_expert(stacked, shared, max_norm, shares)

    return clip


def encode_domains(tokenizer: Any, records_by_domain: list[list[Any]], max_length: int) -> list[list[dict[str, list[int]]]]:
    return [[encode(tokenizer, r, max_length) for r in recs] for recs in records_by_domain]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off for a validation pass, then every submodule back in the mode it was in."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def validation_loss(
    nll_fn: Callable[[dict[str, Tensor]], Tensor], encoded_val: list[list[dict[str, list[int]]]], batch_size: int,
    pad_id: int, device: torch.device,
) -> float:
    """Mean over domains of each domain's token-mean validation NLL (every domain weighs the same, as the
    averaged perplexity of the results table does). `nll_fn(batch)` -> ([B] summed NLL, [B] token counts) or
    a scalar loss already averaged (then rows are weighted by batch)."""
    per_domain = []
    with torch.no_grad():
        for k, rows in enumerate(encoded_val):
            total, count = 0.0, 0.0
            for b in fixed_batches(rows, [k] * len(rows), batch_size, pad_id):
                out = nll_fn(to_device(b, device))
                if isinstance(out, tuple):
                    total, count = total + float(out[0].sum()), count + float(out[1].sum())
                else:
                    total, count = total + float(out) * len(b["input_ids"]), count + len(b["input_ids"])
            per_domain.append(total / max(count, 1.0))
    return sum(per_domain) / max(1, len(per_domain))


def _val_encoded(tokenizer: Any, val_by_domain: list[list[Any]] | None, cfg: MoAConfig) -> list[list[dict[str, list[int]]]] | None:
    """Encoded validation rows (capped at train.val_rows per domain), or None when early stopping is off."""
    if not val_by_domain or cfg.train.eval_every <= 0 or any(len(v) == 0 for v in val_by_domain):
        return None
    cap = cfg.train.val_rows or None
    return encode_domains(tokenizer, [v[:cap] for v in val_by_domain], cfg.train.max_length)


# ------------------------------------------------------------------------------------- stage 1: PEFT
def train_peft_lora(
    base: nn.Module, tokenizer: Any, records_by_domain: list[list[Any]], cfg: MoAConfig, steps: int,
    out_dir: Path, ckpt_dir: Path | None = None, on_log: LogFn | None = None, fingerprint: str = "",
    dp: DataParallel | None = None, val_by_domain: list[list[Any]] | None = None, init_from: Path | None = None,
) -> TrainResult:
    """One PEFT LoRA on the given domains' records (one domain = a stage-1 expert; all = LoRA-mixed),
    batches drawn as `train.mixed_sampling` says (balanced across domains, or natural; one domain: the same). Saves adapter_model.safetensors + adapter_config.json atomically
    (rank 0 only when `dp` spreads the batches over several processes). `steps` is replaced by
    `train.epochs` when set; `val_by_domain` (same domains) enables early stopping when `train.eval_every` > 0.
    `init_from`: a trained adapter (same lora settings) whose weights the LoRA starts from (train.experts_from: mixed)."""
    torch.manual_seed(cfg.train.seed)
    steps = cfg.train.step_budget(steps, sum(len(r) for r in records_by_domain))
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
    )
    if init_from is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, str(init_from), is_trainable=True)
        got = peft_model.peft_config["default"]
        if (got.r, got.lora_alpha, set(got.target_modules)) != (peft_cfg.r, peft_cfg.lora_alpha, set(peft_cfg.target_modules)):
            raise ValueError(f"{init_from} was trained with other lora settings (r={got.r}, alpha={got.lora_alpha}, "
                             f"targets={sorted(got.target_modules)}); retrain it with the current lora section")
    else:
        peft_model = get_peft_model(base, peft_cfg)
    peft_model.train()
    encoded = encode_domains(tokenizer, records_by_domain, cfg.train.max_length)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if dp is not None:
        check_sums_loss(base)
    runner = dp.wrap(peft_model) if dp is not None else peft_model

    def step_fn(b: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return runner(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                      num_items_in_batch=b.get(LM_TOKENS)).loss, {}

    val = _val_encoded(tokenizer, val_by_domain, cfg)
    batches = BATCHES[cfg.train.mixed_sampling]

    def validate() -> float:
        def nll(b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return token_nll(peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        device = next(iter(params.values())).device
        with _eval_mode(peft_model), autocast(cfg.train, device):
            return validation_loss(nll, val, cfg.train.batch_size, tokenizer.pad_token_id, device)  # type: ignore[arg-type]

    result = train_loop(
        params, lambda s: batches(encoded, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id, s),
        step_fn, steps, cfg.train.lr, cfg.train, ckpt_dir, on_log, fingerprint, dp=dp,
        validate=validate if val else None,
    )
    peft_model.eval()
    if dp is None or dp.is_main:
        def write(tmp: Path) -> None:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            sort_adapter_config(tmp)  # the same adapter, the same bytes (DVC, the stage records)

        atomic_dir_write(Path(out_dir), write)
    return result


# ---------------------------------------------------------------------------------- mixture models
class TrainRoute(StrEnum):
    """Which expert each training row goes through (`train_mixture(route=...)`; an int = that expert)."""

    GOLD = "gold"  # the row's own domain expert (MoA stage 2, onboarding)
    LEARNED = "learned"  # the routers decide (MoSLD, MoDULA's router stage)
    EXPERTS_OFF = "experts_off"  # the universal expert only (MoDULA-Res stage 1)


def train_mixture(
    mm: MixtureModel, tokenizer: Any, records_by_domain: list[list[Any]], cfg: MoAConfig, *, steps: int, lr: float,
    train_experts: bool, train_routers: bool, train_universal: bool = False, route: TrainRoute | int = TrainRoute.GOLD,
    eta: float = 0.0, balance_coef: float = 0.0, ckpt_dir: Path | None = None, on_log: LogFn | None = None,
    fingerprint: str = "", frozen_experts: Sequence[int] = (), dp: DataParallel | None = None,
    val_by_domain: list[list[Any]] | None = None,
) -> TrainResult:
    """Train chosen parameter groups of a mixture on balanced mixed-domain batches.

    route: a `TrainRoute` (gold, learned, experts_off), or an int = that expert for every row (MoDULA
    stages 1-2).
    frozen_experts: expert slots whose A/B slices must stay bit-identical although they share the stacked
    tensors with trained experts (onboarding a domain): their gradients are zeroed before the optimizer.
    dp: spread each batch over torchrun processes (DDP); see moa_core.distributed.
    val_by_domain: validation rows in the order of `records_by_domain`; with `train.eval_every` > 0 the stage
    stops early at its validation minimum: the LM loss under this stage's routing, or, for a stage that
    trains routers alone on gold labels, the routers' cross-entropy. `steps` is replaced by `train.epochs`
    when set."""
    steps = cfg.train.step_budget(steps, sum(len(r) for r in records_by_domain))
    mm.train()
    mm.model.eval()  # keeps the frozen base deterministic; dropout lives in the experts
    for w in mm.wrapped.values():
        w.train()
    chosen = {id(p) for p in mm.set_trainable(train_experts, train_routers, train_universal)}
    params = {n: p for n, p in mm.named_parameters() if id(p) in chosen}
    encoded = encode_domains(tokenizer, records_by_domain, cfg.train.max_length)
    if dp is not None:
        check_sums_loss(mm.model)
    runner = dp.wrap(mm) if dp is not None else mm

    def forced_expert(b: dict[str, Tensor]) -> Tensor | None:
        """[B] the expert each row goes through, or None where the routers decide."""
        if route == TrainRoute.GOLD:
            return b["expert"]
        return torch.full_like(b["expert"], route) if isinstance(route, int) else None

    # gold-routed rows in one equal block per expert let the experts skip their per-row gathers (one process only:
    # data-parallel ranks take strided rows of each batch)
    blocks = (route == TrainRoute.GOLD and dp is None and set(mm.spec.experts_per_layer) == {len(encoded)}
              and expert_blocks(len(encoded), cfg.train.batch_size))

    def step_fn(b: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        out = runner(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=forced_expert(b), eta=eta,
                     balance_coef=balance_coef, experts_off=route == TrainRoute.EXPERTS_OFF,
                     num_items_in_batch=b.get(LM_TOKENS), expert_blocks=blocks)
        extra = {"lm_loss": float(out.lm_loss.detach())}
        if out.aux_loss is not None:
            extra["aux_loss"] = float(out.aux_loss.detach())
        if out.router_logits and route == TrainRoute.GOLD:
            acc = torch.stack([lg.argmax(-1) == b["expert"] for lg in out.router_logits]).float()
            extra["router_acc_last"] = float(acc[-1].mean())
            extra["router_acc_mean"] = float(acc.mean())
        return out.loss, extra

    val = _val_encoded(tokenizer, val_by_domain, cfg)
    routers_only = route == TrainRoute.GOLD and train_routers and not (train_experts or train_universal)

    def validate() -> float:
        def nll(b: dict[str, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
            if routers_only:  # the routers' domain cross-entropy, mean over layers
                out = mm(b["input_ids"], b["attention_mask"], expert=b["expert"], eta=1.0,
                         pool_mask=b["attention_mask"] * (b["labels"] == -100))
                return out.aux_loss  # type: ignore[return-value]
            out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=forced_expert(b),
                     experts_off=route == TrainRoute.EXPERTS_OFF)
            return token_nll(out.logits, b["labels"])
        device = next(iter(params.values())).device
        with _eval_mode(mm), autocast(cfg.train, device):
            return validation_loss(nll, val, cfg.train.batch_size, tokenizer.pad_token_id, device)  # type: ignore[arg-type]

    clip = None
    if cfg.train.clip_per_expert and train_experts and route not in (TrainRoute.LEARNED, TrainRoute.EXPERTS_OFF):
        clip = per_expert_clip(mm, params.values(), cfg.train.grad_clip, forced_expert)  # type: ignore[arg-type]
    # Training one expert alone must leave the others bit-identical: their gradients are exactly zero,
    # so a fresh AdamW never moves them, but weight decay would; it is off for such runs.
    frozen = sorted(set(frozen_experts))
    hooks = _zero_expert_grads(mm, frozen) if frozen and train_experts else []
    tcfg = cfg.train.model_copy(update={"weight_decay": 0.0}) if isinstance(route, int) or frozen else cfg.train
    try:
        result = train_loop(
            params, lambda s: balanced_batches(encoded, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id, s,
                                               expert_major=blocks),
            step_fn, steps, lr, tcfg, ckpt_dir, on_log, fingerprint,
            lr_for=lambda name: cfg.router.lr if name.startswith("routers.") else lr, dp=dp,
            validate=validate if val else None, clip=clip,
        )
    finally:
        for h in hooks:
            h.remove()
    mm.eval()
    return result


def _zero_expert_grads(mm: MixtureModel, frozen: list[int]) -> list[Any]:
    """Gradient hooks that zero the frozen experts' slices of every stacked A [E, r, d] / B [E, d_out, r]."""
    idx = torch.tensor(frozen)

    def mask(grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[idx.to(grad.device)] = 0
        return grad

    hooks = []
    for w in mm.wrapped.values():
        if w.shared_a:
            raise ValueError("experts with a shared A (MoSLD) cannot be frozen one by one: the A matrix is common")
        hooks += [w.lora_A.register_hook(mask), w.lora_B.register_hook(mask)]
    return hooks
