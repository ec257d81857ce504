"""Checkpoints through torch.distributed.checkpoint (DCP), loadable at any (dp, ep, tp).

Each sharded tensor is handed to DCP as a DTensor view of this rank's shard, with placements from the
layout table (`parallel/layout.py`). DCP therefore stores global tensors and re-shards them on load:
a checkpoint written at (2, 2, 2) loads at (1, 4, 2) or in a single process. Replicated tensors are
stored once. Everything is a tensor (no pickled Python objects), so reading needs no code execution.

Contents (keys of the DCP state dict):
  model/<name>                 parameters and the routers' expert bias, under single-process names
  optim/<name>/exp_avg|_sq     AdamW moments, sharded like their parameter
  optim/step                   AdamW's step count (the same for every parameter)
  train/step                   optimizer steps done; the LR schedule and the data stream are pure
                               functions of (config, step), so this is also their position
  train/recent_lm_losses       the last 10 lm losses (summary.json's final_lm_loss)
  rng/cpu, rng/cuda            the torch generators
Beside them: config.toml (the resolved config) and layout.json (the placement table it was written at).
Written into a temporary directory, fsynced, checksummed into manifest.json, then renamed (ckpt_paths).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp

from moemesh.config import Config, load_config, to_toml
from moemesh.errors import ConfigError, UserError
from moemesh.parallel.apply import full_buffers
from moemesh.train.rundir import resolved_config
from moemesh.train.ckpt_paths import (CHECKPOINTS, checkpoint_name, complete_checkpoints, fsync_path,
                                      step_of, write_manifest)

if TYPE_CHECKING:
    from moemesh.train.loop import Trainer


def _view(local: torch.Tensor, name: str, trainer: "Trainer") -> Any:
    if trainer.mesh is None:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, trainer.mesh.device_mesh, trainer.layout.dtensor_placements(name),
                              run_check=False)


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state as its first step would, so that a checkpoint can be loaded into it."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _state(trainer: "Trainer", step: int) -> dict[str, Any]:
    """The DCP state dict: views of the live tensors (loading fills them in place)."""
    ensure_optimizer_state(trainer.optimizer)
    state: dict[str, Any] = {}
    first_step = None
    for name, p in trainer.params.named_parameters():  # the fp32 masters when the model computes in bf16
        slots = trainer.optimizer.state[p]
        state[f"model/{name}"] = _view(p.detach(), name, trainer)
        state[f"optim/{name}/exp_avg"] = _view(slots["exp_avg"], name, trainer)
        state[f"optim/{name}/exp_avg_sq"] = _view(slots["exp_avg_sq"], name, trainer)
        first_step = slots["step"] if first_step is None else first_step
    for name, buffer in full_buffers(trainer.model).items():
        state[f"model/{name}"] = buffer
    state["optim/step"] = first_step.detach().clone().cpu()
    state["train/step"] = torch.tensor(step, dtype=torch.int64)
    # the last lm losses (NaN-padded), so that a resumed run's summary equals an undisturbed one's
    recent = torch.full((trainer.recent_lm_losses.maxlen,), float("nan"))
    if trainer.recent_lm_losses:
        recent[: len(trainer.recent_lm_losses)] = torch.stack(list(trainer.recent_lm_losses)).float().cpu()
    state["train/recent_lm_losses"] = recent
    state["rng/cpu"] = torch.get_rng_state()
    if trainer.device.type == "cuda":
        state["rng/cuda"] = torch.cuda.get_rng_state(trainer.device)
    return state


def save_checkpoint(trainer: "Trainer", run_dir: Path, step: int) -> Path:
    """Write checkpoint `step` on every rank (collective); rank 0 checksums, renames and prunes.
    A failure leaves the previous checkpoints untouched and raises a one-line UserError on every rank."""
    mesh, cfg = trainer.mesh, trainer.cfg
    is_main = mesh is None or mesh.rank == 0
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    if final.exists():
        if trainer.resumed == (final.resolve(), step):  # stopped again right after resuming from it
            return final
        # Not this trajectory's (a damaged one that resuming skipped, or another run's in this dir):
        # kept aside under a name that is no checkpoint, never deleted, never mistaken for ours.
        if is_main:
            final.rename(final.with_name(f"{final.name}.superseded-{time.time_ns()}"))
        _all_ok(mesh, True)
    staging = root / f".tmp-{final.name}"
    problem = None
    try:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
            staging.mkdir(parents=True)
        _all_ok(mesh, True)  # nobody writes into the staging dir before it exists
        with _quiet():
            dcp.save(_state(trainer, step), checkpoint_id=str(staging), no_dist=mesh is None)
        if is_main:
            (staging / "config.toml").write_text(to_toml(resolved_config(cfg)), encoding="utf-8")
            (staging / "layout.json").write_text(trainer.layout.to_json(), encoding="utf-8")
            write_manifest(staging, step)
            staging.rename(final)
            fsync_path(root)
            prune(root, cfg.run.keep_checkpoints, step, protect={final})
    except (Exception, dcp.api.CheckpointException) as exc:  # DCP's wraps each rank's error; a BaseException
        problem = _reason(exc)
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
    if not _all_ok(mesh, problem is None):
        previous = [p.name for p in complete_checkpoints(run_dir)]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"run.dir={run_dir}: cannot write checkpoint {final.name} ({problem or 'failed on another rank'}); "
                        f"{kept}")
    return final


@contextlib.contextmanager
def _quiet():
    """DCP warns that it saves "in a single process" when no process group exists: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _all_ok(mesh, ok: bool) -> bool:
    """Every rank learns whether every rank succeeded (doubles as a barrier)."""
    if mesh is None:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=mesh.trace.device)
    return mesh.comm("world").all_reduce(flag).item() == 0


def _reason(exc: BaseException) -> str:
    """The OSError behind a failed save (DCP wraps each rank's exception), as a short phrase."""
    chain = seen_exceptions(exc)
    os_error = next((e for e in chain if isinstance(e, OSError)), None)
    if os_error is not None:
        return os_error.strerror or str(os_error)
    # torch.save's zip writer reports a failed write without its errno ("unexpected pos 704 vs 598")
    inner = [e for e in chain if not hasattr(e, "failures")] or chain
    text = str(inner[-1]).strip().splitlines()
    return f"a write failed: {text[-1] if text else inner[-1].__class__.__name__}; is the disk full?"


def seen_exceptions(exc: BaseException) -> list[BaseException]:
    """exc, its causes and DCP's per-rank failures, outermost first."""
    out, todo = [], [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        for failure in getattr(e, "failures", {}).values():
            todo.append(failure if isinstance(failure, BaseException) else getattr(failure, "exc", None))
    return out


def prune(root: Path, keep: int, step: int, protect: set[Path]) -> None:
    """Keep the newest `keep` complete checkpoints up to `step`; remove older ones and stale staging dirs.
    Checkpoints past `step` (a damaged newer one that resuming skipped) are not counted, so they never push
    out a good one, and the checkpoint just written is never removed."""
    ours = [p for p in complete_checkpoints(root.parent) if step_of(p) <= step]
    protected = {p.resolve() for p in protect}
    for old in ours[:-keep]:
        if old.resolve() not in protected:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(trainer: "Trainer", path: Path) -> int:
    """Load a checkpoint written at any layout into this trainer (collective); return its step."""
    mesh = trainer.mesh
    state = _state(trainer, 0)
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True)  # rng/cuda may be absent; names checked first
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), planner=planner, no_dist=mesh is None)
    # DTensor views and plain tensors were filled in place; the step count is one value for all.
    optim_step = state["optim/step"]
    for slots in trainer.optimizer.state.values():
        slots["step"].copy_(optim_step)
    trainer.recent_lm_losses.clear()
    trainer.recent_lm_losses.extend(v.to(trainer.device) for v in state["train/recent_lm_losses"] if not torch.isnan(v))
    if trainer.masters is not None:
        trainer.masters.masters_to_model()
    torch.set_rng_state(state["rng/cpu"])
    if "rng/cuda" in state and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng/cuda"], trainer.device)
    step = int(state["train/step"])
    assert step_of(Path(path)) in (None, step), (path, step)
    trainer.resumed = (Path(path).resolve(), step)
    return step


def checkpoint_config(path: Path) -> Config:
    """The resolved config a checkpoint was written with."""
    try:
        return load_config(str(Path(path) / "config.toml"))
    except ConfigError as exc:
        raise UserError(f"checkpoint {path}: config.toml unusable ({exc})") from None


def read_model_state(path: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a checkpoint written at any layout, read in this process:
    DCP fills plain full-size tensors from the shards. Single-process names; parameters and the routers'
    expert bias. The checkpoint's shapes are checked against the model its config.toml describes."""
    from moemesh.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
    wanted = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *full_buffers(model).items()]}
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # an unreadable .metadata: the manifest check makes this rare
        raise UserError(f"checkpoint {path}: .metadata unreadable ({exc.__class__.__name__})") from None
    state = {}
    for name, shape in wanted.items():
        meta = stored.get(f"model/{name}")
        if meta is None or tuple(meta.size) != shape:
            found = "absent" if meta is None else list(meta.size)
            raise UserError(f"checkpoint {path}: model/{name} is {found}, its config.toml says {list(shape)}")
        state[name] = torch.empty(shape, dtype=meta.properties.dtype)
    with _quiet():
        dcp.load({f"model/{name}": t for name, t in state.items()}, checkpoint_id=str(path), no_dist=True)
    return state
