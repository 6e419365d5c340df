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
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
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
    with pytest.raises(ConfigError, match=r"meta_batch must be >= 1"):
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
