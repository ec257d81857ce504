"""Rules around checkpoints that need no training: pruning, and skipped steps in the final loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moemesh.config import load_config
from moemesh.train import loop
from moemesh.train.checkpoint import prune


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    return path


def test_prune_keeps_the_newest_good_ones_and_ignores_newer_damaged_ones(tmp_path: Path):
    root = tmp_path / "checkpoints"
    old, resumed, new, newer = (_fake_checkpoint(root, s) for s in (10, 20, 25, 30))
    prune(root, keep=2, step=25, protect={new})
    assert not old.exists() and resumed.exists() and new.exists()
    assert newer.exists(), "a newer (damaged, skipped) checkpoint is neither counted nor removed"
    prune(root, keep=1, step=25, protect={new})
    assert not resumed.exists() and new.exists() and newer.exists()


def test_a_skipped_step_is_no_part_of_the_final_loss(tmp_path: Path, monkeypatch):
    step = loop.Trainer.step

    def nan_at_step_5(self, n):
        losses, grad_norm, lr, updated = step(self, n)
        if n == 5:  # as if this step's loss had been non-finite: reported, not applied
            return torch.full_like(losses, float("nan")), grad_norm, lr, False
        return losses, grad_norm, lr, updated

    monkeypatch.setattr(loop.Trainer, "step", nan_at_step_5)
    cfg = load_config("tiny", ["train.steps=8", "train.skip_nonfinite=1", f"run.dir={tmp_path / 'run'}",
                               "run.progress=false", "run.tensorboard=false"])
    summary = loop.train(cfg)
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["final_lm_loss"])
