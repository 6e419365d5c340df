"""Experiment (2): FO-MAML vs MAML vs iMAML meta-training a small causal transformer through
theria's attention (attn=theria) on few-shot Markov-chain next-token prediction: learning
curves and a final table over seeds.

    python experiments/exp_transformer_algos.py [--seeds 0 1 2] [--jobs 3] [overrides ...]

Runs the sweep through the app, exactly as a user would,
    python -m theria.train -m experiment=exp_transformer_algos algo=fomaml,maml,imaml
        seed=... launcher=joblib hydra.launcher.n_jobs=... [overrides]
then `python -m theria.report` on the sweep folder, and copies its table and plot to
experiments/results/exp_transformer_algos.{md,png}.
"""

from __future__ import annotations

import argparse
import shutil
from datetime import datetime
from pathlib import Path

from exp_common import RESULTS, ROOT, machine, run_train

from theria.report import report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("overrides", nargs="*", help="extra theria.train overrides, e.g. steps=100")
    args = ap.parse_args()
    sweep = (
        ROOT
        / "outputs"
        / "multirun"
        / "exp_transformer_algos"
        / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    )
    run_train([
        "-m", "experiment=exp_transformer_algos", "algo=fomaml,maml,imaml",
        "seed=" + ",".join(map(str, args.seeds)), "launcher=joblib",
        f"hydra.launcher.n_jobs={args.jobs}", f"hydra.sweep.dir={sweep}", *args.overrides,
    ])  # fmt: skip
    md = report(sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    text = md.read_text().replace("report.png", "exp_transformer_algos.png")
    scale = (
        f"\nReduced scale (CPU budget): the steps above, seeds {args.seeds}, a 1-block "
        "transformer of width 32 on 16-token Markov chains over 8 symbols, meta-batch 4, "
        "inner step 0.1 (1 step for FO-MAML/MAML; 10 proximal steps, λ = 1 and 3 CG "
        "iterations for iMAML; each evaluated with its own inner loop) "
        "(conf/experiment/exp_transformer_algos.yaml"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
        + f"). Measured on {machine()}. Sweep folder: {sweep.relative_to(ROOT)} (not "
        "committed).\n\n![validation curves and final losses](exp_transformer_algos.png)\n"
    )
    (args.out / "exp_transformer_algos.md").write_text(text + scale)
    shutil.copy(md.with_suffix(".png"), args.out / "exp_transformer_algos.png")
    print((args.out / "exp_transformer_algos.md").read_text())


if __name__ == "__main__":
    main()
