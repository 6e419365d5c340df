"""One rank of the tests' multi-process jobs: `python -m tests.distributed.worker MODE OUT`
with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set.

MODE: "equal" runs the default tier's scenarios and saves this rank's meta-gradients and
parameters to OUT/rank<r>.pt; "equal-slow" the slow tier's; "raise" makes rank 1 raise at its
second step; "hang" makes rank 1 sleep forever at its second step (the others must time out).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from tests.distributed import scenarios as S
from theria import distributed as D


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share two cores
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
    ctx = D.setup(backend="gloo", timeout_s=timeout, device="cpu")
    if mode in ("equal", "equal-slow"):
        todo = S.SCENARIOS if mode == "equal" else S.SLOW_SCENARIOS
        results = {s.name: S.run(s, ctx, ctx.world_size) for s in todo}
        for r in results.values():  # the library's own check, next to the test's comparison
            D.assert_same_params(r["params"], ctx)
        torch.save(results, out / f"rank{ctx.rank}.pt")
    elif mode in ("raise", "hang"):
        s = S.Scenario("fomaml", "mlp")
        model, algo, sampler = S.build(s)
        params = algo.init_params(model)
        gen = D.task_generator(S.SEED, ctx.rank)
        for step in range(1, 4):
            if ctx.rank == 1 and step == 2:
                if mode == "raise":
                    raise ValueError("rank 1 fails on purpose at step 2")
                time.sleep(3600)
            tasks = sampler.sample("train", D.local_batch(S.META_BATCH, ctx), gen)
            D.all_reduce_mean(algo(model, params, tasks).grads, ctx)
            print(f"rank {ctx.rank} step {step} done", flush=True)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print(f"rank {ctx.rank} finished", flush=True)
    D.teardown(ctx)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
