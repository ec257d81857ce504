"""Decoder-only Mixtral-style MoE transformer: single-device PyTorch, no process groups inside.

Parallelism is applied from outside (`moemesh.parallel.apply.parallelize`) by sharding parameters,
hooking module inputs/outputs and swapping `MoE.dispatcher` and `Transformer.lm_loss`.
Legend: B batch, S sequence, D model dim, V vocab, T tokens (B*S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.config import ModelConfig
from moemesh.model.attention import Attention
from moemesh.model.layers import RMSNorm, SwiGLU, rotary_tables
from moemesh.model.moe import MoE


@dataclass
class ModelOutput:
    loss: torch.Tensor  # lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
    lm_loss: torch.Tensor  # mean next-token cross-entropy (nats)
    aux_loss: torch.Tensor  # mean over MoE layers of the load-balancing loss
    z_loss: torch.Tensor  # mean over MoE layers of the router z-loss


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: MoE | SwiGLU
        if moe:
            self.ffn = MoE(dim=cfg.dim, num_experts=cfg.num_experts, top_k=cfg.top_k, ffn_dim=cfg.ffn_dim,
                           router=cfg.router, renormalize=cfg.renormalize,
                           num_shared_experts=cfg.num_shared_experts, dispatch=cfg.dispatch,
                           capacity_factor=cfg.capacity_factor)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.dense_ffn_dim)

    def forward(self, x_BSD, cos, sin):
        x_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), cos, sin)
        if isinstance(self.ffn, MoE):
            y_BSD, aux_loss, z_loss = self.ffn(self.ffn_norm(x_BSD))
            return x_BSD + y_BSD, aux_loss, z_loss
        return x_BSD + self.ffn(self.ffn_norm(x_BSD)), None, None


def cross_entropy(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_TV.float(), targets_T)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.num_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) everywhere, output projections of residual branches scaled by 1/sqrt(2 L)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight", "w2_EFD")):
                param.normal_(0.0, residual_std)
            else:
                param.normal_(0.0, std)

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> ModelOutput:
        h_BSD = self.tok_embeddings(tokens_BS)
        aux_losses, z_losses = [], []
        for block in self.layers:
            h_BSD, aux_loss, z_loss = block(h_BSD, self.rope_cos, self.rope_sin)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
                z_losses.append(z_loss)
        logits_BSV = self.output(self.norm(h_BSD))
        lm_loss = self.lm_loss(logits_BSV.flatten(0, 1), targets_BS.flatten())
        zero = lm_loss.new_zeros(())
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else zero
        z_loss = torch.stack(z_losses).mean() if z_losses else zero
        loss = lm_loss + self.cfg.aux_loss_coef * aux_loss + self.cfg.z_loss_coef * z_loss
        return ModelOutput(loss, lm_loss, aux_loss, z_loss)
