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
        # distinct seeds: a rerun is not a new one (a run without a seed counts as its own)
        seeds = {m["config"].get("seed", m["_path"]) for m in members}
        row: dict[str, Any] = {"setting": label, "n_seeds": len(seeds), "n_runs": len(members)}
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
        mems = [m["peak_mem_mb"] for m in members if m.get("peak_mem_mb") is not None]
        row["peak_mem_mb"] = max(mems) if mems else None
        sanity = [v for m in members for v in (m.get("sanity_max") or {}).values()]
        row["sanity_max"] = max(sanity) if sanity else None
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
    head += [f"meta-test {pre}", "s / step", "peak MB", "sanity max"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = str(r["n_seeds"]) + (
            f" ({r['n_runs']} runs)" if r["n_runs"] != r["n_seeds"] else ""
        )
        cells = [f"`{r['setting']}`", seeds, _cell(r.get(metric))]
        cells += [_cell(r.get(acc))] if has_acc else []
        mem, san = r.get("peak_mem_mb"), r.get("sanity_max")
        cells += [_cell(r.get(pre)), f"{r['step_time_s']:.3g}"]
        cells += ["–" if mem is None else f"{mem:.4g}", "–" if san is None else f"{san:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = {
        "seeds": "over seeds: Student t on the per-seed meta-test means",
        "tasks": "one seed: over the meta-test tasks",
    }
    over = sorted({r.get(metric + "_ci_over") for r in rows} - {None})
    lines += ["", "mean ± half-width of the 95% confidence interval ("
              + "; ".join(notes[o] for o in over) + "). seeds: distinct seeds (runs, when a "
              "seed ran more than once); peak MB: the largest peak_mem_mb of the setting's runs "
              "(results.json's peak_mem_kind says what it measures); sanity max: the largest "
              "sanity/* value of its runs (docs/METRICS.md: healthy < 1e-5)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["setting"] for r in rows]
    means = [r[metric]["mean"] if metric in r else float("nan") for r in rows]
    errs = [r[metric]["ci95"] if metric in r else 0.0 for r in rows]
    colors = [f"C{i % 10}" for i in range(len(rows))]  # the same colour as the row's curve
    bars.barh(range(len(rows)), means, xerr=errs, capsize=3, color=colors, alpha=0.8)
    bars.set_yticks(range(len(rows)), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel(f"meta-test {metric} (mean ± 95% CI)")
    for r, color in zip(rows, colors, strict=True):
        if r["curve"]:
            steps, values = zip(*r["curve"], strict=True)
            curves.plot(steps, values, marker="o", ms=3, label=r["setting"], color=color)
    curves.set_xlabel("meta-training step")
    curves.set_ylabel(f"meta-val {metric} (mean over seeds)")
    if any(r["curve"] for r in rows):
        curves.legend(fontsize=6)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(runs: list[dict[str, Any]]) -> str:
    """Name and steps when every run shares them; a mixed folder says that it is one."""
    names = sorted({r["name"] for r in runs})
    steps = sorted({r["steps"] for r in runs})
    what = names[0] if len(names) == 1 else f"mixed folder ({', '.join(names)})"
    span = (f"{steps[0]} meta-training steps" if len(steps) == 1
            else f"{steps[0]}–{steps[-1]} meta-training steps")  # fmt: skip
    return f"{what}: {len(runs)} runs, {span}"


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
    title = _title(runs)
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
