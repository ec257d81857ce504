"""The mesh's process groups, built without processes: the real `parallel.mesh.Mesh` on torch's fake
process group (no communication; every collective is a no-op), one rank at a time.

This is what the drawing shows and what the scale test checks, so neither redraws or recomputes the
groups by hand: each rank's groups are whatever `Mesh` (DeviceMesh + `_flatten`) hands that rank.
Building one rank's `Mesh` costs about 0.3 ms per group of the world on 2 CPU cores (torch creates every
group of every axis on every rank), so a 4096-rank world is checked on a sample of ranks against the
mesh's global rank tensor, which all ranks share (`check_invariants`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

AXES = ("data", "expert", "model", "data_expert")


@dataclass
class MeshGroups:
    dp: int
    ep: int
    tp: int
    mesh_tensor: list  # DeviceMesh.mesh as nested lists [dp][ep][tp] of ranks (identical on every rank)
    per_rank: dict[int, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # rank -> axis -> group ranks

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp

    def groups(self, axis: str) -> list[tuple[int, ...]]:
        """The distinct groups of an axis among the built ranks, in order of their first rank."""
        return sorted({g[axis] for g in self.per_rank.values()})


def build_groups(dp: int, ep: int, tp: int, ranks=None) -> MeshGroups:
    """Build `Mesh(dp, ep, tp)` on the fake process group as each of `ranks` (default: every rank)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from moemesh.parallel.mesh import Mesh

    world = dp * ep * tp
    if dist.is_initialized():  # e.g. a caller inside a real run: never replace its process group
        raise RuntimeError("build_groups needs a process without a process group")
    result = MeshGroups(dp, ep, tp, mesh_tensor=[])
    for rank in (range(world) if ranks is None else ranks):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            mesh = Mesh(dp, ep, tp, "cpu")
            if not result.mesh_tensor:
                result.mesh_tensor = mesh.device_mesh.mesh.tolist()
            result.per_rank[rank] = {axis: tuple(mesh.comm(axis).ranks) for axis in AXES}
            result.per_rank[rank]["coords"] = (mesh.coords.data, mesh.coords.expert, mesh.coords.model)
        finally:
            dist.destroy_process_group()
    return result


def axis_groups_from_tensor(mesh_tensor: list, axis: str) -> list[tuple[int, ...]]:
    """Every group of an axis as the slices of the global rank tensor (torch's own definition)."""
    import torch

    t = torch.tensor(mesh_tensor)
    dp, ep, tp = t.shape
    if axis == "data_expert":
        rows = t.reshape(dp * ep, tp).T
    else:
        dim = ("data", "expert", "model").index(axis)
        rows = t.movedim(dim, -1).reshape(-1, t.shape[dim])
    return sorted(tuple(r) for r in rows.tolist())


def check_invariants(groups: MeshGroups) -> list[str]:
    """Every violated invariant, as sentences (empty when the mesh is right):
    - each axis's groups partition the world (every rank in exactly one group of each axis);
    - group sizes are dp, ep, tp and dp*ep;
    - each built rank's real groups are the slices of the global tensor that contain it, it is in them,
      and its members differ from it only in the axis's coordinates (rank = (d*ep + e)*tp + t);
    - data x expert groups are the unions of the data groups of one expert group (same t)."""
    problems: list[str] = []
    world, size = groups.world_size, {"data": groups.dp, "expert": groups.ep, "model": groups.tp,
                                      "data_expert": groups.dp * groups.ep}
    by_axis = {axis: axis_groups_from_tensor(groups.mesh_tensor, axis) for axis in AXES}
    for axis, gs in by_axis.items():
        flat = [r for g in gs for r in g]
        if sorted(flat) != list(range(world)):
            problems.append(f"{axis} groups do not partition the world of {world}")
        if any(len(g) != size[axis] for g in gs):
            problems.append(f"{axis} groups are not all of size {size[axis]}")
    varying = {"data": (0,), "expert": (1,), "model": (2,), "data_expert": (0, 1)}
    for rank, mine in groups.per_rank.items():
        coords = mine["coords"]
        if (coords[0] * groups.ep + coords[1]) * groups.tp + coords[2] != rank:
            problems.append(f"rank {rank} has coordinates {coords}, not those of the rank formula")
        for axis in AXES:
            group = mine[axis]
            expected = next((g for g in by_axis[axis] if rank in g), None)
            if tuple(sorted(group)) != expected:
                problems.append(f"rank {rank}: {axis} group {list(group)} is not the mesh slice {expected}")
            fixed = [i for i in range(3) if i not in varying[axis]]
            for other in group:
                c = _coords(other, groups.ep, groups.tp)
                if any(c[i] != coords[i] for i in fixed):
                    problems.append(f"rank {rank}: {axis} group member {other} differs outside the {axis} axis")
    data_of = {r: g for g in by_axis["data"] for r in g}
    for g in by_axis["data_expert"]:
        union = sorted({r for e_rank in _expert_group_of(g[0], by_axis) for r in data_of[e_rank]})
        if union != sorted(g):
            problems.append(f"data_expert group {list(g)} is not the union of its expert group's data groups")
    return problems


def _coords(rank: int, ep: int, tp: int) -> tuple[int, int, int]:
    return rank // (ep * tp), rank // tp % ep, rank % tp


def _expert_group_of(rank: int, by_axis) -> tuple[int, ...]:
    return next(g for g in by_axis["expert"] if rank in g)
