"""Objects from a composed config: checked config, device/dtype, sampler, model, algorithm,
optimizer and schedule. Every error names the config key, the value and the choices."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from theria.algos import FOMAML, IMAML, MAML
from theria.algos.common import BATCHINGS
from theria.algos.step import GRAPH_MODES
from theria.config import TrainConfig
from theria.models import (
    ATTENTION_PATHS,
    MLP,
    Conv4,
    Conv4Config,
    MLPConfig,
    Transformer,
    TransformerConfig,
)
from theria.models.hf import HF_ARCHS, HF_ATTENTION, SLIDING_ARCHS
from theria.tasks import GlyphTasks, MarkovChainTasks, OmniglotTasks, SinusoidTasks, TaskSampler
from theria.tasks.omniglot import BACKGROUNDS as OMNIGLOT_BACKGROUNDS
from theria.tasks.omniglot import SPLIT_MODES as OMNIGLOT_SPLITS

ALGOS = ("fomaml", "maml", "imaml")
TASKS = ("sinusoid", "markov", "glyphs", "omniglot")
MODELS = ("mlp", "transformer", "hf", "conv4")
OPTIMS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of the (unresolved) config container `node` that the dataclass `schema` lacks, as
    full keys. Hydra's `+key=value` appends a key with struct mode off, and a merge onto the
    structured config keeps a key that a node of the same schema type already holds, so the
    schema alone does not refuse `+algo.inner_lrr=0.5`: this walk does."""
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    bad = []
    for key, value in node.items():
        if key not in fields:
            bad.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints.get(key)) and isinstance(value, dict):
            bad += _unknown_keys(value, hints[key], f"{prefix}{key}.")
    return bad


Check = tuple[str, Callable[[Any], bool], str]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda x: x >= n


# One row per value the types cannot constrain: (key, test, what is expected). Checked in this
# order, before anything is built, so an interpolated key (algo.eval_inner_steps defaults to
# ${.inner_steps}) is reported after the key it comes from.
VALUE_CHECKS: tuple[Check, ...] = (
    ("seed", lambda x: 0 <= x < 2**32, "an integer in [0, 2**32) (numpy's seed range)"),
    *((k, _int_at_least(1), ">= 1") for k in
      ("steps", "meta_batch", "val_tasks", "test_tasks", "logger.log_every")),
    *((k, _int_at_least(0), ">= 0") for k in
      ("eval_every", "sanity_every", "checkpoint_every", "threads")),
    ("algo.inner_steps", _int_at_least(1), ">= 1 (inner gradient steps on the support set)"),
    ("algo.eval_inner_steps", _int_at_least(0), ">= 0"),
    ("algo.inner_lr", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("algo.lam", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("algo.cg_iters", _int_at_least(1), ">= 1"),
    ("algo.cg_damping", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("attn.block_size", _int_at_least(1), ">= 1 (keys per block)"),
    ("task.k_shot", _int_at_least(1), ">= 1"),
    ("task.k_query", _int_at_least(1), ">= 1"),
    ("task.vocab_size", _int_at_least(2), ">= 2"),
    ("task.seq_len", _int_at_least(2), ">= 2 (a next-token task needs two tokens)"),
    ("task.logit_scale", _finite, "a finite number"),
    ("task.n_way", _int_at_least(2), ">= 2"),
    ("task.image_size", _int_at_least(1), ">= 1"),
    ("task.n_classes", _int_at_least(1), ">= 1"),
    ("task.n_instances", _int_at_least(1), ">= 1"),
    ("task.max_shift", _int_at_least(0), ">= 0"),
    ("model.hidden", lambda x: all(w >= 1 for w in x), "a list of widths, each >= 1"),
    ("model.dim", _int_at_least(1), ">= 1"),
    ("model.depth", _int_at_least(1), ">= 1"),
    ("model.heads", _int_at_least(1), ">= 1"),
    ("model.mlp_ratio", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("model.patch_size", _int_at_least(1), ">= 1"),
    ("optim.lr", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("optim.weight_decay", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("optim.momentum", lambda x: _finite(x) and 0 <= x < 1, "a number in [0, 1)"),
    ("optim.betas", lambda x: len(x) == 2 and all(_finite(b) and 0 <= b < 1 for b in x),
     "2 numbers in [0, 1)"),
    ("optim.warmup_steps", _int_at_least(0), ">= 0"),
    ("optim.grad_clip", lambda x: _finite(x) and x >= 0, "a finite number >= 0 (0 disables)"),
    ("dist.timeout_s", lambda x: _finite(x) and x > 0, "a finite number > 0 (seconds)"),
)  # fmt: skip


def _check_values(typed: DictConfig) -> None:
    for key, ok, expected in VALUE_CHECKS:
        try:
            value = OmegaConf.select(typed, key, throw_on_missing=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: {e}") from e
        if isinstance(value, ListConfig):
            value = list(value)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: expected {expected}")
    m, t = typed.model, typed.task
    if m.name == "transformer":
        if m.dim % m.heads:
            raise ConfigError(
                f"model.dim={m.dim} must be a multiple of model.heads={m.heads} (the head width)"
            )
        if t.name in ("glyphs", "omniglot") and t.image_size % m.patch_size:
            raise ConfigError(
                f"model.patch_size={m.patch_size} must divide task.image_size={t.image_size}"
            )
    # A step size beyond the dtype's range makes the first update inf (SGD: p - lr·g): refuse
    # it here rather than at step 1 with a non-finite error.
    # Adam's first step is lr / (1 - beta1) (bias correction), which torch converts to the
    # parameters' dtype: beyond its range the step raises a raw "cannot be converted" error.
    big = torch.finfo(DTYPES[typed.dtype]).max
    o = typed.optim
    first = o.lr / (1.0 - o.betas[0]) if o.name in ("adam", "adamw") else o.lr
    if first > big:
        how = f" (Adam's first step lr/(1 - betas[0]) = {first:.3g})" if first != o.lr else ""
        raise ConfigError(
            f"optim.lr={o.lr!r}: expected a step size below {big:.3g}, the largest "
            f"{typed.dtype}{how}"
        )
    if typed.algo.inner_lr > big:
        raise ConfigError(
            f"algo.inner_lr={typed.algo.inner_lr!r}: expected a step size below {big:.3g}, the "
            f"largest {typed.dtype}"
        )


def check_config(cfg: DictConfig) -> DictConfig:
    """The config merged onto the typed schema (unknown keys and wrong types raise, naming the
    key), then checked for values the types cannot express (`VALUE_CHECKS`, naming the key,
    the value and what is expected). Returns the typed config."""
    unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig)
    if unknown:
        raise ConfigError(
            f"unknown config keys {unknown} (not in the schema, theria/config.py): a typo? "
            "`+key=value` adds a key the app would ignore"
        )
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        missing = sorted(OmegaConf.missing_keys(typed))
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}") from e
    if missing:
        raise ConfigError(f"config keys without a value: {missing}")
    _choice("algo.name", typed.algo.name, ALGOS)
    # attn=eager is transformers' own attention: model=hf (model=mlp ignores attn)
    paths = ATTENTION_PATHS if typed.model.name == "transformer" else HF_ATTENTION
    _choice("attn.name", typed.attn.name, paths)
    _choice("task.name", typed.task.name, TASKS)
    _choice("model.name", typed.model.name, MODELS)
    _choice("optim.name", typed.optim.name, OPTIMS)
    _choice("optim.schedule", typed.optim.schedule, SCHEDULES)
    _choice("dtype", typed.dtype, tuple(DTYPES))
    _choice("algo.hvp", typed.algo.hvp, ("rev_rev", "fwd_rev"))
    _choice("algo.batching", typed.algo.batching, BATCHINGS)
    _choice("graph", typed.graph, GRAPH_MODES)
    _choice("dist.name", typed.dist.name, ("none", "ddp"))
    _choice("dist.backend", typed.dist.backend, ("auto", "nccl", "gloo"))
    device = typed.device
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise ConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if typed.graph == "on":
        if device == "cpu" or not torch.cuda.is_available():
            raise ConfigError(
                f"graph=on needs a CUDA device (device={device!r}, CUDA available: "
                f"{torch.cuda.is_available()}); use graph=auto (CUDA graphs where they work)"
            )
        if typed.dist.name == "ddp":
            raise ConfigError("graph=on with dist=ddp: the all-reduce runs eagerly; use graph=auto")
    if not typed.name.strip() or ".." in Path(typed.name).parts or Path(typed.name).is_absolute():
        raise ConfigError(
            f"name={typed.name!r}: expected a non-empty relative folder name (it names "
            "outputs/<name>/...), without '..'"
        )
    _check_values(typed)
    if typed.model.name == "hf":
        _check_hf(typed)
    return typed


def _check_hf(cfg: DictConfig) -> None:
    """model=hf: what can fail is found before any work (no transformers import here)."""
    h = cfg.model.hf
    if cfg.algo.batching in ("batched", "vmap"):
        raise ConfigError(
            f"algo.batching={cfg.algo.batching} with model=hf: transformers models are not "
            "run under torch.func.vmap over tasks (HFCausalLM.supports_task_vmap is False); "
            "use algo.batching=auto or sequential"
        )
    if cfg.attn.name == "sdpa" and cfg.sanity_every > 0:
        raise ConfigError(
            f"sanity_every={cfg.sanity_every} with model=hf attn=sdpa: the HVP sanity checks "
            "need double backward, which PyTorch's fused SDPA kernels lack; set sanity_every=0 "
            "(and a first-order algorithm, algo=fomaml) or use attn=theria"
        )
    if h.path is not None:
        if not isinstance(h.path, str) or not (Path(h.path) / "config.json").is_file():
            raise ConfigError(
                f"model.hf.path={h.path!r} is not a local pretrained model folder (a directory "
                "holding config.json and the weights)"
            )
        return
    _choice("model.hf.arch", h.arch, HF_ARCHS)
    m = cfg.model
    kv = h.kv_heads or m.heads
    if h.kv_heads < 0 or m.dim % m.heads or m.heads % kv:
        raise ConfigError(
            f"model.dim={m.dim} must be a multiple of model.heads={m.heads}, and model.heads a "
            f"multiple of model.hf.kv_heads={h.kv_heads} (0: = heads)"
        )
    if h.arch == "gpt2" and kv != m.heads:
        raise ConfigError(f"model.hf.kv_heads={h.kv_heads}: model.hf.arch=gpt2 has no GQA")
    if h.sliding_window < 0 or (h.sliding_window and h.arch not in SLIDING_ARCHS):
        raise ConfigError(
            f"model.hf.sliding_window={h.sliding_window}: must be >= 0, and > 0 only for "
            f"model.hf.arch in {list(SLIDING_ARCHS)}"
        )


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else the CPU. Asking for CUDA without one raises."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but torch.cuda.is_available() is False")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_sampler(cfg: DictConfig) -> TaskSampler:
    """The task sampler of `cfg.task` (inputs in `cfg.dtype`). The sampler's own seed (which
    tasks belong to which split) stays fixed across training seeds, so a sweep over `seed`
    varies the initialization and the task stream, not the task family."""
    t, dtype = cfg.task, DTYPES[cfg.dtype]
    try:
        if t.name == "sinusoid":
            return SinusoidTasks(k_shot=t.k_shot, k_query=t.k_query, dtype=dtype)
        if t.name == "markov":
            return MarkovChainTasks(
                vocab_size=t.vocab_size,
                seq_len=t.seq_len,
                k_shot=t.k_shot,
                k_query=t.k_query,
                logit_scale=t.logit_scale,
            )
        images = dict(  # the N-way K-shot classification settings both image tasks share
            n_way=t.n_way,
            k_shot=t.k_shot,
            k_query=t.k_query,
            image_size=t.image_size,
            rotations=t.rotations,
            max_shift=t.max_shift,
            dtype=dtype,
        )
        if t.name == "glyphs":
            return GlyphTasks(n_classes=t.n_classes, n_instances=t.n_instances, **images)
        _choice("task.background", t.background, tuple(OMNIGLOT_BACKGROUNDS))
        _choice("task.split", t.split, OMNIGLOT_SPLITS)
        return OmniglotTasks(
            t.root,
            background=t.background,
            split=t.split,
            split_fractions=tuple(t.split_fractions),
            split_seed=t.split_seed,
            download=t.download,
            **images,
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"task={t.name}: {e}") from e


def build_model(cfg: DictConfig) -> nn.Module:
    """The network of `cfg.model`, its input/output sizes taken from `cfg.task`, initialized
    from torch's global RNG (seed it first), on the CPU in float32."""
    m, t = cfg.model, cfg.task
    if m.name == "hf":
        from theria.models.hf import HFCausalLM, HFModelConfig

        if t.name != "markov":
            raise ConfigError(
                f"model=hf is a causal language model for token tasks (task=markov); got "
                f"task={t.name}"
            )
        path = m.hf.path
        hc = HFModelConfig(
            arch=m.hf.arch,
            path=None if path is None else str(path),
            vocab_size=t.vocab_size,
            max_len=t.seq_len,
            dim=m.dim,
            depth=m.depth,
            heads=m.heads,
            mlp_ratio=m.mlp_ratio,
            kv_heads=m.hf.kv_heads,
            sliding_window=m.hf.sliding_window,
            attn=cfg.attn.name,
            block_size=cfg.attn.block_size,
        )
        try:
            return HFCausalLM(hc)
        except ValueError as e:
            key = "model.hf.path" if path is not None else "model.hf"
            raise ConfigError(f"model=hf ({key}={path or m.hf.arch!r}): {e}") from e
    if m.name == "mlp":
        if t.name != "sinusoid":
            raise ConfigError(
                f"model=mlp takes real vectors (task=sinusoid); task={t.name} needs "
                "model=transformer"
            )
        return MLP(MLPConfig(in_features=1, hidden=tuple(m.hidden), out_features=1))
    if m.name == "conv4":
        if t.name not in ("glyphs", "omniglot"):
            raise ConfigError(
                f"model=conv4 takes images (task=glyphs or omniglot); task={t.name} needs "
                "model=mlp or model=transformer"
            )
        try:
            return Conv4(Conv4Config(in_channels=1, image_size=t.image_size, channels=m.channels,
                                     blocks=m.blocks, out_features=t.n_way,
                                     downsample=m.downsample))  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"model=conv4: {e}") from e
    common = dict(
        dim=m.dim,
        depth=m.depth,
        heads=m.heads,
        mlp_ratio=m.mlp_ratio,
        attn=cfg.attn.name,
        block_size=cfg.attn.block_size,
    )
    try:
        if t.name == "markov":  # next-token prediction: causal, one logit per token id
            tc = TransformerConfig(
                **common, causal=True, embed="tokens", vocab_size=t.vocab_size, max_len=t.seq_len
            )
        elif t.name in ("glyphs", "omniglot"):  # image classification: patches, mean pool
            tc = TransformerConfig(
                **common,
                embed="patches",
                image_size=t.image_size,
                patch_size=m.patch_size,
                out_features=t.n_way,
                pool="mean",
            )
        else:
            raise ConfigError(
                "model=transformer needs a sequence or image task (task=markov, glyphs or "
                f"omniglot); task={t.name} takes model=mlp"
            )
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model=transformer: {e}") from e
    return Transformer(tc)


def build_algo(cfg: DictConfig) -> MAML | IMAML:
    a = cfg.algo
    try:
        if a.name == "imaml":
            return IMAML(
                lam=a.lam,
                inner_steps=a.inner_steps,
                inner_lr=a.inner_lr,
                cg_iters=a.cg_iters,
                cg_damping=a.cg_damping,
                hvp=a.hvp,
                batching=a.batching,
            )
        make = FOMAML if a.name == "fomaml" else MAML
        return make(
            inner_steps=a.inner_steps,
            inner_lr=a.inner_lr,
            learn_inner_lr=a.learn_inner_lr,
            batching=a.batching,
        )
    except ValueError as e:
        raise ConfigError(f"algo={a.name}: {e}") from e


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def place_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Capturable Adam/AdamW on CUDA keep their learning rate as a 0-d tensor on `device` (so
    a CUDA graph of the step reads the schedule's current value); everything else a float.
    Also after loading a state dict, which may bring a tensor from another device."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        if group.get("capturable", False) and device.type == "cuda":
            group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device)
        else:
            group["lr"] = lr


def build_optimizer(cfg: DictConfig, params: dict[str, torch.Tensor]) -> Optimization:
    """The meta-optimizer over the meta-parameters and its schedule: linear warm-up over
    `optim.warmup_steps`, then constant or cosine decay to 0 at `steps`. On CUDA (unless
    `graph=off`) Adam/AdamW are built capturable, their learning rate a device tensor, so the
    meta-step can be captured as a CUDA graph (theria.algos.step)."""
    o = cfg.optim
    leaves = list(params.values())
    device = leaves[0].device
    if o.name == "sgd":
        opt = torch.optim.SGD(leaves, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        if len(o.betas) != 2:
            raise ConfigError(f"optim.betas must hold 2 numbers; got {list(o.betas)}")
        make = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        capturable = device.type == "cuda" and cfg.graph != "off"
        opt = make(leaves, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                   capturable=capturable)  # fmt: skip
    warm, total, cosine = o.warmup_steps, cfg.steps, o.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # the schedule's base rates stay floats (a tensor base rate costs a host sync per step);
    # then the rate a capturable optimizer reads becomes a device tensor the schedule fills
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    place_lr(opt, device)
    return Optimization(opt, schedule)
