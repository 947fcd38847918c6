"""Pool the per-seed flows of `run_flow.sh seeds` into one comparison with 95 % intervals.

Each seed's flow ran in its own copy of the project with `train.seeds: [k]`, so its per-row statistics sit in
<seed dir>/metrics/eval_rows.json. This copies them to metrics/seed-<k>/ of the project given by --params and
runs the same `intervals` stage a one-flow, several-seed run ends with (reports/eval_intervals.md,
metrics/eval_intervals.json, an MLflow run).

    python infra/gpu/pool_seeds.py --profile gpu gpu-out/seed-0 gpu-out/seed-1 gpu-out/seed-2
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from tasks.common import StageContext, configure_env
    from tasks.evaluate import ROWS_FILE, run_intervals

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed_dirs", nargs="+", type=Path, help="one project copy per seed, named seed-<k>")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--profile", default="gpu")
    args = ap.parse_args()
    seeds = []
    for d in args.seed_dirs:
        rows = d / "metrics" / ROWS_FILE
        if not rows.exists():
            print(f"{rows} is missing: that seed's flow did not finish its evaluation", file=sys.stderr)
            return 2
        name = d.resolve().name  # "gpu-seed-2", also when given as gpu-seed-2/ or gpu-seed-2/metrics/..
        if not name.rsplit("-", 1)[-1].isdigit():
            print(f"{d}: the folder name must end in -<seed>, as run_flow.sh seeds names its copies (gpu-seed-0)",
                  file=sys.stderr)
            return 2
        seeds.append(int(name.rsplit("-", 1)[-1]))
    ctx = StageContext.load(args.params, args.profile)
    cfg = ctx.cfg.model_copy(update={"train": ctx.cfg.train.model_copy(update={"seeds": seeds})})
    ctx = dataclasses.replace(ctx, cfg=cfg)
    configure_env(ctx.root)
    for d, s in zip(args.seed_dirs, seeds):
        dest = ctx.for_seed(s).layout.metrics / ROWS_FILE
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(d / "metrics" / ROWS_FILE, dest)
    print(run_intervals(ctx)["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
