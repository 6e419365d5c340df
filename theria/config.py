"""Typed schemas of the experiment app's configuration (`python -m theria.train`).

The YAML files under conf/ hold the values; these dataclasses hold the types and the allowed
keys. `register_configs()` stores `TrainConfig` in Hydra's ConfigStore as `train_schema`, and
conf/config.yaml lists it right after `_self_`: its fields are all MISSING (`???`), so it adds
no values, only types. Composition then fails before any work when a key is misspelled or a
value has the wrong type, and Hydra's message names the key (`full_key: algo.inner_stepz`).

Each config group has one flat schema (OmegaConf has no union of dataclass types): a field
that only some options use says which in its comment. Objects are built from these configs by
name in theria/train.py (`build_*`), which checks the names and raises with the choices: the
typed schema is why the groups use `name:` rather than Hydra's `_target_` (whose keyword
arguments would be untyped).

Depends on omegaconf/hydra only (no torch), so `import theria` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class AlgoConfig:
    """conf/algo/: the meta-learning algorithm (theria.algos)."""

    name: str = MISSING  # fomaml | maml | imaml
    inner_steps: int = MISSING  # gradient steps on the support set
    inner_lr: float = MISSING  # inner step size α
    eval_inner_steps: int = MISSING  # inner steps at meta-validation / meta-test time
    batching: str = MISSING  # auto | batched | sequential | vmap: how a meta-batch runs
    learn_inner_lr: bool = False  # maml/fomaml: Meta-SGD per-parameter rates
    lam: float = 1.0  # imaml: proximal strength λ
    cg_iters: int = 5  # imaml: conjugate-gradient iterations
    cg_damping: float = 0.0  # imaml: δ in ((1 + δ)I + H/λ) x = g
    hvp: str = "rev_rev"  # imaml: rev_rev | fwd_rev


@dataclass
class AttnConfig:
    """conf/attn/: the attention path of transformer models (theria.models.ATTENTION_PATHS)."""

    name: str = MISSING  # theria | theria_torch | theria_triton | reference | sdpa | sdpa_math
    # | eager (model=hf only: transformers' own attention)
    block_size: int = MISSING  # keys per block for the theria backends


@dataclass
class TaskConfig:
    """conf/task/: the task sampler (theria.tasks)."""

    name: str = MISSING  # sinusoid | markov | glyphs | omniglot
    k_shot: int = MISSING  # support examples (per class for classification)
    k_query: int = MISSING  # query examples (per class for classification)
    vocab_size: int = 8  # markov
    seq_len: int = 32  # markov
    logit_scale: float = 2.0  # markov: peakiness of the transition rows
    n_way: int = 5  # glyphs, omniglot
    image_size: int = 28  # glyphs, omniglot
    n_classes: int = 1200  # glyphs
    n_instances: int = 20  # glyphs
    rotations: bool = False  # glyphs, omniglot: rotated copies as extra classes
    max_shift: int = 0  # glyphs, omniglot: random translation in pixels
    root: str = "data"  # omniglot: folder of the official zips (or unzipped folders)
    background: str = "full"  # omniglot: full | small1 | small2 | small1+small2
    split: str = "character"  # omniglot: character | alphabet | evaluation
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # omniglot
    split_seed: int = 0  # omniglot: which characters/alphabets go to which split
    download: bool = False  # omniglot: background=full through torchvision


@dataclass
class HFConfig:
    """model.hf: a Hugging Face causal LM (model=hf; theria/models/hf.py). Sizes are the
    ModelConfig's dim, depth, heads, mlp_ratio; vocabulary and length come from the task."""

    arch: str = "llama"  # llama | gpt2 | qwen2 | mistral: built from config (no download)
    path: Any = None  # null | a local pretrained folder (offline; overrides arch and sizes)
    kv_heads: int = 0  # key/value heads (GQA); 0: = heads
    sliding_window: int = 0  # keys each query sees (qwen2, mistral); 0: all


@dataclass
class ModelConfig:
    """conf/model/: the network; input and output sizes come from the task."""

    name: str = MISSING  # mlp | transformer | hf | conv4
    hidden: list[int] = field(default_factory=lambda: [40, 40])  # mlp
    dim: int = 64  # transformer: width D
    depth: int = 2  # transformer: blocks
    heads: int = 4  # transformer
    mlp_ratio: float = 4.0  # transformer
    patch_size: int = 7  # transformer on images
    channels: int = 64  # conv4: filters per block
    blocks: int = 4  # conv4
    downsample: str = "stride"  # conv4: stride | maxpool
    hf: HFConfig = field(default_factory=HFConfig)  # hf


@dataclass
class OptimConfig:
    """conf/optim/: the outer (meta) optimizer and its learning-rate schedule."""

    name: str = MISSING  # adam | adamw | sgd
    lr: float = MISSING
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    schedule: str = "constant"  # constant | cosine (to 0 at the last step)
    warmup_steps: int = 0  # linear warm-up before the schedule
    grad_clip: float = 0.0  # max global norm of the meta-gradient; 0 disables


@dataclass
class LoggerConfig:
    """conf/logger/: where metrics go (TensorBoard folders: theria.train.tboard)."""

    tensorboard: bool = MISSING
    progress: bool = MISSING  # a tqdm bar on the console
    log_every: int = MISSING  # steps between scalar writes


@dataclass
class DistConfig:
    """conf/dist/: data parallelism over processes (theria.distributed). `ddp` takes effect
    when the job is started by torchrun (or by submitit with several tasks); see
    docs/DISTRIBUTED.md. meta_batch is the total over ranks."""

    name: str = MISSING  # none | ddp
    backend: str = "auto"  # ddp: auto (NCCL on CUDA, gloo on the CPU) | nccl | gloo
    timeout_s: float = 1800.0  # ddp: longest wait for the other ranks (incl. rank 0's evals)


@dataclass
class TrainConfig:
    """The whole experiment. Top-level values live in conf/config.yaml."""

    name: str = MISSING  # names the output folder: outputs/<name>/<time>
    seed: int = MISSING
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    dtype: str = MISSING  # float32 | float64
    steps: int = MISSING  # meta-training steps
    meta_batch: int = MISSING  # tasks per meta-step
    eval_every: int = MISSING  # steps between meta-validations; 0: only at the end
    val_tasks: int = MISSING  # tasks per meta-validation (the same tasks every time)
    test_tasks: int = MISSING  # meta-test tasks of the final evaluation
    sanity_every: int = MISSING  # steps between HVP sanity checks; 0 disables
    checkpoint_every: int = MISSING  # steps between checkpoints; 0: only at the end
    resume: Any = None  # null | true (this run dir) | a run directory or checkpoint file
    threads: int = MISSING  # torch intra-op threads; 0 keeps torch's default
    graph: str = MISSING  # auto | on | off: the meta-step as a CUDA graph (theria.algos.step)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def register_configs() -> None:
    """Stores the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
