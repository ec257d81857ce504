"""Batches made ahead of the step while the GPU trains; the step copies its batch through a pinned host
buffer to the device without blocking.

Two producers, one contract:
  thread   a background thread of this process: for sources whose batches are a few vectorised torch or
           numpy operations (text and bin windows);
  process  a spawned worker process: for sources that build a batch in a Python loop (the synthetic Markov
           chain: one small torch call per position, 10-60 ms a batch). In a thread that loop holds the
           GIL for that long every step, and the training thread, which needs the GIL to launch kernels,
           falls behind the GPU (measured: the GPU idled 6-17 % of a step). The worker is started with the
           Trainer, so its start-up overlaps the model build.
The pinned buffers are a small ring allocated once and reused (a buffer is refilled only after the copy
out of it has finished, which an event tells): pinning each batch anew allocates pinned memory every step,
which cost the training thread milliseconds. The batch of a step is a pure function of (seed, step, data) (`train/data.py`): either producer calls the
same function, only earlier and elsewhere, so results do not change. Used on CUDA; on the CPU the
"device" is the same cores that would run the producer, and the batch is made in place.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import threading
from typing import Callable

import torch
import torch.multiprocessing as torch_mp

POLL_S = 0.1  # how often a blocked producer or consumer looks for a stop, a restart or a dead peer


class BatchPrefetcher:
    def __init__(self, make: Callable[[int], torch.Tensor], device: torch.device, depth: int = 2,
                 process: bool = False):
        """`make(step)` builds step's batch; with `process`, it must be picklable (it runs in a worker)."""
        self.make, self.device, self.depth = make, device, depth
        self._producer: _ThreadProducer | _ProcessProducer | None = None
        if process:
            self._producer = _ProcessProducer(make, depth)
        self._next = None  # the step the producer hands out next
        self._pinned = _PinnedRing(depth + 2) if device.type == "cuda" else None

    def get(self, step: int) -> torch.Tensor:
        """Step `step`'s batch on the device (steps are asked for in order; any other order restarts)."""
        if self._producer is None:
            self._producer = _ThreadProducer(self.make, self.depth)
        if step != self._next:
            self._producer.restart(step)
        got, batch, error = self._producer.take()
        assert got == step, (got, step)
        self._next = step + 1
        if error is not None:
            raise error
        if self._pinned is not None:
            return self._pinned.to_device(batch, self.device)
        return batch.to(self.device)

    def close(self) -> None:
        """Stop the producer and wait for it: a thread still inside a torch call while the interpreter
        exits aborts the process ("terminate called without an active exception")."""
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        self._next = None


class _PinnedRing:
    """Host-to-device copies through `size` reusable pinned buffers."""

    def __init__(self, size: int):
        self._slots: list[tuple[torch.Tensor, torch.cuda.Event] | None] = [None] * size
        self._i = 0

    def to_device(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        slot = self._slots[self._i]
        if slot is not None and slot[0].shape == batch.shape and slot[0].dtype == batch.dtype:
            buffer, copied = slot
            copied.synchronize()  # the copy out of it, `size` steps ago, is long done: no real wait
        else:
            buffer = torch.empty_like(batch, pin_memory=True)
        buffer.copy_(batch)
        out = buffer.to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._slots[self._i] = (buffer, copied)
        self._i = (self._i + 1) % len(self._slots)
        return out


class _ThreadProducer:
    def __init__(self, make: Callable[[int], torch.Tensor], depth: int):
        self.make, self.depth = make, depth
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def restart(self, step: int) -> None:
        self.close()
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(step, self._queue, self._stop), daemon=True,
                                        name="moemesh-batch-prefetch")
        self._thread.start()

    def _produce(self, step: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (step, self.make(step), None)
            except Exception as exc:  # handed to the training thread, which raises it there
                item = (step, None, exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            step += 1

    def take(self):
        return self._queue.get()

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=60)
            self._stop = None


class _ProcessProducer:
    """The worker makes batches from a start step on; a restart bumps a generation number, and batches of
    an older generation still in the queue are dropped."""

    def __init__(self, make: Callable[[int], torch.Tensor], depth: int):
        ctx = torch_mp.get_context("spawn")  # fork after CUDA initialisation is unsafe
        self._commands, self._out = ctx.Queue(), ctx.Queue(maxsize=depth)
        self._generation = 0
        self._process = ctx.Process(target=_worker, args=(make, self._commands, self._out), daemon=True,
                                    name="moemesh-batch-worker")
        self._process.start()

    def restart(self, step: int) -> None:
        self._generation += 1
        self._commands.put((self._generation, step))

    def take(self):
        while True:
            try:
                generation, step, batch, error = self._out.get(timeout=POLL_S)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"the batch worker process exited (code {self._process.exitcode})") from None
                continue
            if generation == self._generation:
                return step, batch, error

    def close(self) -> None:
        if self._process.is_alive():
            self._commands.put(None)
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
        for q in (self._commands, self._out):
            q.cancel_join_thread()
            q.close()


def _worker(make: Callable[[int], torch.Tensor], commands: mp.Queue, out: mp.Queue) -> None:
    """Wait for (generation, start step), then put (generation, step, batch, error) for step, step + 1, ...
    until a new command: another start, or None (stop). Exits too when the parent has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops us
    torch.set_num_threads(1)
    parent = mp.parent_process()
    command = _command(commands, parent, block=True)
    while command is not None:
        generation, step = command
        command = _NONE
        while command is _NONE:
            try:
                item = (generation, step, make(step), None)
            except Exception as exc:  # raised in the trainer; the class and message survive pickling
                item = (generation, step, None, exc if _picklable(exc) else RuntimeError(repr(exc)))
            command = _put(out, item, commands, parent)
            step += 1


_NONE = object()  # no command waiting


def _put(out: mp.Queue, item, commands: mp.Queue, parent):
    """Put `item` once there is room, unless a command comes first; the waiting command or `_NONE`."""
    while True:
        try:
            out.put(item, timeout=POLL_S)
            return _command(commands, parent, block=False)
        except queue.Full:
            command = _command(commands, parent, block=False)
            if command is not _NONE:
                return command


def _command(commands: mp.Queue, parent, block: bool):
    """The next command; `_NONE` when not blocking and none waits; None (stop) when the parent is gone."""
    while True:
        if parent is not None and not parent.is_alive():
            return None
        try:
            return commands.get(timeout=POLL_S) if block else commands.get_nowait()
        except queue.Empty:
            if not block:
                return _NONE


def _picklable(exc: Exception) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:
        return False
