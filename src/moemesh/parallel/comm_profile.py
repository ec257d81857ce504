"""Where a profiled window of training steps spent its time: compute, each mesh axis's communication, idle.

Every collective runs inside a profiler range `moemesh.comm.{axis}.{op}` (parallel/comm.py). From the raw
events of a `torch.profiler.profile` (`prof.profiler.kineto_results.events()`):

  on a GPU  each device event (kernel, memcpy, memset) is linked by the profiler to the host op that
            launched it (`linked_correlation_id` = that op's `correlation_id`, as torch's own kernel
            attribution does); a kernel whose launching op lies inside a comm range of the same host
            thread belongs to that range's axis, any other kernel is compute (NCCL kernels that no range
            claims are counted apart, as `unattributed_nccl`). Per class: kernel time (sum of durations;
            an NCCL kernel's time includes waiting for its slowest peer), and exposed time (what the
            class adds to the union of compute kernels: communication not hidden behind compute). Idle =
            the window's wall time minus the union of all device events.
  on a CPU  (gloo, the dry run) there are no device events: the comm ranges' own host spans are the
            communication (gloo collectives and waits block the calling thread), the rest of the
            window is compute; idle is not defined.

Axes group as the planner's terms do: tp = `model`, ep = `expert`, dp = `data` and `data_expert`
(gradient reduction), other = `world` (loss and gradient-norm reductions).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

RANGE_PREFIX = "moemesh.comm."  # parallel/comm.py's ranges
CLASS_OF_AXIS = {"model": "tp", "expert": "ep", "data": "dp", "data_expert": "dp", "world": "other"}
CLASSES = ("tp", "ep", "dp", "other")


@dataclass(frozen=True)
class Event:
    """What the split needs of one profiler event (from a `_KinetoEvent`, or built by hand in tests)."""
    name: str
    on_device: bool
    start_us: float
    end_us: float
    thread: int
    correlation_id: int
    linked_correlation_id: int
    user_annotation: bool


def from_kineto(kineto_events) -> list[Event]:
    out = []
    for e in kineto_events:
        device = str(e.device_type()).rsplit(".", 1)[-1]
        start = e.start_ns() / 1e3
        activity = str(e.activity_type()) if hasattr(e, "activity_type") else ""
        annotation = bool(e.is_user_annotation()) if hasattr(e, "is_user_annotation") else False
        out.append(Event(e.name(), device != "CPU", start, start + e.duration_ns() / 1e3, e.start_thread_id(),
                         e.correlation_id(), e.linked_correlation_id(), annotation or "user_annotation" in activity))
    return out


def union_us(intervals) -> float:
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _class_of_range(name: str) -> str:
    axis = name[len(RANGE_PREFIX):].split(".", 1)[0]
    return CLASS_OF_AXIS.get(axis, "other")


def _comm_ranges(events: list[Event]) -> dict[int, list[tuple[float, float, str]]]:
    """Host comm ranges per thread, sorted: (start, end, class). They never nest (no collective issues
    another), so the one that can hold an op is the last to start before it."""
    ranges: dict[int, list[tuple[float, float, str]]] = {}
    for e in events:
        if not e.on_device and e.name.startswith(RANGE_PREFIX):
            ranges.setdefault(e.thread, []).append((e.start_us, e.end_us, _class_of_range(e.name)))
    return {thread: sorted(rs) for thread, rs in ranges.items()}


def _inside(ranges: list[tuple[float, float, str]], start: float, end: float) -> str | None:
    i = bisect.bisect_right(ranges, (start, float("inf"), "")) - 1
    if i >= 0 and ranges[i][0] <= start and end <= ranges[i][1]:
        return ranges[i][2]
    return None


def split(events: list[Event], window_us: float, steps: int) -> dict:
    """Per-step milliseconds and shares of the window; see the module docstring."""
    ranges = _comm_ranges(events)
    device = [e for e in events if e.on_device and not e.user_annotation and not e.name.startswith(RANGE_PREFIX)]
    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    if not device:
        return _host_split(ranges, window_us, steps)
    owner: dict[int, str] = {}  # host op correlation id -> class
    for e in events:
        if not e.on_device and e.linked_correlation_id == 0 and e.thread in ranges:
            cls = _inside(ranges[e.thread], e.start_us, e.end_us)
            if cls is not None:
                owner[e.correlation_id] = cls
    by_class: dict[str, list[tuple[float, float]]] = {c: [] for c in ("compute", *CLASSES, "unattributed_nccl")}
    for e in device:
        cls = owner.get(e.linked_correlation_id)
        if cls is None:
            cls = "unattributed_nccl" if "nccl" in e.name.lower() else "compute"
        by_class[cls].append((e.start_us, e.end_us))
    compute_union = union_us(by_class["compute"])
    busy = union_us(iv for ivs in by_class.values() for iv in ivs)
    kernel = {c: per_step(sum(b - a for a, b in ivs)) for c, ivs in by_class.items()}
    exposed = {c: per_step(union_us(by_class["compute"] + ivs) - compute_union)
               for c, ivs in by_class.items() if c != "compute"}
    return {"method": "device kernels by launching host op", "steps": steps, "window_ms": per_step(window_us),
            "busy_ms": per_step(busy), "idle_ms": per_step(window_us - busy), "idle_share": 1 - busy / window_us,
            "compute_busy_ms": per_step(compute_union), "compute_share": compute_union / window_us,
            "kernel_ms": kernel, "exposed_ms": exposed, "comm_exposed_ms": per_step(busy - compute_union),
            "comm_exposed_share": (busy - compute_union) / window_us,
            "exposed_share": {c: v / per_step(window_us) for c, v in exposed.items()},
            "device_events": len(device), "attributed_ops": len(owner)}


def _host_split(ranges: dict[int, list[tuple[float, float, str]]], window_us: float, steps: int) -> dict:
    spans = {c: [(a, b) for rs in ranges.values() for a, b, cls in rs if cls == c] for c in CLASSES}
    comm = union_us(iv for ivs in spans.values() for iv in ivs)
    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    return {"method": "host spans of the comm ranges (no device events)", "steps": steps,
            "window_ms": per_step(window_us), "comm_ms": {c: per_step(union_us(ivs)) for c, ivs in spans.items()},
            "comm_share": {c: union_us(ivs) / window_us for c, ivs in spans.items()},
            "compute_ms": per_step(window_us - comm), "compute_share": 1 - comm / window_us,
            "idle_share": None, "ranges": sum(len(rs) for rs in ranges.values())}
