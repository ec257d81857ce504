"""Which checkpoint a run continues from (`train.resume`), checked before any process starts.

"auto" takes the newest checkpoint of run.dir whose files match their manifest, skipping (with a
warning) incomplete or corrupted newer ones; "none" starts afresh; a path names one checkpoint. The
chosen checkpoint must hold the same model shapes; a different data stream or batch shape needs
`train.allow_data_change=true`; a checkpoint already at `train.steps` means the run is finished.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from moemesh.config import Config, load_config
from moemesh.errors import ConfigError, UserError, report
from moemesh.train.rundir import check_run_dir
from moemesh.train.ckpt_paths import CHECKPOINTS, MANIFEST, problem_with, step_of

# Settings that change the data a step sees: resuming across them must be asked for.
DATA_KEYS = ("data.source", "data.path", "data.token_dtype", "data.branching", "data.val_fraction",
             "train.global_batch", "train.seq_len", "train.seed")


def choose_checkpoint(cfg: Config) -> Path | None:
    if cfg.train.resume == "none" or (cfg.train.resume == "auto" and cfg.run.overwrite):
        return None
    if cfg.run.overwrite and _inside(Path(cfg.train.resume), Path(cfg.run.dir)):
        raise UserError(f"train.resume={cfg.train.resume} lies in run.dir={cfg.run.dir}, whose outputs "
                        f"run.overwrite=true deletes; copy it elsewhere first or drop run.overwrite")
    check_run_dir(cfg)  # an unusable run.dir path is named before any checkpoint is looked for
    if cfg.train.resume == "auto":
        path = _newest_loadable(Path(cfg.run.dir))
        if path is None:
            return None
    else:
        path = Path(cfg.train.resume)
        if not path.is_dir():
            raise UserError(f"train.resume={cfg.train.resume}: no such checkpoint directory")
        if (problem := problem_with(path)) is not None:
            raise UserError(f"train.resume={cfg.train.resume}: {problem}")
    check_compatible(cfg, path)
    return path


def _inside(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


def continues_run_dir(cfg: Config, resume_from: Path | None) -> bool:
    """Whether run.dir's earlier outputs are this run's own past (a checkpoint of run.dir is loaded).
    A checkpoint from elsewhere starts a new run in run.dir: an earlier run there is refused or replaced."""
    return resume_from is not None and _inside(resume_from, Path(cfg.run.dir))


def restarting() -> bool:
    """A group restarted by the elastic agent after a failure: continue, never start afresh."""
    import os

    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _newest_loadable(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    for stale in sorted(root.glob(".tmp-step_*")):
        report(f"warning: ignoring {stale}: a checkpoint whose writing did not finish")
    for path in reversed(candidates):
        problem = problem_with(path)
        if problem is None:
            return path
        report(f"warning: skipping checkpoint {path}: {problem}")
    if candidates:
        raise UserError(f"run.dir={run_dir}: no loadable checkpoint ({len(candidates)} damaged, see above); "
                        f"set train.resume=none and run.overwrite=true to start afresh")
    return None


def check_compatible(cfg: Config, path: Path) -> None:
    step = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["step"]
    try:
        saved = load_config(str(path / "config.toml"))
        shapes = json.loads((path / "layout.json").read_text(encoding="utf-8"))["params"]
    except (ConfigError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"checkpoint {path}: config.toml or layout.json unreadable ({exc})") from None
    mine = _param_shapes(cfg)
    for name, shape in mine.items():
        theirs = shapes.get(name, {}).get("full_shape")
        if theirs != shape:
            raise UserError(f"checkpoint {path} holds another model: {name} is "
                            f"{theirs if theirs is not None else 'absent'} there, {shape} here (model.* differ)")
    extra = sorted(set(shapes) - set(mine))
    if extra:
        raise UserError(f"checkpoint {path} holds another model: {extra[0]} is not in this one (model.* differ)")
    if step >= cfg.train.steps:  # before the data check: a finished run is most likely meant as a new one
        if cfg.train.resume != "auto":
            raise UserError(f"train.resume={cfg.train.resume} is at step {step}, and train.steps={cfg.train.steps} "
                            f"leaves nothing to train: set train.steps above {step}")
        raise UserError(f"run.dir={cfg.run.dir} is finished: checkpoint {path.name} is at step {step} and "
                        f"train.steps={cfg.train.steps}; raise train.steps to train on, or set "
                        f"run.overwrite=true (or another run.dir) to start again")
    if not cfg.train.allow_data_change:
        for key in DATA_KEYS:
            before, now = _value(saved, key), _value(cfg, key)
            if before != now:
                raise UserError(f"checkpoint {path} was trained with {key}={before}, this run has {now}; set "
                                f"train.allow_data_change=true to continue with the new value")
    for key, before in dataclasses.asdict(saved.model).items():  # same shapes, another model setting
        now = getattr(cfg.model, key)
        if before != now:
            report(f"warning: continuing checkpoint {path} with model.{key}={now} (it was trained with {before})")


def _value(cfg: Config, key: str):
    section, _, name = key.partition(".")
    value = getattr(getattr(cfg, section), name)
    return str(Path(value).resolve()) if key == "data.path" and value else value


def _param_shapes(cfg: Config) -> dict[str, list[int]]:
    import torch

    from moemesh.model.transformer import Transformer

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = Transformer(cfg.model)
    return {name: list(p.shape) for name, p in model.named_parameters()}
