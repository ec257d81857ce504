"""parallel/comm_profile.py: the compute / TP / EP / DP / idle split of a profiled window.

The GPU path is checked on hand-made events shaped like the profiler's (host ops with correlation ids,
device kernels linked to them); the CPU path on a real CPU profile with the ranges comm.py opens."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moemesh.parallel import comm
from moemesh.parallel.comm_profile import Event, from_kineto, split, union_us


def host(name, start, end, corr, thread=1, annotation=False):
    return Event(name, False, start, end, thread, corr, 0, annotation)


def kernel(name, start, end, linked):
    return Event(name, True, start, end, 0, 10_000 + linked, linked, False)


def test_union():
    assert union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert union_us([]) == 0


def test_device_split_attributes_kernels_to_the_axis_of_their_launching_op():
    events = [
        host("aten::mm", 0, 5, corr=1),
        host("moemesh.comm.expert.all_to_all", 10, 20, corr=2, annotation=True),
        host("c10d::alltoall_base_", 11, 19, corr=3),  # inside the range: its kernel is EP
        host("moemesh.comm.data.all_reduce", 30, 40, corr=4, annotation=True),
        host("c10d::allreduce_", 31, 39, corr=5),
        host("moemesh.comm.model.all_reduce", 50, 60, corr=6, annotation=True, thread=2),
        host("c10d::allreduce_", 51, 59, corr=7, thread=2),  # backward thread
        host("c10d::allreduce_", 61, 62, corr=8, thread=1),  # thread 1 has no range there: not TP
        host("moemesh.comm.world.all_reduce", 70, 80, corr=9, annotation=True),  # launches with no op inside
        kernel("sm90_gemm", 100, 200, linked=1),  # compute
        kernel("ncclDevKernel_SendRecv", 150, 250, linked=3),  # EP: 50 us under compute, 50 exposed
        kernel("ncclDevKernel_AllReduce_Sum_f32", 300, 320, linked=5),  # DP, all exposed
        kernel("ncclDevKernel_AllReduce_Sum_bf16", 400, 410, linked=7),  # TP
        kernel("ncclDevKernel_AllReduce_Sum_f32", 420, 425, linked=8),  # no range: unattributed NCCL
        kernel("elementwise_kernel", 430, 440, linked=99),  # unknown op: compute
        kernel("ncclDevKernel_AllReduce_Sum_f32", 450, 452, linked=9),  # linked to the range itself: other
        Event("moemesh.comm.expert.all_to_all", True, 150, 250, 0, 0, 2, True),  # gpu_user_annotation: skipped
    ]
    s = split(events, window_us=1000.0, steps=2)
    assert s["kernel_ms"]["compute"] == pytest.approx(110 / 1e3 / 2)
    assert s["kernel_ms"]["ep"] == pytest.approx(100 / 1e3 / 2)
    assert s["kernel_ms"]["dp"] == pytest.approx(20 / 1e3 / 2)
    assert s["kernel_ms"]["tp"] == pytest.approx(10 / 1e3 / 2)
    assert s["kernel_ms"]["unattributed_nccl"] == pytest.approx(5 / 1e3 / 2)
    assert s["exposed_ms"]["ep"] == pytest.approx(50 / 1e3 / 2)
    assert s["exposed_ms"]["dp"] == pytest.approx(20 / 1e3 / 2)
    assert s["kernel_ms"]["other"] == pytest.approx(2 / 1e3 / 2)
    busy = 150 + 20 + 10 + 5 + 10 + 2
    assert s["busy_ms"] == pytest.approx(busy / 1e3 / 2)
    assert s["idle_share"] == pytest.approx(1 - busy / 1000)
    assert s["comm_exposed_ms"] == pytest.approx((busy - 110) / 1e3 / 2)


def test_host_split_on_a_real_cpu_profile():
    a, b = torch.randn(128, 128), torch.randn(128, 128)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            a @ b
            with comm._ranged("moemesh.comm.expert.all_to_all"):
                a @ b
            with comm._ranged("moemesh.comm.data_expert.all_reduce.wait"):
                a @ b
    s = split(from_kineto(prof.profiler.kineto_results.events()), window_us=1e6, steps=2)
    assert s["ranges"] == 4
    assert s["comm_ms"]["ep"] > 0 and s["comm_ms"]["dp"] > 0 and s["comm_ms"]["tp"] == 0
    assert s["compute_ms"] == pytest.approx(500 - sum(s["comm_ms"].values()))
    assert s["idle_share"] is None


def test_ranges_only_while_a_profiler_runs():
    assert not isinstance(comm._ranged("moemesh.comm.data.all_reduce"), torch.profiler.record_function)
    with profile(activities=[ProfilerActivity.CPU]):
        assert isinstance(comm._ranged("moemesh.comm.data.all_reduce"), torch.profiler.record_function)
