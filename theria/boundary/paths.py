"""The built-in attention paths that `theria.boundary.run` probes.

A `Path` has a name and a factory ``make(device, dtype) -> (attn_fn, reference)``; the factory
raises `Unavailable` when the path does not exist in this torch build or on this device (no
CUDA kernel on the CPU, no cuDNN, no FlexAttention, no Triton). Every ``attn_fn`` maps
(B, H, L, E) tensors q, k, v to (B, H, L, E); ``reference`` is its float64 oracle, or None for
the plain explicit composition.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from theria.boundary.probe import DEFAULT_SHAPE, AttnFn, Unavailable, explicit_composition

Factory = Callable[[torch.device, torch.dtype], tuple[AttnFn, AttnFn | None]]


@dataclass(frozen=True)
class Path:
    name: str
    make: Factory
    doc: str = ""


# ----------------------------------------------------------------------------- SDPA


def _sdpa_default(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, None]:
    def sdpa_default(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    return sdpa_default, None


_NATIVE_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


def _forced(backend_name: str) -> Factory:
    """SDPA with one backend forced alone (torch.nn.attention.sdpa_kernel)."""

    def make(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, None]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise Unavailable(
                f"SDPBackend.{backend_name} does not exist in torch {torch.__version__}"
            )
        if device.type == "cpu" and backend_name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            raise Unavailable("PyTorch has no CPU kernel for this backend")
        if backend_name == "CUDNN_ATTENTION" and not torch.backends.cudnn.is_available():
            raise Unavailable("cuDNN is not available in this build")

        def sdpa_forced(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        # Availability: the backend must run at all on a small input in its native dtype;
        # rejecting only the probed dtype is "unsupported input", decided by the probe.
        x = torch.randn(1, 2, 8, 64, device=device, dtype=_NATIVE_DTYPE[device.type])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sdpa_forced(x, x, x)
            except RuntimeError as e:
                why = "; ".join(str(w.message).split("\n")[0] for w in caught)[:300]
                raise Unavailable(f"{str(e).splitlines()[0]} {why}".strip()) from None
        return sdpa_forced, None

    return make


def _cpu_flash_op(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, None]:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if device.type != "cpu" or op is None:
        raise Unavailable("the CPU flash kernel runs on the CPU only")

    def cpu_flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return op(q, k, v)[0]  # (out, logsumexp)

    return cpu_flash, None


# ----------------------------------------------------------------------------- FlexAttention


def _flex(compiled: bool) -> Factory:
    def make(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, None]:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as e:
            raise Unavailable(f"torch.nn.attention.flex_attention: {e}") from None
        kernel = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

        def flex(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return kernel(q, k, v)

        return flex, None

    return make


# ----------------------------------------------------------------------------- nn modules

# The modules see (B, L, H·E) embeddings: q, k, v (B, H, L, E) -> (B, L, H·E) and back.


def _to_embed(x: Tensor) -> Tensor:
    return x.transpose(-3, -2).flatten(-2)  # (B, H, L, E) -> (B, L, H, E) -> (B, L, H·E)


def _from_embed(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)  # (B, L, H·E) -> (B, H, L, E)


def _mha_reference(mha: nn.MultiheadAttention) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """MultiheadAttention in float64 as an explicit composition (in-projection, attention,
    out-projection), on embeddings (B, L, H·E)."""
    m = copy.deepcopy(mha).to("cpu", torch.float64)
    wq, wk, wv = m.in_proj_weight.detach().chunk(3)
    bq, bk, bv = m.in_proj_bias.detach().chunk(3)
    h = m.num_heads

    def ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        qh, kh, vh = (
            _from_embed(F.linear(x, w, b), h) for x, w, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv))
        )
        out = _to_embed(explicit_composition(qh, kh, vh))
        return F.linear(out, m.out_proj.weight.detach(), m.out_proj.bias.detach())

    return ref


def _mha(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, AttnFn]:
    _, heads, _, e = DEFAULT_SHAPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(heads * e, heads, batch_first=True, dropout=0.0)
    mha = mha.to(device, dtype).eval()
    ref = _mha_reference(mha)

    def multihead_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = mha(_to_embed(q), _to_embed(k), _to_embed(v), need_weights=False)[0]
        return _from_embed(out, heads)

    def reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _from_embed(ref(_to_embed(q), _to_embed(k), _to_embed(v)), heads)

    return multihead_attention, reference


def _encoder_layer(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, AttnFn]:
    """nn.TransformerEncoderLayer takes one input: src = q + k + v, so all three get gradients
    (self-attention; needs L = S)."""
    _, heads, _, e = DEFAULT_SHAPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(
            heads * e, heads, dim_feedforward=32, dropout=0.0, batch_first=True
        )
    layer = layer.to(device, dtype).eval()
    m = copy.deepcopy(layer).to("cpu", torch.float64)
    sa = _mha_reference(m.self_attn)

    def encoder_layer(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _from_embed(layer(_to_embed(q + k + v)), heads)

    def reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # post-norm (norm_first=False), ReLU: x = norm1(x + sa(x)); x = norm2(x + ff(x))
        x = _to_embed(q + k + v)
        x = m.norm1(x + sa(x, x, x))
        x = m.norm2(x + m.linear2(F.relu(m.linear1(x))))
        return _from_embed(x, heads)

    return encoder_layer, reference


def _encoder_layer_override(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, AttnFn]:
    """nn.TransformerEncoderLayer inside theria.override_sdpa(): its SDPA calls run theria."""
    from theria.attention.override import override_sdpa

    layer, reference = _encoder_layer(device, dtype)

    def encoder_layer_theria(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with override_sdpa():
            return layer(q, k, v)

    return encoder_layer_theria, reference


# ----------------------------------------------------------------------------- Hugging Face

# transformers' attention functions as its models call them: fn(module, query (B, H, L, E),
# key, value, attention_mask, dropout, scaling, is_causal) -> (out (B, L, H, E), weights).


def _hf(implementation: str) -> Factory:
    def make(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, None]:
        try:
            import transformers  # noqa: F401
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            from transformers.models.llama.modeling_llama import eager_attention_forward
        except ImportError as e:
            raise Unavailable(
                f"transformers does not import (pip install theria[hf]): {e}"
            ) from None
        if implementation == "theria":
            import theria.hf  # noqa: F401 - registers "theria"
        fn = eager_attention_forward if implementation == "eager" else (
            ALL_ATTENTION_FUNCTIONS[implementation])  # fmt: skip
        layer = nn.Module().eval()  # what the functions read from the attention layer
        layer.is_causal = False
        layer.num_key_value_groups = 1

        def hf_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            scale = q.shape[-1] ** -0.5  # what the models pass (Llama eager needs it)
            out, _ = fn(layer, q, k, v, None, dropout=0.0, scaling=scale, is_causal=False)
            return out.transpose(1, 2)  # (B, L, H, E) -> (B, H, L, E)

        return hf_attention, None

    return make


# ----------------------------------------------------------------------------- explicit, theria


def _explicit(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, None]:
    def explicit(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, L, E) @ (B, H, E, S)
        return torch.softmax(s, dim=-1) @ v  # (B, H, L, S) @ (B, H, S, E) -> (B, H, L, E)

    return explicit, None


def _theria(backend: str) -> Factory:
    def make(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, None]:
        from theria.attention.api import sdpa

        if backend == "triton":
            if device.type != "cuda":
                raise Unavailable("the triton backend is probed on CUDA (CPU: interpreter only)")
            try:
                from theria.attention import triton_impl  # noqa: F401
            except Exception as e:  # ImportError, or Triton failing to initialise
                raise Unavailable(f"theria.attention.triton_impl does not import: {e}") from None

        def theria_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return sdpa(q, k, v, backend=backend)  # type: ignore[arg-type]

        return theria_sdpa, None

    return make


def compiled(path: Path) -> Path:
    """``torch.compile(dynamic=False)`` of a path (inductor, its default backend)."""

    def make(device: torch.device, dtype: torch.dtype) -> tuple[AttnFn, AttnFn | None]:
        fn, ref = path.make(device, dtype)
        torch._dynamo.reset()  # a fresh cache per path, so no path inherits another's limit
        return torch.compile(fn, dynamic=False), ref

    return Path(f"compile({path.name})", make, f"torch.compile of {path.name}")


def builtin_paths() -> list[Path]:
    """The eager paths, in report order (compiled variants are added by `run`)."""
    return [
        Path("sdpa default", _sdpa_default, "F.scaled_dot_product_attention, default dispatch"),
        Path("sdpa math", _forced("MATH"), "sdpa_kernel(SDPBackend.MATH)"),
        Path("sdpa flash", _forced("FLASH_ATTENTION"), "sdpa_kernel(SDPBackend.FLASH_ATTENTION)"),
        Path("sdpa efficient", _forced("EFFICIENT_ATTENTION"),
             "sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)"),
        Path("sdpa cudnn", _forced("CUDNN_ATTENTION"), "sdpa_kernel(SDPBackend.CUDNN_ATTENTION)"),
        Path("cpu flash op", _cpu_flash_op, "aten::_scaled_dot_product_flash_attention_for_cpu"),
        Path("flex eager", _flex(compiled=False), "flex_attention, eager"),
        Path("flex compiled", _flex(compiled=True), "torch.compile(flex_attention)"),
        Path("nn.MultiheadAttention", _mha, "need_weights=False, eval"),
        Path("nn.TransformerEncoderLayer", _encoder_layer, "src = q + k + v, eval, post-norm"),
        Path("nn.TransformerEncoderLayer + override_sdpa", _encoder_layer_override,
             "the same layer inside theria.override_sdpa()"),
        Path("hf eager", _hf("eager"),
             "transformers' Llama eager_attention_forward (softmax in float32)"),
        Path("hf sdpa", _hf("sdpa"), "transformers' sdpa_attention_forward (F.sdpa, default)"),
        Path("hf theria", _hf("theria"), "theria.hf: attn_implementation='theria'"),
        Path("explicit", _explicit, "softmax(q kᵀ/√E) v in torch ops"),
        Path("theria reference", _theria("reference"), "theria.sdpa(backend='reference')"),
        Path("theria torch", _theria("torch"), "theria.sdpa(backend='torch')"),
        Path("theria triton", _theria("triton"), "theria.sdpa(backend='triton')"),
    ]  # fmt: skip
