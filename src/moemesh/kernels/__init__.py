"""Triton kernels for the memory-bound parts of a bf16 training step on a GPU.

Each module holds the kernels of one operation, an autograd Function that launches them, and nothing
else; the model keeps its plain PyTorch code as the reference and as the path on CPU. The kernels load
any float dtype, compute in fp32 and round once on store, so on bf16 tensors they are at least as
accurate as the chains of eager operations they replace (which round after every operation).

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (Triton's interpreter): the unit tests compare
them there with the PyTorch code, values and gradients.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def available(device: torch.device) -> bool:
    """The Triton kernels run on CUDA devices (or anywhere under TRITON_INTERPRET=1, for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or interpreting()


def row_programs(device: torch.device) -> int:
    """How many programs a kernel that loops over rows should launch: a few per SM on a GPU, a handful
    under the interpreter (which runs programs one by one)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3
