"""How `moemesh train` runs: in this process, or as a mesh of processes."""

from __future__ import annotations

from moemesh.config import Config
from moemesh.train.loop import create_run_dir, preflight, train


def train_command(cfg: Config) -> int:
    source = preflight(cfg)
    run_dir = create_run_dir(cfg)
    train(cfg, None, source, run_dir)
    return 0
