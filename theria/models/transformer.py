"""A small pre-LayerNorm transformer whose attention is pluggable by name, and an MLP.

Pre-LN blocks (Xiong et al. 2020): x + Attn(LN(x)), then x + MLP(LN(x)), a final LN, a linear
head. Inputs are embedded per `TransformerConfig.embed`:
    "tokens"   (B, L) int64 ids           -> (B, L, D) by a learned table
    "patches"  (B, C, H, W) images        -> (B, (H/p)(W/p), D) by a linear map of p×p patches
                                             (Dosovitskiy et al. 2021, §3.1)
    "vectors"  (B, L, F) real features    -> (B, L, D) by a linear map
plus learned positional embeddings. Output (B, L, out) per token (`pool="none"`) or (B, out)
averaged over tokens (`pool="mean"`). Use it functionally:
`torch.func.functional_call(model, params, x)`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from theria.attention import DEFAULT_BLOCK_SIZE
from theria.models.attention import ATTENTION_PATHS, attention_fn


@dataclass
class TransformerConfig:
    dim: int = 64  # model width D
    depth: int = 2  # number of blocks
    heads: int = 4  # D must be a multiple of heads
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of D
    causal: bool = False  # token i attends to tokens j <= i
    embed: Literal["tokens", "patches", "vectors"] = "tokens"
    vocab_size: int = 0  # embed="tokens": number of token ids
    image_size: int = 28  # embed="patches": H = W
    patch_size: int = 7  # embed="patches": p, a divisor of image_size
    in_channels: int = 1  # embed="patches": C
    in_features: int = 1  # embed="vectors": F
    max_len: int = 256  # positional table size (tokens/vectors); patches use (H/p)²
    out_features: int = 0  # head width; 0 means vocab_size (for next-token prediction)
    pool: Literal["none", "mean"] = "none"
    attn: str = "theria"  # one of models.attention.ATTENTION_PATHS
    block_size: int = DEFAULT_BLOCK_SIZE  # keys per block for the theria backends

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if self.attn not in ATTENTION_PATHS:
            raise ValueError(f"attn must be one of {ATTENTION_PATHS}; got {self.attn!r}")
        if self.embed not in ("tokens", "patches", "vectors"):
            raise ValueError(f"embed must be tokens, patches or vectors; got {self.embed!r}")
        if self.embed == "tokens" and self.vocab_size < 1:
            raise ValueError("embed='tokens' needs vocab_size >= 1")
        if self.embed == "patches" and self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image={self.image_size}")
        if self.pool not in ("none", "mean"):
            raise ValueError(f"pool must be 'none' or 'mean'; got {self.pool!r}")
        if self.out_features < 1 and self.vocab_size < 1:
            raise ValueError("out_features must be >= 1 (or vocab_size set, for tokens)")

    @property
    def n_out(self) -> int:
        return self.out_features or self.vocab_size


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.causal = cfg.heads, cfg.causal
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attend = attention_fn(cfg.attn, cfg.block_size)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, L, Dh)
        out = self.attend(q, k, v, self.causal)  # (B, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, L, H, Dh) -> (B, L, D)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Pre-LN transformer; see the module docstring for inputs and outputs."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.embed == "tokens":
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            n_pos = cfg.max_len
        elif cfg.embed == "patches":
            self.embed = nn.Linear(cfg.in_channels * cfg.patch_size**2, cfg.dim)
            n_pos = (cfg.image_size // cfg.patch_size) ** 2
        else:
            self.embed = nn.Linear(cfg.in_features, cfg.dim)
            n_pos = cfg.max_len
        self.pos = nn.Parameter(0.02 * torch.randn(n_pos, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.n_out)

    @property
    def attn(self) -> str:
        """The attention path's name (for error messages and logs)."""
        return self.config.attn

    def _embed(self, x: Tensor) -> Tensor:
        cfg = self.config
        if cfg.embed == "tokens":
            if x.dim() != 2 or x.dtype != torch.long:
                raise ValueError(f"tokens: expected (B, L) int64; got {tuple(x.shape)} {x.dtype}")
            h = self.embed(x)  # (B, L, D)
        elif cfg.embed == "patches":
            c, s, p = cfg.in_channels, cfg.image_size, cfg.patch_size
            if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
                raise ValueError(f"patches: expected (B, {c}, {s}, {s}); got {tuple(x.shape)}")
            b, g = x.shape[0], s // p
            x = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, p, p)
            h = self.embed(x.reshape(b, g * g, c * p * p))  # (B, g², C·p²) -> (B, g², D)
        else:
            if x.dim() != 3 or x.shape[-1] != cfg.in_features:
                raise ValueError(
                    f"vectors: expected (B, L, {cfg.in_features}); got {tuple(x.shape)}"
                )
            h = self.embed(x)  # (B, L, D)
        if h.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence length {h.shape[1]} > max_len {self.pos.shape[0]}")
        return h + self.pos[: h.shape[1]]

    def forward(self, x: Tensor) -> Tensor:
        h = self._embed(x)  # (B, L, D)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        if self.config.pool == "mean":
            h = h.mean(dim=1)  # (B, L, D) -> (B, D)
        return self.head(h)


@dataclass
class MLPConfig:
    in_features: int = 1
    hidden: tuple[int, ...] = field(default=(40, 40))  # Finn et al. 2017, §5.1: 2 × 40, ReLU
    out_features: int = 1


class MLP(nn.Module):
    """Fully connected ReLU network: (..., in_features) -> (..., out_features)."""

    def __init__(self, cfg: MLPConfig | None = None) -> None:
        super().__init__()
        cfg = MLPConfig() if cfg is None else cfg
        self.config = cfg
        widths = [cfg.in_features, *cfg.hidden, cfg.out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.config.in_features:
            raise ValueError(
                f"MLP: expected (..., {self.config.in_features}); got {tuple(x.shape)}"
            )
        return self.net(x)
