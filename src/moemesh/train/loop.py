"""The training loop. The same code runs single-process (`mesh=None`) and on every rank of a mesh."""

from __future__ import annotations

import contextlib
from collections import deque
import time
from pathlib import Path
from typing import Any

import torch

from moemesh import kernels
from moemesh.config import Config
from moemesh.errors import UserError
from moemesh.model.transformer import Transformer
from moemesh.parallel.apply import parallelize
from moemesh.parallel.layout import Layout
from moemesh.parallel.grad_buckets import GradSync
from moemesh.parallel.grads import clip_factor, clip_grad_norm, mean_over_batch
from moemesh.parallel.mesh import Mesh
from moemesh.train.data import TokenSource, build_source, shard_batch
from moemesh.train.checkpoint import load_checkpoint, save_checkpoint
from moemesh.train.evaluate import Evaluator, with_validation
from moemesh.train.ckpt_paths import latest_checkpoint
from moemesh.train.metrics import MetricsWriter, format_summary, write_summary
from moemesh.train.optim import build_optimizer, lr_at, set_lr
from moemesh.train.stop import Stopped, current as current_stopper
from moemesh.plan.flops import flops_per_token
from moemesh.train import cuda_graph, fused_adamw
from moemesh.train.precision import autocast_dtype, param_dtype
from moemesh.train.master import MasterWeights
from moemesh.train.prefetch import BatchPrefetcher
from moemesh.train.compiled import apply_compile
from moemesh.train.fused_kernels import apply_fused_kernels, fused_kernels_on
from moemesh.train.recompute import apply_activation_checkpointing
from moemesh.train.resume import continues_run_dir
from moemesh.train.rundir import prepare_run_dir


def resolve_device(cfg: Config) -> torch.device:
    wanted = cfg.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA device is visible (use 'cpu' or 'auto')")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def fused_master_wanted(cfg: Config, device: torch.device) -> bool:
    """Whether the config asks for the one-pass Triton step over fp32 masters (`fused_adamw.py`) here."""
    return param_dtype(cfg, device) != torch.float32 and runs_ahead(device) and cfg.train.fused_master_step


def uses_fused_master(cfg: Config, device: torch.device) -> bool:
    """Whether the optimizer step is the one-pass step: asked for, and Triton is there to run it."""
    return fused_master_wanted(cfg, device) and kernels.available(device)


def preflight(cfg: Config, check_ids: bool = True) -> TokenSource:
    """Everything that can fail on user input, checked before any file is written or process started."""
    device = resolve_device(cfg)
    par = cfg.parallel
    layout = (par.dp, par.ep, par.tp) if par.world_size > 1 else None  # one process runs without a mesh
    # 'on' where it cannot: one line, exit 2 (a launcher's ranks check their GPU's capability themselves)
    cuda_graph.wanted(cfg, device, layout, uses_fused_master(cfg, device), on_rank=layout is None)
    backend = cfg.parallel.backend
    if backend != "auto" and (backend == "nccl") != (device.type == "cuda"):
        raise UserError(f"parallel.backend={backend!r} does not fit train.device={device.type!r} "
                        f"(nccl runs on cuda, gloo on cpu; 'auto' picks)")
    return with_validation(build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed, check_ids),
                           cfg)


def build_model(cfg: Config, device: torch.device, mesh: Mesh | None) -> tuple[Transformer, Layout]:
    """Same initial weights at every layout: the full model is built from the seed, then sharded. It is
    built directly on the device (on a GPU: a second for billions of parameters, instead of tens on the
    host), so a CUDA run's initial weights come from the CUDA generator."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = Transformer(cfg.model)
    model, layout = parallelize(model, mesh, cfg.parallel)
    apply_fused_kernels(model, fused_kernels_on(cfg, device.type) and kernels.available(device))
    apply_compile(model, cfg.train.compile)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    return model, layout


def runs_ahead(device: torch.device) -> bool:
    """Whether the host queues steps ahead of the device, so the step must not wait for values on it."""
    return device.type == "cuda"


RECENT_LOSSES = 10  # summary.json's final_lm_loss is their mean


class Trainer:
    """One model, optimizer and data stream; `step(n)` runs optimizer step n (1-based) on this rank."""

    def __init__(self, cfg: Config, mesh: Mesh | None, source: TokenSource, device: torch.device):
        self.cfg, self.mesh, self.source, self.device = cfg, mesh, source, device
        self.model, self.layout = build_model(cfg, device, mesh)
        dtype = param_dtype(cfg, device)
        self.masters = MasterWeights(self.model, dtype) if dtype != torch.float32 else None
        # What the optimizer updates and grad sync, clipping and checkpoints read: the fp32 masters, if any.
        self.params = self.masters if self.masters is not None else self.model
        # On a GPU the step runs ahead of the host: fused AdamW (a few kernels, not ~1,000 launches) skips
        # a non-finite step on the device, and the host learns of it later, when it reads the metrics.
        self.on_device_checks = runs_ahead(device)
        self.optimizer = build_optimizer(self.params, cfg.train, fused=self.on_device_checks)
        # bf16 parameters on a GPU: one Triton pass per tensor does AdamW on the masters and writes the
        # bf16 parameters (`fused_adamw.py`). A single process feeds it the model's bf16 gradients as they
        # are; across ranks they become fp32 master gradients first, so they are reduced in fp32.
        self.fused_master = uses_fused_master(cfg, device)
        multi_rank = mesh is not None and mesh.world_size > 1  # torchrun with one process has a mesh of 1
        self.grads_on_masters = self.masters is not None and (not self.fused_master or multi_rank)
        self.grad_holder = self.model if self.masters is not None and not self.grads_on_masters else self.params
        # Bucketed gradient all-reduce launched from backward hooks (parallel.overlap_grad_reduce).
        self.grad_sync = GradSync(self.model, self.grad_holder, self.layout, mesh,
                                  cfg.parallel.overlap_grad_reduce, cfg.parallel.bucket_mb)
        self.amp_dtype = autocast_dtype(cfg, device)
        self.shard, self.num_shards = (0, 1) if mesh is None else (mesh.batch_shard, mesh.num_batch_shards)
        self.recent_lm_losses: deque[torch.Tensor] = deque(maxlen=RECENT_LOSSES)  # checkpointed too
        self.resumed: tuple[Path, int] | None = None  # (checkpoint, step) this trainer was loaded from
        self.prefetcher = BatchPrefetcher(self._local_batch, device) if device.type == "cuda" else None
        # The one-pass master step reads the learning rate from the device, so a captured step sees each
        # step's value; train.cuda_graph captures the whole step after a few eager ones (cuda_graph.py).
        self.lr = torch.zeros((), dtype=torch.float32, device=device) if self.fused_master else None
        self.capture = cuda_graph.wanted(cfg, device, None if mesh is None else (mesh.dp, mesh.ep, mesh.tp),
                                         self.fused_master)
        self.graph: cuda_graph.CapturedStep | None = None
        self.captured = False  # whether steps were replayed as one CUDA graph (stays True after `close`)
        self.eager_steps = 0

    def close(self) -> None:
        """Stop the batch thread (on CUDA; a thread inside a torch call at interpreter exit aborts it), remove
        the gradient-sync hooks and destroy the captured step (before the process group goes: see
        `CapturedStep.close`)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.grad_sync.close()
        if self.graph is not None:
            with self.reading("the last steps' results"):  # (its sync waits for them)
                self.graph.close()
            self.graph, self.capture = None, False

    def reading(self, what: str):
        """Where the host reads the results of steps that may still run on the GPUs. On a mesh whose steps
        are replayed CUDA graphs the watchdog watches this wait as it watches a collective: the graph's
        collectives run out of its sight, so a rank that hangs in one shows here."""
        if self.graph is None or self.mesh is None or self.mesh.world_size == 1:
            return contextlib.nullcontext()
        ranks = list(range(self.mesh.world_size))
        return self.mesh.trace.watching(f"reading {what} (their collectives run inside a CUDA graph) on world group "
                                        f"{ranks}", ranks)

    def _local_batch(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        batch = self.source.global_batch(step, cfg.train.global_batch, cfg.train.seq_len)
        return shard_batch(batch, self.shard, self.num_shards)

    def batch(self, step: int) -> torch.Tensor:
        if self.prefetcher is not None:
            return self.prefetcher.get(step)
        return self._local_batch(step).to(self.device)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float, bool | torch.Tensor]:
        """Returns (global [loss, lm_loss, aux_loss, z_loss], grad norm before clipping, lr, updated).
        A step whose loss or gradient norm is not finite is not applied: updated is False, or on a GPU a
        bool tensor that the caller reads when it next syncs anyway."""
        cfg = self.cfg
        if self.mesh is not None:
            self.mesh.trace.step = step
        batch_BS = self.batch(step)
        lr = lr_at(step, cfg.train)
        set_lr(self.optimizer, lr)
        if self.lr is not None:
            self.lr.fill_(lr)
        if self.graph is None and self.capture and self.eager_steps >= cuda_graph.WARMUP_STEPS:
            # captured (recorded, not run) now and replayed at once: every value the step leaves behind,
            # the routing statistics included, is then this step's
            self.graph = cuda_graph.CapturedStep(self._device_step, batch_BS)
            self.captured = True
        if self.graph is not None:
            losses, grad_norm, finite = self.graph(batch_BS)
            return losses, grad_norm, lr, finite
        if self.on_device_checks:
            losses, grad_norm, finite = self._device_step(batch_BS)
        else:
            losses, grad_norm, finite = self._host_step(batch_BS)
        if self.masters is not None and not self.fused_master:
            self.masters.masters_to_model()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        self.eager_steps += 1
        return losses, grad_norm, lr, finite

    def _forward_backward(self, batch_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of the batch, synced and measured: (global losses, grad norm, finite), device tensors."""
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
            out = self.model(batch_BS[:, :-1], batch_BS[:, 1:])
        out.loss.backward()
        if self.grads_on_masters:
            self.masters.grads_to_masters()
        self.grad_sync.finish()
        # Fused AdamW applies the clipping factor inside its kernel (as `grad_scale`, the factor it divides
        # gradients by): one pass over the gradients less.
        grad_norm = clip_grad_norm(self.grad_holder, self.layout, cfg.train.grad_clip, self.mesh,
                                   scale_grads=not self.on_device_checks)
        losses = mean_over_batch(torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach(), self.mesh)
        # Both are global (all-reduced), so every rank takes the same decision.
        finite = torch.isfinite(grad_norm) & torch.isfinite(losses).all()
        return losses, grad_norm, finite

    def _device_step(self, batch_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step that reads no value on the host (a GPU's): a non-finite one is skipped on the device
        (params, moments and count stay). With the one-pass master step it is what a CUDA graph holds."""
        cfg = self.cfg
        losses, grad_norm, finite = self._forward_backward(batch_BS)
        found_inf = (~finite).float()
        grad_scale = 1 / clip_factor(grad_norm, cfg.train.grad_clip) if cfg.train.grad_clip > 0 else None
        if self.fused_master:
            fused_adamw.step(self.optimizer, self.masters.model_params,
                             self.masters.grads(self.grads_on_masters), found_inf, grad_scale, self.lr)
        else:
            self.optimizer.found_inf, self.optimizer.grad_scale = found_inf, grad_scale
            self.optimizer.step()
        for moe in self.model.moe_layers():
            moe.router.update_bias(moe.last_stats.counts_E, cfg.model.bias_update_rate * finite)
        return losses, grad_norm, finite

    def _host_step(self, batch_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The CPU reference: the host reads the finiteness check and skips the update itself."""
        losses, grad_norm, finite = self._forward_backward(batch_BS)
        if finite := bool(finite):
            self.optimizer.step()
            for moe in self.model.moe_layers():
                moe.router.update_bias(moe.last_stats.counts_E, self.cfg.model.bias_update_rate)
        return losses, grad_norm, finite


class Speedometer:
    """On a GPU: TFLOP/s per GPU, MFU against `run.peak_tflops` and peak memory, for metrics and summary."""

    def __init__(self, cfg: Config, device: torch.device):
        self.on = device.type == "cuda"
        if self.on:
            self.flops_per_token = flops_per_token(cfg).per_token
            self.gpus, self.peak = cfg.parallel.world_size, cfg.run.peak_tflops * 1e12
            self.device = device

    def record(self, tokens_per_s: float) -> dict[str, float]:
        if not self.on:
            return {}
        flops = self.flops_per_token * tokens_per_s / self.gpus
        return {"tflops_per_gpu": flops / 1e12, "mfu": flops / self.peak,
                "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}


class NonFiniteLoss(Exception):
    """Training diverged: the one-line message names the step and the last good checkpoint."""


def train(cfg: Config, mesh: Mesh | None = None, source: TokenSource | None = None,
          run_dir: Path | None = None, resume_from: Path | None = None) -> dict[str, Any]:
    """Run optimizer steps up to `cfg.train.steps` (from a checkpoint's step when resuming); return the
    summary (on every rank). Checkpoints every `run.checkpoint_every` steps and after the last one."""
    device = resolve_device(cfg)
    source = source or preflight(cfg)
    is_main = mesh is None or mesh.rank == 0
    lock = None  # held until this function returns or raises; the OS drops it if the process dies
    if is_main and run_dir is None:
        run_dir, lock = prepare_run_dir(cfg, resuming=continues_run_dir(cfg, resume_from))
    try:
        return _train(cfg, mesh, source, run_dir, resume_from, device, is_main)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, mesh: Mesh | None, source: TokenSource, run_dir: Path, resume_from: Path | None,
           device: torch.device, is_main: bool) -> dict[str, Any]:
    trainer = Trainer(cfg, mesh, source, device)
    first = load_checkpoint(trainer, resume_from) if resume_from is not None else 0
    writer = (MetricsWriter(run_dir, cfg.train.steps, cfg.run.tensorboard, cfg.run.progress, start_step=first)
              if is_main else None)
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    recent_lm_losses = trainer.recent_lm_losses  # the summary's final loss (restored by a resume)
    window_start, window_steps, start = time.perf_counter(), 0, time.perf_counter()
    skipped, every = 0, cfg.run.checkpoint_every
    pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # GPU: finiteness not read yet
    speed = Speedometer(cfg, device)
    stopper = current_stopper()  # the CLI's SIGINT/SIGTERM handlers; never stops in library use

    def count_skipped(step: int, updated, losses: torch.Tensor, grad_norm: torch.Tensor) -> None:
        nonlocal skipped
        if updated:
            recent_lm_losses.append(losses[1])  # a skipped step's loss is no part of the final loss
            return
        skipped += 1
        if skipped > cfg.train.skip_nonfinite:
            raise NonFiniteLoss(_nonfinite_message(step, losses, grad_norm, run_dir, cfg))

    evaluator, val_loss = (Evaluator(trainer) if cfg.run.eval_every else None), None
    try:
        for step in range(first + 1, cfg.train.steps + 1):
            losses, grad_norm, lr, updated = trainer.step(step)
            if isinstance(updated, torch.Tensor):
                pending.append((step, updated, losses, grad_norm))
            else:
                count_skipped(step, updated, losses, grad_norm)
            window_steps += 1
            stop = step == cfg.train.steps or (every and step % every == 0)
            # On SIGINT/SIGTERM every rank stops after the same step (a collective on a mesh), saves and
            # leaves; a signal during the last step lets the run finish (it saves anyway).
            signum = stopper.agreed(mesh, step) if step < cfg.train.steps else None
            evaluated = evaluator is not None and (step % cfg.run.eval_every == 0 or step == cfg.train.steps)
            logged = step % cfg.run.log_every == 0 or step == cfg.train.steps or evaluated
            if logged or stop or signum is not None:
                for pending_step, flag, pending_losses, pending_norm in pending:  # reading a flag syncs
                    with trainer.reading(f"step {pending_step}'s results"):  # one step's wait each
                        updated = bool(flag)
                    count_skipped(pending_step, updated, pending_losses, pending_norm)
                pending.clear()
            if logged:
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * window_steps / (now - window_start)
                if evaluated:  # after the training window's clock: not counted in tokens_per_s
                    val_loss = evaluator()
                window_start, window_steps = time.perf_counter(), 0
                if writer is not None:
                    record = {**step_record(step, losses, lr, grad_norm, tokens_per_s, trainer.model),
                              **speed.record(tokens_per_s)}
                    writer.log({**record, "val_loss": val_loss} if evaluated else record)
            if cfg.run.checkpoints and (stop or signum is not None):
                save_checkpoint(trainer, run_dir, step)
            if signum is not None:
                raise Stopped(signum, step)
    finally:
        trainer.close()
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - start
    done = cfg.train.steps - first
    tail = torch.stack(list(recent_lm_losses)).mean().item() if recent_lm_losses else float("nan")
    summary = {
        "steps": cfg.train.steps, "resumed_from_step": first, "elapsed_s": elapsed,
        "tokens_per_s": tokens_per_step * done / elapsed,
        "final_lm_loss": tail, "entropy_floor": source.entropy_floor, "run_dir": str(run_dir),
        "gap_to_floor": None if source.entropy_floor is None else tail / source.entropy_floor - 1,
        "layout": {"dp": cfg.parallel.dp, "ep": cfg.parallel.ep, "tp": cfg.parallel.tp},
        "skipped_steps": skipped, "val_loss": val_loss, **speed.record(tokens_per_step * done / elapsed),
    }
    if is_main:
        write_summary(run_dir, summary)
        print(format_summary(summary), flush=True)
    return summary


def _nonfinite_message(step: int, losses: torch.Tensor, grad_norm: torch.Tensor, run_dir: Path | None,
                       cfg: Config) -> str:
    last = latest_checkpoint(run_dir) if run_dir is not None else None
    where = f"last good checkpoint: {last}" if last is not None else "no checkpoint was written"
    allowed = (f"more than train.skip_nonfinite={cfg.train.skip_nonfinite} such steps"
               if cfg.train.skip_nonfinite else "set train.skip_nonfinite=N to skip up to N such steps")
    return (f"step {step}: loss {float(losses[0]):.4g}, gradient norm {float(grad_norm):.4g} is not finite "
            f"(lower train.lr={cfg.train.lr:g}?); {allowed}; {where}")


def step_record(step: int, losses: torch.Tensor, lr: float, grad_norm: torch.Tensor, tokens_per_s: float,
                model: Transformer) -> dict[str, Any]:
    loss, lm_loss, aux_loss, z_loss = losses.tolist()
    loads, dropped = zip(*(moe.expert_load() for moe in model.moe_layers())) if model.moe_layers() else ((), ())
    return {
        "step": step, "loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "z_loss": z_loss, "lr": lr,
        "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s,
        "expert_load": [load.tolist() for load in loads], "dropped_frac": list(dropped),
    }
