"""Pipeline overhead: the demo flow (flows/pipeline.py `moa_pipeline`) vs the same stage functions called
directly, on the tiny config-built model (as tests/conftest.py builds it) and the `quick` profile.

  flow     moa_pipeline(params, profile): Prefect flow + task runs (ThreadPoolTaskRunner), a parent
           MLflow run, the project lock, then the stages.
  direct   the functions the Prefect tasks wrap (tasks/prefect_tasks.py), in the flow's order, in this
           process, no Prefect: run_curate per domain, run_train_expert per domain, run_train_mixed,
           run_train_router (method, then the ablation / comparison methods the config asks for),
           run_evaluate, run_register. Their MLflow runs are standalone instead of nested.

Each run gets a fresh project directory (same params.yaml, same tiny base model), so every run does the
same work: curation, training from step 0, evaluation and a first registry version. The runs alternate
(direct, flow, direct, flow, ...). Prefect starts its ephemeral API server inside the first flow run of
the process, and the first direct run pays the process's first imports and model load: both first runs
are reported apart, the medians are over the later runs (the steady state).

Needs the full project environment (prefect, mlflow): a CPU-only benchmark, run on the dev machine.

Example:  python bench/bench_pipeline.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _env(tmp: Path) -> None:
    """What tests/conftest.py sets: offline, no telemetry, one PREFECT_HOME for the whole process."""
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect-home"))


def make_project(tmp: Path, model_dir: Path, name: str, max_rows: int, threads: int) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base_model"]["source"] = str(model_dir)
    raw.setdefault("profiles", {}).setdefault("quick", {})["curate"] = {"max_rows": max_rows}
    raw.setdefault("train", {})["num_threads"] = threads
    root = tmp / name
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def run_direct(params: Path, profile: str) -> dict[str, Any]:
    """The flow's stage sequence, as plain function calls; returns per-stage seconds."""
    from moa_core.methods import planned_mixtures
    from tasks.common import StageContext, configure_env, set_torch_threads
    from tasks.curate import run_curate
    from tasks.evaluate import run_evaluate
    from tasks.register import run_register
    from tasks.train_expert import run_train_expert, run_train_mixed
    from tasks.train_router import run_train_router

    stages: dict[str, float] = {}

    def stage(_stage: str, fn, /, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        stages[_stage] = stages.get(_stage, 0.0) + time.perf_counter() - t0
        return out

    ctx = stage("load_config", StageContext.load, params, profile)
    configure_env(ctx.root)
    set_torch_threads(ctx.cfg)
    cfg = ctx.cfg
    for d in cfg.domain_names:
        stage("curate", run_curate, ctx, d)
    for d in cfg.domain_names:
        stage("train_expert", run_train_expert, ctx, d)
    if "mixed" in cfg.evaluate.baselines:
        stage("train_mixed", run_train_mixed, ctx)
    for mix in planned_mixtures(cfg):
        stage("train_router", run_train_router, ctx, method=mix.method, eta=mix.eta, name=mix.name)
    stage("evaluate", run_evaluate, ctx)
    reg = stage("register", run_register, ctx)
    return {"stages_s": stages, "registered_version": reg.get("version")}


def run_flow(params: Path, profile: str) -> dict[str, Any]:
    from flows.pipeline import moa_pipeline

    out = moa_pipeline(params=str(params), profile=profile)
    return {"registered_version": out["registered"].get("version")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", default=2, type=int, help="runs of each mode after the first flow run")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--max-rows", default=40, type=int, help="curate.max_rows per domain (tests use 40)")
    ap.add_argument("--threads", default=1, type=int, help="train.num_threads written into params.yaml")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project directories")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="moa-bench-pipeline-"))
    _env(tmp)
    from _common import machine_info, markdown_table, write_json  # after the env: imports torch
    from moa_core.base_model import build_tiny_model

    import torch

    model_dir = build_tiny_model(tmp / "tiny-model")
    runs: list[dict[str, Any]] = []
    order = ["direct", "flow"] * (args.repeats + 1)  # the first flow run starts Prefect's server
    try:
        for i, mode in enumerate(order):
            root = make_project(tmp, model_dir, f"{mode}-{i}", args.max_rows, args.threads)
            t0 = time.perf_counter()
            rec = (run_direct if mode == "direct" else run_flow)(root / "params.yaml", args.profile)
            rec.update(mode=mode, wall_s=time.perf_counter() - t0, index=i)
            runs.append(rec)
            print(f"  {mode} #{i}: {rec['wall_s']:.1f} s", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    first_flow = next(r for r in runs if r["mode"] == "flow")
    first_direct = next(r for r in runs if r["mode"] == "direct")
    flows = [r["wall_s"] for r in runs if r["mode"] == "flow" and r is not first_flow]
    directs = [r["wall_s"] for r in runs if r["mode"] == "direct" and r is not first_direct]
    med_f, med_d = statistics.median(flows), statistics.median(directs)
    stage_names = list(dict.fromkeys(k for r in runs if r["mode"] == "direct" for k in r["stages_s"]))
    stage_med = {k: statistics.median(r["stages_s"].get(k, 0.0) for r in runs
                                      if r["mode"] == "direct" and r is not first_direct) for k in stage_names}
    payload = {"benchmark": "pipeline", "profile": args.profile, "max_rows": args.max_rows, "threads": args.threads,
               "machine": machine_info(torch.device("cpu")), "runs": runs,
               "median_direct_s": med_d, "median_flow_s": med_f, "first_flow_s": first_flow["wall_s"],
               "first_direct_s": first_direct["wall_s"],
               "flow_over_direct": med_f / med_d, "flow_minus_direct_s": med_f - med_d,
               "direct_stage_median_s": stage_med}
    rows = [["direct (stage functions), steady state", len(directs), med_d, min(directs), max(directs), 1.0],
            ["flow (steady state)", len(flows), med_f, min(flows), max(flows), med_f / med_d],
            ["flow (first in process: + Prefect server start)", 1, first_flow["wall_s"], first_flow["wall_s"],
             first_flow["wall_s"], first_flow["wall_s"] / med_d],
            ["direct (first in process: + imports, first model load)", 1, first_direct["wall_s"],
             first_direct["wall_s"], first_direct["wall_s"], first_direct["wall_s"] / med_d]]
    print(f"### Pipeline: tiny model, profile `{args.profile}`, curate.max_rows {args.max_rows}, "
          f"{args.threads} torch thread(s)\n")
    print(markdown_table(["mode", "runs", "median s", "min s", "max s", "/ direct"], rows))
    print(f"\nflow - direct (steady state): {med_f - med_d:+.1f} s per pipeline run\n")
    print(markdown_table(["direct stage (steady state)", "median s"], [[k, v] for k, v in stage_med.items()]))
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
