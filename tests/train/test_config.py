"""conf/: every option of every group composes onto the typed schema; typos and wrong types
fail before any work with the key in the message."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from theria.train import CONF_DIR, ConfigError, compose_config, train
from theria.train.build import check_config

GROUPS = (
    "algo",
    "attn",
    "task",
    "model",
    "optim",
    "logger",
    "launcher",
    "dist",
    "experiment",
    "debug",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_primary_defaults_order() -> None:
    entries = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    # Hydra's own `override hydra/...` entries must come last; the groups' order is before them
    defaults = [
        d
        for d in entries
        if not (hasattr(d, "keys") and str(next(iter(d))).startswith("override "))
    ]
    assert len(defaults) == len(entries) - 1  # the job_logging override
    assert defaults[0] == "_self_"
    assert list(defaults[-2]) == ["experiment"] and defaults[-2].experiment is None
    assert list(defaults[-1]) == ["debug"] and defaults[-1].debug is None


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group: str) -> None:
    names = options(group)
    assert names, f"conf/{group}/ is empty"
    for name in names:
        cfg = compose_config([f"{group}={name}"])
        check_config(cfg)  # typed, complete, values in range


def test_experiment_files_are_global_packages() -> None:
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path


@pytest.mark.parametrize(
    ("override", "key"),
    [("algo.inner_stepz=3", "algo.inner_stepz"), ("optim.lr=fast", "optim.lr"),
     ("seed=zero", "seed"), ("task.k_shot=1.5", "task.k_shot")],
)  # fmt: skip
def test_typo_or_wrong_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        compose_config([override])
    text = f"{e.value} {e.value.__cause__}"
    assert key in text


def test_bad_value_names_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"algo\.name='mamll'"):
        train(compose_config(["algo.name=mamll"]), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"meta_batch=0: expected >= 1"):
        train(compose_config(["meta_batch=0"]), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"model=mlp .* task=markov needs model=transformer"):
        train(compose_config(["task=markov"]), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"algo\.batching='parallel'"):
        train(compose_config(["algo.batching=parallel"]), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"graph='always'"):
        train(compose_config(["graph=always"]), run_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"graph=on needs a CUDA device"):
            train(compose_config(["graph=on"]), run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # failed before any work


def test_hand_built_config_is_checked_against_the_schema() -> None:
    plain = OmegaConf.to_container(compose_config(), resolve=True)
    plain["algo"]["inner_stepz"] = 3  # a typo in a config built by hand (untyped)
    cfg = OmegaConf.create(plain)
    with pytest.raises(ConfigError, match="inner_stepz"):
        check_config(cfg)


def test_attention_choice_without_attention_is_announced(tmp_path) -> None:
    with pytest.warns(RuntimeWarning, match=r"attn=reference has no effect with model=mlp"):
        train(compose_config(["debug=fast", "attn=reference", "steps=1", "sanity_every=0",
                              "logger=none"]), run_dir=tmp_path)  # fmt: skip


# Issue 17: values that used to fail late (after work began), name the wrong key, or pass.
BAD_VALUES = [
    ("model=transformer", "task=markov", "model.dim=0", r"model\.dim=0: expected >= 1"),
    ("model=transformer", "task=markov", "attn.block_size=0", r"attn\.block_size=0: expected >= 1"),
    ("model=transformer", "task=markov", "model.mlp_ratio=-1",
     r"model\.mlp_ratio=-1\.0: expected a finite number > 0"),
    ("model=transformer", "task=markov", "model.heads=3",
     r"model\.dim=32 must be a multiple of model\.heads=3"),
    ("optim=sgd", "optim.lr=1e39", None, r"optim\.lr=1e\+39: expected a step size below 3\.4"),
    ("optim.lr=inf", None, None, r"optim\.lr=inf: expected a finite number > 0"),
    ("algo.inner_steps=-2", None, None, r"^algo\.inner_steps=-2: expected >= 1"),
    ("algo.inner_lr=nan", None, None, r"algo\.inner_lr=nan: expected a finite number > 0"),
    ("optim.grad_clip=-1", None, None, r"optim\.grad_clip=-1\.0: expected a finite number >= 0"),
    ("optim.warmup_steps=-3", None, None, r"optim\.warmup_steps=-3: expected >= 0"),
    ("model.hidden=[0]", None, None, r"model\.hidden=\[0\]: expected a list of widths"),
    ("optim.betas=[0.9]", None, None, r"optim\.betas=\[0\.9\]: expected 2 numbers in \[0, 1\)"),
    ("optim.momentum=-0.5", None, None, r"optim\.momentum=-0\.5: expected a number in"),
    ("seed=-1", None, None, r"seed=-1: expected an integer in \[0, 2\*\*32\)"),
    ("algo=imaml", "algo.lam=0", None, r"algo\.lam=0\.0: expected a finite number > 0"),
    ("device=cuda:x", None, None, r"device='cuda:x': expected auto, cpu, cuda or cuda:N"),
    ("name=../up", None, None, r"name='\.\./up': expected a non-empty relative folder"),
    ("task=glyphs", "model=transformer", "model.patch_size=5",
     r"model\.patch_size=5 must divide task\.image_size=28"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides", BAD_VALUES, ids=[" ".join(filter(None, b[:3])) for b in BAD_VALUES]
)
def test_bad_value_fails_before_work_naming_key_value_and_expectation(overrides, tmp_path) -> None:
    *args, match = overrides
    with pytest.raises(ConfigError, match=match):
        train(compose_config([a for a in args if a]), run_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written: refused before any work


@pytest.mark.parametrize("override", ["+algo.inner_lrr=0.5", "+lrr=1", "+model.extra=1"])
def test_appended_unknown_key_is_refused(override) -> None:
    """`+key=value` (the form Hydra's own error suggests for a typo) adds a key with struct
    mode off; the schema merge alone keeps it, silently ignored. It must be refused."""
    key = override[1:].split("=")[0]
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=rf"unknown config keys \['{key}'\]"):
        check_config(cfg)


def test_job_logging_writes_no_file() -> None:
    """theria prints rather than logs: Hydra's job logging goes to stdout only, so a run folder
    gets no empty `__main__.log` (issue 18)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from theria.config import register_configs
    from theria.train import CONF_DIR

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    handlers = cfg.hydra.job_logging.handlers
    assert "file" not in handlers and set(handlers) == {"console"}, handlers
