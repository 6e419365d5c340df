"""theria: higher-order meta-learning with an attention operator whose first and second
derivatives are exact and memory-efficient in every autodiff mode.

    import theria
    out = theria.sdpa(q, k, v, is_causal=True)          # drop-in for F.scaled_dot_product_attention
    theria.autodiff.hvp(f, params, v, mode="fwd_rev")   # Hessian-vector products

Heavy optional packages (Triton, TensorBoard, Hydra) are imported only where used.
"""

from theria import autodiff
from theria.attention import sdpa

__version__ = "0.1.0"
__all__ = ["__version__", "autodiff", "sdpa"]
