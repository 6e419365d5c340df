"""task=omniglot and model=conv4 through the app: config keys, errors naming them, a short run."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from tests.omniglot_data import make_zip
from theria.train import ConfigError, compose_config, train
from theria.train.build import build_model, build_sampler, check_config


@pytest.fixture
def fake_root(tmp_path):
    alphabets = {"A": 4, "B": 4, "C": 4}
    make_zip(tmp_path / "images_background_small1.zip", "images_background_small1", alphabets)
    return tmp_path


def test_presets_compose_to_finn_et_al_values(monkeypatch):
    monkeypatch.setenv("THERIA_OMNIGLOT_DIR", "/some/where")
    five = check_config(compose_config(["experiment=omniglot_minimal_5way"]))
    assert (five.task.root, five.task.background, five.model.name) == (
        "/some/where", "small1+small2", "conv4")  # fmt: skip
    assert (five.algo.inner_lr, five.algo.inner_steps, five.meta_batch) == (0.4, 1, 32)
    twenty = check_config(compose_config(["experiment=omniglot_minimal_20way"]))
    assert (twenty.algo.inner_lr, twenty.algo.inner_steps, twenty.meta_batch) == (0.1, 5, 16)
    assert twenty.task.n_way == 20 and twenty.task.rotations


def test_bad_values_name_their_key(fake_root):
    base = ["task=omniglot", "model=conv4", f"task.root={fake_root}"]
    with pytest.raises(ConfigError, match=r"task\.background='small9'"):
        build_sampler(check_config(compose_config([*base, "task.background=small9"])))
    with pytest.raises(ConfigError, match=r"task\.split='drawers'"):
        build_sampler(check_config(compose_config([*base, "task.split=drawers"])))
    with pytest.raises(ConfigCompositionException, match=r"task\.split_fractionz"):
        compose_config([*base, "task.split_fractionz=[0.5,0.5,0]"])  # a typo: the typed schema
    with pytest.raises(ConfigCompositionException, match=r"task\.split_seed"):
        compose_config([*base, "task.split_seed=abc"])  # a wrong type
    with pytest.raises(ConfigError, match=r"images_background_small2 not found under root"):
        build_sampler(check_config(compose_config([*base, "task.background=small2"])))
    with pytest.raises(ConfigError, match="model=conv4 takes images"):
        build_model(check_config(compose_config(["task=sinusoid", "model=conv4"])))
    with pytest.raises(ConfigError, match="downsample"):
        build_model(check_config(compose_config([*base, "model.downsample=avg"])))


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_conv4_meta_trains_on_omniglot_zips(fake_root, tmp_path, algo):
    cfg = compose_config([
        "experiment=omniglot_minimal_5way", "debug=fast", "logger=none", f"algo={algo}",
        f"task.root={fake_root}", "task.background=small1", "task.n_way=2", "task.k_query=2",
        "task.split_fractions=[0.5,0.25,0.25]", "model.channels=8", "threads=1",
    ])  # fmt: skip
    res = train(cfg, run_dir=tmp_path / "run")
    acc = res["test"]["query_acc_post"]
    assert res["steps"] == 4 and acc["n"] == 8 and 0 <= acc["mean"] <= 1
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
