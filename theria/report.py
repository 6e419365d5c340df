"""Turn a sweep into a table and a plot.

    python -m theria.report <multirun dir> [--metric query_loss_post] [--out DIR]

Reads every results.json under the directory (one per job of `python -m theria.train -m ...`),
groups the jobs by their overrides with `seed=` removed, and writes report.md (one row per
setting: the meta-test metric's mean over seeds ± the 95% confidence interval of that mean,
Student t with n_seeds − 1 degrees of freedom; with a single seed, the interval over the
meta-test tasks instead) and report.png (the same numbers as bars, and the meta-validation
curves averaged over seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from theria.train.evaluate import mean_ci95

IGNORED_OVERRIDES = ("seed=", "hydra.", "launcher=", "threads=", "logger")


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Every results.json under `root`, sorted by path."""
    runs = []
    for path in sorted(root.rglob("results.json")):
        run = json.loads(path.read_text())
        run["_path"] = str(path.parent)
        runs.append(run)
    return runs


def setting_of(run: dict[str, Any], common: frozenset[str] = frozenset()) -> str:
    """The jobs of one setting share this label: their overrides without seed= (and without
    launcher/logging keys and the overrides in `common`, those every run of the sweep has);
    runs without such overrides are labelled by algo/attn/task."""
    keep = [
        o for o in run.get("overrides", [])
        if not o.lstrip("+~").startswith(IGNORED_OVERRIDES) and o not in common
    ]  # fmt: skip
    if keep:
        return " ".join(sorted(keep))
    c = run["config"]
    return f"algo={c['algo']['name']} attn={c['attn']['name']} task={c['task']['name']}"


def summarize(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per setting: n_seeds, mean ± ci95 of `metric` (post-adaptation meta-test), the
    same for accuracy when present, the pre-adaptation loss, step time, and the mean curve."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    common = frozenset.intersection(*(frozenset(r.get("overrides", [])) for r in runs))
    for run in runs:
        groups[setting_of(run, common)].append(run)
    rows = []
    for label, members in groups.items():
        row: dict[str, Any] = {"setting": label, "n_seeds": len(members)}
        for key in (metric, metric.replace("loss", "acc"), metric.replace("_post", "_pre")):
            if not all(key in m["test"] for m in members):
                continue
            if len(members) == 1:
                row[key] = members[0]["test"][key]  # CI over the meta-test tasks
                row[key + "_ci_over"] = "tasks"
            else:
                row[key] = mean_ci95([m["test"][key]["mean"] for m in members])
                row[key + "_ci_over"] = "seeds"
        row["step_time_s"] = sum(m["train_time_s"] / m["steps"] for m in members) / len(members)
        curves: dict[int, list[float]] = defaultdict(list)
        for m in members:
            for h in m["val_history"]:
                if metric in h:
                    curves[h["step"]].append(h[metric])
        row["curve"] = sorted((s, sum(v) / len(v)) for s, v in curves.items())
        rows.append(row)
    return sorted(rows, key=lambda r: r["setting"])


def _cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "–"
    ci = stat["ci95"]
    return f"{stat['mean']:.4g} ± {ci:.2g}" if ci == ci else f"{stat['mean']:.4g}"


def to_markdown(rows: list[dict[str, Any]], metric: str, title: str) -> str:
    acc, pre = metric.replace("loss", "acc"), metric.replace("_post", "_pre")
    has_acc = any(acc in r for r in rows)
    head = ["setting", "seeds", f"meta-test {metric}"]
    head += [f"meta-test {acc}"] if has_acc else []
    head += [f"meta-test {pre}", "s / step"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['setting']}`", str(r["n_seeds"]), _cell(r.get(metric))]
        cells += [_cell(r.get(acc))] if has_acc else []
        cells += [_cell(r.get(pre)), f"{r['step_time_s']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = {
        "seeds": "over seeds: Student t on the per-seed meta-test means",
        "tasks": "one seed: over the meta-test tasks",
    }
    over = sorted({r.get(metric + "_ci_over") for r in rows} - {None})
    lines += ["", "mean ± half-width of the 95% confidence interval ("
              + "; ".join(notes[o] for o in over) + ")."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["setting"] for r in rows]
    means = [r[metric]["mean"] if metric in r else float("nan") for r in rows]
    errs = [r[metric]["ci95"] if metric in r else 0.0 for r in rows]
    bars.barh(range(len(rows)), means, xerr=errs, capsize=3, color="tab:blue", alpha=0.8)
    bars.set_yticks(range(len(rows)), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel(f"meta-test {metric} (mean ± 95% CI)")
    for r in rows:
        if r["curve"]:
            steps, values = zip(*r["curve"], strict=True)
            curves.plot(steps, values, marker="o", ms=3, label=r["setting"])
    curves.set_xlabel("meta-training step")
    curves.set_ylabel(f"meta-val {metric} (mean over seeds)")
    if any(r["curve"] for r in rows):
        curves.legend(fontsize=6)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root: Path, metric: str = "query_loss_post", out: Path | None = None) -> Path:
    """Writes report.md and report.png for the sweep under `root` (into `out`, default
    `root`); returns the markdown file's path."""
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results.json under {root} (is it a theria.train run/sweep?)")
    missing = [r["_path"] for r in runs if metric not in r["test"]]
    if missing:
        raise ValueError(f"--metric {metric!r} is not in the results of {missing[:3]}")
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs, metric)
    title = f"{runs[0]['name']}: {len(runs)} runs, {runs[0]['steps']} meta-training steps"
    common = sorted(frozenset.intersection(*(frozenset(r.get("overrides", [])) for r in runs)))
    if common:
        title += f" ({' '.join(common)})"
    md = out / "report.md"
    md.write_text(to_markdown(rows, metric, title))
    plot(rows, metric, out / "report.png", title)
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m theria.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("root", type=Path, help="a multirun directory (or any folder of runs)")
    parser.add_argument("--metric", default="query_loss_post", help="a key of results.json's test")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: root)")
    args = parser.parse_args(argv)
    try:
        md = report(args.root, args.metric, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"theria.report: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(md.read_text())
    print(f"written: {md} and {md.with_suffix('.png')}")


if __name__ == "__main__":
    main()
