"""Meta-learning algorithms: (model, params, batch of tasks) -> (meta-loss, meta-gradient,
metrics), one signature for all.

API summary:

    algo = MAML(inner_steps=1, inner_lr=0.01, first_order=False, learn_inner_lr=False,
                vmap=False)
    algo = FOMAML(inner_steps=1, inner_lr=0.01, ...)          # MAML(first_order=True)
    algo = IMAML(lam=1.0, inner_steps=10, inner_lr=0.01, cg_iters=5, cg_damping=0.0,
                 hvp="rev_rev" | "fwd_rev", vmap=False)
    params = algo.init_params(model)        # dict name -> leaf tensor (+ "inner_lr/<name>"
                                            # Meta-SGD rates when learn_inner_lr)
    result = algo(model, params, tasks)     # tasks: a batched theria.tasks.Episode
    result.loss     () detached mean query loss after adaptation
    result.grads    dict like params: the meta-gradient (put it in .grad and step an optimizer)
    result.metrics  dict of floats: query_loss, support_loss_pre, query_acc (classification);
                    iMAML adds cg_residual, cg_residual_max, inner_grad_norm

A model whose attention cannot be differentiated twice (attn="sdpa": PyTorch's fused
kernels) makes MAML/iMAML raise a RuntimeError that names the path and the alternatives.
"""

from theria.algos.common import MetaStepResult, Params
from theria.algos.imaml import IMAML, conjugate_gradient
from theria.algos.maml import FOMAML, LR_PREFIX, MAML

__all__ = ["FOMAML", "IMAML", "LR_PREFIX", "MAML", "MetaStepResult", "Params", "conjugate_gradient"]
