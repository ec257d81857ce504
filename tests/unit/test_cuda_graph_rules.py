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


@pytest.mark.parametrize("overrides, device, layout, fused, capability, reason", [
    ([], "cuda", None, True, H200, None),
    ([], "cpu", None, True, None, "the device is 'cpu' (train.device='cuda'), not a CUDA GPU"),
    ([], "cuda", (2, 1, 1), True, H200, None),  # a mesh's collectives are captured with its step
    ([], "cuda", (1, 1, 2), True, H200, None),
    ([], "cuda", (1, 1, 1), True, H200, None),  # torchrun with one process
    ([], "cuda", (1, 2, 1), True, H200, "parallel.ep=2: the expert all-to-all needs its split sizes on the host"),
    ([], "cuda", (2, 2, 2), True, H200, "parallel.ep=2"),
    (["parallel.check_collectives=true"], "cuda", (2, 1, 1), True, H200, "parallel.check_collectives=true"),
    (["parallel.check_collectives=true"], "cuda", (1, 1, 1), True, H200, "parallel.check_collectives=true"),
    (["parallel.check_collectives=true"], "cuda", None, True, H200, None),  # nothing to check on one GPU
    (["model.dispatch=capacity"], "cuda", None, True, H200, "model.dispatch='capacity'"),
    ([], "cuda", None, True, (8, 0), "cannot use torch._grouped_mm"),  # A100: the per-expert loop syncs
    ([], "cuda", (2, 1, 1), True, (8, 0), "cannot use torch._grouped_mm"),
    ([], "cuda", (2, 1, 1), True, None, None),  # a launcher does not know its ranks' GPUs: they check
    (["model.ffn_dim=1004"], "cuda", None, True, H200, "model.ffn_dim=1004 must be multiples of 8"),
    ([], "cuda", None, False, H200, "not the one-pass master step"),
    (["train.compile=true"], "cuda", None, True, H200, "train.compile=true"),
])
def test_what_keeps_a_step_from_being_a_graph(overrides, device, layout, fused, capability, reason):
    got = unsupported(load_config("gpu", overrides), device, layout, fused, capability)
    assert got == reason if reason is None else reason in got


def test_auto_captures_where_it_can_and_on_says_why_it_cannot(monkeypatch):
    probed = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: probed.append(device) or H200)
    assert wanted(load_config("gpu"), CUDA, None, True)
    assert not wanted(load_config("gpu", ["train.cuda_graph=off"]), CUDA, None, True)
    assert not wanted(load_config("gpu", ["model.dispatch=capacity"]), CUDA, None, True)
    assert not wanted(load_config("gpu"), CUDA, (2, 1, 1), True)  # 'auto' leaves a mesh op by op (MESH_AUTO)
    assert wanted(load_config("gpu", ["train.cuda_graph=on"]), CUDA, (2, 1, 1), True)
    assert not wanted(load_config("gpu"), CUDA, (1, 2, 1), True)
    with pytest.raises(UserError, match=r"train.cuda_graph='on' cannot capture .*: model.dispatch='capacity'"):
        wanted(load_config("gpu", ["model.dispatch=capacity", "train.cuda_graph=on"]), CUDA, None, True)
    with pytest.raises(UserError, match=r"cannot capture this run's step: parallel.ep=2: the expert all-to-all"):
        wanted(load_config("gpu", ["train.cuda_graph=on"]), CUDA, (1, 2, 1), True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not wanted(load_config("gpu"), CUDA, None, True)
    with pytest.raises(UserError, match="cannot use torch._grouped_mm"):
        wanted(load_config("gpu", ["train.cuda_graph=on"]), CUDA, (2, 1, 1), True)
    # a launcher's preflight (on_rank=False) leaves the GPU alone: its ranks check their own capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: pytest.fail("GPU touched"))
    assert wanted(load_config("gpu", ["train.cuda_graph=on"]), CUDA, (2, 1, 1), True, on_rank=False)


ON = ["train.cuda_graph=on"]


@pytest.mark.parametrize("overrides, layout, expected", [
    ([], (1, 1, 1), True), ([], (2, 1, 1), False), ([], (1, 1, 2), False),  # 'auto': one GPU (MESH_AUTO)
    (ON, (2, 1, 1), True), (ON, (1, 1, 2), True), (ON, (2, 1, 4), True),
    (ON, (1, 2, 1), False), (ON, (2, 2, 2), False), ([*ON, "parallel.check_collectives=true"], (2, 1, 1), False),
    (["parallel.check_collectives=true"], (1, 1, 1), True),
    (["train.cuda_graph=off"], (1, 1, 1), False), (["train.cuda_graph=off"], (2, 1, 1), False),
    (["train.param_dtype=float32"], (1, 1, 1), False),
    (["train.dtype=float32"], (1, 1, 1), False), (["train.fused_master_step=false"], (1, 1, 1), False),
    (["model.dispatch=capacity"], (1, 1, 1), False),
    (["model.dim=1020", "model.n_heads=6", "model.n_kv_heads=2"], (1, 1, 1), False),
])
def test_the_planner_knows_which_steps_are_graphs(overrides, layout, expected):
    assert planned(load_config("gpu", overrides), layout, H200) == expected
    assert not planned(load_config("gpu", overrides), layout, GPUS["a100"].capability)


def test_a_graphed_step_prices_the_graphs_idle_time_and_an_op_by_op_mesh_its_host():
    cfg = load_config("gpu")
    layers, c = cfg.model.n_layers, H200_CONSTANTS
    graph_idle = (layers * c.graph_idle_layer_ms + c.graph_idle_step_ms) * 1e-3
    (one,) = [p for p in enumerate_plans(cfg, 1, 8, GPUS["h200"], c) if p.recompute == "none"]
    assert one.graphed and one.terms["idle"] == pytest.approx(graph_idle)
    (eager,) = [p for p in enumerate_plans(load_config("gpu", ["train.cuda_graph=off"]), 1, 8, GPUS["h200"], c)
                if p.recompute == "none"]
    assert eager.terms["idle"] == pytest.approx((layers * c.idle_layer_ms + c.idle_step_ms) * 1e-3)

    def mesh_host(p):
        return 1e-3 * (layers * (c.mesh_host_layer_ms + c.mesh_host_tp_layer_ms * (p.tp > 1)
                                 + c.mesh_host_sync_layer_ms * (p.dp * p.ep > 1) + c.mesh_host_ep_moe_ms * (p.ep > 1))
                       + c.mesh_host_step_ms)  # every layer of the preset is an MoE layer

    every = {(2, 1, 1), (1, 2, 1), (1, 1, 2)}
    for overrides, op_by_op in ((ON, {(1, 2, 1)}), ([], every), (["train.cuda_graph=off"], every)):
        two = [p for p in enumerate_plans(load_config("gpu", overrides), 2, 8, GPUS["h200"], c)
               if p.recompute == "none"]
        assert {(p.dp, p.ep, p.tp) for p in two} == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}
        for p in two:
            device = sum(v for k, v in p.terms.items() if k != "idle")
            if (p.dp, p.ep, p.tp) not in op_by_op:  # one graph, collectives inside: the graph's idle time
                assert p.graphed and p.terms["idle"] == pytest.approx(graph_idle), (p.dp, p.ep, p.tp)
                continue
            step = (device ** c.mesh_overlap_p + mesh_host(p) ** c.mesh_overlap_p) ** (1 / c.mesh_overlap_p)
            assert not p.graphed and p.terms["idle"] == pytest.approx(step - device), (p.dp, p.ep, p.tp)
            assert max(device, mesh_host(p)) < p.step_s < device + mesh_host(p)


def test_the_planner_does_not_import_the_training_loop():
    """`moemesh plan` must answer in < 2 s: the loop's imports (torch.distributed.checkpoint, ~0.6 s) stay out."""
    import subprocess
    import sys

    code = ("import sys; from moemesh.config import load_config; from moemesh.plan.cost import GPUS, H200_CONSTANTS; "
            "from moemesh.plan.search import enumerate_plans; "
            "enumerate_plans(load_config('gpu'), 1, 8, GPUS['h200'], H200_CONSTANTS); "
            "assert 'moemesh.train.loop' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_graphed_mesh_steps_results_are_watched_like_a_collective():
    """A replayed graph's collectives run out of the watchdog's sight: where the loop reads a graphed mesh
    step's results, the rank is marked as waiting, as in a collective of the whole world (same text on
    every rank, so a report can say which peers are in it)."""
    from types import SimpleNamespace

    from moemesh.parallel.comm import CollectiveTrace
    from moemesh.train.loop import Trainer

    trace = CollectiveTrace()
    graphed_mesh = SimpleNamespace(graph=object(), mesh=SimpleNamespace(world_size=2, trace=trace))
    with Trainer.reading(graphed_mesh, "step 7's results"):
        _, what, ranks = trace.waiting
        assert what.startswith("reading step 7's results") and "CUDA graph" in what and ranks == [0, 1]
        assert trace.position().endswith(f"in collective {what}")
    assert trace.waiting is None
    one_rank = SimpleNamespace(world_size=1, trace=trace)
    for graph, mesh in ((None, graphed_mesh.mesh), (object(), None), (object(), one_rank)):
        with Trainer.reading(SimpleNamespace(graph=graph, mesh=mesh), "step 7's results"):
            assert trace.waiting is None  # eager steps wait in their own collectives; one rank waits for no one
