"""The memory estimate reads the placement table: its parameter, gradient and optimizer bytes per rank
equal what the sharded model really holds, at every layout of the parity matrix."""

from __future__ import annotations

import pytest
import torch

from moemesh.config import load_config
from moemesh.model.transformer import Transformer
from moemesh.parallel.layout import build_layout
from moemesh.parallel.mesh import Coordinates
from moemesh.plan.memory import estimate, meta_model, param_counts

LAYOUTS = [(1, 1, 2), (1, 2, 1), (2, 1, 1), (1, 1, 4), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2),
           (4, 1, 2)]


@pytest.mark.parametrize("dp, ep, tp", LAYOUTS)
def test_state_bytes_equal_real_shards(dp, ep, tp):
    cfg = load_config("tiny", ["model.n_kv_heads=4", "model.num_shared_experts=1", f"parallel.dp={dp}",
                               f"parallel.ep={ep}", f"parallel.tp={tp}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    layout = build_layout(model, dp, ep, tp, False)
    full = {name: p.detach() for name, p in model.named_parameters()}
    est = estimate(cfg, "cpu")
    for coords in (Coordinates(0, 0, 0), Coordinates(dp - 1, ep - 1, tp - 1)):
        real = sum(t.numel() * t.element_size() for t in layout.shard_state(full, coords).values())
        assert est.params == est.grads == real
        assert est.optimizer == 2 * real  # AdamW: two fp32 moments per element
    assert est.full_model == sum(t.numel() * 4 for t in full.values())


def test_overlapped_gradient_buckets_are_fp32_all_step():
    """bf16 parameters: backward holds bf16 gradients, unless gradient buckets (fp32, alive the whole step)
    take them in; one rank has no buckets."""
    def est(*overrides):
        return estimate(load_config("tiny", ["train.param_dtype=bfloat16", *overrides]), "cpu")
    with_buckets, without = est("parallel.dp=2"), est("parallel.dp=2", "parallel.overlap_grad_reduce=false")
    assert with_buckets.buckets == with_buckets.grads and not without.buckets  # dp=2: every gradient
    assert with_buckets.grads == 2 * without.grads == without.master_grads  # fp32; the masters' are views
    assert with_buckets.master_grads == 0
    assert with_buckets.allocated == (with_buckets.params + with_buckets.optimizer + with_buckets.grads
                                      + with_buckets.activations + with_buckets.a2a_buffers)
    assert est().grads == without.grads and not est().buckets
    # Only gradients that need a collective are bucketed: at ep=2 (dp=1) the dense ones, not the experts'
    # (they are only scaled); tensor parallelism without sequence parallelism reduces none.
    ep2 = est("parallel.ep=2")
    counts = param_counts(build_layout(meta_model(load_config("tiny").model), 1, 2, 1, False))
    assert ep2.buckets == 4 * counts.dense_grad and ep2.master_grads == 4 * counts.expert_local
    assert ep2.grads == 4 * counts.dense_grad + 2 * counts.expert_local
    assert est("parallel.tp=2").buckets == 0
