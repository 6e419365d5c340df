"""`python -m theria.eval lake --runs DIR --run RUNDIR [--out FILE] [--device DEV]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from theria.eval.lake import LAKE_ANCHORS, evaluate_lake


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m theria.eval", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    lake = sub.add_parser("lake", help="Lake et al.'s 20 runs of 20-way one-shot classification")
    lake.add_argument("--runs", required=True, help="all_runs.zip, or a folder of run01..run20")
    lake.add_argument("--run", required=True, help="a run directory of python -m theria.train")
    lake.add_argument("--out", type=Path, default=None, help="JSON file (default RUN/lake.json)")
    lake.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        res = evaluate_lake(args.run, args.runs, args.device, progress=print)
    except (FileNotFoundError, ValueError) as e:
        print(f"[theria.eval] error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(args.run) / "lake.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    lo, hi = res["ci95"]
    anchors = ", ".join(f"{k} {100 * v:.1f} %" for k, v in LAKE_ANCHORS.items())
    print(
        f"[theria.eval] Lake 20-way one-shot: error {100 * res['error_rate']:.1f} % "
        f"(95% CI {100 * lo:.1f}–{100 * hi:.1f} %, {res['errors']}/{res['trials']} trials)\n"
        f"  anchors (full 30-alphabet background): {anchors}\n  written to {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
