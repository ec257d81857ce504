"""parallelize(model, mesh): applies tensor, expert and data parallelism to a single-device model."""

from __future__ import annotations

from torch import nn

from moemesh.config import ParallelConfig
from moemesh.parallel.mesh import Mesh


def parallelize(model: nn.Module, mesh: Mesh | None, cfg: ParallelConfig) -> nn.Module:
    if mesh is None:
        return model
    raise NotImplementedError("distributed layouts land with the mesh issue")
