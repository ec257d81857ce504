"""Which dtypes a run computes and keeps its parameters in, from the config and the device (read by the
Trainer, and by the planner, which must not import the training loop: `moemesh plan` answers in < 2 s)."""

from __future__ import annotations

import torch

from moemesh.config import Config


def param_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 parameters (with fp32 masters) when asked, or by default when training in bf16 on CUDA."""
    if cfg.train.param_dtype == "bfloat16" or (
            cfg.train.param_dtype == "auto" and device.type == "cuda" and autocast_dtype(cfg, device) == torch.bfloat16):
        return torch.bfloat16
    return torch.float32


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA unless float32 is asked for; fp32 on CPU unless bfloat16 is asked for."""
    if cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
