"""Small building blocks: RMSNorm, rotary position embedding, SwiGLU MLP.

Legend: B batch, S sequence, D model dim, H heads, Dh head dim, F hidden dim.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # one Triton kernel each way (moemesh.kernels.rmsnorm), set from outside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and rmsnorm.supported(x):
            return rmsnorm.rms_norm(x, self.weight, self.eps)
        x_f = x.float()
        out = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, Dh/2] for the half-split (HF Mixtral) rotary convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    seq_len = x_BHSD.shape[-2]
    cos, sin = cos_SD[:seq_len].to(x_BHSD.dtype), sin_SD[:seq_len].to(x_BHSD.dtype)
    x1, x2 = x_BHSD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), Mixtral's expert and dense MLP. Under TP w1/w3 are column shards and w2 a
    row shard, so the output is a partial sum that the parallel wrapper reduces."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = silu_mul  # swappable from outside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x), self.w3(x)))
