"""Which tile a program of a kernel's grid takes: the order in which a GPU runs the tiles.

Every kernel here gives each program one block of rows (queries or keys) of one flattened batch
element z. Without a causal mask all tiles cost the same and the plain order is kept: block
`program_id(0)`, element `program_id(1)` (the first-order kernels' 2-D grids) or block
`pid % n_blk`, element `pid // n_blk` (the second-order kernels' 1-D grids).

Causal tiles differ: a query block at the bottom of the triangle sees every key, the top one
sees one block of them (and the other way round for key blocks). A GPU hands out programs in
launch order (CUDA dispatches blockIdx.x fastest, then y), so the programs that start last
decide when the grid ends. Longest processing time first (Graham 1969, "Bounds on
multiprocessing timing anomalies") puts the long tiles first and ends on the shortest ones;
done across all heads at once it would also spread each head's keys over the whole run, so
that they no longer stay in L2 between the tiles that read them. flash-attention's Hopper
scheduler (`SingleTileLPTScheduler`, hopper/tile_scheduler.hpp) keeps both: heads are taken in
sections whose keys and values fit a fixed L2 budget (50 MiB), and within a section the tiles
run longest first, each rank across all the section's heads. `lpt_tile` maps a program's
position in launch order to its tile the same way.

The section size is a heuristic: ROW_BYTES counts one key and one value row (one query and one
dO row for key-major passes), not the tangents the JVP and second-order passes also stream, nor
that GQA heads share keys (flash-attention scales by the heads per key head), so sections can
be up to twice the budget or a few times smaller than it; the order within them, which is what
shortens the tail, is the same.

Within a section, program t takes rank t // h (h heads in the section) of head t % h: rank 0,
the longest block, for every head, then rank 1, and so on. Query-major passes (forward, JVP,
dQ, the second-order row statistics and dQ̇) start with the last query block; key-major
passes (dK/dV, dK̇/dV̇) with the first key block.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The L2 budget of a section of heads: flash-attention's value for Hopper (H100 and H200 have
# 50 MiB of L2). Tests monkeypatch it smaller to split small grids into several sections.
LPT_L2_BYTES = tl.constexpr(50 * 2**20)


@triton.jit
def lpt_tile(t, n_blk, n_z, rows, ROW_BYTES: tl.constexpr):
    """(rank, z) of the program at position t of a causal grid of n_blk blocks × n_z batch
    elements, in longest-processing-time order within L2 sections: rank 0 is the longest
    block. `rows`: the rows (keys for query blocks, queries for key blocks) every tile of an
    element reads, ROW_BYTES bytes each; a section holds as many elements as fit
    LPT_L2_BYTES (at least one), the last one what is left."""
    # Positions and counts stay int32 (a grid has far fewer than 2**31 programs: each covers
    # at least 16 rows of a tensor in GPU memory); only the bytes per element need int64.
    # (tl.cast, not rows.to(): an int argument equal to 1 arrives as a constexpr)
    per_z = tl.maximum(tl.cast(rows, tl.int64) * ROW_BYTES, 1)
    # (cast first: a constexpr on the left of // would wrap the tensor result as a constexpr)
    fit = tl.cast(LPT_L2_BYTES, tl.int64) // per_z
    hs = tl.cast(tl.maximum(tl.minimum(tl.cast(n_z, tl.int64), fit), 1), tl.int32)
    sec = t // (hs * n_blk)
    r = t - sec * hs * n_blk
    h_sz = tl.minimum(hs, n_z - sec * hs)  # the last section may be short
    rank = r // h_sz
    z = sec * hs + r % h_sz
    return tl.cast(rank, tl.int32), tl.cast(z, tl.int32)


@triton.jit
def grid_tile(
    rows, ROW_BYTES: tl.constexpr, CAUSAL: tl.constexpr, QUERY_MAJOR: tl.constexpr
):  # fmt: skip
    """(block, z) of this program on a 2-D grid (blocks, batch elements); block counts blocks
    from the top of the sequence. Causal: longest first in L2 sections (`lpt_tile`)."""
    block = tl.program_id(0)
    z = tl.program_id(1)
    if CAUSAL:
        n_blk = tl.num_programs(0)
        t = tl.program_id(1) * n_blk + tl.program_id(0)
        rank, z = lpt_tile(t, n_blk, tl.num_programs(1), rows, ROW_BYTES)
        block = n_blk - 1 - rank if QUERY_MAJOR else rank
    return block, z


@triton.jit
def grid_block(
    n_blk, rows, ROW_BYTES: tl.constexpr, CAUSAL: tl.constexpr, QUERY_MAJOR: tl.constexpr
):  # fmt: skip
    """(block, z) of this program on a 1-D grid of n_blk blocks per batch element, element
    major; as `grid_tile`."""
    pid = tl.program_id(0)
    block = pid % n_blk
    z = pid // n_blk
    if CAUSAL:
        rank, z = lpt_tile(pid, n_blk, tl.num_programs(0) // n_blk, rows, ROW_BYTES)
        block = n_blk - 1 - rank if QUERY_MAJOR else rank
    return block, z
