"""Are the experts of one mixed-domain MoA pass as good as N separately trained PEFT experts?

bench_training.py times the one pass (`moa`) against PEFT jobs; this script checks what it trains. For each seed:

  peft   N PEFT LoRA jobs (bench_training.peft_job), job k on domain k's rows, --steps steps of --batch rows;
  moa    one MixtureModel pass (bench_training.moa_pass), --steps steps of N x --batch rows, step s holding exactly
         the rows job k sees at its step s, each row through its own domain's expert;

then every domain's validation loss (mean token NLL over held-out rows, prompt quarter masked) through PEFT expert
k and through MoA with expert k forced, and the base model's as the starting point. Same rank, alpha, dropout,
targets, optimiser and schedule (moa_core.train.train_loop). What differs by design: the one pass averages the
loss over N x --batch rows, and each expert's gradient is divided by its share of that loss and clipped on its own
(its job's clipped gradient; --clip joint clips all experts' share-scaled gradients together, as before
2026-12-04), and the initial A and the dropout masks come from other draws.

Two kinds of data (--data):
  markov   synthetic but learnable domains: domain k is a Markov chain over its own slice of the vocabulary (each
           token has 4 likely successors), so an expert must learn domain-specific statistics and a wrong or weak
           expert shows in its loss. The base is randomly initialised (bench_training's --shape): this checks the
           training mechanics, not language quality.
  curated  the pipeline's own curated domains (data/curated/<domain>/{train,val}.jsonl, written by `moa run` or
           `dvc repro`; the first --experts of params.yaml's domains) on params.yaml's pretrained base (the embedded
           SmolLM2-135M-Instruct by default; --shape is ignored), encoded as training encodes them (chat template,
           prompt masked, --seq-len tokens). Each seed draws its training rows in its own order (a domain with fewer
           rows than --steps x --batch is cycled); the validation rows are the domain's val split.

Verdict: the mean per-domain difference (moa - peft, nats) over seeds x domains with a 95 % t-interval; "equal"
when the whole interval lies within +/- --margin (default 10 %) of what PEFT's training gained (the base's mean
validation loss minus PEFT's), a margin fixed before the runs: a pass that learned 10 % less than the separate
experts fails it. The test split is not involved: these are synthetic validation rows.

Examples:  python bench/training_quality.py --shape tiny --device cpu --experts 4 --steps 30 --seeds 0,1,2
           python bench/training_quality.py --data curated --device cpu --steps 20 --batch 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: I001
    SHAPES, build_base, clone, machine_info, markdown_table, one_shape_args, parse_int_list, pick_device,  # noqa: E402
    pick_dtype, write_json,
)
from bench_training import moa_batches, moa_clip, moa_pass, peft_batches, peft_job, run_loop  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

SUCCESSOR_P = (0.55, 0.25, 0.15, 0.05)  # each token's 4 likely successors in its domain's chain


def markov_rows(k: int, n_domains: int, rows: int, T: int, V: int, stream: int) -> dict[str, Tensor]:
    """Domain k's rows [rows, T] from its own Markov chain over vocabulary slice k (of n_domains slices, ids from 3);
    `stream` picks disjoint samples of the same chain (0: training rows, 1: validation rows)."""
    width = (V - 3) // n_domains
    lo = 3 + k * width
    chain = torch.Generator().manual_seed(7_000 + k)  # the domain itself: fixed whatever the stream
    succ = torch.stack([torch.randperm(width, generator=chain)[: len(SUCCESSOR_P)] for _ in range(width)])  # [width, 4]
    g = torch.Generator().manual_seed(10_000 * (stream + 1) + k)
    ids = torch.empty(rows, T, dtype=torch.long)
    ids[:, 0] = torch.randint(0, width, (rows,), generator=g)
    p = torch.tensor(SUCCESSOR_P)
    for t in range(1, T):
        pick = torch.multinomial(p, rows, replacement=True, generator=g)
        ids[:, t] = succ[ids[:, t - 1], pick]
    ids += lo
    labels = ids.clone()
    labels[:, : T // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def curated_rows(records: list, tokenizer, rows: int, T: int, seed: int | None) -> dict[str, Tensor]:
    """`rows` encoded records [rows, T], right-padded (mask 0, labels -100) as training encodes them
    (moa_core.batching.encode). seed None: the records in order, at most `rows` of them (validation); else a
    seed-shuffled order, cycled (reshuffled each pass) until `rows` are drawn."""
    import random

    from moa_core.batching import collate, encode

    if seed is None:
        chosen = records[:rows]
    else:
        rng, chosen = random.Random(seed), []
        while len(chosen) < rows:
            order = list(records)
            rng.shuffle(order)
            chosen += order[: rows - len(chosen)]
    batch = collate([encode(tokenizer, r, T) for r in chosen], tokenizer.pad_token_id)
    pad = T - batch["input_ids"].shape[1]  # collate pads to the longest row; every domain gets width T
    fill = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, pad), value=fill[k]) for k, v in batch.items()}


def curated_domains(params: str, n: int) -> tuple[nn.Module, object, list[str], list[list], list[list]]:
    """params.yaml's pretrained base and its first `n` curated domains -> (base in eval mode, tokenizer, names,
    train records per domain, val records per domain). A clear error when the curated data is missing."""
    from moa_core.base_model import load_base
    from moa_core.config import load_config
    from moa_core.data import read_records
    from moa_core.layout import Layout

    cfg = load_config(params)
    names = [d.name for d in cfg.domains][:n]
    root = Path(params).resolve().parent
    splits = {}
    for split in ("train", "val"):
        paths = [Layout.at(root).curated(d) / f"{split}.jsonl" for d in names]
        if missing := [str(p) for p in paths if not p.is_file()]:
            raise SystemExit(f"no curated data at {', '.join(missing)}: run `make run` or `.venv/bin/dvc repro "
                             "curate` first (training_quality --data curated reads the pipeline's curated domains)")
        splits[split] = [read_records(p) for p in paths]
    if len(names) < n:
        raise SystemExit(f"--experts {n} but params.yaml has {len(names)} domains")
    base, tok, _ = load_base(cfg.base_model, root, device=torch.device("cpu"))
    return base, tok, names, splits["train"], splits["val"]


def _to(d: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in d.items()}


@torch.no_grad()
def val_loss(forward, rows: dict[str, Tensor], chunk: int = 16) -> float:
    """Mean token NLL of `forward(batch) -> loss` over `rows`, weighted by each chunk's label tokens."""
    total, count = 0.0, 0
    n = rows["input_ids"].shape[0]
    for i in range(0, n, chunk):
        b = {k: v[i:i + chunk] for k, v in rows.items()}
        tokens = int((b["labels"][:, 1:] != -100).sum())
        total += float(forward(b)) * tokens
        count += tokens
    return total / count


def run_seed(seed: int, base: nn.Module, train: list[dict[str, Tensor]], val: list[dict[str, Tensor]],
             args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Per-domain validation losses of the N PEFT experts and the MoA pass's experts for one seed;
    train[k]: domain k's rows [steps x batch, T]."""
    N, S, B = len(train), args.steps, args.batch
    out: dict[str, list[float]] = {"peft": [], "moa": []}
    for k in range(N):
        pm, params, step_fn = peft_job(clone(base), seed=seed)
        run_loop(params, peft_batches(train[k], S, B), step_fn, args.lr, args.grad_clip)
        pm.eval()
        out["peft"].append(val_loss(lambda b: pm(**b).loss, val[k]))
        del pm, params
    mm, params, step_fn = moa_pass(clone(base), base, N, seed=seed)
    clip = moa_clip(mm, params, args.grad_clip) if args.clip == "per_expert" else None
    run_loop(params, moa_batches(train, S, B, device), step_fn, args.lr, args.grad_clip, clip=clip)
    mm.eval()
    for k in range(N):
        def forward(b, k=k):
            expert = torch.full((b["input_ids"].shape[0],), k, device=device)
            return mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=expert).loss
        out["moa"].append(val_loss(forward, val[k]))
    return out


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion around the normal one (within 0.01 of the exact value
    for df >= 5 at p = 0.975; the GPU image has no scipy)."""
    z = statistics.NormalDist().inv_cdf(p)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of `xs`."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def main(argv: list[str] | None = None) -> int:
    ap = one_shape_args(__doc__, experts=4)
    ap.add_argument("--steps", default=30, type=int, help="optimiser steps per expert")
    ap.add_argument("--batch", default=8, type=int, help="rows per step per expert")
    ap.add_argument("--seq-len", default=64, type=int)
    ap.add_argument("--val-rows", default=32, type=int, help="validation rows per domain")
    ap.add_argument("--lr", default=1e-3, type=float)
    ap.add_argument("--seeds", default="0,1,2", type=parse_int_list)
    ap.add_argument("--grad-clip", default=1.0, type=float,
                    help="gradient-norm clip of every job and of the pass (params.yaml train.grad_clip)")
    ap.add_argument("--clip", default="per_expert", choices=["per_expert", "joint"],
                    help="how the pass clips: each expert's own-rows gradient on its own, as its job would (per_expert, "
                         "train_mixture's default: train.clip_per_expert) or all experts' gradients together "
                         "(joint, before)")
    ap.add_argument("--data", default="markov", choices=["markov", "curated"],
                    help="markov: synthetic domains on a random base of --shape; curated: the pipeline's curated "
                         "domains on params.yaml's pretrained base (see below)")
    ap.add_argument("--params", default="params.yaml", help="with --data curated: the pipeline's params file")
    ap.add_argument("--margin", default=0.1, type=float,
                    help="equal when the 95%% interval of the mean difference lies within +/- this fraction of "
                         "PEFT's gain (base loss - PEFT loss)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    N, rows = args.experts, args.steps * args.batch
    if args.data == "curated":
        base, tok, names, train_records, val_records = curated_domains(args.params, N)
        base = base.to(device=device, dtype=dtype)

        def train_rows(seed: int) -> list[dict[str, Tensor]]:
            return [_to(curated_rows(r, tok, rows, args.seq_len, seed), device) for r in train_records]

        val = [_to(curated_rows(r, tok, args.val_rows, args.seq_len, None), device) for r in val_records]
        what = f"curated domains {names} on the pretrained base"
    else:
        V = SHAPES[args.shape]["vocab_size"]
        base = build_base(args.shape, device, dtype, seed=0)
        fixed = [_to(markov_rows(k, N, rows, args.seq_len, V, 0), device) for k in range(N)]

        def train_rows(seed: int) -> list[dict[str, Tensor]]:
            return fixed

        val = [_to(markov_rows(k, N, args.val_rows, args.seq_len, V, 1), device) for k in range(N)]
        names = [f"markov {k}" for k in range(N)]
        what = f"markov domains, shape `{args.shape}`"
    base_losses = [val_loss(lambda b: base(**b).loss, val[k]) for k in range(N)]  # the same for every seed
    per_seed, t0 = {}, time.perf_counter()
    for seed in args.seeds:
        per_seed[seed] = {"base": base_losses, **run_seed(seed, base, train_rows(seed), val, args, device)}
        print(f"  seed {seed}: peft {statistics.fmean(per_seed[seed]['peft']):.4f}, "
              f"moa {statistics.fmean(per_seed[seed]['moa']):.4f}, base {statistics.fmean(per_seed[seed]['base']):.4f} "
              f"(+{time.perf_counter() - t0:.0f} s)", flush=True)
    diffs = [m - p for s in per_seed.values() for m, p in zip(s["moa"], s["peft"])]
    peft_mean = statistics.fmean(v for s in per_seed.values() for v in s["peft"])
    base_mean = statistics.fmean(v for s in per_seed.values() for v in s["base"])
    mean, lo, hi = t_interval(diffs)
    bound = args.margin * (base_mean - peft_mean)
    equal = -bound <= lo and hi <= bound
    rows = [[names[k], statistics.fmean(s["base"][k] for s in per_seed.values()),
             statistics.fmean(s["peft"][k] for s in per_seed.values()),
             statistics.fmean(s["moa"][k] for s in per_seed.values()),
             statistics.fmean(s["moa"][k] - s["peft"][k] for s in per_seed.values())] for k in range(N)]
    print(f"\n### One MoA pass vs {N} separately trained PEFT experts: validation loss per domain, {what}, "
          f"{device.type} {str(dtype).replace('torch.', '')}, {args.steps} steps x {args.batch} rows x "
          f"{args.seq_len} tokens per expert, mean over seeds {args.seeds}\n")
    print(markdown_table(["domain", "base", "peft", "moa", "moa - peft"], rows))
    print(f"\nmoa - peft over {len(diffs)} (seed, domain) pairs: {mean:+.4f} nats, 95% CI [{lo:+.4f}, {hi:+.4f}]; "
          f"margin +/- {bound:.4f} ({args.margin:.0%} of PEFT's gain, {base_mean:.4f} -> {peft_mean:.4f}): "
          f"{'EQUAL' if equal else 'NOT shown equal'}")
    write_json(args.json, {"benchmark": "training_quality", "args": vars(args), "machine": machine_info(device),
                           "domains": names,
                           "per_seed": {str(s): v for s, v in per_seed.items()}, "difference": {
                               "mean": mean, "ci95": [lo, hi], "margin": bound, "equal": equal},
                           "peft_mean": peft_mean, "base_mean": base_mean})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
