"""Tiny float64 meta-training problems run both by spawned ranks (worker.py) and by the test
process as the one-process reference: same model, same tasks, same optimizer, one step loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from theria.algos import FOMAML, IMAML, MAML, Params
from theria.distributed import DistContext, local_batch, reduce_result, task_generator
from theria.models import MLP, MLPConfig, Transformer, TransformerConfig
from theria.tasks import Episode, MarkovChainTasks, SinusoidTasks

SEED = 5
META_BATCH = 4  # total tasks per meta-step, split over the ranks
STEPS = 3


@dataclass(frozen=True)
class Scenario:
    algo: str  # fomaml | maml | imaml
    model: str  # mlp (sinusoid) | transformer (Markov chains, causal attention)
    attn: str = "theria"

    @property
    def name(self) -> str:
        return f"{self.algo}-{self.model}" + (f"-{self.attn}" if self.model != "mlp" else "")


# Every algorithm on both models, and every attention path a CPU runs (fused "sdpa" has no
# double backward, so first-order only). The default tier runs a few (each algorithm, both
# models, a theria and a PyTorch path; spawning ranks dominates its time); the slow tier the
# rest, with the triton path through the interpreter.
SCENARIOS = [
    Scenario("maml", "mlp"),
    Scenario("imaml", "mlp"),
    Scenario("maml", "transformer", "theria"),
    Scenario("fomaml", "transformer", "sdpa"),
]
SLOW_SCENARIOS = [
    Scenario("fomaml", "mlp"),
    Scenario("fomaml", "transformer", "theria"),
    Scenario("imaml", "transformer", "theria"),
    *(Scenario("maml", "transformer", attn) for attn in ("theria_torch", "reference", "sdpa_math")),
    Scenario("imaml", "transformer", "sdpa_math"),
    Scenario("maml", "transformer", "theria_triton"),
]


def build(s: Scenario):
    """(model, algo, sampler) in float64, the model initialized from SEED."""
    torch.manual_seed(SEED)
    if s.model == "mlp":
        model: nn.Module = MLP(MLPConfig(hidden=(8, 8)))
        sampler = SinusoidTasks(k_shot=4, k_query=4, dtype=torch.float64)
    else:
        cfg = TransformerConfig(dim=8, depth=1, heads=2, mlp_ratio=2.0, vocab_size=4,
                                causal=True, attn=s.attn, block_size=4)  # fmt: skip
        model = Transformer(cfg)
        sampler = MarkovChainTasks(vocab_size=4, seq_len=6, k_shot=2, k_query=2)
    model = model.double()
    if s.algo == "imaml":
        algo = IMAML(lam=2.0, inner_steps=2, inner_lr=0.1, cg_iters=3)
    else:
        algo = (FOMAML if s.algo == "fomaml" else MAML)(inner_steps=1, inner_lr=0.1)
    return model, algo, sampler


def draw(sampler, gens: list[torch.Generator], per_rank: int, ranks: list[int]) -> Episode:
    """The tasks of `ranks` (each from its own stream), concatenated on the task dim."""
    eps = [sampler.sample("train", per_rank, gens[r]) for r in ranks]
    return Episode(*(torch.cat([getattr(e, f) for e in eps]) for f in
                     ("support_x", "support_y", "query_x", "query_y", "task_info")),
                   loss=eps[0].loss)  # fmt: skip


def run(s: Scenario, ctx: DistContext, world_size: int) -> dict[str, list[Params] | Params]:
    """STEPS meta-steps of SGD with momentum over META_BATCH tasks per step, split into
    `world_size` rank streams. With a one-process `ctx`, this process draws every rank's
    tasks (the reference); with a distributed one, only its own, and the reduction averages
    over ranks. Returns the (reduced) meta-gradient of every step and the final parameters."""
    model, algo, sampler = build(s)
    params = algo.init_params(model)
    # SGD, not Adam: Adam divides by the root of the squared gradient, so an entry whose
    # exact gradient is 0 (e.g. the key bias, which softmax ignores) takes a step of
    # normalized rounding noise, and the runs could differ there by up to lr per step. SGD
    # keeps the parameters as close as the gradients. (The ranks stay bitwise identical
    # under Adam as well: the trainer's tests check that.)
    opt = torch.optim.SGD(list(params.values()), lr=0.05, momentum=0.9)
    per_rank = META_BATCH // world_size
    if ctx.distributed:
        assert local_batch(META_BATCH, ctx) == per_rank
    gens = [task_generator(SEED, r) for r in range(world_size)]
    mine = [ctx.rank] if ctx.distributed else list(range(world_size))
    grads_per_step = []
    for _ in range(STEPS):
        tasks = draw(sampler, gens, per_rank, mine)
        result = reduce_result(algo(model, params, tasks), ctx)
        for k, p in params.items():
            p.grad = result.grads[k]
        opt.step()
        opt.zero_grad(set_to_none=True)
        grads_per_step.append({k: g.clone() for k, g in result.grads.items()})
    return {"grads": grads_per_step, "params": {k: v.detach().clone() for k, v in params.items()},
            "loss": float(result.loss)}  # fmt: skip
