"""What the GPU step adds around the model, checked on the CPU: activation checkpointing changes no
number, the batch prefetcher hands out exactly the batches of the data source, in order, and the
combine in the experts' dtype is the old fp32 arithmetic when the experts run in fp32."""

from __future__ import annotations

import pytest
import torch

from moemesh.config import load_config
from moemesh.model.moe import RowOrder, combine
from moemesh.train.data import build_source
from moemesh.train.loop import Trainer
from moemesh.train.prefetch import BatchPrefetcher


def _train(mode: str, steps: int = 3):
    cfg = load_config("tiny", [f"train.activation_checkpointing={mode}", "model.num_dense_layers=1",
                               "model.n_layers=3", "train.warmup_steps=1"])
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    trainer = Trainer(cfg, None, source, torch.device("cpu"))
    losses = [trainer.step(step)[0] for step in range(1, steps + 1)]
    return torch.stack(losses), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("mode", ["moe", "full"])
def test_activation_checkpointing_changes_no_number(mode):
    ref_losses, ref_params = _train("none")
    losses, params = _train(mode)
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(params[n], ref_params[n]) for n in ref_params)


def test_prefetcher_hands_out_the_source_batches_in_order_and_restarts():
    made = []

    def make(step):
        made.append(step)
        return torch.full((2, 3), step)

    pre = BatchPrefetcher(make, torch.device("cpu"))
    assert [int(pre.get(s)[0, 0]) for s in (1, 2, 3)] == [1, 2, 3]
    assert int(pre.get(7)[0, 0]) == 7  # a jump (a resume) restarts the producer at that step
    assert int(pre.get(8)[0, 0]) == 8
    pre.close()
    assert made[:3] == [1, 2, 3] and 7 in made


def test_prefetcher_raises_the_producers_error_in_the_caller():
    def make(step):
        raise OSError(f"cannot read step {step}")

    pre = BatchPrefetcher(make, torch.device("cpu"))
    with pytest.raises(OSError, match="cannot read step 5"):
        pre.get(5)
    pre.close()


def test_combine_in_fp32_is_the_fp32_reference():
    torch.manual_seed(0)
    T, K, D = 5, 2, 4
    y_RD, order_R = torch.randn(7, D), torch.tensor([0, 1, 2, 4, 5, 7, 9])
    w_TK = torch.rand(T, K)
    ref = torch.zeros(T * K, D)
    ref[order_R] = y_RD * w_TK.reshape(-1)[order_R][:, None]
    assert torch.equal(combine(y_RD, RowOrder.of(order_R, T, K), w_TK), ref.view(T, K, D).sum(dim=1))
