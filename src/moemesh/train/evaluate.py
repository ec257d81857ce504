"""Validation loss: held-out data, evaluated at any layout with the single-process value.

Held-out data (`with_validation`, applied by `preflight` to the training source):
  text, bin   the last `data.val_fraction` of the token array. Training windows start only in the rest and
              never reach into it; validation windows lie wholly inside it. With val_fraction = 0 the
              training source is the unchanged one (the same windows as before this split existed).
  synthetic   the same Markov chain, another random stream: validation batch i is the source's batch of
              "step" -(i + 1). Batches are pure functions of (seed, step) and training steps start at 1,
              so the two streams never share a batch.
Validation batch i (i < run.eval_batches) depends only on the seed and i: every evaluation sees the same
rows, whatever the layout. Each data x expert coordinate evaluates its rows of each batch (like a training
step); the mean losses are averaged with the training step's collective (`mean_over_batch`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from moemesh.config import Config
from moemesh.errors import UserError
from moemesh.parallel.grads import mean_over_batch
from moemesh.train.data import TokenSource, WindowSource, shard_batch

if TYPE_CHECKING:
    from moemesh.train.loop import Trainer


class HeldOutSource:
    """A TokenSource for training, plus `validation_batch`: the held-out rows."""

    def __init__(self, train: TokenSource, held_out: TokenSource):
        self.train, self.held_out = train, held_out
        self.vocab_size, self.entropy_floor = train.vocab_size, train.entropy_floor

    def global_batch(self, step: int, global_batch: int, seq_len: int) -> torch.Tensor:
        return self.train.global_batch(step, global_batch, seq_len)

    def validation_batch(self, index: int, global_batch: int, seq_len: int) -> torch.Tensor:
        """int64 [global_batch, seq_len + 1], like a training batch; a function of (seed, index)."""
        return self.held_out.global_batch(-(index + 1), global_batch, seq_len)


def with_validation(source: TokenSource, cfg: Config) -> TokenSource:
    """The training source with its held-out part split off (see the module docstring)."""
    fraction, seq_len = cfg.data.val_fraction, cfg.train.seq_len
    if cfg.data.source == "synthetic":
        return HeldOutSource(source, source)
    if fraction == 0:
        return source
    assert isinstance(source, WindowSource), type(source)
    tokens_N: np.ndarray = source.tokens_N
    held = int(len(tokens_N) * fraction)
    kept = len(tokens_N) - held
    if min(held, kept) < seq_len + 1:
        raise UserError(f"data.val_fraction={fraction} splits data.path={cfg.data.path} ({len(tokens_N)} tokens) "
                        f"into {kept} training and {held} held-out tokens; each part needs at least "
                        f"train.seq_len+1={seq_len + 1}")
    return HeldOutSource(WindowSource(tokens_N[:kept], source.vocab_size, source.seed),
                         WindowSource(tokens_N[kept:], source.vocab_size, source.seed))


class Evaluator:
    """`evaluator()` -> the validation loss (mean next-token cross-entropy over run.eval_batches batches),
    the same number on every rank. Collective on a mesh: every rank calls it at the same steps."""

    def __init__(self, trainer: "Trainer"):
        source = trainer.source
        if not isinstance(source, HeldOutSource):  # a library caller's own source; the CLI's comes from preflight
            raise UserError("run.eval_every > 0 needs a source with held-out data: build it with preflight(cfg) "
                            "(and data.val_fraction > 0 for text or bin data)")
        self.trainer, self.source = trainer, source
        self.batches: list[torch.Tensor] = []  # this rank's rows of each batch, made on first use

    def _rows(self) -> list[torch.Tensor]:
        if not self.batches:
            t, tr = self.trainer.cfg.train, self.trainer
            self.batches = [shard_batch(self.source.validation_batch(i, t.global_batch, t.seq_len),
                                        tr.shard, tr.num_shards).to(tr.device)
                            for i in range(tr.cfg.run.eval_batches)]
        return self.batches

    @torch.no_grad()
    def __call__(self) -> float:
        tr = self.trainer
        moe_layers = tr.model.moe_layers()
        kept = [moe.last_stats for moe in moe_layers]  # the training step's routing stats are logged after this
        total = torch.zeros((), device=tr.device)
        autocast = torch.autocast(tr.device.type, dtype=tr.amp_dtype) if tr.amp_dtype else contextlib.nullcontext()
        with autocast:
            for batch_BS in self._rows():
                total += tr.model(batch_BS[:, :-1], batch_BS[:, 1:]).lm_loss.float()
        for moe, stats in zip(moe_layers, kept):
            moe.last_stats = stats
        return float(mean_over_batch(total / len(self.batches), tr.mesh))
