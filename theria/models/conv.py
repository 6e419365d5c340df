"""Conv4: the 4-block convolutional network of the MAML image benchmarks.

Finn et al. 2017, §5.2 (after Vinyals et al. 2016): 4 blocks of a 3×3 convolution with 64
filters, batch normalization, ReLU and 2×2 down-sampling, then a linear head; "for Omniglot,
strided convolutions instead of max-pooling". Shapes for 28×28 Omniglot, 64 channels:

    x (B, 1, 28, 28) -> block 1 (B, 64, 14, 14) -> 2 (B, 64, 7, 7) -> 3 (B, 64, 4, 4)
      -> 4 (B, 64, 2, 2) -> mean over H, W (B, 64) -> head (B, n_way)
    (downsample="maxpool": 28 -> 14 -> 7 -> 3 -> 1, each a 2×2 max-pool after a stride-1 conv)

Batch normalization always uses the statistics of the batch it is given and keeps no running
averages: no buffers, nothing updated in place, so the forward is a pure function of
(params, x) that `torch.func.functional_call` and `torch.func.vmap` over per-task parameters
(a leading task dim) handle, and that is twice differentiable. This is also what Finn et al.'s
reference code does at meta-test time (github.com/cbfinn/maml, utils.py `normalize`:
`tf.contrib.layers.batch_norm` with its default `is_training=True`, so batch statistics
always): a set (support or query) is normalized with its own statistics, i.e. predictions on
a query set are transductive over that set, as in the published numbers.

Use it functionally: `torch.func.functional_call(model, params, (x,))`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Conv4Config:
    in_channels: int = 1  # C of the images
    image_size: int = 28  # H = W
    channels: int = 64  # filters per block
    blocks: int = 4  # conv blocks
    out_features: int = 5  # head width: N of N-way
    downsample: Literal["stride", "maxpool"] = "stride"  # Omniglot: stride (Finn et al. §5.2)
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        for key in ("in_channels", "image_size", "channels", "blocks", "out_features"):
            if getattr(self, key) < 1:
                raise ValueError(f"Conv4Config.{key} must be >= 1; got {getattr(self, key)}")
        if self.downsample not in ("stride", "maxpool"):
            raise ValueError(
                f"Conv4Config.downsample must be 'stride' or 'maxpool'; got {self.downsample!r}"
            )
        if self.downsample == "maxpool" and self.image_size < 2**self.blocks:
            raise ValueError(
                f"downsample='maxpool' halves the image {self.blocks} times: image_size must be "
                f">= {2**self.blocks}; got {self.image_size}"
            )
        if not self.bn_eps > 0:
            raise ValueError(f"Conv4Config.bn_eps must be > 0; got {self.bn_eps}")


class BatchStatNorm(nn.Module):
    """Batch normalization over (B, H, W) per channel with the batch's own statistics
    (biased variance, as in training-mode BatchNorm2d), a learned scale and shift, no buffers."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        var = (x - mean).square().mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1), biased
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)  # (B, C, H, W)
        return x_hat * self.weight[:, None, None] + self.bias[:, None, None]


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, downsample: str, eps: float) -> None:
        super().__init__()
        stride = 2 if downsample == "stride" else 1
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)  # "same" for stride 1
        self.norm = BatchStatNorm(c_out, eps)
        self.pool = downsample == "maxpool"

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm(self.conv(x)))  # (B, C', H', W')
        return F.max_pool2d(h, 2) if self.pool else h  # maxpool: (B, C', H'/2, W'/2)


class Conv4(nn.Module):
    """(B, C, S, S) images -> (B, out_features) logits; see the module docstring."""

    def __init__(self, cfg: Conv4Config) -> None:
        super().__init__()
        self.config = cfg
        widths = [cfg.in_channels] + [cfg.channels] * cfg.blocks
        self.blocks = nn.ModuleList(
            ConvBlock(a, b, cfg.downsample, cfg.bn_eps) for a, b in itertools.pairwise(widths)
        )
        self.head = nn.Linear(cfg.channels, cfg.out_features)

    def forward(self, x: Tensor) -> Tensor:
        c, s = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"Conv4: expected images (B, {c}, {s}, {s}); got {tuple(x.shape)}")
        h = x
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=(2, 3)))  # (B, C', h, w) -> (B, C') -> (B, out)
