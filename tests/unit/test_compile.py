"""train.compile: the dense parts of each block are compiled in place (names unchanged) and train exactly as
eager. Inductor's code generation is slow on 2 cores, so this uses the "aot_eager" backend: the same Dynamo
capture (fullgraph, so a graph break fails) and AOT autograd, with eager kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from moemesh.config import ConfigError, load_config
from moemesh.train import compiled
from moemesh.train.data import build_source
from moemesh.train.loop import Trainer


def _losses(tmp: Path, compile_: bool, recompute: str) -> tuple[list[float], Trainer]:
    cfg = load_config("tiny", [f"train.compile={str(compile_).lower()}", f"run.dir={tmp}",
                               f"train.activation_checkpointing={recompute}", "model.num_dense_layers=1"])
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    trainer = Trainer(cfg, None, source, torch.device("cpu"))
    return [float(trainer.step(s)[0][0]) for s in range(1, 4)], trainer


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_compiled_blocks_train_exactly_as_eager(tmp_path: Path, monkeypatch, recompute):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    eager, _ = _losses(tmp_path / "e", False, recompute)
    assert counters["stats"]["unique_graphs"] == 0
    got, trainer = _losses(tmp_path / "c", True, recompute)
    assert counters["stats"]["unique_graphs"] > 0  # it was compiled, not silently left eager
    assert got == eager
    names = [name for name, _ in trainer.model.named_parameters()]
    assert "layers.0.attention.wq.weight" in names and not any("_orig_mod" in n for n in names)


def test_compile_with_tensor_parallelism_is_refused():
    with pytest.raises(ConfigError, match="train.compile=true needs parallel.tp=1"):
        load_config("tiny", ["train.compile=true", "parallel.tp=2"])
