"""Stage-1 training of N domain experts: N sequential PEFT LoRA jobs vs one moa_core pass.

Same tokens, same rank, same optimiser, same training loop (`moa_core.train.train_loop`: AdamW, warm-up
+ cosine, grad clipping, the loop's per-step loss check):

  (a) peft_seq   N PEFT LoRA jobs one after another (what the pipeline's train_expert stage runs): job k
                 wraps a fresh copy of the base with `get_peft_model` and trains on domain k's rows,
                 --steps steps of --batch rows.
  (b) moa        one MixtureModel (method moa, N experts, same r/alpha/dropout/targets) trained like
                 `train_mixture(route="gold", train_experts=True, train_routers=False)`: mixed-domain
                 batches, each row through its own domain's expert (per-expert gradients through the
                 gathered A/B), --steps steps of N x --batch rows. Step s holds exactly the rows job k
                 sees at its step s, for every k: each expert sees the same rows, in the same number of
                 optimiser steps, as its own PEFT job.
  (b') moa_b     the same pass with the PEFT jobs' batch shape: N x --steps steps of --batch mixed rows
                 (each expert then sees its rows in smaller slices, over more steps).

Rows are synthetic (random token ids, a quarter prompt masked out with -100, no padding), built on the
device before timing. Per variant: the loop's tokens/s (tokens / synchronised loop time), the wall
time including wrapping the model and building the optimiser (`setup`; the copy of the base, which
stands in for loading it from disk, is outside), and peak memory (GPU: max_memory_allocated; CPU: peak
RSS growth, see _common.PeakMemory). Copies of the base are made before each measured section.

Example:  python bench/bench_training.py --shape tiny --device cpu --experts 1,2,4,8 --steps 4
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import types
from typing import Any
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: I001
    run_shapes, setup_shape, shape_args,  # noqa: E402
    LORA_ALPHA, LORA_R, TARGETS, PeakMemory, build_base, clone, machine_info, markdown_table, median,
    moa_spec, pick_device, pick_dtype, sync, timed, write_json,
)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

VARIANTS = ["peft_seq", "moa", "moa_b"]
DROPOUT = 0.05  # params.yaml lora.dropout


def loop_cfg(lr_warmup: float = 0.1, grad_clip: float = 1.0) -> types.SimpleNamespace:
    """The fields train_loop reads from TrainConfig (params.yaml train:), no checkpoints, sparse logging."""
    return types.SimpleNamespace(weight_decay=0.0, warmup_fraction=lr_warmup, grad_clip=grad_clip,
                                 log_every=10**9, checkpoint_every=10**9)


def make_rows(n_domains: int, rows_per_domain: int, T: int, V: int, device: torch.device) -> list[dict[str, Tensor]]:
    """Per domain: input_ids, attention_mask, labels [rows, T] (first T//4 positions are prompt: -100)."""
    out = []
    for k in range(n_domains):
        g = torch.Generator().manual_seed(1000 + k)
        ids = torch.randint(3, V, (rows_per_domain, T), generator=g)
        labels = ids.clone()
        labels[:, : T // 4] = -100
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


def _take(d: dict[str, Tensor], sl: slice) -> dict[str, Tensor]:
    return {k: v[sl] for k, v in d.items()}


def _cat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def peft_batches(rows: dict[str, Tensor], steps: int, B: int) -> list[dict[str, Tensor]]:
    return [_take(rows, slice(s * B, (s + 1) * B)) for s in range(steps)]


def moa_batches(data: list[dict[str, Tensor]], steps: int, B: int, device: torch.device) -> list[dict[str, Tensor]]:
    """Step s = rows [s*B, (s+1)*B) of every domain (what each PEFT job sees at its step s)."""
    out = []
    for s in range(steps):
        parts = [_take(d, slice(s * B, (s + 1) * B)) for d in data]
        b = _cat(parts)
        b["expert"] = torch.arange(len(data), device=device).repeat_interleave(B)
        out.append(b)
    return out


def moa_small_batches(data: list[dict[str, Tensor]], steps: int, B: int, device: torch.device) -> list[dict[str, Tensor]]:
    """The same rows as moa_batches, interleaved (row i of every domain, then row i+1, ...) and cut into
    N*steps batches of B rows: each batch mixes min(N, B) domains."""
    N = len(data)
    big = moa_batches(data, steps, B, device)
    rows = []
    for b in big:  # b holds N blocks of B rows; interleave them
        order = torch.arange(N * B, device=device).view(N, B).t().reshape(-1)
        rows.append({k: v[order] for k, v in b.items()})
    allrows = _cat(rows)
    return [_take(allrows, slice(i * B, (i + 1) * B)) for i in range(N * steps)]


def run_loop(params: dict[str, nn.Parameter], batches: list[dict[str, Tensor]], step_fn, lr: float):
    from moa_core.train import train_loop

    return train_loop(params, lambda start: iter(batches[start:]), step_fn, len(batches), lr, loop_cfg())


def train_peft_job(base_copy: nn.Module, batches: list[dict[str, Tensor]], lr: float, device: torch.device) -> dict:
    """One stage-1 job as moa_core.train.train_peft_lora runs it (model set-up + train_loop)."""
    from peft import LoraConfig, get_peft_model

    def job():
        torch.manual_seed(0)
        pm = get_peft_model(base_copy, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=DROPOUT,
                                                  target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        pm.train()
        params = {n: p for n, p in pm.named_parameters() if p.requires_grad}

        def step_fn(b):
            return pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss, {}

        return params, step_fn

    return _timed_training(job, batches, lr, device)


def _timed_training(setup: Any, batches: list[dict[str, Tensor]], lr: float, device: torch.device) -> dict:
    """Time `setup()` (model building, returns (params, step_fn)) plus the training loop over `batches`;
    `wall_s` covers both, `loop_s` the loop alone."""

    def job():
        params, step_fn = setup()
        sync(device)
        t0 = time.perf_counter()
        res = run_loop(params, batches, step_fn, lr)
        sync(device)
        return res, time.perf_counter() - t0, sum(p.numel() for p in params.values())

    wall, (res, loop_s, n_params) = timed(job, device)
    return {"wall_s": wall, "loop_s": loop_s, "setup_s": wall - loop_s, "tokens": res.tokens,
            "final_loss": res.final_loss, "trainable_params": n_params}


def train_moa_pass(base_copy: nn.Module, base_for_spec: nn.Module, n: int, batches: list[dict[str, Tensor]],
                   lr: float, device: torch.device) -> dict:
    """One mixed-domain pass, set up as moa_core.train.train_mixture does for route='gold', experts only."""
    from moa_core.model import MixtureModel

    def job():
        torch.manual_seed(0)
        mm = MixtureModel(base_copy, moa_spec(base_for_spec, n, dropout=DROPOUT))
        mm.routers.to(device)  # a no-op since MixtureModel builds its routers on the base's device
        mm.train()
        mm.model.eval()
        for w in mm.wrapped.values():
            w.train()
        chosen = {id(p) for p in mm.set_trainable(experts=True)}
        params = {nm: p for nm, p in mm.named_parameters() if id(p) in chosen}

        def step_fn(b):
            out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"])
            return out.loss, {}

        return params, step_fn

    return _timed_training(job, batches, lr, device)


def run_variant(v: str, base: nn.Module, n: int, data: list[dict[str, Tensor]], steps: int, B: int, lr: float,
                device: torch.device) -> dict:
    if v == "peft_seq":
        jobs, peak, method = [], 0, ""
        for k in range(n):
            copy = clone(base)
            batches = peft_batches(data[k], steps, B)
            with PeakMemory(device) as pmem:
                jobs.append(train_peft_job(copy, batches, lr, device))
            peak, method = max(peak, pmem.peak_bytes), pmem.method
            del copy, batches
            gc.collect()
        rec = {k: sum(j[k] for j in jobs) for k in ("wall_s", "loop_s", "setup_s", "tokens", "trainable_params")}
        rec["final_loss"] = [j["final_loss"] for j in jobs]
    else:
        copy = clone(base)
        batches = (moa_batches if v == "moa" else moa_small_batches)(data, steps, B, device)
        with PeakMemory(device) as pmem:
            rec = train_moa_pass(copy, base, n, batches, lr, device)
        peak, method = pmem.peak_bytes, pmem.method
        del copy, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rec["peak_bytes"], rec["memory_method"] = peak, method
    return rec


def run_shape(args: argparse.Namespace) -> dict:
    device, dtype, base, V = setup_shape(args)
    S, B, T = args.steps, args.batch, args.seq_len
    variants = [v for v in VARIANTS if v in args.variants]
    data_all = make_rows(max(args.experts), S * B, T, V, device)
    if args.warmup:  # kernels, cuBLAS handles, allocator; one tiny run of each variant, untimed
        nw = min(2, max(args.experts))
        for v in variants:
            run_variant(v, base, nw, data_all[:nw], min(2, S), B, args.lr, device)
    results = []
    for n in args.experts:
        data = data_all[:n]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):  # interleaved: clock drift and neighbours hit the variants alike
            for v in variants:
                runs[v].append(run_variant(v, base, n, data, S, B, args.lr, device))
        rec: dict = {"experts": n, "tokens": runs[variants[0]][0]["tokens"], "runs": runs}
        for v in variants:
            rec[v] = {
                "loop_s": median([r["loop_s"] for r in runs[v]]),
                "wall_s": median([r["wall_s"] for r in runs[v]]),
                "setup_s": median([r["setup_s"] for r in runs[v]]),
                "peak_bytes": max(r["peak_bytes"] for r in runs[v]),
                "trainable_params": runs[v][0]["trainable_params"],
                "final_loss": runs[v][-1]["final_loss"],
            }
            rec[v]["tokens_per_s"] = rec["tokens"] / rec[v]["loop_s"]
            rec[v]["tokens_per_s_wall"] = rec["tokens"] / rec[v]["wall_s"]
            assert all(r["tokens"] == rec["tokens"] for r in runs[v]), f"{v}: token counts differ"
        for v in variants[1:]:
            rec[f"{v}_over_peft_seq_tokens_per_s"] = rec[v]["tokens_per_s"] / rec["peft_seq"]["tokens_per_s"]
            rec[f"{v}_over_peft_seq_wall"] = rec["peft_seq"]["wall_s"] / rec[v]["wall_s"]
        results.append(rec)
        print(f"  N={n}: " + ", ".join(f"{v} {rec[v]['tokens_per_s']:.0f} tok/s" for v in variants),
              file=sys.stderr, flush=True)
    return {"shape": args.shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "steps_per_expert": S, "batch_per_expert": B, "seq_len": T, "lr": args.lr, "repeats": args.repeats,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": DROPOUT, "targets": TARGETS},
            "machine": machine_info(device), "results": results}


def render(p: dict) -> str:
    variants = [v for v in VARIANTS if v in p["results"][0]]
    head = (f"### Training: shape `{p['shape']}`, {p['device']} {p['dtype']}, {p['steps_per_expert']} steps x "
            f"{p['batch_per_expert']} rows x {p['seq_len']} tokens per expert, r={p['lora']['r']}, median of {p['repeats']}\n")
    headers = ["N", "tokens"] + [f"{v} tok/s" for v in variants] + [f"{v} wall s" for v in variants]
    headers += [f"{v} peak MiB" for v in variants]
    headers += [f"{v}/peft_seq tok/s" for v in variants[1:]] + [f"{v}/peft_seq wall" for v in variants[1:]]
    rows = []
    for r in p["results"]:
        row = [r["experts"], r["tokens"]] + [r[v]["tokens_per_s"] for v in variants] + [r[v]["wall_s"] for v in variants]
        row += [r[v]["peak_bytes"] / 2**20 for v in variants]
        row += [r[f"{v}_over_peft_seq_tokens_per_s"] for v in variants[1:]]
        row += [r[f"{v}_over_peft_seq_wall"] for v in variants[1:]]
        rows.append(row)
    mem = p["results"][0]["runs"][variants[0]][0]["memory_method"]
    return head + "\n" + markdown_table(headers, rows) + f"\n\nPeak memory: {mem}; peft_seq = the largest job's.\n"


def main(argv: list[str] | None = None) -> int:
    ap = shape_args(__doc__, experts="1,2,4,8")
    ap.add_argument("--steps", default=8, type=int, help="optimiser steps per expert")
    ap.add_argument("--batch", default=8, type=int, help="rows per step per expert (params.yaml train.batch_size)")
    ap.add_argument("--seq-len", default=128, type=int, help="tokens per row (params.yaml train.max_length)")
    ap.add_argument("--lr", default=1e-3, type=float)
    ap.add_argument("--repeats", default=3, type=int)
    ap.add_argument("--warmup", default=1, type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    return run_shapes(ap.parse_args(argv), "training", run_shape, render)


if __name__ == "__main__":
    raise SystemExit(main())
