"""The execution-strategy meta-step benchmark end to end on a tiny transformer (CPU)."""

from __future__ import annotations

from theria.bench import meta


def test_meta_strategies_table(tmp_path, capsys) -> None:
    args = ["--seq-lens", "8", "--dim", "16", "--tasks", "3", "--shots", "2", "--repeats", "2",
            "--warmup", "1", "--imaml-inner-steps", "2", "--cg-iters", "2",
            "--strategies", "theria", "sequential", "vmap_math", "--out", str(tmp_path),
            "--name", "m"]  # fmt: skip
    meta.main(args)
    text = (tmp_path / "m.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 8 |")]
    strategies = {(r.split("|")[2].strip(), r.split("|")[3].strip()) for r in rows}
    for algo in ("maml", "imaml"):
        assert {(algo, s) for s in ("theria", "sequential", "vmap_math")} <= strategies
    # float32 against float64: the theria step passes the 2x rule against the math-SDPA peer
    assert "L=8 maml: pass" in text and "L=8 imaml: pass" in text
    assert "sequential / theria" in text and "Reproduce: `python -m theria.bench meta" in text
