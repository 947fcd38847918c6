"""Paired differences between two systems that may come from different runs (e.g. two profiles), on the same
test rows: A minus B per domain and on the average, with the 95 % paired bootstrap interval and the verdict.

    python infra/gpu/paired.py [--bootstrap N] A_DIR[,A_DIR2...]:SYSTEM B_DIR[,B_DIR2...]:SYSTEM

Each DIR is a project copy whose metrics/eval_rows.json holds the per-row statistics of its evaluation (one seed
per copy, as `run_flow.sh seeds` leaves them); several comma-separated DIRs are several seeds of that side.
Both sides must have been evaluated on the same test split (same curated data and evaluate settings): the row
counts are checked. Example, the `from_mixed` profile's MoA against the default MoA of the same seed:

    python infra/gpu/paired.py out/gpu_from_mixed-seed-0:moa out/gpu-seed-0:moa
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moa_core.stats import PAIRED, RowStats, paired_difference  # noqa: E402


def load_side(spec: str) -> tuple[str, list[dict[str, RowStats]]]:
    dirs, _, system = spec.rpartition(":")
    seeds = []
    for d in dirs.split(","):
        rows = json.loads((Path(d) / "metrics" / "eval_rows.json").read_text())
        if system not in rows:
            raise SystemExit(f"{d}/metrics/eval_rows.json has no system {system!r} (it has {sorted(rows)})")
        seeds.append({dom: RowStats.from_json(r) for dom, r in rows[system].items()})
    return f"{system} ({dirs})", seeds


def main(argv: list[str]) -> int:
    n_boot = 1000
    if argv[:1] == ["--bootstrap"] and len(argv) > 1:
        n_boot, argv = int(argv[1]), argv[2:]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    (name_a, a), (name_b, b) = load_side(argv[0]), load_side(argv[1])
    domains = list(a[0])
    for da, db in zip(a[0].values(), b[0].values()):
        if len(da.nll) != len(db.nll):
            raise SystemExit("the two sides were evaluated on different test rows: compare runs of the same split")
    print(f"A = {name_a}\nB = {name_b}\nA - B, 95 % paired bootstrap over test rows ({n_boot} resamples)\n")
    print("| domain | " + " | ".join(PAIRED) + " |\n|---|" + "---|" * len(PAIRED))
    for dom in [*domains, "avg"]:
        cells = []
        for m in PAIRED:
            d = paired_difference(a, b, domains, m, n_boot=n_boot, domain=dom)
            cells.append(f"{d.value:+.2f} [{d.low:+.2f}, {d.high:+.2f}] {d.verdict}")
        print(f"| {dom} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
