"""Shared by the bench scripts: run one measurement in a child process and read back its JSON result,
a line `RESULT {...}` on stdout (a child's own CUDA state, imports and crashes stay out of the parent),
a single-process Trainer warmed up for a steady-state look at its steps (or train()'s own, kept open past
its end), and a profiled window of them."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time


def timed_train(cfg, warmup: int) -> dict:
    """`moemesh.train.loop.train(cfg)` in this process, measured: tokens/s (median of the logged windows
    after step `warmup`, from the run dir's metrics.jsonl), start-up seconds (process work before the first
    step), peak memory on a GPU, and the logged losses."""
    import statistics
    from pathlib import Path

    import torch

    from moemesh.train.loop import train

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(cfg)
    total = time.perf_counter() - started
    records = [json.loads(line) for line in open(Path(cfg.run.dir) / "metrics.jsonl")]
    steady = [r["tokens_per_s"] for r in records if r["step"] > warmup] or [records[-1]["tokens_per_s"]]
    return {"tokens_per_s": statistics.median(steady), "windows": len(steady), "tokens_per_s_windows": steady,
            "startup_s": total - summary["elapsed_s"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "losses": [[r["step"], r["lm_loss"]] for r in records], "final_lm_loss": summary["final_lm_loss"]}


def run_child(args: list[str], env: dict[str, str], timeout: float) -> dict:
    """`python <args>`; its last RESULT line as a dict plus wall_s, or {"error", "stderr"}."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": time.perf_counter() - started}


def warm_trainer(cfg, steps: int):
    """A single-process Trainer of `cfg` after `steps` optimizer steps (1..steps), the device idle."""
    import torch

    from moemesh.train.data import build_source
    from moemesh.train.loop import Trainer, resolve_device

    device = resolve_device(cfg)
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    trainer = Trainer(cfg, None, source, device)
    for step in range(1, steps + 1):
        trainer.step(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return trainer


@contextlib.contextmanager
def trainer_kept_open():
    """Inside: `moemesh.train.loop.train` leaves its Trainer open when it returns (Trainer.close only
    records it), so that further steps run on the same model, optimizer state and data stream without a
    second build (~2 s a config); yields the list that receives it. On exit close is restored and the
    kept Trainer closed (its batch thread stopped). The training run itself is unchanged."""
    from moemesh.train.loop import Trainer

    kept, close = [], Trainer.close

    def keep(trainer) -> None:
        kept.append(trainer)

    Trainer.close = keep
    try:
        yield kept
    finally:
        Trainer.close = close
        for trainer in kept:
            trainer.close()


def profile_steps(trainer, first: int, steps: int):
    """Optimizer steps first..first+steps-1 under torch.profiler (host and, on a GPU, device activity:
    device-only tracing misses kernels on the H200); returns (the profiler, the window's wall time in us)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for step in range(first, first + steps):
            trainer.step(step)
        if cuda:
            torch.cuda.synchronize()
        window_us = (time.perf_counter() - t0) * 1e6
    return prof, window_us
