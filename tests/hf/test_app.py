"""The app's model=hf: built from config or a local pretrained folder, meta-trained with
attn=theria / eager / sdpa; bad keys fail in check_config (before any work), naming the key."""

import pytest
import torch
import transformers

from theria.algos import MAML
from theria.models.hf import HFCausalLM, HFModelConfig
from theria.tasks import MarkovChainTasks
from theria.train import compose_config, train
from theria.train.build import ConfigError, build_model, check_config

BASE = ["experiment=exp_hf_llama", "debug=fast", "logger=none"]


def _cfg(*overrides: str):
    return check_config(compose_config([*BASE, *overrides]))


def test_build_from_config():
    model = build_model(_cfg())
    assert isinstance(model, HFCausalLM) and model.supports_task_vmap is False
    assert model.config.attn == "theria" and model.hf.config._attn_implementation == "theria"
    assert model.hf.config.num_key_value_heads == 2  # GQA from the preset
    tokens = torch.randint(8, (3, 32))
    params = dict(model.named_parameters())
    logits = torch.func.functional_call(model, params, (tokens,))
    assert logits.shape == (3, 32, 8)
    assert torch.func.functional_call(model, params, (tokens[None],)).shape == (1, 3, 32, 8)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.hf.arch=bert"], "model.hf.arch='bert' is not one of"),
        (["model.hf.path=/no/such/folder"], "model.hf.path='/no/such/folder'"),
        (["task=sinusoid"], "task=sinusoid"),
        (["algo.batching=batched"], "algo.batching=batched with model=hf"),
        (["algo.batching=vmap"], "algo.batching=vmap with model=hf"),
        (["model.hf.arch=gpt2"], "model.hf.kv_heads=2: model.hf.arch=gpt2 has no GQA"),
        (["model.hf.sliding_window=4"], "model.hf.sliding_window=4"),
        (["model.hf.kv_heads=3"], "model.hf.kv_heads=3"),
        (["attn=sdpa", "algo=fomaml"], "sanity_every=2 with model=hf attn=sdpa"),
        (["attn.name=flash"], "attn.name='flash' is not one of"),
    ],
)
def test_bad_keys_fail_before_any_work(overrides, key, monkeypatch):
    monkeypatch.setattr(HFCausalLM, "__init__", lambda *a: pytest.fail("built a model"))
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace("[", r"\[")):
        train(compose_config([*BASE, *overrides]))


def test_eager_is_for_hf_models_only():
    with pytest.raises(ConfigError, match=r"attn\.name='eager' is not one of"):
        check_config(compose_config(["task=markov", "model=transformer", "attn=eager"]))


def test_load_a_local_pretrained_folder(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)  # fmt: skip
    saved = transformers.AutoModelForCausalLM.from_config(config)
    saved.save_pretrained(tmp_path / "llama")
    model = build_model(_cfg(f"model.hf.path={tmp_path / 'llama'}"))
    assert model.hf.config._attn_implementation == "theria"
    tokens = torch.randint(8, (2, 32))
    expected = saved(input_ids=tokens).logits[..., :8]
    assert (model(tokens) - expected).abs().max() < 1e-5
    bert = transformers.AutoModelForMaskedLM.from_config(
        transformers.BertConfig(
            vocab_size=20,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"model\.hf\.path=.*bert.*is not causal"):
        build_model(_cfg(f"model.hf.path={tmp_path / 'bert'}"))


def _meta_gradient(arch: str, attn: str, **sizes):
    torch.manual_seed(0)
    model = HFCausalLM(HFModelConfig(arch=arch, vocab_size=8, max_len=16, attn=attn, **sizes))
    model = model.to(torch.float64)
    tasks = MarkovChainTasks(vocab_size=8, seq_len=16, k_shot=2, k_query=2)
    episode = tasks.sample("train", 2, torch.Generator().manual_seed(0))
    algo = MAML(inner_steps=2, inner_lr=0.5)
    return algo(model, algo.init_params(model), episode)


@pytest.mark.parametrize(
    "arch, sizes",
    [("llama", dict(kv_heads=2)), ("qwen2", dict(kv_heads=1, sliding_window=5))],
)  # fmt: skip
def test_maml_meta_gradient_through_the_app_model(arch, sizes):
    """theria's MAML (two inner steps, tasks one after another) through HFCausalLM equals the
    math path's in float64."""
    got = _meta_gradient(arch, "theria", **sizes)
    ref = _meta_gradient(arch, "sdpa_math", **sizes)
    flat = lambda r: torch.cat([g.flatten() for g in r.grads.values()])  # noqa: E731
    assert flat(ref).norm() > 0
    assert float((flat(got) - flat(ref)).norm() / flat(ref).norm()) < 1e-10
    assert abs(float(got.loss) - float(ref.loss)) < 1e-12


def test_sdpa_maml_raises_naming_the_path():
    with pytest.raises(RuntimeError, match=r"attn='sdpa'.*no double backward"):
        _meta_gradient("llama", "sdpa", kv_heads=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [["attn=eager"], ["attn=sdpa", "algo=fomaml", "sanity_every=0"], ["attn=reference"],
     ["model.hf.arch=mistral", "model.hf.sliding_window=8"]],
)  # fmt: skip
def test_meta_train_a_few_steps(overrides, tmp_path):
    res = train(compose_config([*BASE, *overrides]), run_dir=tmp_path)
    assert res["steps"] == 4
