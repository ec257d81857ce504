"""Mixture-of-Experts feed-forward: router, grouped SwiGLU experts, and the local token dispatch.

Dispatch runs as separate stages so that expert parallelism can slot its all-to-all between them:
  1. `permute`: sort (token, choice) assignments by expert, apply capacity, count rows per expert;
  2. gather rows `x_RD = x_TD[token of each kept assignment]`;
  3. experts on contiguous per-expert row blocks (one grouped GEMM);
  4. `combine`: scale by router weights, scatter back to (token, choice) slots, sum over choices.
The model holds a `LocalDispatcher`; `moemesh.parallel` swaps in one that moves rows between ranks.

Capacity policy (dispatch="capacity"): each expert takes at most
ceil(capacity_factor * tokens_per_group * top_k / num_experts) assignments per capacity group (a group is
one rank's micro-batch; single-process it is the whole batch unless `capacity_groups` says otherwise).
Assignments are served in token order (sequence by sequence, position by position, then choice order),
so within a group the LATEST tokens are dropped first. A dropped assignment contributes nothing; its
weight is not given to the other choices; a token with every choice dropped passes on by the residual.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, R routed rows (kept assignments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from moemesh.kernels import gather_sum
from moemesh.model.grouped import grouped_mm
from moemesh.model.layers import SwiGLU, silu_mul


@dataclass
class Routing:
    weights_TK: torch.Tensor  # fp32 combine weights of the chosen experts
    experts_TK: torch.Tensor  # int64 chosen expert ids
    probs_TE: torch.Tensor  # fp32 per-expert probabilities the aux loss balances
    logits_TE: torch.Tensor  # fp32 raw gate logits (z-loss)


class Router(nn.Module):
    """Linear gate and top-k choice.

    softmax: weights are the softmax probabilities of the chosen experts (Mixtral; with `renormalize`
    this equals a softmax over the chosen logits). sigmoid: scores are sigmoid(logits); experts are
    chosen by score + `expert_bias`, a buffer moved toward equal load after each step (`update_bias`),
    and weighted by the unbiased scores (DeepSeek-V3).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, kind: str, renormalize: bool):
        super().__init__()
        self.num_experts, self.top_k, self.kind, self.renormalize = num_experts, top_k, kind, renormalize
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(x_TD).float()
        if self.kind == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
            choice_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
            choice_TE = scores_TE + self.expert_bias
        experts_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(weights_TK, experts_TK, probs_TE, logits_TE)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor, rate: float | torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.
        `rate` may be a tensor (0 for a skipped step), so that no host sync is needed."""
        if self.kind == "sigmoid" and (isinstance(rate, torch.Tensor) or rate > 0):
            self.expert_bias += rate * torch.sign(counts_E.mean() - counts_E)


@dataclass
class Permutation:
    order_R: torch.Tensor  # flat assignment index (token * K + choice) of each kept row, grouped by expert
    counts_E: torch.Tensor  # int64 kept rows per expert
    num_dropped: torch.Tensor  # int64 scalar


@dataclass
class RowOrder:
    """The index tensors stages 2 and 4 share, made once per dispatch: each row's flat assignment
    (token * K + choice), its token, and, when every assignment is kept (decided by the shape, so no host
    sync), the row of each assignment (the permutation's inverse; None with drops)."""
    order_R: torch.Tensor
    token_R: torch.Tensor
    inverse_A: torch.Tensor | None
    top_k: int

    @classmethod
    def of(cls, order_R: torch.Tensor, num_tokens: int, top_k: int) -> "RowOrder":
        inverse_A = None
        if order_R.numel() == num_tokens * top_k:
            inverse_A = torch.empty_like(order_R)
            inverse_A[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        return cls(order_R, order_R // top_k, inverse_A, top_k)


def count_ids(ids: torch.Tensor, num_ids: int) -> torch.Tensor:
    """How often each id in [0, num_ids) occurs; unlike torch.bincount, no host sync on CUDA."""
    return torch.zeros(num_ids, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def capacity_per_group(tokens_per_group: int, top_k: int, num_experts: int, factor: float) -> int:
    return math.ceil(factor * tokens_per_group * top_k / num_experts)


def permute(experts_TK: torch.Tensor, num_experts: int, capacity: int | None, groups: int = 1) -> Permutation:
    """Stage 1: order assignments by expert (stable, so token order within an expert), drop those past
    `capacity` within each of `groups` equal contiguous token groups (None: dropless)."""
    num_tokens, top_k = experts_TK.shape
    assert num_tokens % groups == 0, f"{num_tokens} tokens do not split into {groups} capacity groups"
    flat_A = experts_TK.reshape(-1)
    if capacity is None:
        order_R = torch.argsort(flat_A, stable=True)
        counts_E = count_ids(flat_A, num_experts)
        return Permutation(order_R, counts_E, flat_A.new_zeros(()))
    group_A = torch.arange(flat_A.numel(), device=flat_A.device) // (num_tokens // groups * top_k)
    key_A = flat_A * groups + group_A
    order_A = torch.argsort(key_A, stable=True)
    sorted_key_A = key_A[order_A]
    seg_counts = count_ids(key_A, num_experts * groups)
    seg_starts = torch.cumsum(seg_counts, 0) - seg_counts
    rank_A = torch.arange(flat_A.numel(), device=flat_A.device) - seg_starts[sorted_key_A]
    keep_A = rank_A < capacity
    order_R = order_A[keep_A]
    counts_E = count_ids(flat_A[order_R], num_experts)
    return Permutation(order_R, counts_E, (~keep_A).sum())


class _GatherTokens(torch.autograd.Function):
    """x_RD = x_TD[order_R // K] when every assignment is kept. Indexing's backward would accumulate the
    K copies of each token with a sort and an index_put; here the backward gathers the row gradients
    back into (token, choice) order and sums the K choices: two plain passes, deterministic."""

    @staticmethod
    def forward(ctx, x_TD, token_R, inverse_A, top_k, fused):
        ctx.save_for_backward(inverse_A)
        ctx.top_k, ctx.fused = top_k, fused
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, g_RD):
        (inverse_A,) = ctx.saved_tensors
        if ctx.fused:  # the two passes in one kernel
            return gather_sum.gather_sum(g_RD, inverse_A, ctx.top_k, None, g_RD.dtype), None, None, None, None
        g_AD = g_RD.index_select(0, inverse_A)
        return g_AD.view(-1, ctx.top_k, g_AD.shape[-1]).sum(dim=1), None, None, None, None


def gather_tokens(x_TD: torch.Tensor, rows: RowOrder, fused: bool = False) -> torch.Tensor:
    """Stage 2: the input row of every kept assignment, in the rows' order (`fused`: the backward in one
    Triton kernel, moemesh.kernels.gather_sum)."""
    if rows.inverse_A is None or not x_TD.requires_grad:
        return x_TD[rows.token_R]
    return _GatherTokens.apply(x_TD, rows.token_R, rows.inverse_A, rows.top_k, fused)


class _PermuteRows(torch.autograd.Function):
    """x[order] for a permutation whose inverse is at hand: the backward is the gather g[inverse], where
    indexing's backward would be a sort-based accumulate."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[order], `order` a permutation of x's rows and `inverse` its inverse."""
    if not x.requires_grad:
        return x.index_select(0, order)
    return _PermuteRows.apply(x, order, inverse)


class _SumChoices(torch.autograd.Function):
    """out_TD = sum over k of yw_RD[inverse_A[t*K + k]] in fp32, when every assignment is kept: one
    gather and a sum instead of a zeroed T*K*D slot buffer and a scatter. Backward: every row's gradient
    is its token's, one gather from T*D."""

    @staticmethod
    def forward(ctx, yw_RD, inverse_A, token_R, top_k):
        ctx.save_for_backward(token_R)
        ctx.dtype = yw_RD.dtype
        slots_AD = yw_RD.index_select(0, inverse_A)
        return slots_AD.view(-1, top_k, slots_AD.shape[-1]).sum(dim=1, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g_TD):
        (token_R,) = ctx.saved_tensors
        return g_TD.index_select(0, token_R).to(ctx.dtype), None, None, None


def combine(y_RD: torch.Tensor, rows: RowOrder, weights_TK: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Stage 4: weight each row, put it in its (token, choice) slot, sum choices in a fixed order
    (deterministic, unlike an atomic index_add). The sum over choices accumulates in fp32; rows and
    weights are multiplied in the experts' dtype (bf16 under autocast: half the bytes kept for backward).
    `fused` (every assignment kept): weights, gather and sum in one Triton kernel each way, the product
    in fp32 (moemesh.kernels.gather_sum)."""
    num_tokens, top_k = weights_TK.shape
    order_R = rows.order_R
    if fused and rows.inverse_A is not None:
        return gather_sum.combine(y_RD, weights_TK, order_R, rows.inverse_A)
    yw_RD = y_RD * weights_TK.reshape(-1)[order_R][:, None].to(y_RD.dtype)
    if rows.inverse_A is not None:
        return _SumChoices.apply(yw_RD, rows.inverse_A, rows.token_R, top_k)
    slots_AD = yw_RD.new_zeros(num_tokens * top_k, y_RD.shape[-1])
    slots_AD[order_R] = yw_RD
    return slots_AD.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32)


def to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """The dtype autocast would compute in (grouped GEMM is not on autocast's lists)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU experts stored stacked for one grouped GEMM per projection."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD):  # the Transformer re-initialises with its std
            nn.init.normal_(w, std=0.02)
        self.activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = silu_mul  # swappable from outside

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        x_RD = to_compute_dtype(x_RD)
        w1, w3, w2 = (w.to(x_RD.dtype) for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD))
        h_RF = self.activation(grouped_mm(x_RD, w1, offsets_E), grouped_mm(x_RD, w3, offsets_E))
        return grouped_mm(h_RF, w2, offsets_E)


class Dispatcher(Protocol):
    fused: bool  # gather's backward and combine as Triton kernels (moemesh.kernels.gather_sum)

    def __call__(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, perm: Permutation,
                 experts: GroupedExperts) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts live here: gather rows, run experts, combine."""

    def __init__(self):
        self.fused = False

    def __call__(self, x_TD, weights_TK, perm, experts):
        top_k = weights_TK.shape[1]
        rows = RowOrder.of(perm.order_R, x_TD.shape[0], top_k)
        return combine(experts(gather_tokens(x_TD, rows, self.fused), perm.counts_E), rows, weights_TK, self.fused)


class RoutingStats:
    """A layer's routing statistics packed in one vector, so one collective makes them global:
    [counts_E, prob_sums_E, z_sum, num_tokens, num_dropped]. Every field is a sum over tokens, so the
    sum of the vectors of the micro-batches is the vector of the whole batch. Only prob_sums and z_sum
    carry gradient (the aux and z losses)."""

    def __init__(self, packed: torch.Tensor, num_experts: int):
        assert packed.shape == (2 * num_experts + 3,), (packed.shape, num_experts)
        self.packed, self.num_experts = packed, num_experts

    @classmethod
    def of(cls, routing: Routing, perm: Permutation) -> "RoutingStats":
        num_experts = routing.probs_TE.shape[1]
        counts_E = count_ids(routing.experts_TK.reshape(-1), num_experts).float()
        z_sum = torch.logsumexp(routing.logits_TE, dim=-1).pow(2).sum()
        # The token count from a tensor op, not a Python float: new_tensor(float) syncs on CUDA.
        num_tokens = torch.ones_like(z_sum).mul_(routing.probs_TE.shape[0])
        tail = torch.stack([z_sum, num_tokens, perm.num_dropped.to(z_sum.dtype)])
        return cls(torch.cat([counts_E, routing.probs_TE.sum(dim=0), tail]), num_experts)

    @property
    def counts_E(self) -> torch.Tensor:
        return self.packed[:self.num_experts]

    @property
    def prob_sums_E(self) -> torch.Tensor:
        return self.packed[self.num_experts:2 * self.num_experts]

    @property
    def z_sum(self) -> torch.Tensor:
        return self.packed[2 * self.num_experts]

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.packed[2 * self.num_experts + 1]

    @property
    def num_dropped(self) -> torch.Tensor:
        return self.packed[2 * self.num_experts + 2]

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        return RoutingStats(self.packed + other.packed, self.num_experts)

    def reduced(self, reducer: Callable[[torch.Tensor], torch.Tensor]) -> "RoutingStats":
        return RoutingStats(reducer(self.packed), self.num_experts)

    def detach(self) -> "RoutingStats":
        return RoutingStats(self.packed.detach(), self.num_experts)


def balance_losses(stats: RoutingStats, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard aux loss E * sum_e f_e * P_e (f: fraction of assignments, P: mean probability) and
    router z-loss mean(logsumexp(logits)^2), from (global) routing statistics."""
    f_E = stats.counts_E / (stats.num_tokens * top_k)
    p_E = stats.prob_sums_E / stats.num_tokens
    return stats.num_experts * (f_E * p_E).sum(), stats.z_sum / stats.num_tokens


def _identity(stats: torch.Tensor) -> torch.Tensor:
    return stats


class MoE(nn.Module):
    def __init__(self, *, dim: int, num_experts: int, top_k: int, ffn_dim: int, router: str = "softmax",
                 renormalize: bool = True, num_shared_experts: int = 0, dispatch: str = "dropless",
                 capacity_factor: float = 1.25):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor if dispatch == "capacity" else None
        self.router = Router(dim, num_experts, top_k, router, renormalize)
        self.experts = GroupedExperts(num_experts, dim, ffn_dim)
        self.shared = SwiGLU(dim, ffn_dim * num_shared_experts) if num_shared_experts else None
        # Pluggable from outside (moemesh.parallel): where experts run, and how stats become global.
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.stats_reducer: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.capacity_groups = 1
        self.last_stats: RoutingStats | None = None  # global statistics of the last forward, detached

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        routing = self.router(x_TD)
        capacity = None
        if self.capacity_factor is not None:
            capacity = capacity_per_group(x_TD.shape[0] // self.capacity_groups, self.top_k,
                                          self.num_experts, self.capacity_factor)
        perm = permute(routing.experts_TK, self.num_experts, capacity, self.capacity_groups)
        stats = RoutingStats.of(routing, perm).reduced(self.stats_reducer)
        self.last_stats = stats.detach()
        aux_loss, z_loss = balance_losses(stats, self.top_k)
        y_TD = self.dispatcher(x_TD, routing.weights_TK, perm, self.experts).to(x_BSD.dtype)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(shape), aux_loss, z_loss

    def expert_load(self) -> tuple[torch.Tensor, float]:
        """(fraction of assignments per expert, fraction of assignments dropped) of the last forward."""
        stats = self.last_stats
        assert stats is not None, "expert_load() before any forward"
        total = stats.num_tokens * self.top_k
        return stats.counts_E / total, float(stats.num_dropped / total)
