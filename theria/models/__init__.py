"""Models used functionally by the meta-learning algorithms.

Transformer(TransformerConfig(dim, depth, heads, mlp_ratio, causal, embed, ..., attn))
    pre-LN transformer; attn in ATTENTION_PATHS = theria, theria_torch, theria_triton,
    reference, sdpa, sdpa_math
MLP(MLPConfig(in_features=1, hidden=(40, 40), out_features=1))   the sinusoid baseline
Conv4(Conv4Config(in_channels=1, image_size=28, channels=64, out_features=5))
    the 4-block conv net of the MAML image benchmarks (batch statistics only: vmap-safe)
params = dict(model.named_parameters())
torch.func.functional_call(model, params, x)
"""

from theria.models.attention import ATTENTION_PATHS, attention_fn
from theria.models.conv import Conv4, Conv4Config
from theria.models.transformer import MLP, MLPConfig, Transformer, TransformerConfig

__all__ = [
    "ATTENTION_PATHS",
    "MLP",
    "Conv4",
    "Conv4Config",
    "MLPConfig",
    "Transformer",
    "TransformerConfig",
    "attention_fn",
]
