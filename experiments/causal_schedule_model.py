"""How long a causal pass's tail is, in a model of how a GPU hands out its programs: each
kernel's tiles in the order of its grid (main's orders before the LPT change) and in the
longest-first order of `theria.attention.kernels.schedule`.

Model: a pass of B·H heads × n_blk tiles on `--sms` SMs with the CTAs/SM each kernel's
registers and shared memory allow (offline sm_90a compile, results/kernel_resources_sm90_
causal_t36_lpt.md). A tile costs the number of inner blocks it loops over (a causal query
block m of BLOCK_M rows sees ceil(min(S, (m+1)·BLOCK_M) / BLOCK_N) key blocks; a key block n
sees the query blocks from n·BLOCK_N on). Programs start in launch order, each on the slot
that frees first (greedy list scheduling, Graham 1969). Reported: the makespan over the ideal
total / slots. It ignores that CTAs sharing an SM share its throughput (which softens every
tail) and memory effects, so the gain it shows is an upper bound of what a GPU gives.

    python experiments/causal_schedule_model.py [--sizes 4096 16384] [--heads 32] [--sms 132]
"""

from __future__ import annotations

import argparse
import heapq
import math
from pathlib import Path

from theria.bench.common import environment, markdown_table, write_result

LPT_L2_BYTES = 50 * 2**20  # theria.attention.kernels.schedule's (not imported: needs Triton)

# (kernel, D): (BLOCK_M, BLOCK_N, CTAs/SM, query-major, main's order reversed the blocks)
KERNELS = {
    ("forward", 64): (128, 64, 2, True, True),
    ("dQ", 64): (128, 64, 1, True, True),
    ("dK/dV", 64): (32, 128, 2, False, False),
    ("row statistics", 64): (64, 32, 3, True, False),
    ("dQ̇", 64): (128, 64, 1, True, False),
    ("dK̇/dV̇", 64): (64, 128, 1, False, False),
    ("forward", 128): (128, 128, 1, True, True),
    ("dQ", 128): (128, 64, 1, True, True),
    ("dK/dV", 128): (64, 128, 1, False, False),
    ("row statistics", 128): (64, 64, 1, True, False),
    ("dQ̇", 128): (128, 64, 1, True, False),
    ("dK̇/dV̇", 128): (32, 128, 1, False, False),
}


def tile_costs(n: int, bm: int, bn: int, query_major: bool) -> list[int]:
    """Inner blocks per tile of one head, tile 0 first (top of the sequence), L = S = n."""
    if query_major:
        return [math.ceil(min(n, (m + 1) * bm) / bn) for m in range(math.ceil(n / bm))]
    return [math.ceil((n - j * bn) / bm) for j in range(math.ceil(n / bn))]


def makespan(order: list[int], slots: int) -> int:
    free = [0] * slots
    end = 0
    for cost in order:
        start = heapq.heappop(free)
        heapq.heappush(free, start + cost)
        end = max(end, start + cost)
    return end


def orders(
    costs: list[int], heads: int, reversed_main: bool, section: int
) -> tuple[list[int], list[int]]:
    """(main's launch order, the LPT order) of the tile costs of `heads` heads, the latter in
    sections of `section` heads (`schedule.lpt_tile`)."""
    per_head = costs[::-1] if reversed_main else costs
    main = per_head * heads
    longest_first = sorted(costs, reverse=True)
    lpt = []
    for first in range(0, heads, section):
        size = min(section, heads - first)
        lpt += [c for c in longest_first for _ in range(size)]  # rank-major across the section
    return main, lpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", type=int, default=32, help="B·H (issue 16: B=2, H=16)")
    ap.add_argument("--sms", type=int, default=132, help="SMs (H100 / H200 SXM: 132)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = ap.parse_args()
    rows = []
    for (name, dim), (bm, bn, ctas, qm, rev) in KERNELS.items():
        for n in args.sizes:
            costs = tile_costs(n, bm, bn, qm)
            slots = args.sms * ctas
            ideal = max(sum(costs) * args.heads / slots, max(costs))
            # a section: the heads whose streamed rows (bf16, E = Ev = D) fit the L2 budget
            section = max(1, min(args.heads, LPT_L2_BYTES // (n * 2 * dim * 2)))
            main_order, lpt_order = orders(costs, args.heads, rev, section)
            a, b = makespan(main_order, slots) / ideal, makespan(lpt_order, slots) / ideal
            rows.append([name, dim, n, f"({bm}, {bn})", ctas, section, f"{a:.3f}", f"{b:.3f}",
                         f"{a / b:.3f}"])  # fmt: skip
            print(*rows[-1], flush=True)
    head = ["pass", "D", "N", "tile", "CTAs/SM", "heads/section", "main / ideal", "LPT / ideal",
            "main / LPT"]  # fmt: skip
    body = (
        f"Greedy list scheduling of causal tiles (B·H = {args.heads}, {args.sms} SMs, L = S = N;"
        " tiles and CTAs/SM of the offline sm_90a compile). main: the grid order before the "
        "LPT change (the first-order query-major passes reversed within each head); LPT: "
        "longest first across heads. An upper bound of the gain (see the script's docstring). "
        "Script: `python experiments/causal_schedule_model.py`.\n\n" + markdown_table(head, rows)
    )
    write_result("causal_schedule_model", "Causal tile order: a scheduling model",
                 environment("cpu"), body, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
