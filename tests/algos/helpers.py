"""Small float64 problems shared by the algorithm tests."""

import torch
from torch import Tensor

from theria.models import MLP, MLPConfig, Transformer, TransformerConfig
from theria.tasks import MarkovChainTasks, SinusoidTasks


def sinusoid_problem(n_tasks: int = 3, hidden=(16, 16)):
    model = MLP(MLPConfig(hidden=hidden)).double()
    tasks = SinusoidTasks(k_shot=6, k_query=5).sample(
        "train", n_tasks, torch.Generator().manual_seed(1)
    )
    return model, tasks.to(dtype=torch.float64)


def markov_problem(attn: str = "theria", n_tasks: int = 2):
    cfg = TransformerConfig(dim=16, depth=1, heads=2, vocab_size=5, causal=True, attn=attn)
    model = Transformer(cfg).double()
    tasks = MarkovChainTasks(vocab_size=5, seq_len=7, k_shot=2, k_query=2).sample(
        "train", n_tasks, torch.Generator().manual_seed(2)
    )
    return model, tasks


def random_direction(params: dict[str, Tensor], seed: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    norm = torch.sqrt(sum((t**2).sum() for t in u.values()))
    return {k: t / norm for k, t in u.items()}


def fd_directional(fn, params, u, eps: float = 1e-5) -> float:
    """Central difference of the scalar fn(params) along u: error O(eps²)."""
    plus = {k: v.detach() + eps * u[k] for k, v in params.items()}
    minus = {k: v.detach() - eps * u[k] for k, v in params.items()}
    return float((fn(plus) - fn(minus)) / (2 * eps))


def dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    num = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in b))
    return float(num / torch.sqrt(sum((b[k] ** 2).sum() for k in b)))
