"""LoRA-mixed alone, under a given profile, for one seed: curate, train_mixed (the flow's own stage functions, with
MLflow), then perplexity on every test row through the evaluation's own code. Written to <project>/metrics/
mixed_probe.json, with per-row statistics that `compare` pairs against a full flow's system on the same rows.

It answers one question cheaply (no experts, no stage 2): how good is lora-mixed under another sampling
(e.g. `--profile gpu,balanced_mix` against `gpu`) than a flow's run used? Run it in an empty project folder holding a params.yaml
(the code on PYTHONPATH), as `run_flow.sh seeds` does for whole flows:

    python bench/mixed_sampling_probe.py run --params DIR/params.yaml --profile gpu --seed 0
    python bench/mixed_sampling_probe.py compare PROBE_DIR[,PROBE_DIR...] FLOW_DIR[,FLOW_DIR...]:moa

With `--generate` it also generates on the rows the profile's `evaluate.max_samples` allows (every row for
`gpu`) and writes metrics/eval_rows.json as the flow's evaluate does (system `lora-mixed`), so that
`infra/gpu/paired.py FLOW_DIR...:moa PROBE_DIR...:lora-mixed` pairs PPL, BLEU and ROUGE-L.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROBE_FILE = "mixed_probe.json"


def run(args: argparse.Namespace) -> int:
    from moa_core.base_model import load_base
    from moa_core.evaluate import evaluate_system
    from moa_core.methods.moa import experts_side_by_side
    from tasks.common import StageContext, configure_env
    from tasks.curate import run_curate
    from tasks.evaluate import ROWS_FILE, SYSTEM_LABELS
    from tasks.train_expert import run_train_mixed

    ctx = StageContext.load(args.params, args.profile)
    update = {"train": ctx.cfg.train.model_copy(update={"seeds": [args.seed], "seed": args.seed})}
    if not args.generate:  # perplexity on every row, 1 generation
        update["evaluate"] = ctx.cfg.evaluate.model_copy(update={"max_samples": 1})
    cfg = ctx.cfg.model_copy(update=update)
    ctx = dataclasses.replace(ctx, cfg=cfg).for_seed(args.seed)
    configure_env(ctx.root)
    t0 = time.perf_counter()
    for d in cfg.domain_names:
        run_curate(ctx, d)
    train = run_train_mixed(ctx)
    trained_s = time.perf_counter() - t0
    base, tok, model_id = load_base(cfg.base_model, ctx.root)
    mm = experts_side_by_side(cfg, base, model_id, [ctx.layout.mixed])
    test = ctx.splits("test")
    ev = evaluate_system(mm, tok, test, cfg, 0)  # no autograd, the flow's autocast: evaluate_system's own
    out = {"profile": args.profile, "seed": args.seed, "mixed_sampling": cfg.train.mixed_sampling,
           "train": {k: v for k, v in train.items() if isinstance(v, int | float | str)}, "seconds_to_trained": trained_s,
           "ppl": {d: v["ppl"] for d, v in ev.per_domain.items()},
           "rows": {d: {"nll": r.nll, "tokens": r.tokens} for d, r in ev.rows.items()}}
    if args.generate:
        out["per_domain"] = ev.per_domain
    path = ctx.layout.metrics / PROBE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    if args.generate:  # the flow's per-row file, for infra/gpu/paired.py
        rows = {SYSTEM_LABELS["mixed"]: {d: r.to_json() for d, r in ev.rows.items()}}
        (ctx.layout.metrics / ROWS_FILE).write_text(json.dumps(rows))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Paired PPL difference (flow system minus the probe's lora-mixed), per domain and on the average."""
    from moa_core.stats import RowStats, paired_difference

    probes = []
    for d in args.probe_dirs.split(","):
        found = sorted(Path(d).glob(f"metrics/**/{PROBE_FILE}"))
        if not found:
            raise SystemExit(f"no {PROBE_FILE} under {d}/metrics: run the probe there first")
        rows = json.loads(found[0].read_text())["rows"]
        probes.append({dom: RowStats(nll=r["nll"], tokens=r["tokens"]) for dom, r in rows.items()})
    dirs, _, system = args.flow.rpartition(":")
    flows = [{dom: RowStats.from_json(r) for dom, r in json.loads((Path(d) / "metrics" / "eval_rows.json").read_text())[system].items()}
             for d in dirs.split(",")]
    domains = list(flows[0])
    for dom in domains:
        if len(flows[0][dom].nll) != len(probes[0][dom].nll):
            raise SystemExit(f"{dom}: the probe and the flow were evaluated on different test rows")
    print(f"A = {system} ({dirs})\nB = lora-mixed of the probe ({args.probe_dirs})\nA - B perplexity, 95 % paired "
          f"bootstrap over test rows ({args.bootstrap} resamples)\n\n| domain | A - B |\n|---|---|")
    for dom in [*domains, "avg"]:
        d = paired_difference(flows, probes, domains, "ppl", n_boot=args.bootstrap, domain=dom)
        print(f"| {dom} | {d.value:+.2f} [{d.low:+.2f}, {d.high:+.2f}] {d.verdict} |")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="curate, train lora-mixed, perplexity on every test row")
    r.add_argument("--params", type=Path, required=True)
    r.add_argument("--profile", default="gpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--generate", action="store_true",
                   help="also generate (as many rows as evaluate.max_samples) and write metrics/eval_rows.json")
    c = sub.add_parser("compare", help="paired PPL: a flow's system against the probe's lora-mixed")
    c.add_argument("probe_dirs")
    c.add_argument("flow", help="FLOW_DIR[,FLOW_DIR...]:SYSTEM, one folder per seed in the probes' order")
    c.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    return run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
