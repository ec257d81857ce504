"""Training FLOPs per token, the numerator of MFU.

6 x active matmul parameters (forward 2, backward 4; the embedding lookup is not a matmul; each expert
counts top_k / num_experts of the time) plus attention scores and values, 12 * L * S * D for the full
S x S product, half of it with causal masking (what flash/SDPA kernels compute). Activation
checkpointing's recomputation is not counted: MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

from dataclasses import dataclass

from moemesh.config import Config


@dataclass(frozen=True)
class Flops:
    params_total: int
    params_active_matmul: int
    per_token: int  # causal attention
    per_token_noncausal: int


def flops_per_token(cfg: Config) -> Flops:
    from moemesh.plan.memory import meta_model

    m = cfg.model
    model = meta_model(m)
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name.startswith("tok_embeddings") or p.ndim < 2:
            continue  # a lookup, norms
        active += p.numel() * m.top_k // m.num_experts if ".experts." in name else p.numel()
    attention = 12 * m.n_layers * cfg.train.seq_len * m.dim
    return Flops(total, active, 6 * active + attention // 2, 6 * active + attention)
