"""Where checkpoints live in a run dir, and which of them are complete (no torch import here).

    run_dir/checkpoints/step_000400/   one directory per checkpoint, named by its optimizer step
        manifest.json                  written last: {"step", "files": {name: {"bytes", "sha256"}}}
        .metadata, __0_0.distcp ...    torch.distributed.checkpoint files
        config.toml, layout.json       the resolved config and the placement table it was written at

A checkpoint is written into `checkpoints/.tmp-step_000400-<pid>` and renamed when complete, so a
directory named `step_*` with a manifest is complete; anything else there does not exist for resuming.
"""

from __future__ import annotations

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
