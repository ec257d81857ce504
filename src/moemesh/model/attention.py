"""Causal grouped-query self-attention with rotary embedding (Mixtral layout: wq, wk, wv, wo).

`n_heads` / `n_kv_heads` are the counts this module holds: tensor parallelism shards the projections
by heads and lowers them; the forward is the same code either way.
Legend: B batch, S sequence, D model dim, H heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels.rotary import rotary
from moemesh.model.layers import apply_rotary


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.fused_rotary = False  # rotary on [B, S, H, Dh] in one Triton kernel each way, set from outside

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHD = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k_BSGD = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v_BGSD = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.fused_rotary:
            q_BHSD, k_BGSD = rotary(q_BSHD, cos, sin).transpose(1, 2), rotary(k_BSGD, cos, sin).transpose(1, 2)
        else:
            q_BHSD = apply_rotary(q_BSHD.transpose(1, 2), cos, sin)
            k_BGSD = apply_rotary(k_BSGD.transpose(1, 2), cos, sin)
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BGSD, v_BGSD, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out_BHSD.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
