"""The held-out split: disjoint from training windows, fixed per (seed, index), and no change at all to
training batches when it is off. (Equality of the validation loss across layouts: tests/e2e/test_hf_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moemesh.config import load_config
from moemesh.errors import ConfigError, UserError
from moemesh.train.data import build_source
from moemesh.train.evaluate import HeldOutSource, with_validation


def _bin(tmp_path: Path, num_tokens: int) -> Path:
    path = tmp_path / "ids.bin"
    np.arange(num_tokens, dtype="<u2").tofile(path)  # token i is i: a row shows where its window lies
    return path


def _sources(path: Path, *overrides: str):
    cfg = load_config("tiny", ["data.source=bin", f"data.path={path}", "model.vocab_size=4096", *overrides])
    full = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    return cfg, full, with_validation(full, cfg)


def test_held_out_tail_is_disjoint_from_training_windows(tmp_path):
    cfg, _, source = _sources(_bin(tmp_path, 4000), "data.val_fraction=0.25", "run.eval_every=5")
    assert isinstance(source, HeldOutSource)
    train = torch.cat([source.global_batch(step, 16, 64) for step in range(1, 50)])
    val = torch.cat([source.validation_batch(i, 16, 64) for i in range(4)])
    assert int(train.max()) < 3000 <= int(val.min()) and int(val.max()) < 4000
    assert torch.equal(source.validation_batch(2, 16, 64), source.validation_batch(2, 16, 64))
    assert not torch.equal(source.validation_batch(0, 16, 64), source.validation_batch(1, 16, 64))


def test_without_a_split_training_batches_are_unchanged(tmp_path):
    _, full, source = _sources(_bin(tmp_path, 4000))
    assert source is full
    synthetic = load_config("tiny")
    markov = build_source(synthetic.data, 128, 64, 0)
    wrapped = with_validation(markov, synthetic)
    assert torch.equal(wrapped.global_batch(3, 16, 64), markov.global_batch(3, 16, 64))
    val = wrapped.validation_batch(0, 16, 64)  # the same chain, another stream
    assert all(not torch.equal(val, markov.global_batch(step, 16, 64)) for step in range(1, 20))


def test_bad_splits_are_refused(tmp_path):
    with pytest.raises(UserError, match="data.val_fraction=0.01 splits"):
        _sources(_bin(tmp_path, 4000), "data.val_fraction=0.01")
    with pytest.raises(ConfigError, match="run.eval_every=5 needs data.val_fraction > 0"):
        load_config("tiny", ["data.source=text", "data.path=x.txt", "model.vocab_size=256", "run.eval_every=5"])
    with pytest.raises(ConfigError, match="data.val_fraction=1.0 must be < 1"):
        load_config("tiny", ["data.val_fraction=1"])
