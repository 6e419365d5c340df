"""Triton kernels of the `triton` backend (imported lazily: Triton is optional).

    first_order.py   forward (O, lse), forward-mode JVP (Ȯ, μ; also fused with the forward),
                     backward (preprocess δ, then dK/dV and dQ passes)
    second_order.py  the JVP of the backward (double backward, forward-over-reverse)

Kernels see only pointers, strides and `tl.constexpr` tile sizes; `theria.attention.triton_impl`
checks, allocates and launches them.
"""
