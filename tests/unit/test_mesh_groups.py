"""Scale by simulation: the real `Mesh` built on torch's fake process group (no processes), every group
checked against the mesh invariants; and the checker itself rejects a broken mesh."""

from __future__ import annotations

import copy

import pytest

from moemesh.plan.groups import build_groups, check_invariants


@pytest.mark.parametrize("dp, ep, tp", [(1, 1, 1), (2, 2, 2), (4, 1, 2), (1, 8, 1), (3, 2, 4), (2, 4, 8)])
def test_every_rank_of_small_worlds(dp, ep, tp):
    groups = build_groups(dp, ep, tp)
    assert len(groups.per_rank) == dp * ep * tp
    assert check_invariants(groups) == []
    # groups collected from every rank's own view partition the world too (not only the global tensor)
    for axis, size in (("data", dp), ("expert", ep), ("model", tp), ("data_expert", dp * ep)):
        seen = sorted(r for g in groups.groups(axis) for r in g)
        assert seen == list(range(dp * ep * tp)) and all(len(g) == size for g in groups.groups(axis))


def test_design_doc_example():
    groups = build_groups(2, 2, 2)
    assert groups.groups("model") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups.groups("expert") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups.groups("data") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups.groups("data_expert") == [(0, 2, 4, 6), (1, 3, 5, 7)]


@pytest.mark.parametrize("dp, ep, tp", [(64, 8, 8), (16, 256, 1), (512, 1, 8)])
def test_4096_ranks_sampled(dp, ep, tp):
    """4096 ranks: the global tensor's groups are checked whole; the real per-rank groups on a sample
    that includes the first and last rank and a rank in the middle of every axis."""
    world = dp * ep * tp
    sample = sorted({0, world - 1, world // 2 + tp // 2, *range(7, world, world // 5)})
    groups = build_groups(dp, ep, tp, ranks=sample)
    assert check_invariants(groups) == []


def test_checker_finds_a_wrong_group():
    groups = build_groups(2, 2, 2)
    broken = copy.deepcopy(groups)
    broken.per_rank[3]["expert"] = (2, 3)  # the model group's ranks, not rank 3's expert group {1, 3}
    assert any("rank 3: expert group" in p for p in check_invariants(broken))
    broken = copy.deepcopy(groups)
    broken.mesh_tensor[1][0] = [5, 4]  # two ranks swapped in the global tensor: coordinates mismatch
    assert check_invariants(broken)
