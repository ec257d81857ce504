"""Batches made ahead of the step: a background thread builds the next steps' local batches in pinned
host memory while the GPU trains, and the step copies its batch to the device without blocking.

The batch of a step is still a pure function of (seed, step, data) (`train/data.py`): the thread calls
the same function, only earlier, so results do not change. Used on CUDA; on the CPU the "device" is the
same cores that would run the thread, and the batch is made in place.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch


class BatchPrefetcher:
    def __init__(self, make: Callable[[int], torch.Tensor], device: torch.device, depth: int = 2):
        self.make, self.device, self.depth = make, device, depth
        self._queue: queue.Queue | None = None
        self._next = None  # the step the producer will hand out next
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _start(self, step: int) -> None:
        self.close()
        self._queue, self._stop, self._next = queue.Queue(maxsize=self.depth), threading.Event(), step
        self._thread = threading.Thread(target=self._produce, args=(step, self._queue, self._stop), daemon=True,
                                        name="moemesh-batch-prefetch")
        self._thread.start()

    def _produce(self, step: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                batch = self.make(step)
                item = (step, batch.pin_memory() if self.device.type == "cuda" else batch, None)
            except Exception as exc:  # handed to the training thread, which raises it there
                item = (step, None, exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    def get(self, step: int) -> torch.Tensor:
        """Step `step`'s batch on the device (steps are asked for in order; any other order restarts)."""
        if self._queue is None or step != self._next:
            self._start(step)
        got, batch, error = self._queue.get()
        assert got == step, (got, step)
        self._next = step + 1
        if error is not None:
            raise error
        return batch.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the producer and wait for it: a thread still inside a torch call while the interpreter
        exits aborts the process ("terminate called without an active exception")."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=60)
