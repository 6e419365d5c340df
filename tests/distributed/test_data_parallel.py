"""Data-parallel meta-steps over 2 gloo processes (spawned here, like torchrun would) against
a 1-process run over the same tasks, in float64; and a failing or hanging rank ending the job
with a clear error instead of a hang."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import launch
from tests.distributed import scenarios as S
from theria.distributed import DistContext

# Float64 rounding: the 2-process meta-gradient is (mean of 2 tasks + mean of 2 tasks) / 2,
# the 1-process one a running sum of 4 tasks / 4, so they differ by reordering a few sums
# (~1e-16 relative); three SGD steps and iMAML's 3 CG iterations on these well-conditioned
# tiny problems amplify that by far less than 1e5. A wrong reduction (missing, summed instead
# of averaged, a rank's tasks lost) changes the gradient at O(1) (checked below).
RTOL, ATOL = 1e-10, 1e-13


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in b))
    return float(num / torch.sqrt(sum((b[k] ** 2).sum() for k in b)))


def _run_job(tmp_path, mode: str, scenarios: list[S.Scenario], timeout_s: float):
    ranks = launch.start(["-m", "tests.distributed.worker", mode, str(tmp_path)], world=2)
    # the 1-process reference runs here while the ranks start up
    one = DistContext()
    reference = {s.name: S.run(s, one, world_size=2) for s in scenarios}
    launch.wait(ranks, timeout_s)
    ok = [launch.completed(r.returncode, r.err, f"rank {r.rank} finished" in r.out) for r in ranks]
    assert all(ok), launch.logs(ranks)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return reference, got


def _check(reference, got, scenarios: list[S.Scenario]) -> None:
    for s in scenarios:
        ref, r0, r1 = reference[s.name], got[0][s.name], got[1][s.name]
        # the ranks: bitwise identical meta-gradients at every step and parameters after
        for step, (g0, g1) in enumerate(zip(r0["grads"], r1["grads"], strict=True)):
            assert all(torch.equal(g0[k], g1[k]) for k in g0), f"{s.name}: step {step} grads"
        assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"]), s.name
        # against the 1-process run over the same 4 tasks per step
        for step, (g, gr) in enumerate(zip(r0["grads"], ref["grads"], strict=True)):
            for k in gr:
                where = f"{s.name} step {step} grad {k}"
                torch.testing.assert_close(g[k], gr[k], rtol=RTOL, atol=ATOL,
                                           msg=lambda m, w=where: f"{w}: {m}")  # fmt: skip
        for k in ref["params"]:
            where = f"{s.name} param {k}"
            torch.testing.assert_close(r0["params"][k], ref["params"][k], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, w=where: f"{w}: {m}")  # fmt: skip
        assert r0["loss"] == pytest.approx(ref["loss"], rel=RTOL)


def test_two_processes_equal_one_process(tmp_path):
    reference, got = _run_job(tmp_path, "equal", S.SCENARIOS, timeout_s=240)
    _check(reference, got, S.SCENARIOS)
    # the comparison can fail: rank 0's own tasks alone give a clearly different gradient
    s = S.SCENARIOS[0]
    model, algo, sampler = S.build(s)
    params = algo.init_params(model)
    gens = [S.task_generator(S.SEED, r) for r in range(2)]
    own = algo(model, params, S.draw(sampler, gens, S.META_BATCH // 2, [0])).grads
    assert _rel(own, got[0][s.name]["grads"][0]) > 1e-3


@pytest.mark.slow
@pytest.mark.triton_interpret
def test_two_processes_equal_one_process_every_attention_path(tmp_path):
    reference, got = _run_job(tmp_path, "equal-slow", S.SLOW_SCENARIOS, timeout_s=900)
    _check(reference, got, S.SLOW_SCENARIOS)


def test_a_raising_rank_ends_the_job_with_a_clear_error(tmp_path):
    ranks = launch.start(["-m", "tests.distributed.worker", "raise", str(tmp_path), "60"], 2)
    # bounded: gloo sees rank 1's closed connection at once; the 60 s group timeout is the
    # backstop; the margin is for starting two Python processes on a loaded 2-core machine
    launch.wait(ranks, timeout_s=150)
    r0, r1 = ranks
    assert r1.returncode != 0 and "rank 1 fails on purpose" in r1.err, launch.logs(ranks)
    assert r0.returncode != 0, launch.logs(ranks)
    assert "DistributedError: rank 0 of 2: all-reduce of the meta-gradient failed" in r0.err, (
        launch.logs(ranks)
    )
    assert "rank 0 step 1 done" in r0.out and "rank 0 step 2 done" not in r0.out


@pytest.mark.slow
def test_a_hanging_rank_ends_the_others_at_the_timeout(tmp_path):
    timeout = 8.0
    ranks = launch.start(["-m", "tests.distributed.worker", "hang", str(tmp_path),
                          str(timeout)], 2)  # fmt: skip
    r0, r1 = ranks
    try:
        launch.wait([r0], timeout_s=120 + timeout)
    finally:
        r1.proc.kill()
        r1.proc.wait()
    assert r0.returncode != 0, launch.logs(ranks)
    assert "DistributedError: rank 0 of 2: all-reduce of the meta-gradient failed" in r0.err
    assert f"process-group timeout ({timeout:g} s)" in r0.err
