"""Collectives on one mesh axis, with autograd, and a trace of every collective a rank issues.

`AxisComm` wraps the process group of one axis (data, expert, model, data_expert). Every collective,
forward or backward, goes through `AxisComm._issue`, which
  1. notes where the rank is (step, layer, op, axis) so a watchdog can say where a hang waits;
  2. with `check_collectives`, first exchanges a fingerprint of the collective with every rank of the
     world (SPMD: all ranks issue the same sequence, each on its own group of that axis) and stops with
     a message naming the first diverging collective and the ranks on each side;
  3. runs the collective, inside a profiler range `moemesh.comm.{axis}.{op}` (only while a profiler
     runs; its waits in `moemesh.comm.{axis}.{op}.wait`), so that a trace attributes each collective's
     kernels to its axis (parallel/comm_profile.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from moemesh.errors import report
from moemesh.parallel.comm_profile import RANGE_PREFIX

# torch 2.13 renamed the tensor-in/tensor-out collectives; 2.11 (the GPU machine) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# The profiler check costs ~0.1 us; an unconditional record_function ~7 us on these CPUs.
_profiling = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def _ranged(name: str):
    return torch.profiler.record_function(name) if name and _profiling() else contextlib.nullcontext()


class CollectiveMismatch(RuntimeError):
    pass


@dataclass
class CollectiveTrace:
    """Per-rank record of collectives; `where` is set by the loop (step) and layer hooks (layer)."""

    check: bool = False
    timeout_s: float = 300.0
    device: torch.device = torch.device("cpu")  # where fingerprints live (CUDA under NCCL)
    step: int = 0
    layer: str = "-"
    count: int = 0
    waiting: tuple[float, str, list[int]] | None = None  # since (monotonic), description, group ranks
    # Split all-to-alls (the chunked EP dispatch) in flight now, and the most at once, per pass.
    in_flight: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    max_in_flight: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def launched(self, phase: str) -> None:
        self.in_flight[phase] += 1
        self.max_in_flight[phase] = max(self.max_in_flight[phase], self.in_flight[phase])

    def landed(self, phase: str) -> None:
        self.in_flight[phase] -= 1

    def describe(self, op: str, axis: str, shape: tuple[int, ...], group_ranks: list[int]) -> str:
        return f"#{self.count} step {self.step} {self.layer}: {op} on {axis} group {group_ranks} shape {list(shape)}"

    @contextlib.contextmanager
    def watching(self, what: str, group_ranks: list[int]):
        """Mark this rank as waiting in a collective for the watchdog while the block runs."""
        self.waiting = (time.monotonic(), what, group_ranks)
        try:
            yield
        finally:  # a collective that raised is no longer waited on: the watchdog must not report it later
            self.waiting = None

    def position(self) -> str:
        """Where this rank is, for its peers' watchdog reports."""
        waiting = self.waiting
        if waiting is None:
            return f"step {self.step}, not in a collective"
        return f"waiting {time.monotonic() - waiting[0]:.0f} s in collective {waiting[1]}"

    def start_watchdog(self, rank: int, board: "Board | None" = None) -> None:
        """Daemon threads that report (and end the process, exit code 3) when one collective waits longer
        than `timeout_s`. With a board, each rank also posts its position there once a second, so that
        the report names the peers that never joined and where they were; and the first report tells
        every rank to end, so that the world stops within seconds instead of leaving ranks blocked in
        other collectives (or a frozen one) for the launcher's own 30 s grace."""
        watchdog = _Watchdog(self, rank, board)
        threading.Thread(target=watchdog.watch, daemon=True, name="moemesh-collective-watchdog").start()
        if board is not None:
            threading.Thread(target=watchdog.publish, daemon=True, name="moemesh-watchdog-publisher").start()


class Board(Protocol):
    """Where the watchdogs of one attempt post positions. It must outlive every worker: a c10d store
    hosted by rank 0 would make every survivor's next post log a C++ stack trace once rank 0 is gone."""

    def post(self, name: str, value: str) -> None: ...
    def read(self, name: str) -> str | None: ...
    def claim(self, name: str) -> bool: ...  # True for exactly one caller


class FileBoard:
    """Files in a directory of the local launcher (one host): nothing is lost when a rank dies."""

    def __init__(self, directory: Path):
        self.dir = directory

    def post(self, name: str, value: str) -> None:
        partial = self.dir / f".{name}.{os.getpid()}"
        partial.write_text(value)
        os.replace(partial, self.dir / name)  # readers never see half a post

    def read(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text()
        except FileNotFoundError:
            return None

    def claim(self, name: str) -> bool:
        try:
            os.close(os.open(self.dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False


class StoreBoard:
    """A c10d store that the launcher hosts (torchrun's agent store), for ranks on several hosts. The
    restart count keeps a restarted group clear of an earlier attempt's keys (that store outlives them)."""

    def __init__(self, store):
        self.store = store
        self.prefix = f"moemesh/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def post(self, name: str, value: str) -> None:
        self.store.set(self.prefix + name, value)

    def read(self, name: str) -> str | None:
        key = self.prefix + name
        return self.store.get(key).decode() if self.store.check([key]) else None

    def claim(self, name: str) -> bool:
        return self.store.add(self.prefix + name, 1) == 1


STALE_S = 3.0  # a peer that has not posted for this long is frozen or gone (it posts every second)
BOARD_WAIT_S = 2.0  # a board call from the watchdog never delays its report longer


class _Watchdog:
    def __init__(self, trace: CollectiveTrace, rank: int, board: Board | None):
        self.trace, self.rank, self.board = trace, rank, board

    def watch(self) -> None:
        trace = self.trace
        while True:
            time.sleep(1.0)
            waiting = trace.waiting
            if waiting is not None and time.monotonic() - waiting[0] > trace.timeout_s:
                self.fire(waiting)

    def publish(self) -> None:
        """Once a second: our position out, the abort flag in. Posting stops at the first error."""
        try:
            while True:
                self.board.post(f"where-{self.rank}", f"{time.time():.3f}|{self.trace.position()}")
                if self.board.read("abort") is not None:
                    _end(3)  # another rank's watchdog has reported; it said everything
                time.sleep(1.0)
        except Exception:
            return

    def fire(self, waiting: tuple[float, str, list[int]]) -> None:
        _, what, group_ranks = waiting
        peers = _bounded(lambda: self.peers(what, group_ranks), "the other ranks' positions are unknown")
        first = _bounded(lambda: self.board is None or self.board.claim("fired"), True)
        if first:
            report(f"error: rank {self.rank} waited {self.trace.timeout_s:.0f} s in collective {what}; {peers}")
        _bounded(lambda: self.board is not None and self.board.post("abort", str(self.rank)), None)
        _end(3)

    def peers(self, what: str, group_ranks: list[int]) -> str:
        """Which peers of the group are not in this collective, and where they were last seen."""
        if self.board is None:
            return "the other ranks of that group never joined it"
        missing, joined = [], []
        for peer in group_ranks:
            if peer == self.rank:
                continue
            posted = self.board.read(f"where-{peer}")
            if posted is None:
                missing.append(f"rank {peer} never joined (it never posted its position)")
                continue
            stamp, position = posted.split("|", 1)
            age = time.time() - float(stamp)
            if position.endswith(f"in collective {what}") and age < STALE_S:
                joined.append(peer)
                continue
            seen = f"last seen {age:.0f} s ago" if age >= STALE_S else "last seen"
            missing.append(f"rank {peer} never joined ({seen}: {position})")
        if not missing:
            return f"ranks {joined} are all in it: the backend never completed it"
        return "; ".join(missing)


def _bounded(fn, fallback):
    """fn() run in a helper thread, or `fallback` if it raises or takes longer than BOARD_WAIT_S."""
    result = [fallback]

    def run():
        try:
            result[0] = fn()
        except Exception:
            pass

    helper = threading.Thread(target=run, daemon=True)
    helper.start()
    helper.join(BOARD_WAIT_S)
    return result[0]


def _end(code: int) -> None:
    sys.stderr.flush()
    os._exit(code)


class AxisComm:
    def __init__(self, axis: str, group, trace: CollectiveTrace):
        self.axis, self.group, self.trace = axis, group, trace
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)

    def _issue(self, op: str, shape: tuple[int, ...], fn) -> str:
        trace = self.trace
        trace.count += 1
        what = trace.describe(op, self.axis, shape, self.ranks)
        if trace.check:  # watched too: a rank that stopped issuing collectives never joins this one
            with trace.watching(f"(order check before) {what}", list(range(dist.get_world_size()))):
                _compare_fingerprints(trace, op, self.axis, shape, what)
        with trace.watching(what, self.ranks), _ranged(f"{RANGE_PREFIX}{self.axis}.{op}"):
            fn()
        return what

    def _issue_async(self, op: str, shape: tuple[int, ...], fn) -> "Pending":
        """Launch a collective (`fn` returns the backend's work object) and return at once; the wait is
        watched like a blocking collective, under the same number and description."""
        works = []
        what = self._issue(op, shape, lambda: works.append(fn()))
        return Pending(works[0], what, self.ranks, self.trace, f"{RANGE_PREFIX}{self.axis}.{op}.wait")

    # --- plain collectives (no autograd) ---
    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        x = x.contiguous().clone()
        name = "all_reduce" if op == "sum" else f"all_reduce_{op}"
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self._issue(name, tuple(x.shape), lambda: dist.all_reduce(x, op=reduce_op, group=self.group))
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] * self.size, *x0.shape[1:]))
        self._issue("all_gather", tuple(x.shape), lambda: _all_gather_single(out, x0, group=self.group))
        return out.movedim(0, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] // self.size, *x0.shape[1:]))
        self._issue("reduce_scatter", tuple(x.shape), lambda: _reduce_scatter_single(out, x0, group=self.group))
        return out.movedim(0, dim)

    def all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        # Row counts vary by rank; the fingerprint keeps only the trailing dims.
        self._issue("all_to_all", tuple(x.shape[1:]), lambda: dist.all_to_all_single(
            out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.group))
        return out

    # --- launched now, waited on later (overlap with compute) ---
    def all_reduce_async_(self, x: torch.Tensor) -> "Pending":
        """Sum `x` (contiguous) in place over the group; `x` holds the result after `wait()`."""
        assert x.is_contiguous()
        return self._issue_async("all_reduce", tuple(x.shape),
                                 lambda: dist.all_reduce(x, group=self.group, async_op=True))

    def all_to_all_async(self, x: torch.Tensor, out_splits: list[int],
                         in_splits: list[int]) -> tuple[torch.Tensor, "Pending"]:
        """`all_to_all`, returned before it completes: read the output only after `wait()`."""
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        pending = self._issue_async("all_to_all", tuple(x.shape[1:]), lambda: dist.all_to_all_single(
            out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.group, async_op=True))
        pending.keep = x  # the send buffer must outlive the collective
        return out, pending

    def local_slice(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()


class Pending:
    """An issued collective that has not been waited on. On gloo `wait()` blocks the host until it is
    done; on NCCL it makes the current stream wait for it. Either way the watchdog sees the wait."""

    def __init__(self, work, what: str, group_ranks: list[int], trace: CollectiveTrace, range_name: str = ""):
        self.work, self.what, self.group_ranks, self.trace = work, what, group_ranks, trace
        self.range_name = range_name
        self.keep: torch.Tensor | None = None
        self.result: torch.Tensor | None = None  # the output buffer, for whoever waits

    def wait(self) -> None:
        if self.work is None:
            return
        with self.trace.watching(self.what, self.group_ranks), _ranged(self.range_name):
            self.work.wait()
        self.work, self.keep = None, None


def _compare_fingerprints(trace: CollectiveTrace, op: str, axis: str, shape: tuple[int, ...], what: str) -> None:
    digest = hashlib.blake2b(f"{op}|{axis}|{shape}".encode(), digest_size=7).digest()
    mine = torch.tensor([trace.count, int.from_bytes(digest, "little")], dtype=torch.int64, device=trace.device)
    world = dist.get_world_size()
    everyone = torch.empty(world * 2, dtype=torch.int64, device=trace.device)
    _all_gather_single(everyone, mine)  # on the default group, which has the world's backend
    rows = everyone.view(world, 2).tolist()
    if all(row == rows[0] for row in rows):
        return
    descriptions = [None] * world
    dist.all_gather_object(descriptions, what)
    sides: dict[str, list[int]] = {}
    for rank, text in enumerate(descriptions):
        sides.setdefault(text.split(": ", 1)[1], []).append(rank)
    detail = "; ".join(f"ranks {ranks} issue {text}" for text, ranks in sides.items())
    raise CollectiveMismatch(f"collective order differs at collective #{trace.count} "
                             f"(step {trace.step}, {trace.layer}): {detail}")


# --- autograd-aware wrappers (Megatron's f / g and the sequence-parallel pair) ---

class _AllReduce(torch.autograd.Function):
    """All-reduce (sum) in the forward pass, the backward pass, or both:
    forward only  = Megatron's g (sum partial outputs; the gradient is already whole);
    backward only = Megatron's f (enter a region that produces partial input gradients);
    both          = a global statistic that every rank's loss depends on."""

    @staticmethod
    def forward(ctx, x, comm, in_forward, in_backward):
        ctx.comm, ctx.in_backward = comm, in_backward
        return comm.all_reduce(x) if in_forward else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (ctx.comm.all_reduce(grad) if ctx.in_backward else grad), None, None, None


class _GatherAlongDim(torch.autograd.Function):
    """Forward all-gather along `dim`. Backward: reduce-scatter when downstream grads are partial sums,
    or keep this rank's slice when they are replicated (identical on every rank)."""

    @staticmethod
    def forward(ctx, x, comm, dim, grad_is_partial):
        ctx.comm, ctx.dim, ctx.partial = comm, dim, grad_is_partial
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return ctx.comm.reduce_scatter(grad, ctx.dim), None, None, None
        return ctx.comm.local_slice(grad, ctx.dim), None, None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    """Forward reduce-scatter along `dim` (sum partials, keep this rank's sequence slice); backward all-gather."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks with variable split sizes; backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x, comm, out_splits, in_splits):
        ctx.comm, ctx.out_splits, ctx.in_splits = comm, out_splits, in_splits
        return comm.all_to_all(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_to_all(grad, ctx.in_splits, ctx.out_splits), None, None, None


def copy_to_group(x, comm: AxisComm):
    return _AllReduce.apply(x, comm, False, True)


def reduce_from_group(x, comm: AxisComm):
    return _AllReduce.apply(x, comm, True, False)


def all_reduce_with_grad(x, comm: AxisComm):
    return _AllReduce.apply(x, comm, True, True)


def gather_along_dim(x, comm: AxisComm, dim: int, grad_is_partial: bool):
    return _GatherAlongDim.apply(x, comm, dim, grad_is_partial)


def reduce_scatter_along_dim(x, comm: AxisComm, dim: int):
    return _ReduceScatterAlongDim.apply(x, comm, dim)


def all_to_all(x, comm: AxisComm, out_splits: list[int], in_splits: list[int]):
    return _AllToAll.apply(x, comm, out_splits, in_splits)


# --- an all-to-all in two halves (launch, wait), so that compute can run in between, forward and backward ---

class InFlight:
    """Links the two halves of one split all-to-all: the launch's pending collective (forward) and the
    reverse all-to-all of the gradient (backward)."""

    def __init__(self):
        self.forward: Pending | None = None
        self.backward: Pending | None = None


class _LaunchAllToAll(torch.autograd.Function):
    """Forward: launch the all-to-all and return its output buffer, to be read only after `_WaitAllToAll`.
    Backward: wait for the gradient's reverse all-to-all, which `_WaitAllToAll.backward` launched, and
    return its result (the incoming gradient is the one that all-to-all is sending)."""

    @staticmethod
    def forward(ctx, x, comm, out_splits, in_splits, flight):
        out, flight.forward = comm.all_to_all_async(x, out_splits, in_splits)
        comm.trace.launched("forward")
        ctx.flight, ctx.trace = flight, comm.trace
        return out

    @staticmethod
    def backward(ctx, _):
        pending, ctx.flight.backward = ctx.flight.backward, None
        pending.wait()
        ctx.trace.landed("backward")
        return pending.result, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Forward: wait for the launched all-to-all. Backward: launch the gradient's reverse all-to-all,
    which `_LaunchAllToAll.backward` waits for (through the flight; the gradient passes on unchanged).
    Autograd runs the later-created of two ready nodes first, so in backward the launches of a pipeline's
    chunks come before their waits, as in forward."""

    @staticmethod
    def forward(ctx, out, comm, out_splits, in_splits, flight):
        flight.forward.wait()
        flight.forward = None
        comm.trace.landed("forward")
        ctx.comm, ctx.out_splits, ctx.in_splits, ctx.flight = comm, out_splits, in_splits, flight
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        result, ctx.flight.backward = ctx.comm.all_to_all_async(grad, ctx.in_splits, ctx.out_splits)
        ctx.flight.backward.result = result
        ctx.comm.trace.launched("backward")
        return grad, None, None, None, None


def launch_all_to_all(x, comm: AxisComm, out_splits: list[int], in_splits: list[int]):
    """(output buffer, flight): pass both to `wait_all_to_all` before reading the output."""
    flight = InFlight()
    return _LaunchAllToAll.apply(x, comm, out_splits, in_splits, flight), flight


def wait_all_to_all(out, flight: InFlight, comm: AxisComm, out_splits: list[int], in_splits: list[int]):
    return _WaitAllToAll.apply(out, comm, out_splits, in_splits, flight)
