"""The run dir: created with its config.toml, locked for the whole run, and never silently reused.

    run_dir/.lock          flock'ed by the process that prepared the dir; holds that process's pid
    run_dir/config.toml    the resolved config (data.path absolute, run.dir as the user gave it)
    run_dir/metrics.jsonl, summary.json, tensorboard/, checkpoints/    a run's outputs (OUTPUTS)

A fresh run (not resuming) refuses a dir that holds an earlier run's outputs unless run.overwrite is
set, so that a second `moemesh train` never appends to or replaces a finished run by accident.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
from pathlib import Path

from moemesh.config import Config, to_toml
from moemesh.errors import UserError
from moemesh.train.ckpt_paths import CHECKPOINTS, latest_checkpoint

OUTPUTS = ("metrics.jsonl", "summary.json", "tensorboard", CHECKPOINTS)
LOCK_FILE = ".lock"


class RunDirLock:
    """An exclusive, non-blocking flock on `run_dir/.lock`, held until `release()` or process death.

    The OS drops a flock when the last descriptor of its open file goes away, so a crashed run never
    leaves a stale lock behind. Under the local launcher the parent takes this lock and then forks the
    workers: they inherit the descriptor, so they share the parent's lock (they never try to take it
    themselves), and the dir stays locked while any of them still runs. Spawned workers (CUDA) do not
    inherit it (Python opens it close-on-exec); the parent holds it for them."""

    def __init__(self, run_dir: Path, display: str):
        path = run_dir / LOCK_FILE
        self.fd = -1
        self.created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"run.dir={display} is in use by another moemesh run (pid {holder}); wait for it "
                            f"to finish, or choose another run.dir") from None
        self.fd = fd
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            # Close, never LOCK_UN: an unlock through any copy of the descriptor (a forked worker's
            # too) would drop the lock for all of them; a close drops it only with the last copy.
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a caller that dropped the lock on an exception path
        self.release()

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_dir(cfg: Config) -> Path | None:
    """A usable run.dir path (or a one-line UserError); returns the first of its folders not yet there."""
    run_dir, shown = Path(cfg.run.dir), cfg.run.dir
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run.dir={shown}: exists and is not a directory")
        return next((p for p in [*reversed(run_dir.parents), run_dir] if not p.exists()), None)
    except OSError as exc:  # e.g. ENAMETOOLONG: Path.exists() raises it rather than returning False
        raise UserError(f"run.dir={shown}: not writable ({exc.strerror or exc})") from None


def prepare_run_dir(cfg: Config, resuming: bool) -> tuple[Path, RunDirLock]:
    """Create (if needed) and lock `run.dir`, clear or refuse an earlier run, write config.toml.

    `resuming=True` (a complete checkpoint will be loaded) keeps the earlier outputs: metrics are
    appended. Otherwise an earlier run's outputs are refused, or deleted when run.overwrite is set.
    The caller holds the returned lock for the whole run. On failure every folder this call created
    is removed again, and a lock file it created too."""
    run_dir, shown = Path(cfg.run.dir), cfg.run.dir
    first_new = check_run_dir(cfg)
    lock = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(run_dir, shown)
        if not resuming:
            _clear_earlier_run(run_dir, cfg)
        write_atomic(run_dir / "config.toml", to_toml(resolved_config(cfg)).encode())
    except (OSError, UserError) as exc:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        elif lock is not None and lock.created:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        if lock is not None:
            lock.release()
        if isinstance(exc, UserError):
            raise
        raise UserError(f"run.dir={shown}: not writable ({exc.strerror or exc})") from None
    return run_dir, lock


def _clear_earlier_run(run_dir: Path, cfg: Config) -> None:
    found = [name for name in OUTPUTS if (run_dir / name).exists()]
    if not found:
        return
    if not cfg.run.overwrite:
        listed = ", ".join(name + "/" if (run_dir / name).is_dir() else name for name in found)
        if latest_checkpoint(run_dir) is None:
            what = "and no checkpoint to continue from; set run.overwrite=true to replace it"
        else:
            what = (f"and train.resume={cfg.train.resume}; set train.resume=auto to continue it, "
                    f"run.overwrite=true to replace it")
        raise UserError(f"run.dir={cfg.run.dir} holds an earlier run ({listed}) {what}, or choose another run.dir")
    for name in found:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def resolved_config(cfg: Config) -> Config:
    """The config as config.toml stores it: data.path absolute, so that `moemesh train
    run_dir/config.toml` reads the same data from any directory. run.dir stays as the user gave it."""
    if not cfg.data.path:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve())))


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file and a rename: readers see the old file or the whole new
    one, never a half-written one (a full disk fails the write and leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
