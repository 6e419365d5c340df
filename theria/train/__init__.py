"""The experiment app: meta-training from a Hydra config.

    python -m theria.train algo=maml attn=theria task=markov model=transformer
    python -m theria.train -m algo=fomaml,maml,imaml attn=theria,sdpa_math seed=0,1,2
    python -m theria.train experiment=exp_transformer_algos launcher=joblib -m seed=0,1,2

    from theria.train import train, compose_config
    results = train(compose_config(["algo=fomaml", "debug=fast"]), run_dir="outputs/x")

`train(cfg, run_dir=None, *, reduce_grads=None) -> dict` (results.json's contents); the
config groups live in conf/ and their types in theria/config.py. Outputs of a run directory:
<label>/ (TensorBoard events; the label is the run's overrides, theria.train.tboard),
checkpoints/last.pt, results.json (meta-test mean and 95% CI, memory, provenance:
docs/METRICS.md).
"""

from __future__ import annotations

from pathlib import Path

from theria.train.build import ConfigError
from theria.train.evaluate import adaptation_curve, evaluate, mean_ci95
from theria.train.loop import NonFiniteLossError, task_generator, train

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "NonFiniteLossError",
    "adaptation_curve",
    "compose_config",
    "evaluate",
    "mean_ci95",
    "task_generator",
    "train",
]


def compose_config(overrides: list[str] | None = None, config_name: str = "config"):
    """The config `python -m theria.train <overrides>` would run, composed with Hydra's
    compose API (for tests, notebooks and scripts)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from theria.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))
