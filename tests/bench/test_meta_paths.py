"""The meta-step benchmark end to end on a tiny transformer (its table is a committed result)."""

from __future__ import annotations

import re
import shlex

from theria.bench import meta_paths as meta
from theria.bench.common import command_line

ARGS = ["--seq-lens", "24", "--dim", "16", "--depth", "1", "--heads", "2", "--tasks", "1"]
ARGS += ["--shots", "1", "--cg-iters", "2", "--repeats", "1"]


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] == "24":
            rows[(cells[1], cells[2])] = cells[3:]
    return rows


def test_meta_bench_table(tmp_path, capsys):
    meta.main([*ARGS, "--out", str(tmp_path), "--name", "m"])
    text = (tmp_path / "m.md").read_text()
    rows = _rows(text)
    for algo in ("maml", "imaml"):
        assert rows[(algo, "sdpa")][0] == "fails"  # CPU fused SDPA: no double backward
        for path in ("reference", "theria", "sdpa_math"):
            ms, _, peak, rel, f64, verdict = rows[(algo, path)]
            assert float(ms) > 0 and float(peak) >= 0
            # float32 against the float64 truth from the same parameters: a few ulps of the
            # meta-gradient's scale, far below anything a wrong derivative would give
            assert float(f64) < 1e-4, (algo, path, f64)
            assert float(rel) < 1e-4
            # theria's float32 meta-gradient is as close to float64 as its peers'
            assert verdict == ("pass" if path == "theria" else ""), (algo, path, f64)
    assert "float64 truth through `reference`" in text
    # the reproduce line names every flag that differs from the defaults, and parses back
    line = re.search(r"Reproduce: `python -m theria.bench meta-paths (.*)`", text).group(1)
    again = meta._parser().parse_args(shlex.split(line))
    assert (
        command_line("python -m theria.bench meta-paths", again, meta._parser())
        == f"python -m theria.bench meta-paths {line}"
    )
    assert line.startswith("--device cpu --seq-lens 24 --dim 16 --depth 1 --heads 2")
    out = capsys.readouterr().out  # progress with an ETA, one line per (L, algorithm, path)
    n = 2 * len(meta._parser().parse_args([]).paths)
    assert f"[bench meta-paths {n}/{n}] L=24 imaml" in out and "ETA" in out, out[-2000:]


def test_command_line_names_every_changed_flag() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tag", default="")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--name", default="a")
    ap.add_argument("--tile", action="append", default=[])
    ap.add_argument("--out", default=None)
    argv = ["--sizes", "3", "--tag", "a b", "--no-check", "--name", "b", "--tile", "x:1",
            "--tile", "y:2", "--out", "/tmp/x"]  # fmt: skip
    line = command_line("prog", ap.parse_args(argv), ap)
    tiles = "--tile x:1 --tile y:2"  # an append flag: once per value
    assert line == f"prog --device cpu --sizes 3 --tag 'a b' --no-check --name b {tiles}"
    assert ap.parse_args(shlex.split(line)[1:]) == ap.parse_args(argv[:-2])
