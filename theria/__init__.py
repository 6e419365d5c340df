"""theria: higher-order meta-learning with an attention operator whose first and second
derivatives are exact and memory-efficient in every autodiff mode.

    import theria
    out = theria.sdpa(q, k, v, is_causal=True)          # drop-in for F.scaled_dot_product_attention
    with theria.override_sdpa(): ...                    # F.scaled_dot_product_attention -> theria
    import theria.hf                                    # attn_implementation="theria" in HF
    theria.autodiff.hvp(f, params, v, mode="fwd_rev")   # Hessian-vector products

Heavy optional packages (Triton, TensorBoard, Hydra) are imported only where used.
"""

from theria import autodiff
from theria.attention import override_sdpa, sdpa

__version__ = "0.1.0"
__all__ = ["__version__", "autodiff", "override_sdpa", "sdpa"]
