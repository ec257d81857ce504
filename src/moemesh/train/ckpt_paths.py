"""Where checkpoints live in a run dir, which of them are complete, and their manifests (no torch here).

    run_dir/checkpoints/step_000400/   one directory per checkpoint, named by its optimizer step
        manifest.json                  written last: {"step", "files": {name: {"bytes", "sha256"}}}
        .metadata, __0_0.distcp ...    torch.distributed.checkpoint files
        config.toml, layout.json       the resolved config and the placement table it was written at

A checkpoint is written into `checkpoints/.tmp-step_000400-<pid>` and renamed when complete, so a
directory named `step_*` with a manifest is complete; anything else there does not exist for resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Directories `run_dir/checkpoints/step_*` that hold a manifest, oldest first (checksums unchecked)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so that renames and new entries in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int) -> None:
    """Checksum every file of a finished checkpoint directory, then write manifest.json last (fsynced)."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    staged = directory / f".{MANIFEST}.partial"
    staged.write_text(json.dumps({"format": 1, "step": step, "files": files}, indent=1) + "\n", encoding="utf-8")
    fsync_path(staged)
    staged.rename(directory / MANIFEST)
    fsync_path(directory)


def problem_with(directory: Path) -> str | None:
    """Why a checkpoint directory cannot be loaded (missing, truncated or corrupted file), or None."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (an incomplete checkpoint)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc.__class__.__name__})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def resolve_checkpoint(target: str) -> Path:
    """A checkpoint directory, or a run dir's newest complete checkpoint (damaged newer ones are skipped
    with a warning); checksums checked. A one-line UserError names what is wrong."""
    from moemesh.errors import UserError, report

    path = Path(target)
    if not path.is_dir():
        raise UserError(f"{target}: no such run dir or checkpoint directory")
    if (path / MANIFEST).exists() or step_of(path) is not None:
        if (problem := problem_with(path)) is not None:
            raise UserError(f"checkpoint {target}: {problem}")
        return path
    if not (path / CHECKPOINTS).is_dir():
        raise UserError(f"{target}: neither a run dir (no {CHECKPOINTS}/) nor a checkpoint (no {MANIFEST})")
    candidates = sorted((p for p in (path / CHECKPOINTS).iterdir() if p.is_dir() and step_of(p) is not None),
                        key=step_of)
    for candidate in reversed(candidates):
        if (problem := problem_with(candidate)) is None:
            return candidate
        report(f"warning: skipping checkpoint {candidate}: {problem}")
    raise UserError(f"{target}: no complete checkpoint in {path / CHECKPOINTS}")
