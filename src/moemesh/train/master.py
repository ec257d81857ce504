"""bf16 parameters with fp32 master weights (GPU training in bf16).

The model computes with bf16 parameters, so autocast casts no weight in the forward or backward pass and
activations between blocks are bf16 (as with Megatron-Core's bf16 training or torchtitan's FSDP mixed
precision). The optimizer owns fp32 copies: each step the bf16 gradients become the masters' fp32
gradients, gradient sync, clipping and AdamW run in fp32 on the masters, and the updated masters are
cast back into the bf16 parameters. Checkpoints store the fp32 masters, so nothing is lost to rounding
across a resume, and a checkpoint loads the same way whatever the parameter dtype of the run.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class MasterWeights:
    """Duck-types the parts of nn.Module that the optimizer, `grads.py` and checkpoints read."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self._named = [(name, p) for name, p in model.named_parameters()]
        self._masters = [nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad) for _, p in self._named]
        # each master -> the bf16 parameter the model computes with (the one-pass step writes both)
        self.model_params = {master: p for (_, p), master in zip(self._named, self._masters)}
        with torch.no_grad():
            for _, p in self._named:  # parameters only: buffers (the routers' bias, rotary tables) stay fp32
                p.data = p.data.to(dtype)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter([(name, master) for (name, _), master in zip(self._named, self._masters)])

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._masters)

    def grads(self, on_masters: bool) -> dict[torch.Tensor, torch.Tensor]:
        """Each master -> its gradient: the fp32 master gradient, or the model's bf16 one."""
        pairs = zip(self._named, self._masters)
        if on_masters:
            return {master: master.grad for _, master in pairs if master.grad is not None}
        return {master: p.grad for (_, p), master in pairs if p.grad is not None}

    def grads_to_masters(self) -> None:
        for (_, p), master in zip(self._named, self._masters):
            if p.grad is not None:
                master.grad = p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        torch._foreach_copy_([p for _, p in self._named], self._masters)
