"""The planner's activation term against what autograd really saves: on CPU, every tensor packed by
`torch.autograd.graph.saved_tensors_hooks` during the forward pass (deduplicated by storage; parameters and
buffers excluded), plus the inputs that activation checkpointing keeps, per checkpointing mode, in fp32
and in the GPU's setup (bf16 parameters with fp32 masters, bf16 autocast).

Exact in fp32. Under bf16 the CPU runs the experts' per-expert loop instead of `torch._grouped_mm`
(train on CPU has no bf16 grouped GEMM), which does not save the int32 row offsets that the grouped GEMM
saves on the GPU: 4 * num_experts bytes per MoE layer, the one stated margin.

With train.compile the models are compiled as the Trainer does, with the "aot_eager" backend (Inductor's
code generation is slow on 2 cores): the same capture and AOT autograd partition, so the same saved
tensors. tests/unit/interpreted_memory.py runs these checks with train.fused_kernels' Triton kernels."""

from __future__ import annotations

import pytest
import torch

from moemesh.config import load_config
from moemesh.model.transformer import Transformer
from moemesh.plan.memory import activation_bytes
from moemesh.train import compiled
from moemesh.train.compiled import apply_compile
from moemesh.train.fused_kernels import apply_fused_kernels
from moemesh.train.master import MasterWeights
from moemesh.train.recompute import apply_activation_checkpointing

BASE = ["model.n_layers=2", "model.dim=64", "model.ffn_dim=96", "model.vocab_size=256", "model.num_experts=4",
        "model.top_k=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32", "train.seq_len=32",
        "train.global_batch=2"]
VARIANTS = {
    "base": [],
    "dense+shared": ["model.num_dense_layers=1", "model.dense_ffn_dim=160", "model.num_shared_experts=1"],
    "top1-e8-d128": ["model.top_k=1", "model.num_experts=8", "model.dim=128", "model.n_heads=8", "model.n_kv_heads=8"],
}


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()  # a fresh cache per model: no recompile limit across the parametrized tests


def build(overrides, mode, bf16, compile_=False, fused_kernels=False):
    """The model as train/loop.py:build_model sets it up on one device (checkpointing: saved_by_forward)."""
    cfg = load_config("tiny", [*BASE, *overrides, f"train.activation_checkpointing={mode}",
                               f"train.compile={str(compile_).lower()}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if bf16:
        MasterWeights(model, torch.bfloat16)  # what the trainer does on a GPU
    apply_fused_kernels(model, fused_kernels)
    apply_compile(model, compile_)
    return cfg, model


def saved_by_forward(cfg, model, bf16: bool, inside=None) -> int:
    """Bytes of the distinct storages autograd saves in one forward (and checkpointed modules' inputs);
    with `inside`, only those first saved while that module runs, its own input excluded."""
    mode = cfg.train.activation_checkpointing
    apply_activation_checkpointing(model, mode)
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    active = [inside is None]

    def keep(t):
        s = t.untyped_storage()
        if active[0] and s.data_ptr() not in exclude:
            seen.setdefault(s.data_ptr(), s.nbytes())

    def pack(t):
        keep(t)
        return t

    hooks = []
    if mode != "none":  # non-reentrant checkpoint holds the module's inputs for the recomputation
        for module in (model.moe_layers() if mode == "moe" else model.layers):
            hooks.append(module.register_forward_pre_hook(lambda mod, args: [keep(a) for a in args if torch.is_tensor(a)] and None))
    if inside is not None:
        def enter(mod, args):
            active[0] = True
            exclude.add(args[0].untyped_storage().data_ptr())

        inside.register_forward_pre_hook(enter)
        inside.register_forward_hook(lambda mod, args, out: active.__setitem__(0, False))
    b, s = cfg.train.global_batch, cfg.train.seq_len
    gen = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen) for _ in range(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        model(tokens, targets)
    return sum(seen.values())


def margin(cfg, bf16: bool) -> int:
    return 4 * cfg.model.num_experts * (cfg.model.n_layers - cfg.model.num_dense_layers) if bf16 else 0


def check_saved(variant, mode, bf16, compile_, fused_kernels):
    cfg, model = build(VARIANTS[variant], mode, bf16, compile_, fused_kernels)
    predicted = activation_bytes(cfg, cfg.train.global_batch * cfg.train.seq_len, amp=bf16, masters=bf16,
                                 fused_kernels=fused_kernels).saved
    measured = saved_by_forward(cfg, model, bf16)
    assert 0 <= predicted - measured <= margin(cfg, bf16), (predicted, measured)


def check_recomputed(mode, bf16, compile_, fused_kernels):
    """What one recomputed module holds again during its backward: the tensors it saves in a plain
    forward (checkpointing off), its input excluded (kept anyway)."""
    cfg, model = build(VARIANTS["base"], mode, bf16, compile_, fused_kernels)
    predicted = activation_bytes(cfg, cfg.train.global_batch * cfg.train.seq_len, amp=bf16, masters=bf16,
                                 fused_kernels=fused_kernels).recompute
    plain = load_config("tiny", [*BASE, "train.activation_checkpointing=none"])
    last = model.layers[-1]
    measured = saved_by_forward(plain, model, bf16, inside=last.ffn if mode == "moe" else last)
    assert 0 <= predicted - measured <= 4 * cfg.model.num_experts * bf16, (predicted, measured)


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "moe", "full"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_activations_match_autograd(variant, mode, bf16, compile_):
    check_saved(variant, mode, bf16, compile_, fused_kernels=False)


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["moe", "full"])
def test_recomputed_module_matches_its_plain_forward(mode, bf16, compile_):
    check_recomputed(mode, bf16, compile_, fused_kernels=False)
