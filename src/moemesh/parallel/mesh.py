"""The one mesh object: a DeviceMesh ('data', 'expert', 'model') and the process groups cut from it.

Rank order is TP innermost, then EP, then DP: rank = (d * ep + e) * tp + t. With dp=ep=tp=2 the model
(TP) groups are {0,1} {2,3} {4,5} {6,7}, expert groups {0,2} {1,3} {4,6} {5,7}, data groups
{0,4} {1,5} {2,6} {3,7}, and the data x expert groups {0,2,4,6} {1,3,5,7}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moemesh.parallel.comm import AxisComm, CollectiveTrace

AXES = ("data", "expert", "model")


@dataclass(frozen=True)
class Coordinates:
    data: int
    expert: int
    model: int


def coordinates_of(rank: int, ep: int, tp: int) -> Coordinates:
    return Coordinates(rank // (ep * tp), rank // tp % ep, rank % tp)


class Mesh:
    """Owns the DeviceMesh; hands out named groups. Build after `dist.init_process_group`."""

    def __init__(self, dp: int, ep: int, tp: int, device_type: str, check_collectives: bool = False,
                 timeout_s: float = 300.0):
        assert dist.is_initialized() and dist.get_world_size() == dp * ep * tp
        self.dp, self.ep, self.tp = dp, ep, tp
        self.device_mesh: DeviceMesh = init_device_mesh(device_type, (dp, ep, tp), mesh_dim_names=AXES)
        self.rank = dist.get_rank()
        self.coords = coordinates_of(self.rank, ep, tp)
        self.data_group = self.device_mesh.get_group("data")
        self.expert_group = self.device_mesh.get_group("expert")
        self.model_group = self.device_mesh.get_group("model")
        # Keep the flattened mesh object: re-slicing the root would build new groups (ENV_NOTES.md).
        self.data_expert_mesh = self.device_mesh["data", "expert"]._flatten()
        self.data_expert_group = self.data_expert_mesh.get_group()
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        self.trace = CollectiveTrace(check=check_collectives, timeout_s=timeout_s, device=device)
        self.comms = {axis: AxisComm(axis, self.group(axis), self.trace)
                      for axis in ("data", "expert", "model", "data_expert")}
        self.comms["world"] = AxisComm("world", dist.group.WORLD, self.trace)

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp

    @property
    def batch_shard(self) -> int:
        """Which of the dp*ep micro-batches this rank reads (TP ranks share theirs)."""
        return self.coords.data * self.ep + self.coords.expert

    @property
    def num_batch_shards(self) -> int:
        return self.dp * self.ep

    def comm(self, axis: str) -> AxisComm:
        return self.comms[axis]

    def size(self, axis: str) -> int:
        return {"data": self.dp, "expert": self.ep, "model": self.tp, "data_expert": self.dp * self.ep,
                "world": self.world_size}[axis]

    def group(self, axis: str):
        return {"data": self.data_group, "expert": self.expert_group, "model": self.model_group,
                "data_expert": self.data_expert_group}[axis]
