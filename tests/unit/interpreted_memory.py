"""tests/unit/test_activation_memory.py's exact checks of the planner's activation term with
train.fused_kernels' Triton kernels switched on (`apply_fused_kernels(model, True)`, as the Trainer does
on a GPU), run by Triton's interpreter on the CPU: the bytes the kernels' autograd Functions and the
PyTorch code around them save, per checkpointing mode, fp32 and the GPU's bf16 setup (same margin: the
CPU's per-expert loop does not save the grouped GEMM's int32 offsets), eager and with train.compile
(which puts the PyTorch code back in the modules it compiles).

Run by tests/unit/test_kernels.py in the process it starts with TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest

from tests.unit.test_activation_memory import VARIANTS, aot_eager, check_recomputed, check_saved  # noqa: F401

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/unit/test_kernels.py"


@pytest.mark.parametrize("compile_", [False, True], ids=["kernels", "kernels+compile"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "moe", "full"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_activations_with_fused_kernels_match_autograd(variant, mode, bf16, compile_):
    check_saved(variant, mode, bf16, compile_, fused_kernels=True)


@pytest.mark.parametrize("compile_", [False, True], ids=["kernels", "kernels+compile"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["moe", "full"])
def test_recomputed_module_with_fused_kernels_matches_its_plain_forward(mode, bf16, compile_):
    check_recomputed(mode, bf16, compile_, fused_kernels=True)
