"""Evaluations of trained runs beyond the meta-test of `theria.train`.

    python -m theria.eval lake --runs DIR --run RUNDIR [--out FILE] [--device cpu]

`lake`: Lake et al.'s (2015) 20 within-alphabet 20-way one-shot runs (theria.eval.lake).
Trainer layer: it uses theria.train's builders, checkpoints and test-time adaptation.
"""

from theria.eval.lake import LAKE_ANCHORS, LakeRun, evaluate_lake, load_lake_runs

__all__ = ["LAKE_ANCHORS", "LakeRun", "evaluate_lake", "load_lake_runs"]
