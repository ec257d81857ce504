"""bf16 parameters with fp32 master weights (the GPU default in bf16), exercised on the CPU: the model
computes in bf16, the optimizer updates fp32 masters, checkpoints hold the masters and resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.config import load_config
from moemesh.train.checkpoint import load_checkpoint, save_checkpoint
from moemesh.train.data import build_source
from moemesh.train import loop
from moemesh.train.loop import Trainer


def _trainer(tmp: Path, dtype: str, steps: int = 8) -> Trainer:
    # small: bf16 matmuls are slow on a CPU
    cfg = load_config("tiny", [f"train.param_dtype={dtype}", "train.dtype=bfloat16", f"train.steps={steps}",
                               "model.router=sigmoid", f"run.dir={tmp}", "train.global_batch=4", "train.seq_len=32",
                               "model.n_layers=1", "train.warmup_steps=2"])
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    return Trainer(cfg, None, source, torch.device("cpu"))


def test_bf16_model_fp32_masters_train_like_fp32_parameters(tmp_path: Path):
    bf16, fp32 = _trainer(tmp_path / "a", "bfloat16", 20), _trainer(tmp_path / "b", "float32", 20)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert all(p.dtype == torch.float32 for p in bf16.params.parameters())
    assert bf16.model.layers[0].ffn.router.expert_bias.dtype == torch.float32  # buffers stay fp32
    a = [float(bf16.step(s)[0][1]) for s in range(1, 21)]
    b = [float(fp32.step(s)[0][1]) for s in range(1, 21)]
    assert a[-1] < a[0] - 0.3  # it learns
    assert abs(a[-1] - b[-1]) / b[-1] < 0.02  # bf16 compute, fp32 updates: close to fp32 parameters
    for (_, p), master in zip(bf16.model.named_parameters(), bf16.params.parameters()):
        assert torch.equal(p, master.to(torch.bfloat16))  # the model is its masters, rounded


@pytest.mark.parametrize("one_pass", [False, True])
def test_checkpoint_holds_the_masters_and_resumes_exactly(tmp_path: Path, monkeypatch, one_pass):
    if one_pass:  # the GPU path: device-side checks and the Triton master step (its interpreter, here)
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(loop, "runs_ahead", lambda device: True)
    straight = _trainer(tmp_path / "s", "bfloat16")
    want = [straight.step(s)[0] for s in range(1, 9)]
    first = _trainer(tmp_path / "r", "bfloat16")
    for s in range(1, 5):
        first.step(s)
    path = save_checkpoint(first, tmp_path / "r", 4)
    again = _trainer(tmp_path / "r", "bfloat16")
    assert again.fused_master == one_pass
    assert load_checkpoint(again, path) == 4
    got = [again.step(s)[0] for s in range(5, 9)]
    assert all(torch.equal(g, w) for g, w in zip(got, want[4:]))
    assert all(torch.equal(a, b) for a, b in zip(again.params.parameters(), straight.params.parameters()))
    # the masters are fp32 in the checkpoint: an fp32-parameter run loads them without rounding
    as_fp32 = _trainer(tmp_path / "r", "float32")
    load_checkpoint(as_fp32, path)
    assert all(torch.equal(a, b) for a, b in zip(as_fp32.model.parameters(), first.params.parameters()))


def test_one_pass_master_step_trains_like_the_unfused_one(tmp_path: Path, monkeypatch):
    """The GPU path (device-side checks, the Triton AdamW fed the model's bf16 gradients), run on the CPU by
    Triton's interpreter, against the unfused CPU path (fp32 master gradients, torch's AdamW, copy back)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(loop, "runs_ahead", lambda device: True)
    fused = _trainer(tmp_path / "f", "bfloat16", 6)
    assert fused.fused_master and not fused.grads_on_masters and fused.grad_holder is fused.model
    monkeypatch.setattr(loop, "runs_ahead", lambda device: False)
    plain = _trainer(tmp_path / "p", "bfloat16", 6)
    assert not plain.fused_master
    for s in range(1, 7):
        (lf, nf, _, okf), (lp, np_, _, okp) = fused.step(s), plain.step(s)
        assert bool(okf) and okp
        torch.testing.assert_close(lf, lp, rtol=2e-3, atol=0)  # bf16 compute; AdamW rounding differs
        torch.testing.assert_close(nf, np_, rtol=2e-2, atol=0)
    assert all(p.grad is None for p in fused.model.parameters())
    for (_, p), master in zip(fused.model.named_parameters(), fused.params.parameters()):
        assert torch.equal(p, master.to(torch.bfloat16))
    assert all(float(fused.optimizer.state[m]["step"]) == 6 for m in fused.params.parameters())
