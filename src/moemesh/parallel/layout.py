"""The placement table: how every parameter of the single-process model lies on the mesh.

One `Placement` per single-process parameter name says which mesh axes shard which tensor dim, whether
it is an expert weight, and over which axes each rank's gradient is only a partial sum. Everything that
needs to know how a tensor is split reads this table: sharding at `parallelize` time, gradient sync and
clipping (`grads.py`), gathering and re-sharding full state dicts, checkpoints (DCP placements), the
memory estimate. The table is a pure function of the model's parameter shapes and the layout, so it can
be built without any process group (e.g. from a model on the meta device).

Rules (Megatron-style TP on `model`, experts split over `expert`, everything else replicated):
  attention wq/wk/wv      rows (heads) over model        wo       columns over model
  dense / shared SwiGLU   w1, w3 rows over model         w2       columns over model
  routed experts          w1_EDF, w3_EDF: F over model, E over expert; w2_EFD: F over model, E over expert
  tok_embeddings, output  vocab rows over model
  norms, router gate      replicated; with sequence parallelism a norm's gradient is partial over model
Dense gradients are averaged over data x expert; expert gradients are summed over data (each expert's
gradient already holds the contributions of its whole expert group) and scaled by 1 / (dp * ep).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch import nn

AXES = ("data", "expert", "model")


@dataclass(frozen=True)
class Placement:
    full_shape: tuple[int, ...]
    shards: tuple[tuple[str, int], ...] = ()  # (axis, tensor dim), in the order they are applied
    expert: bool = False  # a routed-expert weight (gradient summed over data, not data x expert)
    partial_over: tuple[str, ...] = ()  # axes over which each rank's gradient is a partial sum

    def dim_of(self, axis: str) -> int | None:
        return next((dim for name, dim in self.shards if name == axis), None)


@dataclass(frozen=True)
class Layout:
    dp: int
    ep: int
    tp: int
    params: dict[str, Placement] = field(default_factory=dict)

    def size(self, axis: str) -> int:
        return {"data": self.dp, "expert": self.ep, "model": self.tp}[axis]

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp

    def local_shape(self, name: str) -> tuple[int, ...]:
        placement = self.params[name]
        shape = list(placement.full_shape)
        for axis, dim in placement.shards:
            shape[dim] //= self.size(axis)
        return tuple(shape)

    def replicas(self, name: str) -> int:
        """How many ranks hold an identical copy of each element of this parameter."""
        return self.world_size // math.prod(self.size(axis) for axis, _ in self.params[name].shards)

    def local_slice(self, name: str, full: torch.Tensor, coords) -> torch.Tensor:
        """This rank's part of a full tensor (`coords` has .data/.expert/.model): the inverse of gathering."""
        assert tuple(full.shape) == self.params[name].full_shape, (name, tuple(full.shape))
        part = full
        for axis, dim in self.params[name].shards:
            part = part.chunk(self.size(axis), dim=dim)[getattr(coords, axis)]
        return part

    def shard_state(self, full_state: dict[str, torch.Tensor], coords) -> dict[str, torch.Tensor]:
        """Shard a full (single-process) state dict onto this layout; unknown names (buffers) pass whole."""
        return {name: self.local_slice(name, t, coords).clone() if name in self.params else t.clone()
                for name, t in full_state.items()}

    def dtensor_placements(self, name: str) -> tuple:
        """Placements along ('data', 'expert', 'model') for DTensor.from_local (checkpoints)."""
        from torch.distributed.tensor import Replicate, Shard

        placement = self.params[name]
        return tuple(Replicate() if (dim := placement.dim_of(axis)) is None else Shard(dim) for axis in AXES)

    def to_json(self) -> str:
        return json.dumps({"dp": self.dp, "ep": self.ep, "tp": self.tp, "params": {
            name: {"full_shape": list(p.full_shape), "shards": [list(s) for s in p.shards], "expert": p.expert,
                   "partial_over": list(p.partial_over)} for name, p in self.params.items()}}, indent=1)


def build_layout(model: nn.Module, dp: int, ep: int, tp: int, sequence_parallel: bool) -> Layout:
    """The table for a single-process model (any device, meta included) at layout (dp, ep, tp)."""
    from moemesh.model.attention import Attention
    from moemesh.model.layers import RMSNorm, SwiGLU
    from moemesh.model.moe import GroupedExperts

    model_axis = (("model",) if tp > 1 else ())
    rules: dict[str, tuple[tuple[tuple[str, int], ...], bool, tuple[str, ...]]] = {}

    def over(axis: str, dim: int, size: int) -> tuple[tuple[str, int], ...]:
        return ((axis, dim),) if size > 1 else ()

    for prefix, module in model.named_modules():
        at = f"{prefix}." if prefix else ""
        if isinstance(module, Attention):
            for proj in ("wq", "wk", "wv"):
                rules[f"{at}{proj}.weight"] = (over("model", 0, tp), False, ())
            rules[f"{at}wo.weight"] = (over("model", 1, tp), False, ())
        elif isinstance(module, SwiGLU):
            rules[f"{at}w1.weight"] = rules[f"{at}w3.weight"] = (over("model", 0, tp), False, ())
            rules[f"{at}w2.weight"] = (over("model", 1, tp), False, ())
        elif isinstance(module, GroupedExperts):
            for weight, hidden_dim in (("w1_EDF", 2), ("w3_EDF", 2), ("w2_EFD", 1)):
                rules[f"{at}{weight}"] = (over("model", hidden_dim, tp) + over("expert", 0, ep), True, ())
        elif isinstance(module, RMSNorm) and sequence_parallel:
            rules[f"{at}weight"] = ((), False, model_axis)
    for name in ("tok_embeddings.weight", "output.weight"):
        rules[name] = (over("model", 0, tp), False, ())
    params = {}
    for name, param in model.named_parameters():
        shards, expert, partial = rules.get(name, ((), False, ()))
        params[name] = Placement(tuple(param.shape), shards, expert, partial)
    return Layout(dp, ep, tp, params)
