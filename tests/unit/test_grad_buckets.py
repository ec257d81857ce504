"""Gradient buckets without process groups: which group each gradient is summed over (the same sums as
`sync_gradients`), and how parameters are packed into buckets and ordered."""

from __future__ import annotations

import pytest
import torch

from moemesh.config import load_config
from moemesh.model.transformer import Transformer
from moemesh.parallel.grad_buckets import plan_buckets, reduction_group
from moemesh.parallel.layout import build_layout


def _model() -> Transformer:
    cfg = load_config("tiny", ["model.num_shared_experts=1", "model.num_dense_layers=1", "model.n_layers=3"])
    with torch.device("meta"):
        return Transformer(cfg.model)


@pytest.mark.parametrize("layout, norm, dense, expert", [
    ((2, 2, 2), "world", "data_expert", "data"),  # SP norm: summed over model, then over data x expert
    ((1, 2, 2), "world", "data_expert", None),  # experts at dp=1: only scaled by 1/ep
    ((2, 1, 2), "world", "data_expert", "data"),
    ((1, 1, 2), "model", None, None),
    ((2, 2, 1), "data_expert", "data_expert", "data"),  # no tp: norms are plain dense weights
    ((1, 4, 1), "data_expert", "data_expert", None),
])
def test_reduction_group_follows_the_placement_table(layout, norm, dense, expert):
    dp, ep, tp = layout
    table = build_layout(_model(), dp, ep, tp, sequence_parallel=tp > 1)
    assert reduction_group(table.params["layers.1.ffn_norm.weight"], table) == norm
    assert reduction_group(table.params["layers.1.attention.wq.weight"], table) == dense
    assert reduction_group(table.params["layers.1.ffn.experts.w1_EDF"], table) == expert


def test_buckets_hold_every_parameter_once_in_backward_order():
    model = _model()
    table = build_layout(model, 2, 2, 2, sequence_parallel=True)
    names = [n for n, _ in model.named_parameters()]
    numels = {n: p.numel() for n, p in model.named_parameters()}
    limit = 40 * 1024
    buckets, scale_only = plan_buckets(table, names, numels, limit)
    assert scale_only == []
    packed = [n for b in buckets for n in b.names]
    assert sorted(packed) == sorted(names)
    for bucket in buckets:
        assert {reduction_group(table.params[n], table) for n in bucket.names} == {bucket.group}
        # full only when the last parameter crossed the limit: without it, the bucket was below it
        assert (bucket.numel - bucket.numels[-1]) * 4 < limit
    # The output layer is the first gradient of backward, the embedding the last.
    assert buckets[0].names[0] == "output.weight" or "output.weight" in buckets[0].names
    assert "tok_embeddings.weight" in buckets[-1].names or buckets[-1].group == "world"
    assert len(buckets) > 3


def test_experts_at_dp1_need_no_bucket():
    model = _model()
    table = build_layout(model, 1, 2, 1, sequence_parallel=False)
    names = [n for n, _ in model.named_parameters()]
    buckets, scale_only = plan_buckets(table, names, {n: p.numel() for n, p in model.named_parameters()}, 2**20)
    assert set(scale_only) == {n for n in names if table.params[n].expert}
    assert {b.group for b in buckets} == {"data_expert"}
