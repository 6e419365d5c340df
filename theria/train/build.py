"""Objects from a composed config: checked config, device/dtype, sampler, model, algorithm,
optimizer and schedule. Every error names the config key, the value and the choices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
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
from theria.tasks import GlyphTasks, MarkovChainTasks, OmniglotTasks, SinusoidTasks, TaskSampler
from theria.tasks.omniglot import BACKGROUNDS as OMNIGLOT_BACKGROUNDS
from theria.tasks.omniglot import SPLIT_MODES as OMNIGLOT_SPLITS

ALGOS = ("fomaml", "maml", "imaml")
TASKS = ("sinusoid", "markov", "glyphs", "omniglot")
MODELS = ("mlp", "transformer", "conv4")
OPTIMS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def check_config(cfg: DictConfig) -> DictConfig:
    """The config merged onto the typed schema (unknown keys and wrong types raise, naming the
    key), then checked for values the types cannot express. Returns the typed config."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        missing = sorted(OmegaConf.missing_keys(typed))
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}") from e
    if missing:
        raise ConfigError(f"config keys without a value: {missing}")
    _choice("algo.name", typed.algo.name, ALGOS)
    _choice("attn.name", typed.attn.name, ATTENTION_PATHS)
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
    if not typed.dist.timeout_s > 0:
        raise ConfigError(f"dist.timeout_s must be > 0; got {typed.dist.timeout_s}")
    for key in ("steps", "meta_batch", "val_tasks", "test_tasks", "logger.log_every"):
        if OmegaConf.select(typed, key) < 1:
            raise ConfigError(f"{key} must be >= 1; got {OmegaConf.select(typed, key)}")
    for key in (
        "eval_every",
        "sanity_every",
        "checkpoint_every",
        "threads",
        "algo.eval_inner_steps",
    ):
        if OmegaConf.select(typed, key) < 0:
            raise ConfigError(f"{key} must be >= 0; got {OmegaConf.select(typed, key)}")
    if not typed.optim.lr > 0:
        raise ConfigError(f"optim.lr must be > 0; got {typed.optim.lr}")
    device = typed.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    return typed


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
        place_lr(opt, device)
    warm, total, cosine = o.warmup_steps, cfg.steps, o.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return Optimization(opt, torch.optim.lr_scheduler.LambdaLR(opt, factor))
