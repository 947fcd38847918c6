"""Stage-1 training of N domain experts: N sequential PEFT LoRA jobs vs one moa_core pass.

Same tokens, same rank, same optimiser, same training loop (`moa_core.train.train_loop`: AdamW, warm-up
+ cosine, grad clipping, the loop's per-step loss check):

  (a) peft_seq   N PEFT LoRA jobs one after another (what the pipeline's train_expert stage runs): job k
                 wraps a fresh copy of the base with `get_peft_model` and trains on domain k's rows,
                 --steps steps of --batch rows.
  (b) moa        one MixtureModel (method moa, N experts, same r/alpha/dropout/targets) trained like
                 `train_mixture(route="gold", train_experts=True, train_routers=False)`: mixed-domain
                 batches, each row through its own domain's expert (per-expert gradients), --steps steps of N x --batch rows. Step s holds exactly the rows job k
                 sees at its step s, for every k: each expert sees the same rows, in the same number of
                 optimiser steps, as its own PEFT job. The rows are one block per domain, as train_mixture
                 orders a batch the domains divide, so each expert applies to its block's view
                 (`expert_blocks=True`: no per-row gathers).
  (b'') moa_gather  the same pass and batches with each row's A and B gathered (what any row order takes): the
                 blocked path's gain.
  (b') moa_b     the same pass with the PEFT jobs' batch shape: N x --steps steps of --batch mixed rows
                 (each expert then sees its rows in smaller slices, over more steps), rows interleaved
                 across domains, each row's expert gathered.

Fair baselines for (b), which owes most of its tokens/s to its larger batch:

  peft_one      ONE PEFT LoRA job given moa's batches (N x --batch mixed rows per step, --steps steps): the same
                rows per step and the same work per step, one adapter for all domains (what a single job
                could do with the GPU; it does not give N experts);
  peft_par      N PEFT LoRA jobs as N processes started together on the same device (each its own domain,
                --steps steps of --batch rows, as in peft_seq): the GPU shared by independent jobs. tokens/s =
                all tokens / the span from the first loop's start to the last loop's end; wall = from spawning
                the processes to the last one's exit (each process imports torch and builds its own base copy);
                peak memory = the sum of the processes' peaks.

The per-step model FLOPs are estimated as 4 x (base parameters, embeddings excluded) x tokens (forward and the
activation gradients of the frozen base; the LoRA and attention terms are left out), so `model TFLOP/s` and
`MFU` (against --peak-tflops) are lower bounds of the arithmetic done.

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
    HAVE_TRAIN, LORA_ALPHA, LORA_R, TARGETS, PeakMemory, TrainConfig, build_base, clone, machine_info, markdown_table,
    median, moa_spec, pick_device, pick_dtype, sync, timed, write_json,
)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

VARIANTS = ["peft_seq", "moa", "moa_gather", "moa_b", "peft_one", "peft_par"]
DROPOUT = 0.05  # params.yaml lora.dropout
# PEFT's adapters in the base's dtype (bf16 on the GPU, as MoA's experts), not PEFT's default of upcasting them to
# float32 (`autocast_adapter_dtype=True`), which adds casts and fp32 products to every wrapped projection: the same
# precision on both sides. --peft-fp32-adapters measures PEFT's default instead.
PEFT_FP32_ADAPTERS = False


def loop_cfg(lr_warmup: float = 0.1, grad_clip: float = 1.0) -> Any:
    """params.yaml's train: defaults for train_loop (TrainConfig; without pydantic the fields it reads), no
    checkpoints, sparse logging. Precision stays fp32 (no autocast): the bench casts the model itself (--dtype)."""
    fields = dict(weight_decay=0.0, warmup_fraction=lr_warmup, grad_clip=grad_clip, log_every=10**9,
                  checkpoint_every=10**9)
    if HAVE_TRAIN:
        return TrainConfig(**fields)
    return types.SimpleNamespace(**fields, precision="fp32", seed=0, eval_every=0, patience=3, min_delta=0.0)


def domain_rows(k: int, rows: int, T: int, V: int, device: torch.device) -> dict[str, Tensor]:
    """Domain k's input_ids, attention_mask, labels [rows, T] (first T//4 positions are prompt: -100)."""
    g = torch.Generator().manual_seed(1000 + k)
    ids = torch.randint(3, V, (rows, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def make_rows(n_domains: int, rows_per_domain: int, T: int, V: int, device: torch.device) -> list[dict[str, Tensor]]:
    return [domain_rows(k, rows_per_domain, T, V, device) for k in range(n_domains)]


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


def run_loop(params: dict[str, nn.Parameter], batches: list[dict[str, Tensor]], step_fn, lr: float,
             grad_clip: float = 1.0, clip=None):
    """train_loop over `batches`; `clip(batch)` replaces its joint gradient clip (see `moa_clip`)."""
    from moa_core.train import train_loop

    return train_loop(params, lambda start: iter(batches[start:]), step_fn, len(batches), lr,
                      loop_cfg(grad_clip=grad_clip), clip=clip)


def moa_clip(mm: nn.Module, params: dict[str, nn.Parameter], grad_clip: float = 1.0):
    """The one pass's gradient clip as train_mixture does it by default (train.clip_per_expert): each expert's
    own-rows gradient (divided by its share of the batch's loss tokens) clipped on its own -> clip(batch)."""
    from moa_core.train import per_expert_clip

    return per_expert_clip(mm, params.values(), grad_clip, lambda b: b["expert"])


def peft_job(base_copy: nn.Module, seed: int = 0) -> tuple[nn.Module, dict[str, nn.Parameter], Any]:
    """One stage-1 job's model as moa_core.train.train_peft_lora builds it -> (peft model, trainable params,
    step_fn(batch) -> (loss, {}))."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(base_copy, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=DROPOUT,
                                              target_modules=list(TARGETS), task_type="CAUSAL_LM"),
                        autocast_adapter_dtype=PEFT_FP32_ADAPTERS)
    pm.train()
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}

    def step_fn(b):
        return pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss, {}

    return pm, params, step_fn


def train_peft_job(base_copy: nn.Module, batches: list[dict[str, Tensor]], lr: float, device: torch.device) -> dict:
    """One stage-1 job as moa_core.train.train_peft_lora runs it (model set-up + train_loop)."""
    return _timed_training(lambda: peft_job(base_copy)[1:], batches, lr, device)


def _timed_training(setup: Any, batches: list[dict[str, Tensor]], lr: float, device: torch.device) -> dict:
    """Time `setup()` (model building, returns (params, step_fn)) plus the training loop over `batches`;
    `wall_s` covers both, `loop_s` the loop alone."""

    def job():
        params, step_fn, *clip = setup()
        sync(device)
        t0 = time.perf_counter()
        res = run_loop(params, batches, step_fn, lr, clip=clip[0] if clip else None)
        sync(device)
        return res, time.perf_counter() - t0, sum(p.numel() for p in params.values())

    wall, (res, loop_s, n_params) = timed(job, device)
    return {"wall_s": wall, "loop_s": loop_s, "setup_s": wall - loop_s, "tokens": res.tokens,
            "final_loss": res.final_loss, "trainable_params": n_params}


def moa_pass(base_copy: nn.Module, base_for_spec: nn.Module, n: int, seed: int = 0,
             blocks: bool = True) -> tuple[nn.Module, dict[str, nn.Parameter], Any]:
    """One mixed-domain pass's model, set up as moa_core.train.train_mixture does for route='gold', experts only
    -> (MixtureModel, trainable params, step_fn(batch with "expert") -> (loss, {})). `blocks`: the batches are
    `moa_batches`' (one equal block of rows per expert, in expert order, as train_mixture orders a batch that
    the experts divide), so the experts take the blocked path (`forward(expert_blocks=True)`)."""
    from moa_core.model import MixtureModel

    torch.manual_seed(seed)
    mm = MixtureModel(base_copy, moa_spec(base_for_spec, n, dropout=DROPOUT))
    mm.train()
    mm.model.eval()
    for w in mm.wrapped.values():
        w.train()
    chosen = {id(p) for p in mm.set_trainable(experts=True)}
    params = {nm: p for nm, p in mm.named_parameters() if id(p) in chosen}

    def step_fn(b):
        return mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"],
                  expert_blocks=blocks).loss, {}

    return mm, params, step_fn


def train_moa_pass(base_copy: nn.Module, base_for_spec: nn.Module, n: int, batches: list[dict[str, Tensor]],
                   lr: float, device: torch.device, blocks: bool = True) -> dict:
    """One mixed-domain pass (model set-up + train_loop), see `moa_pass`."""
    def setup():
        mm, params, step_fn = moa_pass(base_copy, base_for_spec, n, blocks=blocks)
        return params, step_fn, moa_clip(mm, params)

    return _timed_training(setup, batches, lr, device)


def run_parallel_peft_jobs(args: argparse.Namespace, n: int) -> dict:
    """N PEFT jobs as N processes started at once (see the module docstring); each prints one JSON line."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        go = Path(d) / "go"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-go", str(go), "--shape", args.shape,
               "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--threads", str(args.threads)]
        cmd += ["--peft-fp32-adapters"] if args.peft_fp32_adapters else []
        t0 = time.time()
        procs = [subprocess.Popen(cmd + ["--worker-domain", str(k)], stdout=subprocess.PIPE, text=True)
                 for k in range(n)]
        while len(list(Path(d).glob("ready.*"))) < n:  # every process built its model: start the loops together
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate()[0] for p in procs]
        wall = time.time() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a parallel PEFT job failed: exit codes {[p.returncode for p in procs]}")
    jobs = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    span = max(j["loop_end"] for j in jobs) - min(j["loop_start"] for j in jobs)
    return {"wall_s": wall, "loop_s": span, "setup_s": wall - span, "tokens": sum(j["tokens"] for j in jobs),
            "trainable_params": sum(j["trainable_params"] for j in jobs), "final_loss": [j["final_loss"] for j in jobs],
            "peak_bytes": sum(j["peak_bytes"] for j in jobs), "memory_method": jobs[0]["memory_method"] + " (sum)"}


def worker(args: argparse.Namespace) -> int:
    """One process of peft_par: build the base and the job, say ready, wait for the go file, train, print JSON."""
    import json

    device, dtype, base, V = setup_shape(args)
    k = args.worker_domain
    batches = peft_batches(domain_rows(k, args.steps * args.batch, args.seq_len, V, device), args.steps, args.batch)
    go = Path(args.worker_go)
    (go.parent / f"ready.{k}").touch()
    while not go.exists():
        time.sleep(0.01)
    with PeakMemory(device) as pmem:
        sync(device)
        start = time.time()
        res = train_peft_job(base, batches, args.lr, device)
        sync(device)
        end = time.time()
    print(json.dumps({"loop_start": end - res["loop_s"], "loop_end": end, "job_start": start, "tokens": res["tokens"],
                      "trainable_params": res["trainable_params"], "final_loss": res["final_loss"],
                      "peak_bytes": pmem.peak_bytes, "memory_method": pmem.method}), flush=True)
    return 0


def run_variant(v: str, base: nn.Module, n: int, data: list[dict[str, Tensor]], steps: int, B: int, lr: float,
                device: torch.device, args: argparse.Namespace | None = None) -> dict:
    if v == "peft_par":
        rec = run_parallel_peft_jobs(args, n)
        gc.collect()
        return rec
    if v == "peft_one":
        copy = clone(base)
        batches = [{k: t for k, t in b.items() if k != "expert"} for b in moa_batches(data, steps, B, device)]
        with PeakMemory(device) as pmem:
            rec = train_peft_job(copy, batches, lr, device)
        rec["peak_bytes"], rec["memory_method"] = pmem.peak_bytes, pmem.method
        del copy, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return rec
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
        batches = (moa_small_batches if v == "moa_b" else moa_batches)(data, steps, B, device)
        with PeakMemory(device) as pmem:
            rec = train_moa_pass(copy, base, n, batches, lr, device, blocks=v == "moa")
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
    emb = {id(p) for m in base.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    base_params = sum(p.numel() for p in base.parameters() if id(p) not in emb)
    if args.warmup:  # kernels, cuBLAS handles, allocator; one tiny run of each variant, untimed
        nw = min(2, max(args.experts))
        for v in variants:
            if v != "peft_par":  # its processes start cold every time by design
                run_variant(v, base, nw, data_all[:nw], min(2, S), B, args.lr, device, args)
    results = []
    for n in args.experts:
        data = data_all[:n]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for i in range(args.repeats):  # interleaved (ABC CBA ...): clock drift and neighbours hit the variants alike
            for v in (variants if i % 2 == 0 else variants[::-1]):
                runs[v].append(run_variant(v, base, n, data, S, B, args.lr, device, args))
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
            tps = [rec["tokens"] / r["loop_s"] for r in runs[v]]
            rec[v]["tokens_per_s_min"], rec[v]["tokens_per_s_max"] = min(tps), max(tps)
            rec[v]["model_tflops"] = 4 * base_params * rec[v]["tokens_per_s"] / 1e12
            assert all(r["tokens"] == rec["tokens"] for r in runs[v]), f"{v}: token counts differ"
        if "peft_seq" in variants:
            for v in variants[1:]:
                rec[f"{v}_over_peft_seq_tokens_per_s"] = rec[v]["tokens_per_s"] / rec["peft_seq"]["tokens_per_s"]
                rec[f"{v}_over_peft_seq_wall"] = rec["peft_seq"]["wall_s"] / rec[v]["wall_s"]
        if "moa" in variants:  # moa's tokens/s over each baseline's, per round (paired), median [min, max]
            rec["moa_over"] = {}
            for v in variants:
                if v != "moa":
                    q = [b["loop_s"] / a["loop_s"] for a, b in zip(runs["moa"], runs[v])]
                    rec["moa_over"][v] = {"median": median(q), "min": min(q), "max": max(q)}
        results.append(rec)
        print(f"  N={n}: " + ", ".join(f"{v} {rec[v]['tokens_per_s']:.0f} tok/s" for v in variants),
              file=sys.stderr, flush=True)
    return {"shape": args.shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "steps_per_expert": S, "batch_per_expert": B, "seq_len": T, "lr": args.lr, "repeats": args.repeats,
            "base_params_no_embeddings": base_params, "peak_tflops": args.peak_tflops,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": DROPOUT, "targets": TARGETS,
                     "peft_adapters": "float32" if PEFT_FP32_ADAPTERS else "base dtype"},
            "machine": machine_info(device), "results": results}


def render(p: dict) -> str:
    """tokens/s median [min-max] per variant, wall, peak memory, model TFLOP/s; moa's lead over each baseline."""
    variants = [v for v in VARIANTS if v in p["results"][0]]
    head = (f"### Training: shape `{p['shape']}`, {p['device']} {p['dtype']}, {p['steps_per_expert']} steps x "
            f"{p['batch_per_expert']} rows x {p['seq_len']} tokens per expert, r={p['lora']['r']}, PEFT adapters in "
            f"{p['lora'].get('peft_adapters', 'float32')}, median of {p['repeats']} interleaved rounds [min-max]\n")
    headers = ["N", "tokens"] + [f"{v} tok/s" for v in variants] + [f"{v} wall s" for v in variants]
    headers += [f"{v} peak MiB" for v in variants]
    rows = []
    for r in p["results"]:
        row = [r["experts"], r["tokens"]]
        for v in variants:
            lo, hi = r[v].get("tokens_per_s_min"), r[v].get("tokens_per_s_max")
            row.append(f"{r[v]['tokens_per_s']:,.0f}" + (f" [{lo:,.0f}-{hi:,.0f}]" if lo is not None else ""))
        row += [r[v]["wall_s"] for v in variants] + [r[v]["peak_bytes"] / 2**20 for v in variants]
        rows.append(row)
    out = [head, markdown_table(headers, rows)]
    if "moa_over" in p["results"][0]:
        others = list(p["results"][0]["moa_over"])
        rows = [[r["experts"]] + [f"{r['moa_over'][v]['median']:.3g} [{r['moa_over'][v]['min']:.3g}-{r['moa_over'][v]['max']:.3g}]"
                                  for v in others] for r in p["results"]]
        out += ["\nmoa tokens/s over each baseline's, per round: median [min-max].\n",
                markdown_table(["N"] + [f"moa/{v}" for v in others], rows)]
    if "peak_tflops" in p and p["device"].startswith("cuda"):
        rows = [[r["experts"]] + [f"{r[v]['model_tflops']:.1f} ({100 * r[v]['model_tflops'] / p['peak_tflops']:.1f}%)"
                                  for v in variants] for r in p["results"]]
        out += [f"\nModel TFLOP/s (MFU against {p['peak_tflops']} TFLOP/s; a lower bound, see the docstring).\n",
                markdown_table(["N"] + variants, rows)]
    mem = p["results"][0]["runs"][variants[0]][0]["memory_method"]
    out.append(f"\nPeak memory: {mem}; peft_seq = the largest job's, peft_par = the sum of its processes'.\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = shape_args(__doc__, experts="1,2,4,8")
    ap.add_argument("--steps", default=8, type=int, help="optimiser steps per expert")
    ap.add_argument("--batch", default=8, type=int, help="rows per step per expert (params.yaml train.batch_size)")
    ap.add_argument("--seq-len", default=128, type=int, help="tokens per row (params.yaml train.max_length)")
    ap.add_argument("--lr", default=1e-3, type=float)
    ap.add_argument("--repeats", default=3, type=int)
    ap.add_argument("--warmup", default=1, type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    ap.add_argument("--peak-tflops", default=989.0, type=float,
                    help="dense bf16 peak for the MFU column (H100/H200 SXM datasheet: 989)")
    ap.add_argument("--peft-fp32-adapters", action="store_true",
                    help="PEFT's default float32 adapters on a bf16 base (autocast_adapter_dtype=True); by default "
                         "its adapters stay in the base's dtype, as MoA's experts do")
    ap.add_argument("--worker-domain", default=None, type=int, help=argparse.SUPPRESS)  # a peft_par process
    ap.add_argument("--worker-go", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global PEFT_FP32_ADAPTERS
    PEFT_FP32_ADAPTERS = args.peft_fp32_adapters
    if args.worker_domain is not None:
        return worker(args)
    return run_shapes(args, "training", run_shape, render)


if __name__ == "__main__":
    raise SystemExit(main())
