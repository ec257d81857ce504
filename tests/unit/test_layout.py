"""The placement table, without process groups: which parameter is split how, and that slicing a full
tensor at every coordinate of a layout tiles it exactly (the inverse of gathering)."""

from __future__ import annotations

import itertools

import pytest
import torch

from moemesh.config import load_config
from moemesh.model.transformer import Transformer
from moemesh.parallel.layout import build_layout
from moemesh.parallel.mesh import Coordinates


def _model(*overrides: str) -> Transformer:
    cfg = load_config("tiny", ["model.num_shared_experts=1", "model.num_dense_layers=1", "model.n_layers=3",
                               *overrides])
    with torch.device("meta"):
        return Transformer(cfg.model)


def test_rules_name_every_kind_of_parameter():
    layout = build_layout(_model(), dp=2, ep=2, tp=2, sequence_parallel=True)
    p = layout.params
    assert p["layers.0.attention.wq.weight"].shards == (("model", 0),)
    assert p["layers.0.attention.wo.weight"].shards == (("model", 1),)
    assert p["layers.0.ffn.w2.weight"].shards == (("model", 1),)  # the dense first layer
    assert p["layers.1.ffn.shared.w1.weight"].shards == (("model", 0),)
    assert p["layers.1.ffn.experts.w1_EDF"].shards == (("model", 2), ("expert", 0))
    assert p["layers.1.ffn.experts.w2_EFD"].shards == (("model", 1), ("expert", 0))
    assert p["layers.1.ffn.experts.w2_EFD"].expert and not p["layers.1.ffn.shared.w2.weight"].expert
    assert p["tok_embeddings.weight"].shards == p["output.weight"].shards == (("model", 0),)
    assert p["layers.1.ffn.router.gate.weight"].shards == ()
    assert p["layers.2.ffn_norm.weight"].partial_over == ("model",) and p["norm.weight"].partial_over == ("model",)
    assert layout.replicas("layers.1.ffn.experts.w1_EDF") == 2  # replicated over data only
    assert layout.replicas("norm.weight") == 8
    assert layout.local_shape("layers.1.ffn.experts.w1_EDF") == (2, 64, 64)
    no_sp = build_layout(_model(), dp=2, ep=2, tp=2, sequence_parallel=False)
    assert no_sp.params["norm.weight"].partial_over == ()
    single = build_layout(_model(), 1, 1, 1, False)
    assert all(not pl.shards and not pl.partial_over for pl in single.params.values())


@pytest.mark.parametrize("dp, ep, tp", [(2, 2, 2), (1, 4, 2), (4, 1, 2), (1, 2, 1), (2, 1, 1)])
def test_local_slices_tile_every_full_tensor(dp, ep, tp):
    model = _model("model.num_experts=8")
    layout = build_layout(model, dp, ep, tp, sequence_parallel=False)
    for name, placement in layout.params.items():
        full = torch.arange(torch.Size(placement.full_shape).numel(), dtype=torch.float32).view(placement.full_shape)
        covered = torch.zeros_like(full)
        for d, e, t in itertools.product(range(dp), range(ep), range(tp)):
            coords = Coordinates(d, e, t)
            part = layout.local_slice(name, full, coords)
            assert tuple(part.shape) == layout.local_shape(name)
            covered += torch.isin(full, part).float()
        # every element is held by exactly `replicas` ranks
        assert torch.equal(covered, torch.full_like(full, layout.replicas(name))), name
