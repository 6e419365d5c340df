"""Lake et al.'s one-shot classification test: 20 runs of 20-way, 1-shot classification.

The distributed format (github.com/brendenlake/omniglot, python/one-shot-classification/):
`all_runs.zip`, or its unzipped folders `run01` ... `run20`, each holding
    training/class01.png ... class20.png     one image of each of 20 characters
    test/item01.png ... item20.png           another drawer's image of each (in some order)
    class_labels.txt                         20 lines, each
                                             "runNN/test/itemKK.png runNN/training/classMM.png":
                                             test item KK shows the character of class MM
105×105 binary PNGs like the rest of Omniglot, preprocessed as theria.tasks.omniglot does
(Lanczos resize to the run's image_size, ink = 1). The characters come from the evaluation
alphabets, within one alphabet per run.

A trained run (a directory written by `python -m theria.train`, whose checkpoints/last.pt holds
the config and the meta-parameters) is evaluated with its own test-time inner loop
(`theria.train.evaluate.adapt`: the algorithm's inner problem, `algo.eval_inner_steps` steps)
on the 20 training images of each run, then classifies the 20 test items (one batch: conv4's
batch statistics are those of the 20 items, as in Finn et al.'s evaluation). Reported: the
error rate over the 400 trials with a 95% Wilson score interval, and per run.

Anchors with the full 30-alphabet background set for training (not the minimal sets):
people 4.5 %, Bayesian Program Learning 3.3 % (Lake et al. 2015), Koch et al.'s (2015)
Siamese network 8.0 %.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.func import functional_call

from theria.tasks.omniglot import preprocess

N_RUNS, N_WAY = 20, 20
LAKE_ANCHORS = {  # error rates, full 30-alphabet background (Lake et al. 2015; Koch et al. 2015)
    "people": 0.045,
    "Bayesian Program Learning": 0.033,
    "Siamese network (Koch et al.)": 0.080,
}
LABELS = "class_labels.txt"
_LINE = re.compile(r"^(run\d\d)/test/item(\d\d)\.png\s+(run\d\d)/training/class(\d\d)\.png$")


@dataclass(frozen=True)
class LakeRun:
    """One run: `train` (20, 1, S, S) the one-shot images of classes 1..20 (label i-1),
    `test` (20, 1, S, S) items 1..20, `labels` (20,) the class index (0-based) of each item."""

    name: str
    train: Tensor
    test: Tensor
    labels: Tensor


class _Files:
    """Relative paths "runNN/..." inside all_runs.zip (any leading folder) or a folder."""

    def __init__(self, path: Path) -> None:
        self.path, self.zip, self.prefix = path, None, ""
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(
                    f"Lake runs: {path} is not a readable zip file ({e}); expected all_runs.zip"
                ) from e
            names = self.zip.namelist()
            hits = [n for n in names if re.search(r"(^|/)run\d\d/", n)]
            if not hits:
                raise ValueError(
                    f"Lake runs: {path} holds no run01/ ... run20/ folders; expected "
                    "all_runs.zip as distributed"
                )
            m = re.search(r"(^|/)run\d\d/", hits[0])
            self.prefix = hits[0][: m.start() + len(m.group(1))]
            self.members = set(names)

    def where(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}" if self.zip else str(self.path / rel)

    def has_dir(self, rel: str) -> bool:
        if self.zip is None:
            return (self.path / rel).is_dir()
        p = f"{self.prefix}{rel}/"
        return any(n.startswith(p) for n in self.members)

    def read(self, rel: str) -> bytes:
        if self.zip is None:
            f = self.path / rel
            if not f.is_file():
                raise FileNotFoundError(f"Lake runs: {f} not found")
            return f.read_bytes()
        name = f"{self.prefix}{rel}"
        if name not in self.members:
            raise FileNotFoundError(f"Lake runs: {self.where(rel)} not found")
        return self.zip.read(name)


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "all_runs.zip").is_file() and not (p / "run01").is_dir():
            return p / "all_runs.zip"
        return p
    raise FileNotFoundError(
        f"Lake runs: --runs {str(path)!r} does not exist; expected all_runs.zip or a folder "
        "holding it or run01 ... run20"
    )


def parse_labels(text: str, run: str, where: str) -> Tensor:
    """(20,) 0-based class of test items 1..20, from class_labels.txt of run `run`."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    labels: dict[int, int] = {}
    for i, line in enumerate(lines, 1):
        m = _LINE.match(line)
        if m is None or m.group(1) != run or m.group(3) != run:
            raise ValueError(
                f"Lake runs: {where} line {i}: expected '{run}/test/itemKK.png "
                f"{run}/training/classMM.png'; got {line!r}"
            )
        item, cls = int(m.group(2)), int(m.group(4))
        if not (1 <= item <= N_WAY and 1 <= cls <= N_WAY) or item in labels:
            raise ValueError(
                f"Lake runs: {where} line {i}: item {item:02d} / class {cls:02d} out of 01..20 "
                "or the item listed twice"
            )
        labels[item] = cls - 1
    if len(labels) != N_WAY:
        missing = sorted(set(range(1, N_WAY + 1)) - set(labels))
        raise ValueError(
            f"Lake runs: {where} lists {len(labels)} test items, expected {N_WAY} (missing "
            f"items {missing})"
        )
    return torch.tensor([labels[k] for k in range(1, N_WAY + 1)], dtype=torch.long)


def load_lake_runs(path: str | Path, image_size: int = 28) -> list[LakeRun]:
    """The 20 runs from all_runs.zip (or a folder holding it) or the folders run01..run20,
    every file checked before any evaluation; errors name the file."""
    files = _Files(_resolve(path))
    names = [f"run{r:02d}" for r in range(1, N_RUNS + 1)]
    missing = [n for n in names if not files.has_dir(n)]
    if missing:
        raise FileNotFoundError(
            f"Lake runs: {files.where('')} lacks the run folders {missing}; expected run01 ... "
            "run20 (all_runs.zip as distributed)"
        )
    runs = []
    for name in names:
        rel = f"{name}/{LABELS}"
        try:
            text = files.read(rel).decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Lake runs: {files.where(rel)} not found: run folder {files.where(name)} has "
                f"no {LABELS}"
            ) from None
        except UnicodeDecodeError as e:
            raise ValueError(f"Lake runs: {files.where(rel)} is not a text file ({e})") from e
        labels = parse_labels(text, name, files.where(rel))

        def images(kind: str, stem: str, name: str = name) -> Tensor:
            out = []
            for k in range(1, N_WAY + 1):
                r = f"{name}/{kind}/{stem}{k:02d}.png"
                out.append(preprocess(files.read(r), image_size, files.where(r)))
            return torch.stack(out)[:, None].float() / 255.0  # (20, 1, S, S), ink = 1

        runs.append(LakeRun(name, images("training", "class"), images("test", "item"), labels))
    return runs


def wilson_ci95(errors: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion errors/n."""
    z = 1.959963984540054
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load_trained_run(run_dir: str | Path) -> dict[str, Any]:
    """{"config", "params", "checkpoint"} of a `python -m theria.train` run directory."""
    from theria.train.checkpoint import CHECKPOINT, load_checkpoint

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"--run {str(run_dir)!r}: no checkpoint at {path}; expected a run directory written "
            "by python -m theria.train"
        )
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "config" not in state or "params" not in state:
        raise ValueError(f"--run: {path} holds no 'config' and 'params' (not a theria checkpoint)")
    return {"config": state["config"], "params": state["params"], "checkpoint": str(path)}


def evaluate_lake(
    run_dir: str | Path,
    runs_path: str | Path,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Lake's 400 trials for the trained run `run_dir` (see the module docstring). Returns
    {"error_rate", "ci95": [lo, hi], "errors", "trials", "per_run": {name: error rate}, ...}."""
    from theria.train.build import DTYPES, build_algo, build_model, check_config
    from theria.train.evaluate import adapt

    trained = load_trained_run(run_dir)
    cfg = check_config(OmegaConf.create(trained["config"]))
    if cfg.task.n_way != N_WAY:
        raise ValueError(
            f"--run {str(run_dir)!r} was trained with task.n_way={cfg.task.n_way}; Lake's runs "
            f"are {N_WAY}-way one-shot: evaluate a run trained with task.n_way={N_WAY}"
        )
    if cfg.task.name not in ("omniglot", "glyphs"):
        raise ValueError(f"--run {str(run_dir)!r}: task={cfg.task.name} is not an image task")
    runs = load_lake_runs(runs_path, cfg.task.image_size)  # every file checked first
    dtype = DTYPES[cfg.dtype]
    model = build_model(cfg).to(device=device, dtype=dtype)
    algo = build_algo(cfg)
    params = {k: v.to(device=device, dtype=dtype) for k, v in trained["params"].items()}
    labels = torch.arange(N_WAY, device=device)
    per_run, wrong = {}, 0
    for run in runs:
        sx = run.train.to(device=device, dtype=dtype)
        qx = run.test.to(device=device, dtype=dtype)
        phi = adapt(algo, model, "ce", params, sx, labels, cfg.algo.eval_inner_steps)
        with torch.no_grad():
            pred = functional_call(model, phi, (qx,)).argmax(-1).cpu()  # (20,)
        n_wrong = int((pred != run.labels).sum())
        per_run[run.name] = n_wrong / N_WAY
        wrong += n_wrong
        if progress is not None:
            progress(f"{run.name}: {n_wrong}/{N_WAY} wrong")
    trials = N_RUNS * N_WAY
    lo, hi = wilson_ci95(wrong, trials)
    return {
        "error_rate": wrong / trials,
        "ci95": [lo, hi],
        "errors": wrong,
        "trials": trials,
        "per_run": per_run,
        "run": str(run_dir),
        "runs": str(runs_path),
        "checkpoint": trained["checkpoint"],
        "algo": cfg.algo.name,
        "eval_inner_steps": cfg.algo.eval_inner_steps,
        "anchors_full_background": LAKE_ANCHORS,
    }
