"""Per-rank memory of a run, estimated from the config and the placement table before anything is
allocated (the layout planner extends this module; the sharding itself is read from `parallel/layout.py`,
never modelled a second time).

Two numbers, kept apart because torch sees only one of them:
  allocated  what `torch.cuda.max_memory_allocated` reports at the training peak: parameters, gradients,
             AdamW moments (local shards from the placement table), the activations the real code path
             saves for backward (`activation_bytes`, below), and the transients of backward;
  overhead   the CUDA context and the allocator's slack, which `max_memory_allocated` cannot see: a fixed
             term, added only where the estimate is checked against the GPU's capacity (`device`).
The full model that every rank builds before slicing out its shards (`train.loop.build_model`) is a
third, earlier peak (`full_model`).

Activations (`activation_bytes`) are counted tensor by tensor from the code in model/ and
train/recompute.py: for a micro-batch of T tokens, the bytes of every tensor autograd saves for backward
(tests/unit/test_activation_memory.py compares them, per checkpointing mode, with the bytes that
`torch.autograd.graph.saved_tensors_hooks` sees on CPU). b is the compute dtype's size (2 under bf16
autocast), r the residual stream's (2 with bf16 parameters, else 4); norms, router, combine weights and
the cross-entropy's log-softmax are fp32 whatever the autocast. Each part is counted as the code that runs
it (`CodePath`): on CUDA train.fused_kernels' Triton kernels, which save less (RMSNorm keeps x and an fp32
1/rms, rotary only its fp32 tables, SwiGLU gate and up, the combine its fp32 weights; tests/unit/
interpreted_memory.py checks them under Triton's interpreter), eager PyTorch elsewhere, and what AOT
autograd keeps for the modules train.compile compiles. With activation checkpointing
(`train.activation_checkpointing`) a recomputed module keeps only its input, and during its backward its
own activations live again (`recompute`). Backward frees saved tensors as it goes and makes gradients:
its peak is at the head (everything saved plus the fp32 gradients of the log-softmax and of the logits,
2 x 4 T V) or in the last layer (the head's activations gone, the layer recomputed, the gradients of the
expert rows and slots and one hidden tensor in flight, b R (2 D + F)), whichever is larger; parameter
gradients are counted whole only at the end of backward, when the activations are gone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from moemesh.config import Config
from moemesh.train.fused_kernels import fused_kernels_on
from moemesh.errors import UserError, report

GIB = 1024 ** 3
PROCESS_OVERHEAD = {"cpu": 0.45 * GIB, "cuda": 1.0 * GIB}  # torch runtime, CUDA context, allocator slack
FP32 = 4


@dataclass
class MemoryEstimate:
    params: int  # bytes of this rank's parameter shards (bf16 parameters: bf16 copy + fp32 masters)
    grads: int  # every local gradient, at the end of backward (bf16 parameters: bf16 gradients; with
    # parallel.overlap_grad_reduce on a mesh: the fp32 gradient buckets)
    optimizer: int
    activations: int  # peak of backward: saved activations, recompute, transients, the gradients made by then
    full_model: int  # the whole model, built once on each rank's host before it is sharded
    overhead: int  # CUDA context and allocator slack: not in torch.cuda.max_memory_allocated
    a2a_buffers: int = 0  # expert all-to-all send/receive rows alive in a MoE layer (ep > 1)
    master_grads: int = 0  # bf16 parameters: the fp32 master gradients, alive from sync to the update (not
    # made by the one-pass master step on one GPU; views into the buckets when there are buckets)
    buckets: int = 0  # bytes of the fp32 gradient buckets, alive the whole step (parallel/grad_buckets.py)

    @property
    def allocated(self) -> int:
        """Training peak as torch.cuda.max_memory_allocated sees it: early in backward (activations,
        `Activations.peak`), the end of backward (every gradient) or the optimizer step (fp32 master
        gradients), on top of parameters and AdamW moments."""
        backward = self.activations + self.a2a_buffers
        # the buckets are allocated before backward and kept: they add to every phase
        return self.params + self.optimizer + self.buckets + max(backward, self.grads - self.buckets,
                                                                 self.master_grads)

    @property
    def device(self) -> int:
        """What the device must hold at the training peak: the allocated peak plus the runtime overhead."""
        return self.allocated + self.overhead

    @property
    def device_peak(self) -> int:
        """The model is built whole on the device first, before training allocates the rest."""
        return max(self.device, self.full_model + self.overhead)


def meta_model(model_cfg):
    """The single-process model with its parameters on the meta device and no initialisation: shapes for
    the placement table at no memory and no compute (torch's meta init kernels cost ~1 s on first use)."""
    import torch
    from torch.overrides import TorchFunctionMode

    from moemesh.model.transformer import Transformer

    skip = {torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.nn.init.trunc_normal_,
            torch.Tensor.normal_, torch.Tensor.uniform_}

    class ParamsOnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in skip:
                return args[0] if args else kwargs["tensor"]
            if func is torch.empty:  # every nn.Parameter of the model is allocated by torch.empty
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    with ParamsOnMeta():
        return Transformer(model_cfg)


def estimate(cfg: Config, device_type: str) -> MemoryEstimate:
    from moemesh.parallel.layout import build_layout

    p = cfg.parallel
    return estimate_layout(cfg, device_type, build_layout(meta_model(cfg.model), p.dp, p.ep, p.tp, p.sequence_parallel))


@dataclass(frozen=True)
class ParamCounts:
    """Element counts of a placement table that the estimates need (summed once per table)."""
    local: int
    full: int
    expert_local: int
    dense_grad: int  # local elements all-reduced over data x expert
    dense_matmul: int  # full size of the 2-D dense weights but the embedding (attention, MLPs, router, head)


def param_counts(layout) -> ParamCounts:
    local = full = expert_local = dense_grad = dense = 0
    for name, placement in layout.params.items():
        numel = math.prod(layout.local_shape(name))
        local += numel
        full += math.prod(placement.full_shape)
        if placement.expert:
            expert_local += numel
        else:
            dense_grad += numel
            if len(placement.full_shape) >= 2 and not name.startswith("tok_embeddings"):
                dense += math.prod(placement.full_shape)
    return ParamCounts(local, full, expert_local, dense_grad, dense)


class CountsByLayout:
    """`param_counts` for every (ep, tp) from one placement table, without a table per layout.

    The table is built once at ep = tp = 2, where every shardable parameter lists the axes it is split
    over (`build_layout` omits axes of size 1); at any valid layout a parameter's local size is then its
    full size divided by the sizes of those axes (valid layouts divide every sharded dim exactly).
    Parameters are grouped by (axes, expert, dense) so that a layout costs one pass over a few groups."""

    def __init__(self, model, sequence_parallel: bool):
        from moemesh.parallel.layout import build_layout

        self.table = build_layout(model, 1, 2, 2, sequence_parallel)
        groups: dict[tuple, int] = {}
        for name, placement in self.table.params.items():
            axes = tuple(sorted(axis for axis, _ in placement.shards))
            dense = not placement.expert and len(placement.full_shape) >= 2 and not name.startswith("tok_embeddings")
            key = (axes, placement.expert, dense)
            groups[key] = groups.get(key, 0) + math.prod(placement.full_shape)
        self.groups = groups

    def __call__(self, ep: int, tp: int) -> ParamCounts:
        size = {"expert": ep, "model": tp, "data": 1}
        local = full = expert_local = dense_grad = dense = 0
        for (axes, expert, is_dense), numel in self.groups.items():
            here = numel // math.prod(size[a] for a in axes)
            local += here
            full += numel
            if expert:
                expert_local += here
            else:
                dense_grad += here
                dense += numel if is_dense else 0
        return ParamCounts(local, full, expert_local, dense_grad, dense)

    def layout(self, dp: int, ep: int, tp: int):
        """A Layout with this table's placements at (dp, ep, tp): local shapes as build_layout's."""
        import dataclasses

        return dataclasses.replace(self.table, dp=dp, ep=ep, tp=tp)


@dataclass(frozen=True)
class Activations:
    saved: int  # bytes autograd holds at the end of the forward pass
    head_saved: int  # of which the head's (final norm, head input, fp32 log-softmax), freed by its backward
    recompute: int  # bytes a recomputed module's activations add during its backward (0 without checkpointing)
    head_transient: int  # the head's backward: fp32 gradients of the log-softmax and of the logits
    layer_transient: int  # a MoE layer's backward: gradients in flight (R x D twice, R x F)

    @property
    def peak(self) -> int:
        """Backward's two candidate peaks: at the head (everything saved, the logits' gradients) or in
        the last layer (the head's activations freed, the layer recomputed, its gradients in flight)."""
        return max(self.saved + self.head_transient,
                   self.saved - self.head_saved + self.recompute + self.layer_transient)


def activation_bytes(cfg: Config, tokens: int, tp: int = 1, amp: bool = True, masters: bool = True,
                     rows: float = 1.0, sequence_parallel: bool = False, fused_kernels: bool = False) -> Activations:
    """The activations of one rank's micro-batch of `tokens` tokens, tensor by tensor as model/ saves them.

    amp: bf16 autocast (b = 2, else 4); masters: bf16 parameters (the residual stream and the norms'
    weight casts); rows: max/mean rows per expert rank (the expert rows of one rank, ep > 1);
    fused_kernels: train.fused_kernels' Triton kernels are on (`fused_kernels_on`). Each part is counted
    as the code that runs it: the kernels' autograd Functions, eager PyTorch, or, for the modules
    train.compile compiles (cfg.train.compile: the norms, attention and dense MLPs, and the experts'
    activation), the tensors AOT autograd's min-cut partition keeps (measured under aot_eager on CPU)."""
    m = cfg.model
    T, D, E, K, S = tokens, m.dim, m.num_experts, m.top_k, cfg.train.seq_len
    H, Dh = m.n_heads, m.head_dim
    Gd = m.n_kv_heads * Dh
    b, r = (2 if amp else 4), (2 if masters else 4)
    R = int(T * K * rows)  # expert rows this rank runs
    sp = tp if sequence_parallel else 1
    path = _code_path(cfg, fused_kernels)
    # RMSNorm, eager: x.float(), rsqrt, normalised x (fp32), and the weight's fp32 cast when it is bf16;
    # the kernel and compiled code: x as it is and the fp32 1/rms per row
    norm = (((r if path.lean_norm else 8) * T * D + 4 * T) // sp
            + (4 * D if masters and not path.lean_norm else 0))
    # wq/wk/wv input; rotated q, k; v; SDPA output and log-sum-exp; wo input: a copy of the SDPA output,
    # except after the rotary kernel: its q is [B, S, H, Dh] in memory, SDPA's output takes q's layout, and
    # the reshape for wo is a view. The rotary tables' bf16 casts: eager per q and k, compiled once; the
    # kernel reads the fp32 tables (buffers)
    wo_copy = 0 if path.rotary_kernel else T * D
    tables = 0 if path.rotary_kernel or not amp else (2 if path.compiled else 4) * S * Dh
    attention = b * T * D + (b * (2 * T * D + wo_copy + 2 * T * Gd) + 4 * T * H) // tp + tables
    # SwiGLU: w1 out, w3 out, w2 input, and silu(w1 out) where eager PyTorch runs the activation
    shared = path.hidden_shared * b * T * m.num_shared_experts * m.ffn_dim // tp
    dense_ffn = b * T * D + path.hidden * b * T * m.dense_ffn_dim // tp
    # combine: eager, the bf16 row weights and the int64 row tokens (_SumChoices); the kernel, the fp32
    # weights (kernels/gather_sum.py:_Combine); both keep the row order and the expert outputs
    combine = 4 * T * K if path.combine_kernel else 8 * T * K + b * T * K
    # router: gate input, fp32 softmax, chosen ids (int64), the renormalising sum and the weights; routing
    # statistics; dispatch (int64: the order the row weights are gathered by, the gather's inverse
    # permutation), combine, expert outputs; experts: the gathered rows, the hidden tensors of R x F, the offsets
    moe = (b * T * D + 4 * T * E + 12 * T * K + 4 * T + 4 * T * E + 4 * T + 4 * (2 * E + 3) + 8 * E + 4
           + 16 * T * K + combine + b * R * D + b * R * D + path.hidden * b * R * m.ffn_dim // tp + 4 * E
           + shared)
    layer_attn = 2 * norm + attention
    num_moe = m.n_layers - m.num_dense_layers
    # tokens and targets (int64), final norm, head input, fp32 log-softmax of the logits, loss scalars
    head = 16 * T + norm + b * T * D + 4 * T * m.vocab_size // tp + 4
    mode = cfg.train.activation_checkpointing
    if mode == "none":
        saved = m.n_layers * layer_attn + num_moe * moe + m.num_dense_layers * dense_ffn + head
        recompute = 0
    elif mode == "moe":  # a MoE layer keeps its (normalised) input, b T D, and recomputes the rest
        saved = m.n_layers * layer_attn + num_moe * b * T * D + m.num_dense_layers * dense_ffn + head
        recompute = moe - b * T * D if num_moe else 0
    else:  # "full": a block keeps its input (the residual stream) and recomputes everything else
        saved = m.n_layers * r * T * D // sp + head
        block = layer_attn + max(moe if num_moe else 0, dense_ffn if m.num_dense_layers else 0)
        # the block's input is saved inside it when its norm keeps x as it is (fp32 residual, or lean norm)
        recompute = block - (r * T * D // sp if r == 4 or path.lean_norm else 0)
    head_saved = norm + b * T * D + 4 * T * m.vocab_size // tp
    # a MoE layer's backward: the gradients of the combined slots and of the expert rows (R x D each) and
    # of one hidden tensor (R x F) in flight at once
    layer_transient = b * R * (2 * D + m.ffn_dim // tp) if num_moe else b * T * (2 * D + m.dense_ffn_dim // tp)
    return Activations(saved, head_saved, recompute, 8 * T * m.vocab_size // tp, layer_transient)


@dataclass(frozen=True)
class CodePath:
    """Which code runs each part that saves tensors, as train/loop.py:build_model sets the model up:
    apply_fused_kernels, then apply_compile, which puts the PyTorch code back in the modules it compiles."""
    compiled: bool  # train.compile
    lean_norm: bool  # RMSNorm keeps x and 1/rms: the kernel (rows up to its block) or compiled code
    rotary_kernel: bool
    combine_kernel: bool  # every assignment kept (dropless); capacity drops run the PyTorch combine
    hidden: int  # R x F (or T x F) tensors the experts and dense MLPs keep: 3 (kernel or compiled
    # activation, which keep gate and up) or 4 (eager: silu(gate) too)
    hidden_shared: int  # the shared experts' MLP is inside the MoE, which compile leaves as it is


def _code_path(cfg: Config, fused_kernels: bool) -> CodePath:
    compiled = cfg.train.compile
    kernels = fused_kernels and not compiled  # in the modules compile takes over
    lean_norm = compiled
    if kernels:
        from moemesh.kernels.rmsnorm import MAX_BLOCK

        lean_norm = cfg.model.dim <= MAX_BLOCK
    return CodePath(compiled, lean_norm, rotary_kernel=kernels,
                    # capacity dispatch runs the kernel too on steps that drop nothing (RowOrder decides by
                    # shape); counting the PyTorch combine there is the upper bound
                    combine_kernel=fused_kernels and cfg.model.dispatch == "dropless",
                    hidden=3 if fused_kernels or compiled else 4, hidden_shared=3 if fused_kernels else 4)


def estimate_layout(cfg: Config, device_type: str, layout, imbalance: float = 1.0,
                    counts: ParamCounts | None = None) -> MemoryEstimate:
    """The estimate for `cfg` at the placement table `layout` (its dp/ep/tp win over cfg.parallel's).

    `imbalance` is max/mean of the rows an expert rank receives (the planner's margin for natural
    routing); it scales the expert rows' activations and all-to-all buffers only. `counts` is
    `param_counts(layout)`, when the caller already has it."""
    m, t = cfg.model, cfg.train
    counts = counts or param_counts(layout)
    amp = t.dtype == "bfloat16" or (t.dtype == "auto" and device_type == "cuda")
    masters = t.param_dtype == "bfloat16" or (t.param_dtype == "auto" and amp and device_type == "cuda")
    tokens = t.global_batch // (layout.dp * layout.ep) * t.seq_len
    rows = imbalance if layout.ep > 1 else 1.0  # with ep=1 a rank's rows are its own, whatever the routing
    sp = any(p.partial_over for p in layout.params.values())  # sequence parallel: norm weights are partial sums
    act = activation_bytes(cfg, tokens, layout.tp, amp, masters, rows, sp, fused_kernels_on(cfg, device_type))  # triton assumed where the run goes
    num_moe = m.n_layers - m.num_dense_layers
    # the token all-to-all's send and receive buffers of one MoE layer (the receive side skewed by routing)
    b = 2 if amp else 4
    a2a = int(b * tokens * m.top_k * m.dim * (1 + rows)) if layout.ep > 1 and num_moe else 0
    # bf16 parameters keep fp32 masters beside them (2 + 4 bytes each); backward makes bf16 gradients,
    # which become fp32 master gradients after it (train/master.py), when the activations are gone, except
    # on one GPU with the one-pass master step, which reads the bf16 gradients as they are (train/loop.py).
    # With overlap_grad_reduce on a mesh, fp32 gradient buckets (parallel/grad_buckets.py) take each
    # gradient as backward makes it and live through the whole step; the masters' gradients are views.
    fused = masters and device_type == "cuda" and t.fused_master_step and layout.world_size == 1
    # Bucketed are the gradients that need a collective (grad_buckets.reduction_group): dense ones when
    # dp*ep > 1, experts' when dp > 1 (sequence-parallel norm weights at dp*ep = 1 too: a few KB, ignored).
    dense_bucketed = cfg.parallel.overlap_grad_reduce and layout.dp * layout.ep > 1
    bucketed = (counts.dense_grad if dense_bucketed else 0) + \
        (counts.expert_local if cfg.parallel.overlap_grad_reduce and layout.dp > 1 else 0)
    rest = counts.local - bucketed
    per_param = 2 + FP32 if masters else FP32
    grad_bytes = 2 if masters else FP32
    head_grad = 0 if dense_bucketed else grad_bytes * m.vocab_size * m.dim // layout.tp  # backward's first gradient
    return MemoryEstimate(params=per_param * counts.local, grads=FP32 * bucketed + grad_bytes * rest,
                          optimizer=2 * FP32 * counts.local, activations=act.peak + head_grad,
                          full_model=FP32 * counts.full, overhead=int(PROCESS_OVERHEAD[device_type]),
                          a2a_buffers=a2a, master_grads=FP32 * rest if masters and not fused else 0,
                          buckets=FP32 * bucketed)


def host_memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(cfg: Config, device_type: str, ranks_here: int) -> MemoryEstimate:
    """Refuse (one line, exit 2) a run whose ranks cannot fit in this machine's memory."""
    est = estimate(cfg, device_type)
    host = host_memory_available()
    where = f"parallel.dp*ep*tp={cfg.parallel.world_size}"
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        if est.device_peak > total:
            raise UserError(f"the run needs ≈{est.device_peak / GIB:.1f} GiB per GPU ({_parts(est)}) at {where}; "
                            f"this GPU has {total / GIB:.1f} GiB (use more ranks, a smaller model or batch)")
        host_need = ranks_here * PROCESS_OVERHEAD["cpu"]
    else:
        host_need = ranks_here * (est.device + est.full_model)
    if host is not None and host_need > host:
        raise UserError(f"the run needs ≈{host_need / GIB:.1f} GiB of host memory for {ranks_here} local "
                        f"rank(s) (≈{host_need / ranks_here / GIB:.2f} GiB each: {_parts(est)}); this machine has "
                        f"{host / GIB:.1f} GiB available (use fewer ranks, a smaller model or batch)")
    if cfg.train.steps > 10 ** 8:
        report(f"warning: train.steps={cfg.train.steps}: at 100 steps/s this takes "
               f"{cfg.train.steps / 100 / 86400 / 365:.0f} years")
    return est


def _parts(est: MemoryEstimate) -> str:
    return (f"parameters {est.params / GIB:.2f}, gradients {max(est.grads, est.master_grads) / GIB:.2f}, "
            f"AdamW {est.optimizer / GIB:.2f}, "
            f"activations {est.activations / GIB:.2f}, full model at build {est.full_model / GIB:.2f}, "
            f"runtime {est.overhead / GIB:.2f}")


def ranks_on_this_host(cfg: Config) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.parallel.world_size))
