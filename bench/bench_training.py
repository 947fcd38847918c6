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

--compile (off by default: both sides eager) compiles the model's forward on both sides the one way PEFT documents
for LoRA training in a custom loop (its torch.compile guide: `model = torch.compile(model)` on the PEFT model, default
settings; inductor, mode "default", no fullgraph, dynamic=None): `torch.compile(peft_model)` for peft_one and
peft_seq, `torch.compile(mixture_model)` for moa, moa_gather and moa_b (the whole forward: routing hooks, experts,
loss; the backward is compiled with it). The optimiser step and the gradient clip stay eager on both sides. peft_par
is refused (each of its N processes would compile its own copy while the others wait at the common start); so is
any unknown variant name, before a model is built. Each run's first COMPILE_STEPS (2) forward+backward passes on its
first batch (not optimiser steps; train_loop drops their gradients) compile the model before its loop is timed:
their time is `compile_s`, left out of `loop_s`, `wall_s` and `setup_s` (peak memory does cover them). The untimed
--warmup runs stay eager (their shapes are not the measured ones), and a small function compiled first pays the
process's one-time compile costs (`init_s`), so that neither side pays them for the other. Dynamo keeps one compiled
model per code family (MixtureModel.forward, PeftModel.forward): a fresh model of the same variant and N reuses its
graphs (its later runs' compile_s is then about two steps); another variant or N of the same family resets dynamo
first (torch._dynamo.reset()), so that a shape change never turns on dynamic shapes, and so does a frame near
dynamo's recompile limit (past it dynamo would run the frame eagerly). The first run of a graph compiles it from
scratch unless inductor's on-disk caches hold it already. Per variant, the JSON holds the compile mode it ran
in, compile_s (its first run's, the median, each run's) and dynamo's counts (`dynamo`): in the first run's first
steps, the frames compiled, graphs, graph breaks (each site counted when it is traced, not per step) with their
reasons and places, and recompiles; the frames compiled in the later runs' first steps (0 when they reused the
graphs); and those compiled inside the timed loops (a recompile there would be timed: there should be none). One
line per variant on stderr says the same, so that a GPU run's log tells it.

Example:  python bench/bench_training.py --shape tiny --device cpu --experts 1,2,4,8 --steps 4
          python bench/bench_training.py --shape tiny --device cpu --experts 2 --steps 2 --variants moa,peft_one --compile
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
# --compile: the call PEFT's torch.compile guide documents for training a LoRA model in a custom loop (default settings),
# made on both sides; COMPILE_STEPS forward+backward passes compile a run's model before its loop is timed
COMPILE = False
COMPILE_STEPS = 2
COMPILE_MODE = {"call": "torch.compile(model)", "backend": "inductor", "mode": "default", "fullgraph": False,
                "dynamic": None}
COMPILE_VARIANTS = ("peft_seq", "moa", "moa_gather", "moa_b", "peft_one")  # not peft_par: see the docstring
_DYNAMO_HOLDS: dict[str, tuple] = {}  # code family -> the (variant, N) whose compiled graphs dynamo holds


def loop_cfg(lr_warmup: float = 0.1, grad_clip: float = 1.0) -> Any:
    """params.yaml's train: defaults for train_loop (TrainConfig; without pydantic the fields it reads), no
    checkpoints, sparse logging. Precision stays fp32 (no autocast): the bench casts the model itself (--dtype)."""
    fields = dict(weight_decay=0.0, warmup_fraction=lr_warmup, grad_clip=grad_clip, log_every=10**9,
                  checkpoint_every=10**9)
    if HAVE_TRAIN:
        return TrainConfig(**fields)
    return types.SimpleNamespace(**fields, precision="fp32", seed=0, eval_every=0, patience=3, min_delta=0.0)


def compiled(model: nn.Module, family: str, key: tuple) -> nn.Module:
    """`torch.compile(model)` with default settings (COMPILE_MODE). `family` names the forward's code (models of one
    family share dynamo's cache entries); when it last compiled for another `key` (variant, N), dynamo is reset first,
    so that a new shape recompiles from scratch instead of turning on dynamic shapes (a fresh model of the same key
    reuses the graphs). A frame compiled limit-1 times resets it too: past dynamo's recompile limit it runs eagerly."""
    from torch._dynamo import convert_frame

    limit = getattr(torch._dynamo.config, "recompile_limit", 8)
    if _DYNAMO_HOLDS.get(family, key) != key \
            or max(getattr(convert_frame, "FRAME_COMPILE_COUNTER", {}).values(), default=0) >= limit - 1:
        torch._dynamo.reset()
        _DYNAMO_HOLDS.clear()
    _DYNAMO_HOLDS[family] = key
    return torch.compile(model)


def dynamo_state() -> dict:
    """Dynamo's running counts: frames it compiled (each compile of a frame once; a frame's second compile is a
    recompile), graphs, graph breaks by reason, and the located breaks so far (torch._dynamo.utils.graph_break_reasons;
    both it and the per-frame counts start again at a reset)."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters, graph_break_reasons

    per_frame = dict(getattr(convert_frame, "FRAME_COMPILE_COUNTER", {}))
    return {"frame_compiles": sum(per_frame.values()), "recompiles": sum(max(0, c - 1) for c in per_frame.values()),
            "graphs": counters["stats"]["unique_graphs"], "breaks": dict(counters["graph_break"]),
            "located": list(graph_break_reasons)}


def _where(stack: list) -> str:
    """The innermost frame of a graph break's user stack, as path:line (function), the path from the repository or
    site-packages."""
    if not stack:
        return "?"
    fs = stack[-1]
    name = fs.filename
    for cut in ("site-packages/", str(Path(__file__).resolve().parent.parent) + "/"):
        if cut in name:
            name = name.split(cut, 1)[1]
    return f"{name}:{fs.lineno} ({fs.name})"


def dynamo_delta(before: dict, after: dict) -> dict:
    """What dynamo did between two `dynamo_state()`s: frame compiles, recompiles, graphs, graph breaks (total, and
    each reason's first line with its count) and where the located ones broke. A reset in between (another variant
    of the family) is not expected: `compiled` runs before the first state is taken."""
    reasons: dict[str, int] = {}
    for k, v in after["breaks"].items():
        d = v - before["breaks"].get(k, 0)
        if d > 0:
            first = k.strip().splitlines()[0][:120]
            reasons[first] = reasons.get(first, 0) + d
    located = after["located"][len(before["located"]):] if len(after["located"]) >= len(before["located"]) \
        else after["located"]
    return {"frame_compiles": after["frame_compiles"] - before["frame_compiles"],
            "recompiles": after["recompiles"] - before["recompiles"],
            "graphs": after["graphs"] - before["graphs"], "graph_breaks": sum(reasons.values()),
            "break_reasons": reasons,
            "break_sites": sorted({f"{_where(r.user_stack)}: {r.reason.strip().splitlines()[0][:100]}" for r in located})}


def merge_dynamo(deltas: list[dict]) -> dict:
    """Several `dynamo_delta`s as one: counts added (per reason too), break sites united."""
    out: dict = {}
    for d in deltas:
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = {r: out.get(k, {}).get(r, 0) + v.get(r, 0) for r in {*out.get(k, {}), *v}}
            elif isinstance(v, list):
                out[k] = sorted(set(out.get(k, [])) | set(v))
            else:
                out[k] = out.get(k, 0) + v
    return out


def compile_init(device: torch.device) -> float:
    """--compile: compile one small function forward and backward on `device`, then reset dynamo -> seconds. The
    process's one-time costs (importing inductor, starting its compile workers, the device's compiler) are paid here,
    not by whichever variant compiles first."""
    x = torch.randn(64, 64, device=device, requires_grad=True)
    t0 = time.perf_counter()
    torch.compile(lambda t: (t @ t).relu().sum())(x).backward()
    sync(device)
    torch._dynamo.reset()
    _DYNAMO_HOLDS.clear()
    return time.perf_counter() - t0


def first_steps(params: dict[str, nn.Parameter], step_fn, batch: dict[str, Tensor], device: torch.device) -> dict:
    """--compile: COMPILE_STEPS forward+backward passes of `step_fn` on `batch` (as train_loop runs a step, without
    the optimiser), which compile the model; their gradients are dropped. -> {"compile_s", "dynamo": what dynamo did}."""
    from moa_core.batching import autocast

    before = dynamo_state()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(COMPILE_STEPS):
        with autocast(loop_cfg(), device):
            loss, _extra = step_fn(batch)
        loss.backward()
    sync(device)
    compile_s = time.perf_counter() - t0
    for p in params.values():
        p.grad = None
    return {"compile_s": compile_s, "dynamo": dynamo_delta(before, dynamo_state())}


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


def peft_job(base_copy: nn.Module, seed: int = 0,
             compile_key: tuple | None = None) -> tuple[nn.Module, dict[str, nn.Parameter], Any]:
    """One stage-1 job's model as moa_core.train.train_peft_lora builds it -> (peft model, trainable params,
    step_fn(batch) -> (loss, {})). With `compile_key` (--compile), step_fn calls `torch.compile(peft model)`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(base_copy, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=DROPOUT,
                                              target_modules=list(TARGETS), task_type="CAUSAL_LM"),
                        autocast_adapter_dtype=PEFT_FP32_ADAPTERS)
    pm.train()
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    fwd = compiled(pm, "peft", compile_key) if compile_key is not None else pm

    def step_fn(b):
        return fwd(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss, {}

    return pm, params, step_fn


def train_peft_job(base_copy: nn.Module, batches: list[dict[str, Tensor]], lr: float, device: torch.device,
                   compile_key: tuple | None = None) -> dict:
    """One stage-1 job as moa_core.train.train_peft_lora runs it (model set-up + train_loop); `compile_key`: see
    `peft_job`."""
    return _timed_training(lambda: peft_job(base_copy, compile_key=compile_key)[1:], batches, lr, device)


def _timed_training(setup: Any, batches: list[dict[str, Tensor]], lr: float, device: torch.device) -> dict:
    """Time `setup()` (model building, returns (params, step_fn)) plus the training loop over `batches`;
    `wall_s` covers both, `loop_s` the loop alone. With --compile, the model's first passes (`first_steps`) run
    between the two, and their time (`compile_s`) is in neither; `dynamo` says what dynamo did in them and in the loop."""

    def job():
        params, step_fn, *clip = setup()
        first = first_steps(params, step_fn, batches[0], device) if COMPILE else None
        before = dynamo_state() if COMPILE else None
        sync(device)
        t0 = time.perf_counter()
        res = run_loop(params, batches, step_fn, lr, clip=clip[0] if clip else None)
        sync(device)
        loop_s = time.perf_counter() - t0
        if first is not None:
            first["dynamo"] = {"first_steps": first["dynamo"], "loop": dynamo_delta(before, dynamo_state())}
        return res, loop_s, sum(p.numel() for p in params.values()), first

    wall, (res, loop_s, n_params, first) = timed(job, device)
    rec = {"tokens": res.tokens, "final_loss": res.final_loss, "trainable_params": n_params}
    if first is not None:
        wall -= first["compile_s"]
        rec.update(first)
    return {"wall_s": wall, "loop_s": loop_s, "setup_s": wall - loop_s, **rec}


def moa_pass(base_copy: nn.Module, base_for_spec: nn.Module, n: int, seed: int = 0, blocks: bool = True,
             compile_key: tuple | None = None) -> tuple[nn.Module, dict[str, nn.Parameter], Any]:
    """One mixed-domain pass's model, set up as moa_core.train.train_mixture does for route='gold', experts only
    -> (MixtureModel, trainable params, step_fn(batch with "expert") -> (loss, {})). `blocks`: the batches are
    `moa_batches`' (one equal block of rows per expert, in expert order, as train_mixture orders a batch that
    the experts divide), so the experts take the blocked path (`forward(expert_blocks=True)`). With `compile_key`
    (--compile), step_fn calls `torch.compile(mixture model)`."""
    from moa_core.model import MixtureModel

    torch.manual_seed(seed)
    mm = MixtureModel(base_copy, moa_spec(base_for_spec, n, dropout=DROPOUT))
    mm.train()
    mm.model.eval()
    for w in mm.wrapped.values():
        w.train()
    chosen = {id(p) for p in mm.set_trainable(experts=True)}
    params = {nm: p for nm, p in mm.named_parameters() if id(p) in chosen}
    fwd = compiled(mm, "moa", compile_key) if compile_key is not None else mm

    def step_fn(b):
        return fwd(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"],
                   expert_blocks=blocks).loss, {}

    return mm, params, step_fn


def train_moa_pass(base_copy: nn.Module, base_for_spec: nn.Module, n: int, batches: list[dict[str, Tensor]],
                   lr: float, device: torch.device, blocks: bool = True, compile_key: tuple | None = None) -> dict:
    """One mixed-domain pass (model set-up + train_loop), see `moa_pass`."""
    def setup():
        mm, params, step_fn = moa_pass(base_copy, base_for_spec, n, blocks=blocks, compile_key=compile_key)
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
    key = (v, n) if COMPILE else None  # --compile: the key of the compiled graphs (see `compiled`)
    if v == "peft_one":
        copy = clone(base)
        batches = [{k: t for k, t in b.items() if k != "expert"} for b in moa_batches(data, steps, B, device)]
        with PeakMemory(device) as pmem:
            rec = train_peft_job(copy, batches, lr, device, compile_key=key)
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
                jobs.append(train_peft_job(copy, batches, lr, device, compile_key=key))
            peak, method = max(peak, pmem.peak_bytes), pmem.method
            del copy, batches
            gc.collect()
        rec = {k: sum(j[k] for j in jobs) for k in ("wall_s", "loop_s", "setup_s", "tokens", "trainable_params")}
        rec["final_loss"] = [j["final_loss"] for j in jobs]
        if COMPILE:  # the jobs' compile times summed, dynamo's counts over all of them
            rec["compile_s"] = sum(j["compile_s"] for j in jobs)
            rec["dynamo"] = {part: merge_dynamo([j["dynamo"][part] for j in jobs]) for part in ("first_steps", "loop")}
    else:
        copy = clone(base)
        batches = (moa_small_batches if v == "moa_b" else moa_batches)(data, steps, B, device)
        with PeakMemory(device) as pmem:
            rec = train_moa_pass(copy, base, n, batches, lr, device, blocks=v == "moa", compile_key=key)
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
    global COMPILE
    if args.warmup:  # kernels, cuBLAS handles, allocator; one tiny run of each variant, untimed (eager: its shapes
        nw = min(2, max(args.experts))  # are not the measured ones, so compiling it would only cost time)
        on, COMPILE = COMPILE, False
        try:
            for v in variants:
                if v != "peft_par":  # its processes start cold every time by design
                    run_variant(v, base, nw, data_all[:nw], min(2, S), B, args.lr, device, args)
        finally:
            COMPILE = on
    init_s = compile_init(device) if COMPILE else None
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
            rec[v]["compile_mode"] = compile_mode(v)
            if "compile_s" in runs[v][0]:  # the first run compiled (unless inductor's caches held its graphs)
                cs = [r["compile_s"] for r in runs[v]]
                rec[v]["compile_s"], rec[v]["compile_s_median"], rec[v]["compile_s_runs"] = cs[0], median(cs), cs
                rec[v]["dynamo"] = {"first_run": runs[v][0]["dynamo"]["first_steps"],
                                    "later_runs": merge_dynamo([r["dynamo"]["first_steps"] for r in runs[v][1:]]),
                                    "loops": merge_dynamo([r["dynamo"]["loop"] for r in runs[v]])}
                print(f"  N={n}: {compile_line(v, rec[v])}", file=sys.stderr, flush=True)
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
            "compile": ({**COMPILE_MODE, "enabled": True, "variants": [v for v in variants if v in COMPILE_VARIANTS],
                         "first_steps": COMPILE_STEPS, "init_s": init_s, "torch": torch.__version__}
                        if COMPILE else {"enabled": False, "mode": "eager"}),
            "base_params_no_embeddings": base_params, "peak_tflops": args.peak_tflops,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": DROPOUT, "targets": TARGETS,
                     "peft_adapters": "float32" if PEFT_FP32_ADAPTERS else "base dtype"},
            "machine": machine_info(device), "results": results}


def compile_mode(v: str) -> str:
    """The mode variant `v` ran in, for the payload."""
    if COMPILE and v in COMPILE_VARIANTS:
        return f"{COMPILE_MODE['call']}, mode {COMPILE_MODE['mode']}"
    return "eager"


def compile_line(v: str, r: dict) -> str:
    """One line on what compiling variant v did (its record in run_shape's results)."""
    f, later, lp = r["dynamo"]["first_run"], r["dynamo"].get("later_runs", {}), r["dynamo"]["loops"]
    reasons = "; ".join(f"{k} x{c}" for k, c in sorted(f["break_reasons"].items()))
    return (f"{v} [{r['compile_mode']}]: first run's first steps {r['compile_s']:.1f} s ({f['frame_compiles']} frame "
            f"compiles, {f['graphs']} graphs, {f['graph_breaks']} graph breaks{' (' + reasons + ')' if reasons else ''}, "
            f"{f['recompiles']} recompiles); median run's {r['compile_s_median']:.2f} s (later runs: "
            f"{later.get('frame_compiles', 0)} frame compiles, {later.get('recompiles', 0)} recompiles); timed loops: "
            f"{lp['frame_compiles']} frame compiles, {lp['recompiles']} recompiles"
            + (" -- WARNING: dynamo compiled inside a timed loop, whose time includes it" if lp["frame_compiles"] else ""))


def compiled_head(c: dict | None) -> str:
    """The table heading's words on the compile mode (payloads from before --compile: eager)."""
    if not c or not c.get("enabled"):
        return "eager (not compiled)"
    return (f"{', '.join(c['variants'])} compiled ({c['call']}, mode {c['mode']}; the others eager), compile time "
            f"outside the timed loops")


def render(p: dict) -> str:
    """tokens/s median [min-max] per variant, wall, peak memory, model TFLOP/s; moa's lead over each baseline."""
    variants = [v for v in VARIANTS if v in p["results"][0]]
    head = (f"### Training: shape `{p['shape']}`, {p['device']} {p['dtype']}, {p['steps_per_expert']} steps x "
            f"{p['batch_per_expert']} rows x {p['seq_len']} tokens per expert, r={p['lora']['r']}, PEFT adapters in "
            f"{p['lora'].get('peft_adapters', 'float32')}, median of {p['repeats']} interleaved rounds [min-max], "
            f"{compiled_head(p.get('compile'))}\n")
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
    if p.get("compile", {}).get("enabled"):
        rows = []
        for r in p["results"]:
            for v in variants:
                if "dynamo" in r[v]:
                    f, d = r[v]["dynamo"]["first_run"], r[v]["dynamo"]
                    rows.append([r["experts"], v, r[v]["compile_s"], r[v]["compile_s_median"], f["frame_compiles"],
                                 f["graphs"], f["graph_breaks"], f["recompiles"],
                                 d["later_runs"].get("frame_compiles", 0), d["loops"]["frame_compiles"]])
        out += [f"\nCompile: the first {p['compile']['first_steps']} forward+backward passes of each run, outside the "
                f"timed loops: the first run's seconds and the median run's; what dynamo did in the first run's (frames "
                f"compiled, graphs, graph breaks, recompiles), frames compiled in the later runs' (0: the first run's "
                f"graphs reused) and inside the timed loops (should be 0). Process init: {p['compile']['init_s']:.1f} s.\n",
                markdown_table(["N", "variant", "compile s", "median s", "frames", "graphs", "breaks", "recompiles",
                                "later runs' frames", "loop frames"], rows)]
        sites = sorted({f"{v}: {site}" for r in p["results"] for v in variants if "dynamo" in r[v]
                        for site in r[v]["dynamo"]["first_run"]["break_sites"]})
        if sites:
            out.append("\nGraph breaks:\n\n" + "\n".join(f"- {x}" for x in sites))
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
    ap.add_argument("--compile", action="store_true",
                    help="compile the model's forward on both sides as PEFT documents for LoRA training in a custom "
                         "loop: torch.compile(model), default settings, for " + ", ".join(COMPILE_VARIANTS) +
                         " (peft_par is refused); each run's first " + str(COMPILE_STEPS) + " forward+backward passes "
                         "compile, and their time (compile_s) is reported apart, outside the timed loops; off: eager")
    ap.add_argument("--worker-domain", default=None, type=int, help=argparse.SUPPRESS)  # a peft_par process
    ap.add_argument("--worker-go", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global PEFT_FP32_ADAPTERS, COMPILE
    PEFT_FP32_ADAPTERS = args.peft_fp32_adapters
    if args.worker_domain is not None:
        return worker(args)
    if not args.render:  # before any model is built
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            ap.error(f"unknown --variants {unknown}; known: {VARIANTS}")
        refused = [v for v in args.variants if v not in COMPILE_VARIANTS]
        if args.compile and refused:
            ap.error(f"--compile does not support {refused}: peft_par's N processes would each compile their own copy "
                     f"while the others wait at the common start. Compiled variants: {list(COMPILE_VARIANTS)}")
    COMPILE = args.compile
    return run_shapes(args, "training", run_shape, render)


if __name__ == "__main__":
    raise SystemExit(main())
