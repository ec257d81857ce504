"""Which runs capture their step as one CUDA graph (train/cuda_graph.py), decided in one place that the
Trainer, preflight and the planner all read. The capture itself needs a GPU: tests/gpu/test_cuda_graph.py."""

from __future__ import annotations

import pytest
import torch

from moemesh.config import load_config
from moemesh.errors import UserError
from moemesh.plan.cost import GPUS, H200_CONSTANTS
from moemesh.plan.search import enumerate_plans
from moemesh.train.cuda_graph import planned, unsupported, wanted

CUDA = torch.device("cuda")  # a device object needs no GPU


H200 = (9, 0)


@pytest.mark.parametrize("overrides, device, ranks, fused, capability, reason", [
    ([], "cuda", None, True, H200, None),
    ([], "cpu", None, True, None, "train.device is 'cpu'"),
    ([], "cuda", 2, True, H200, "a mesh of 2 rank(s)"),
    ([], "cuda", 1, True, H200, "a mesh of 1 rank(s)"),  # torchrun with one process
    (["model.dispatch=capacity"], "cuda", None, True, H200, "model.dispatch='capacity'"),
    ([], "cuda", None, True, (8, 0), "cannot use torch._grouped_mm"),  # A100: the per-expert loop syncs
    (["model.ffn_dim=1004"], "cuda", None, True, H200, "model.ffn_dim=1004 must be multiples of 8"),
    ([], "cuda", None, False, H200, "not the one-pass master step"),
    (["train.compile=true"], "cuda", None, True, H200, "train.compile=true"),
])
def test_what_keeps_a_step_from_being_a_graph(overrides, device, ranks, fused, capability, reason):
    got = unsupported(load_config("gpu", overrides), device, ranks, fused, capability)
    assert got == reason if reason is None else reason in got


def test_auto_captures_where_it_can_and_on_says_why_it_cannot(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: H200)
    assert wanted(load_config("gpu"), CUDA, None, True)
    assert not wanted(load_config("gpu", ["train.cuda_graph=off"]), CUDA, None, True)
    assert not wanted(load_config("gpu", ["model.dispatch=capacity"]), CUDA, None, True)
    assert not wanted(load_config("gpu"), CUDA, 2, True)
    with pytest.raises(UserError, match=r"train.cuda_graph='on' cannot capture .*: model.dispatch='capacity'"):
        wanted(load_config("gpu", ["model.dispatch=capacity", "train.cuda_graph=on"]), CUDA, None, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not wanted(load_config("gpu"), CUDA, None, True)


@pytest.mark.parametrize("overrides, world, expected", [
    ([], 1, True), ([], 2, False), (["train.cuda_graph=off"], 1, False), (["train.param_dtype=float32"], 1, False),
    (["train.dtype=float32"], 1, False), (["train.fused_master_step=false"], 1, False),
    (["model.dispatch=capacity"], 1, False), (["model.dim=1020", "model.n_heads=6", "model.n_kv_heads=2"], 1, False),
])
def test_the_planner_knows_which_steps_are_graphs(overrides, world, expected):
    assert planned(load_config("gpu", overrides), world, H200) == expected
    assert not planned(load_config("gpu", overrides), world, GPUS["a100"].capability)


def test_a_single_gpu_plan_prices_the_graphs_idle_time_and_a_mesh_its_host():
    cfg = load_config("gpu")
    layers, c = cfg.model.n_layers, H200_CONSTANTS
    (one,) = [p for p in enumerate_plans(cfg, 1, 8, GPUS["h200"], c) if p.recompute == "none"]
    assert one.terms["idle"] == pytest.approx((layers * c.graph_idle_layer_ms + c.graph_idle_step_ms) * 1e-3)
    (eager,) = [p for p in enumerate_plans(load_config("gpu", ["train.cuda_graph=off"]), 1, 8, GPUS["h200"], c)
                if p.recompute == "none"]
    assert eager.terms["idle"] == pytest.approx((layers * c.idle_layer_ms + c.idle_step_ms) * 1e-3)
    two = [p for p in enumerate_plans(cfg, 2, 8, GPUS["h200"], c) if p.recompute == "none"]
    assert {(p.dp, p.ep, p.tp) for p in two} == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}
    for p in two:
        host = 1e-3 * (layers * (c.mesh_host_layer_ms + c.mesh_host_tp_layer_ms * (p.tp > 1)
                                 + c.mesh_host_sync_layer_ms * (p.dp * p.ep > 1) + c.mesh_host_ep_moe_ms * (p.ep > 1))
                       + c.mesh_host_step_ms)  # every layer of the preset is an MoE layer
        device = sum(v for k, v in p.terms.items() if k != "idle")
        step = (device ** c.mesh_overlap_p + host ** c.mesh_overlap_p) ** (1 / c.mesh_overlap_p)
        assert p.terms["idle"] == pytest.approx(step - device), (p.dp, p.ep, p.tp)
        assert max(device, host) < p.step_s < device + host


def test_the_planner_does_not_import_the_training_loop():
    """`moemesh plan` must answer in < 2 s: the loop's imports (torch.distributed.checkpoint, ~0.6 s) stay out."""
    import subprocess
    import sys

    code = ("import sys; from moemesh.config import load_config; from moemesh.plan.cost import GPUS, H200_CONSTANTS; "
            "from moemesh.plan.search import enumerate_plans; "
            "enumerate_plans(load_config('gpu'), 1, 8, GPUS['h200'], H200_CONSTANTS); "
            "assert 'moemesh.train.loop' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
