"""TensorBoard for comparing runs, as Lightning does it: one folder of event files per run named
by what distinguishes it, one `hp_metric` scalar, and an HParams summary whose columns are every
key the run's overrides set (what differs across a sweep) plus a fixed core.

    <run dir>/<label>/events.out.tfevents...      label: "algo=maml,seed=1" (the job's
                                                  overrides), or the run's name without any

so that `tensorboard --logdir outputs/multirun/<name>/<time>` lists runs as `0/algo=fomaml,seed=0`,
`1/algo=maml,seed=0`, ... (no `tb` level, no `hparam/` plots)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Overrides that do not tell runs apart (they may change on resume, or are where things go):
# left out of the run's label, so that a resumed run keeps writing to the same folder.
_NOT_IN_LABEL = ("resume", "hydra.", "logger", "device", "threads", "steps", "eval_every",
                 "val_tasks", "test_tasks", "sanity_every", "checkpoint_every", "dist.timeout_s",
                 "launcher")  # fmt: skip
CORE_HPARAMS = ("algo.name", "attn.name", "task.name", "model.name", "seed", "meta_batch",
                "steps", "dtype", "optim.name", "optim.lr", "algo.inner_steps", "algo.inner_lr",
                "task.k_shot")  # fmt: skip
# Tags (logged as scalars elsewhere) that HParams shows as metric columns: their last values.
METRIC_TAGS = ("hp_metric", "test/query_loss_post", "test/query_acc_post", "val/query_loss_post",
               "train/loss", "perf/step_time_s", "perf/train_time_s", "perf/peak_mem_mb",
               "sanity/hvp_rev_vs_fwd", "sanity/hvp_rev_vs_fd", "sanity/maml_fd_rel_err",
               "imaml/cg_true_residual_max")  # fmt: skip


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


_SWEEP_SYNTAX = re.compile(r",|^(range|choice|interval|glob|tag)\(")


def _swept(value: str) -> bool:
    """Whether an override's value is Hydra sweep syntax (a list `[8,8]` is one value)."""
    return not value.startswith(("[", "{")) and bool(_SWEEP_SYNTAX.search(value))


def sweep_keys() -> set[str] | None:
    """Under a Hydra multirun: the keys the sweep varies (overrides written with sweep syntax,
    `algo=fomaml,maml` or `seed=range(3)`, in <sweep dir>/multirun.yaml, and the keys of
    hydra.sweeper.params); None outside a multirun or without that file."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    path = Path(hc.sweep.dir) / "multirun.yaml"
    if not path.is_file():
        return None
    main = OmegaConf.load(path)
    keys = {_key(o) for o in main.hydra.overrides.task if _swept(o.split("=", 1)[-1])}
    params = OmegaConf.select(main, "hydra.sweeper.params") or {}
    return keys | {str(k) for k in params}


def label(overrides: list[str], name: str, varying: set[str] | None = None) -> str:
    """The run's folder name: its distinguishing overrides joined by commas (as Hydra names
    multirun jobs) — in a sweep (`varying`, from `sweep_keys`) only those the sweep varies —
    "/" made "_", at most 120 characters; `name` when there are none."""
    keep = [o for o in overrides if not _key(o).startswith(_NOT_IN_LABEL)
            and (varying is None or _key(o) in varying)]  # fmt: skip
    text = ",".join(keep) or name
    text = re.sub(r"[/\\\s]+", "_", text)
    return text[:120]


def hparams(
    flat: dict[str, Any], overrides: list[str], varying: set[str] | None = None
) -> dict[str, Any]:
    """The core keys plus every key (or config group) the overrides set — in a sweep
    (`varying`) those it varies — with values TensorBoard accepts (bool, int, float, str;
    anything else as its str)."""
    keys = list(CORE_HPARAMS)
    for o in overrides:
        k = _key(o)
        if k.startswith(("hydra.", "resume")) or (varying is not None and k not in varying):
            continue
        if k not in flat and f"{k}.name" in flat:  # a config group: algo=maml -> algo.name
            k = f"{k}.name"
        if k in flat and k not in keys:
            keys.append(k)
    out = {}
    for k in keys:
        if k in flat:
            v = flat[k]
            out[k] = v if isinstance(v, bool | int | float | str) else str(v)
    return out


def write_hparams(writer: Any, hp: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    """The HParams summary into the run's own event folder (torch's `add_hparams` would open a
    sub-run and plot each metric again as `hparam/*`); `metrics` are logged as scalars at
    `step` when not already (hp_metric, test/*, perf/train_time_s)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    tags = {t: 0.0 for t in METRIC_TAGS}
    exp, ssi, sei = hparams_summary(hp, tags)
    for s in (exp, ssi, sei):
        writer.file_writer.add_summary(s)
    for k, v in metrics.items():
        writer.add_scalar(k, v, step)
