"""Tensor parallelism on the `model` axis, Megatron style, applied to an unmodified Transformer.

Non-sequence-parallel: the residual stream is replicated over TP. A sharded sub-layer (attention,
dense MLP, vocab projection) takes its input through `copy_to_group` (backward all-reduce of the partial
input gradients) and its partial output through `reduce_from_group` (all-reduce).
Sequence-parallel: the residual stream is split along the sequence; the same sub-layers all-gather the
sequence on entry (backward reduce-scatter) and reduce-scatter on exit (backward all-gather), and norm
weights, which now see only a slice of the tokens, get their gradients summed over TP.

The MoE layer runs on the whole (gathered) token set on every TP rank, so routing is identical across
TP and only expert weights are split (w1/w3 by columns, w2 by rows of the hidden dim).
Legend: B batch, S sequence, D dim, V vocab, T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.model.moe import MoE
from moemesh.model.transformer import Transformer
from moemesh.parallel.comm import (AxisComm, copy_to_group, gather_along_dim, reduce_from_group,
                                   reduce_scatter_along_dim)

SEQ_DIM = 1


def _enter(comm: AxisComm, sequence_parallel: bool):
    """Input hook of a sharded sub-layer whose input gradients are partial sums."""
    def hook(module, args):
        x = args[0]
        x = gather_along_dim(x, comm, SEQ_DIM, grad_is_partial=True) if sequence_parallel else copy_to_group(x, comm)
        return (x, *args[1:])
    return hook


def _exit(comm: AxisComm, sequence_parallel: bool):
    """Output hook: sum the partial outputs (and scatter the sequence under SP)."""
    def reduce(y):
        return reduce_scatter_along_dim(y, comm, SEQ_DIM) if sequence_parallel else reduce_from_group(y, comm)

    def hook(module, args, out):
        return (reduce(out[0]), *out[1:]) if isinstance(out, tuple) else reduce(out)
    return hook


def _enter_replicated(comm: AxisComm):
    """MoE input under SP: gather the sequence; downstream grads are made whole inside, so keep a slice."""
    def hook(module, args):
        return (gather_along_dim(args[0], comm, SEQ_DIM, grad_is_partial=False), *args[1:])
    return hook


def _copy_in(comm: AxisComm):
    def hook(module, args):
        return (copy_to_group(args[0], comm), *args[1:])
    return hook


def apply_tensor_parallel(model: Transformer, comm: AxisComm, sequence_parallel: bool) -> None:
    """Hooks and module swaps for TP; the parameters are already sharded by `parallelize` (layout.py)."""
    for block in model.layers:
        attn = block.attention
        attn.n_heads //= comm.size
        attn.n_kv_heads //= comm.size
        attn.register_forward_pre_hook(_enter(comm, sequence_parallel))
        attn.register_forward_hook(_exit(comm, sequence_parallel))
        ffn = block.ffn
        if isinstance(ffn, MoE):
            if ffn.shared is not None:
                ffn.shared.register_forward_pre_hook(_copy_in(comm))
            if sequence_parallel:
                ffn.register_forward_pre_hook(_enter_replicated(comm))
        else:
            ffn.register_forward_pre_hook(_enter(comm, sequence_parallel))
        ffn.register_forward_hook(_exit(comm, sequence_parallel))
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, comm, sequence_parallel)
    model.output.register_forward_pre_hook(_enter(comm, sequence_parallel))
    model.lm_loss = VocabParallelCrossEntropy(comm)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the table; other ids look up zeros; partial sums reduced over TP."""

    def __init__(self, local: nn.Embedding, comm: AxisComm, sequence_parallel: bool):
        super().__init__()
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.weight = local.weight  # already this rank's rows of the vocabulary
        self.vocab_start = comm.rank * self.weight.shape[0]

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        local_BS = tokens_BS - self.vocab_start
        outside_BS = (local_BS < 0) | (local_BS >= self.weight.shape[0])
        h_BSD = F.embedding(local_BS.masked_fill(outside_BS, 0), self.weight)
        h_BSD = h_BSD.masked_fill(outside_BS.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_along_dim(h_BSD, self.comm, SEQ_DIM)
        return reduce_from_group(h_BSD, self.comm)


class _VocabParallelCE(torch.autograd.Function):
    """Mean cross-entropy over tokens whose logits are split by vocab across TP; never gathers them."""

    @staticmethod
    def forward(ctx, logits_TV, targets_T, comm):
        logits_TV = logits_TV.float()
        vocab_local = logits_TV.shape[-1]
        start = comm.rank * vocab_local
        max_T = logits_TV.max(dim=-1).values
        max_T = comm.all_reduce(max_T, op="max")  # exact in any order
        shifted_TV = logits_TV - max_T[:, None]
        exp_TV = shifted_TV.exp()
        local_T = targets_T - start
        inside_T = (local_T >= 0) & (local_T < vocab_local)
        local_T = local_T.clamp(0, vocab_local - 1)
        target_T = shifted_TV.gather(1, local_T[:, None]).squeeze(1) * inside_T
        sums = comm.all_reduce(torch.stack([exp_TV.sum(dim=-1), target_T]))
        sum_exp_T, target_T = sums[0], sums[1]
        loss = (sum_exp_T.log() - target_T).mean()
        ctx.save_for_backward(exp_TV / sum_exp_T[:, None], local_T, inside_T)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax_TV, local_T, inside_T = ctx.saved_tensors
        grad_TV = softmax_TV.clone()
        rows = torch.arange(grad_TV.shape[0], device=grad_TV.device)
        grad_TV[rows, local_T] -= inside_T.to(grad_TV.dtype)
        return grad_TV * (grad / grad_TV.shape[0]), None, None


class VocabParallelCrossEntropy:
    def __init__(self, comm: AxisComm):
        self.comm = comm

    def __call__(self, logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
        return _VocabParallelCE.apply(logits_TV, targets_T, self.comm)
