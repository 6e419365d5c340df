"""theria.hf: registration, the masks and layouts it accepts, the ones it refuses, dropout,
cached keys, and unpacking zipped pretrained folders."""

import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
import theria.hf
from tests.hf.models import build, inputs
from theria._warnings import forget


class _Layer(torch.nn.Module):
    is_causal = False


def _qkv(b=2, h=4, hkv=2, l=5, s=7, e=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, l, e, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, s, e, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, e, generator=g, dtype=torch.float64)
    return q, k, v


def _oracle(q, k, v, mask=None, causal=False, scale=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale
        )
    return out.transpose(1, 2)


def test_import_theria_does_not_import_transformers():
    code = "import sys, theria; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_with_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert "theria" in transformers.AttentionInterface._global_mapping
    assert "theria" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_from_pretrained_and_from_config(tmp_path):
    model = build("llama")
    x = inputs("llama", 0)
    with sdpa_kernel(SDPBackend.MATH):
        model.set_attn_implementation("sdpa")
        expected = model(**x).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="theria", dtype=torch.float64, local_files_only=True
    )
    assert loaded.config._attn_implementation == "theria"
    assert (loaded(**x).logits - expected).abs().max() < 1e-12
    fresh = transformers.AutoModelForCausalLM.from_config(
        model.config, attn_implementation="theria"
    )
    assert fresh.config._attn_implementation == "theria"


def test_gqa_scaling_and_masks_against_the_math_path():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    fmask = torch.randn(1, 4, 5, 7, dtype=torch.float64)
    for m in (None, mask, fmask, fmask.float()):  # a float32 mask is cast to the query's dtype
        out, weights = theria.hf.theria_attention(_Layer(), q, k, v, m, scaling=0.3)
        assert weights is None and out.shape == (2, 5, 4, 8)  # (B, L, H, E)
        ref = _oracle(
            q, k, v, None if m is None else m.to(q.dtype) if m.is_floating_point() else m, scale=0.3
        )
        assert (out - ref).abs().max() < 1e-12


def test_causal_default_from_the_module_and_longer_keys():
    """No mask, L > 1, more keys than queries (an empty static cache's prefill): top-left
    causal over the first L keys; one query (decoding) attends every key."""
    q, k, v = _qkv(l=5, s=9)
    layer = _Layer()
    layer.is_causal = True
    out, _ = theria.hf.theria_attention(layer, q, k, v, None)
    assert (out - _oracle(q, k[:, :, :5], v[:, :, :5], causal=True)).abs().max() < 1e-12
    out1, _ = theria.hf.theria_attention(layer, q[:, :, :1], k, v, None)
    assert (out1 - _oracle(q[:, :, :1], k, v)).abs().max() < 1e-12
    out_nc, _ = theria.hf.theria_attention(layer, q, k, v, None, is_causal=False)
    assert (out_nc - _oracle(q, k, v)).abs().max() < 1e-12


def test_cached_continuation_and_generation_match_eager():
    model = build("llama")
    ids = inputs("llama", 0)["input_ids"]
    model.set_attn_implementation("theria")
    full = model(ids).logits
    head = model(ids[:, :7], use_cache=True)
    tail = model(ids[:, 7:], past_key_values=head.past_key_values)  # L=5 queries, S=12 keys
    assert (tail.logits - full[:, 7:]).abs().max() < 1e-12
    generated = {}
    for name in ("eager", "theria"):
        model.set_attn_implementation(name)
        for cache in ("dynamic", "static"):
            generated[name, cache] = model.generate(
                ids, max_new_tokens=4, do_sample=False, cache_implementation=cache, pad_token_id=0
            )
    assert all(torch.equal(g, generated["eager", "dynamic"]) for g in generated.values())


def test_position_bias_is_added():
    q, k, v = _qkv(hkv=4)
    bias = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[..., -2:] = False
    out, _ = theria.hf.theria_attention(_Layer(), q, k, v, mask, position_bias=bias)
    ref = _oracle(q, k, v, bias.masked_fill(~mask, float("-inf")))
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 7, dtype=torch.bool), r"shape \(2, 7\), dtype torch.bool"),
        (torch.ones(2, 1, 5, 7, dtype=torch.long), r"shape \(2, 1, 5, 7\), dtype torch.int64"),
        (torch.ones(2, 5, 7, dtype=torch.bool), r"shape \(2, 5, 7\), dtype torch.bool"),
        (torch.ones(2, 1, 5, 9, dtype=torch.bool), r"shape \(2, 1, 5, 9\), dtype torch.bool.*"
         r"does not broadcast to the attention's \(2, 4, 5, 7\)"),
        (torch.ones(3, 1, 5, 7, dtype=torch.bool), r"shape \(3, 1, 5, 7\)"),
    ],
)  # fmt: skip
def test_unknown_mask_layouts_raise_naming_shape_and_dtype(mask, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        theria.hf.theria_attention(_Layer(), q, k, v, mask)


def test_a_non_tensor_mask_raises_naming_its_type():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="type dict"):
        theria.hf.theria_attention(_Layer(), q, k, v, {"block": 1})


def test_unsupported_kwargs_raise():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=r"softcap=50\.0"):
        theria.hf.theria_attention(_Layer(), q, k, v, None, softcap=50.0)
    with pytest.raises(NotImplementedError, match="sinks"):
        theria.hf.theria_attention(_Layer(), q, k, v, None, sinks=torch.zeros(4))


def test_output_attentions_warns():
    forget("hf:output_attentions")
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="output_attentions"):
        theria.hf.theria_attention(_Layer(), q, k, v, None, output_attentions=True)


def test_dropout_in_train_mode_falls_back_visibly_once():
    forget()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5,
    )  # fmt: skip
    model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="theria")
    model = model.double().train()
    x = inputs("bert", 0)
    with pytest.warns(RuntimeWarning, match=r"BertSelfAttention in train mode .* dropout 0.5"):
        out = model(**x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        again = model(**x).logits
    assert (out - again).abs().max() > 1e-6  # dropout is applied (different masks)
    params = list(model.parameters())
    g = torch.autograd.grad(out.square().sum(), params, create_graph=True, allow_unused=True)
    hv = torch.autograd.grad(sum(gi.sum() for gi in g if gi is not None), params, allow_unused=True)
    assert any(h is not None and h.abs().sum() > 0 for h in hv)  # second order through dropout
    model.eval()
    assert (model(**x).logits - model(**x).logits).abs().max() == 0


def test_register_other_backends():
    name = theria.hf.register("theria_reference_test", backend="reference", block_size=8)
    model = build("gpt2")
    x = inputs("gpt2", 0)
    model.set_attn_implementation("eager")
    expected = model(**x).logits
    model.set_attn_implementation(name)
    assert (model(**x).logits - expected).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"backend must be one of .*'fast'"):
        theria.hf.register("bad", backend="fast")
    with pytest.raises(ValueError, match="block_size must be a positive int; got 0"):
        theria.hf.register("bad", block_size=0)


def test_unpack_pretrained(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "weights.bin").write_bytes(b"\0" * 10)
    zpath = tmp_path / "model.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"inner/{f.name}")  # one top-level folder
    cache = tmp_path / "cache"
    folder = theria.hf.unpack_pretrained(zpath, cache)
    assert folder.name == "inner" and (folder / "weights.bin").read_bytes() == b"\0" * 10
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert theria.hf.unpack_pretrained(zpath, cache) == folder  # once: not extracted again
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [folder.parent.name]  # no temporary left
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(ValueError, match="outside the extraction folder"):
        theria.hf.unpack_pretrained(evil, cache)
    assert not (tmp_path / "outside.txt").exists()
    assert len(list(cache.iterdir())) == 1
    with pytest.raises(FileNotFoundError, match=r"zip_path='.*missing\.zip' is not a file"):
        theria.hf.unpack_pretrained(tmp_path / "missing.zip", cache)


def test_hf_sdpa_path_under_override_sdpa_takes_second_derivatives():
    """attn_implementation="sdpa" calls F.scaled_dot_product_attention: inside
    theria.override_sdpa() that is theria, so the HVP exists and equals the math path's."""
    model = build("mistral")  # GQA + sliding window: a bool mask and repeat_kv'd keys
    model.set_attn_implementation("sdpa")
    x = inputs("mistral", 0)
    params = list(model.parameters())

    def hvp():
        loss = model(**x).logits.square().sum()
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.cat(
            [h.flatten() for h in torch.autograd.grad(sum(gi.sum() for gi in g), params)]
        )

    with theria.override_sdpa():
        got = hvp()
    with sdpa_kernel(SDPBackend.MATH):
        ref = hvp()
    assert float((got - ref).norm() / ref.norm()) < 1e-10
