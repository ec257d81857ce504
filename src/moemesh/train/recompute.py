"""Activation checkpointing, applied from outside the model: the chosen modules keep only their inputs
in the forward pass and run again in the backward pass (`torch.utils.checkpoint`, non-reentrant).

"moe" recomputes each MoE feed-forward (its gathered rows and expert hidden activations are most of a
layer's memory); "full" recomputes each whole block. The instance's `forward` is wrapped, so parameter
names, the placement table and the hooks of tensor parallelism (which run outside `forward`) stay as
they are; collectives inside a recomputed module (the expert all-to-alls, the statistics all-reduce)
run again in the backward pass, on every rank alike. The model draws no random numbers, so the RNG
state is not saved for the recomputation (which also keeps a step capturable as a CUDA graph).
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from moemesh.model.moe import MoE
from moemesh.model.transformer import Transformer


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    if mode == "none":
        return
    modules = [block.ffn for block in model.layers if isinstance(block.ffn, MoE)] if mode == "moe" else list(model.layers)
    for module in modules:
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False,
                                           preserve_rng_state=False)
