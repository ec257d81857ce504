"""The training step as one CUDA graph, on a GPU (skipped where there is none; the GPU machine runs these
with `python -m pytest tests/gpu`): a captured run trains like the eager one, skips a non-finite step on
the device, logs the training step's routing statistics after a validation loss, and resumes from a
checkpoint like an eager run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.config import load_config
from moemesh.train.checkpoint import load_checkpoint, save_checkpoint
from moemesh.train.cuda_graph import WARMUP_STEPS
from moemesh.train.data import build_source
from moemesh.train.evaluate import Evaluator, with_validation
from moemesh.train.loop import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 8


def _trainer(tmp: Path, graph: str, *extra: str) -> Trainer:
    cfg = load_config("gpu", [f"train.cuda_graph={graph}", f"run.dir={tmp}", "model.n_layers=2", "model.dim=512",
                              "model.ffn_dim=1024", "model.n_heads=8", "model.n_kv_heads=4", "train.global_batch=8",
                              "train.seq_len=256", f"train.steps={STEPS}", "train.warmup_steps=2",
                              "model.router=sigmoid", "model.num_shared_experts=1", "run.eval_batches=1", *extra])
    source = with_validation(build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed), cfg)
    return Trainer(cfg, None, source, torch.device("cuda"))


def _run(trainer: Trainer, first: int, last: int) -> list[torch.Tensor]:
    out = [trainer.step(s) for s in range(first, last + 1)]
    torch.cuda.synchronize()
    return [losses for losses, *_ in out]


@pytest.mark.parametrize("extra", [[], ["train.activation_checkpointing=moe"]], ids=["plain", "recompute-moe"])
def test_captured_steps_train_like_eager_ones(tmp_path: Path, extra):
    graphed, eager = _trainer(tmp_path / "g", "on", *extra), _trainer(tmp_path / "e", "off", *extra)
    got, want = _run(graphed, 1, STEPS), _run(eager, 1, STEPS)
    assert graphed.graph is not None and eager.graph is None
    # the eager steps before the capture are the same code; after it, the same kernels replayed
    assert all(torch.equal(a, b) for a, b in zip(got[:WARMUP_STEPS], want[:WARMUP_STEPS]))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # bf16; atomics in backward may reorder sums
    assert got[-1][1] < got[0][1]  # it learns
    for a, b in zip(graphed.params.parameters(), eager.params.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
    for (_, p), master in zip(graphed.model.named_parameters(), graphed.params.parameters()):
        assert torch.equal(p, master.to(torch.bfloat16))  # the graph wrote the bf16 parameters too
    for a, b in zip(graphed.model.moe_layers(), eager.model.moe_layers()):
        torch.testing.assert_close(a.router.expert_bias, b.router.expert_bias)  # the bias update ran
    assert all(float(graphed.optimizer.state[m]["step"]) == STEPS for m in graphed.params.parameters())
    graphed.close(), eager.close()


def test_a_non_finite_step_is_skipped_inside_the_graph(tmp_path: Path):
    trainer = _trainer(tmp_path, "on")
    _run(trainer, 1, WARMUP_STEPS + 1)
    assert trainer.graph is not None
    masters = [m.clone() for m in trainer.params.parameters()]
    # a weight every token's forward reads (an embedding row might not be in the batch)
    weight = next(p for name, p in trainer.model.named_parameters() if name.startswith("layers.0.") and p.ndim == 2)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("inf")  # in place: the graph reads this address
    _, _, _, updated = trainer.step(WARMUP_STEPS + 2)
    assert not bool(updated)
    assert all(torch.equal(a, b) for a, b in zip(trainer.params.parameters(), masters))
    assert all(float(trainer.optimizer.state[m]["step"]) == WARMUP_STEPS + 1 for m in trainer.params.parameters())
    with torch.no_grad():
        weight.copy_(saved)
    _, _, _, updated = trainer.step(WARMUP_STEPS + 3)
    assert bool(updated)
    trainer.close()


def test_routing_stats_after_a_validation_loss_are_the_training_steps(tmp_path: Path):
    trainer = _trainer(tmp_path, "on")
    _run(trainer, 1, WARMUP_STEPS + 1)
    moe = trainer.model.moe_layers()[0]
    counts = moe.last_stats.counts_E.clone()
    Evaluator(trainer)()
    assert torch.equal(moe.last_stats.counts_E, counts)
    _run(trainer, WARMUP_STEPS + 2, WARMUP_STEPS + 2)
    assert not torch.equal(moe.last_stats.counts_E, counts)  # the replay updates what is logged
    trainer.close()


def test_every_step_logs_its_own_routing_statistics(tmp_path: Path):
    """The capture happens at the start of the first replayed step and is replayed at once, so no step
    leaves statistics the graph has not yet written (a capture at the end of an eager step did)."""
    trainer = _trainer(tmp_path, "on")
    for step in range(1, WARMUP_STEPS + 3):
        trainer.step(step)
        assert (trainer.graph is not None) == (step > WARMUP_STEPS)
        for moe in trainer.model.moe_layers():
            load, dropped = moe.expert_load()
            assert torch.isfinite(load).all() and float(load.sum()) > 0 and dropped == 0, (step, load, dropped)
    trainer.close()


def test_a_captured_run_resumes_like_an_eager_one(tmp_path: Path):
    straight = _trainer(tmp_path / "s", "off")
    want = _run(straight, 1, STEPS)
    first = _trainer(tmp_path / "r", "on")
    _run(first, 1, 5)
    path = save_checkpoint(first, tmp_path / "r", 5)
    again = _trainer(tmp_path / "r", "on")
    assert load_checkpoint(again, path) == 5
    got = _run(again, 6, STEPS)
    for a, b in zip(got, want[5:]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    straight.close(), first.close(), again.close()
