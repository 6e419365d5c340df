"""Accuracy at large logits: theria's float32 error against PyTorch's float32 math path.

    python experiments/large_logits.py [--device cuda] [--backends torch triton]
        [--scales 1 10 30 100] [--seeds 0 1 2] [--out DIR]

B, H, L, E = 2, 2, 33, 8, loss ⟨O, W⟩; for each backend and scale, the relative errors against
float64 of the gradient, the rev-rev HVP and the fwd-rev HVP (q, k and v each: 9 quantities),
summed over the seeds, divided by the math path's summed errors on the same device. The 2×
rule asks every ratio ≤ 2. This is the measurement behind docs/CONTRACT.md's "Accuracy at
large logits" table; tests/attention/test_bad_input.py holds the same check as tests. Writes
<out>/large_logits_<device>.md (default outputs/bench).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.attention.test_bad_input import summed_errors  # noqa: E402
from theria._environment import environment  # noqa: E402

NAMES = [f"{m} d{t}" for m in ("grad", "rev-rev", "fwd-rev") for t in "qkv"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 30.0, 100.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    for backend in args.backends:
        for scale in args.scales:
            ours, math = summed_errors(backend, scale, args.seeds, args.device)
            ratios = [o / m for o, m in zip(ours, math, strict=True)]
            worst = max(range(9), key=lambda i: ratios[i])
            rows.append((backend, scale, ratios, worst))
            print(f"{backend:7s} scale {scale:6g}: worst {ratios[worst]:.2f}× ({NAMES[worst]}); "
                  + " ".join(f"{r:.2f}" for r in ratios), flush=True)  # fmt: skip
    env = environment(torch.device(args.device))
    lines = [
        "# Accuracy at large logits (float32, 2× rule against PyTorch's float32 math path)", "",
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; "
        f"{env['date']}. B, H, L, E = 2, 2, 33, 8, loss ⟨O, W⟩; relative errors against "
        f"float64 summed over seeds {args.seeds}, divided by the math path's.", "",
        "| backend | scale | max \\|S\\| ≈ | worst ratio | " + " | ".join(NAMES) + " |",
        "|---|---|---|---|" + "---|" * 9,
    ]  # fmt: skip
    for backend, scale, ratios, worst in rows:
        cells = " | ".join(f"{r:.2f}" for r in ratios)
        lines.append(f"| {backend} | {scale:g} | {10 * scale:g} | **{ratios[worst]:.2f}** "
                     f"({NAMES[worst]}) | {cells} |")  # fmt: skip
    cmd = "python experiments/large_logits.py " + " ".join(sys.argv[1:])
    lines += ["", f"{time.perf_counter() - t0:.0f} s. Reproduce: `{cmd.strip()}`"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"large_logits_{args.device}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
