"""Expert parallelism: each rank of an `expert` group holds num_experts / ep consecutive experts.

The dispatcher replaces `MoE.dispatcher`. Rows leave in the order `permute` sorted them (by global
expert id, hence by destination rank), run on their expert's rank, and come back the same way.
All-to-alls run among ranks with the same TP index (the expert group), so each TP rank exchanges the
same tokens with its counterparts, which hold the same slice of each expert's hidden dim.
Legend: T tokens, D dim, K top-k, R rows sent, Q rows received, E experts (global), L local experts.
"""

from __future__ import annotations

import torch

from moemesh.model.moe import GroupedExperts, Permutation, combine, gather_tokens, to_compute_dtype
from moemesh.parallel.comm import AxisComm, all_to_all, copy_to_group


def regroup_order(counts_SL: torch.Tensor) -> torch.Tensor:
    """Received rows come as blocks (source rank, local expert); return the row order that groups them
    by (local expert, source rank), as the grouped GEMM needs contiguous rows per expert."""
    num_sources, num_local = counts_SL.shape
    block_key = torch.arange(num_local, device=counts_SL.device)[None, :] * num_sources + \
        torch.arange(num_sources, device=counts_SL.device)[:, None]
    row_key_Q = torch.repeat_interleave(block_key.reshape(-1), counts_SL.reshape(-1))
    return torch.argsort(row_key_Q, stable=True)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class ExpertParallelDispatcher:
    def __init__(self, expert_comm: AxisComm | None, model_comm: AxisComm | None):
        self.expert_comm, self.model_comm = expert_comm, model_comm

    def __call__(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, perm: Permutation,
                 experts: GroupedExperts) -> torch.Tensor:
        top_k = weights_TK.shape[1]
        if self.model_comm is not None:
            # Each TP rank computes with a slice of every expert: input and weight gradients are partial.
            x_TD = copy_to_group(x_TD, self.model_comm)
            weights_TK = copy_to_group(weights_TK, self.model_comm)
        x_RD = to_compute_dtype(gather_tokens(x_TD, perm, top_k))  # bf16 rows on the wire under autocast
        if self.expert_comm is None:
            y_RD = experts(x_RD, perm.counts_E)
        else:
            y_RD = self._run_remote(x_RD, perm.counts_E, experts)
        return combine(y_RD, perm.order_R, weights_TK)

    def _run_remote(self, x_RD: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
        comm = self.expert_comm
        ep = comm.size
        num_local = counts_E.numel() // ep
        # 1. Exchange counts: tell each rank how many rows of each of its experts come from here.
        recv_counts_SL = comm.all_to_all(counts_E, [num_local] * ep, [num_local] * ep).view(ep, num_local)
        send_splits = counts_E.view(ep, num_local).sum(dim=1).tolist()
        recv_splits = recv_counts_SL.sum(dim=1).tolist()  # one host sync: split sizes must be known
        # 2. Rows to the ranks holding their experts.
        recv_QD = all_to_all(x_RD, comm, recv_splits, send_splits)
        # 3. Regroup by local expert and run the local experts (one grouped GEMM per projection).
        order_Q = regroup_order(recv_counts_SL)
        y_QD = experts(recv_QD[order_Q], recv_counts_SL.sum(dim=0))
        # 4. Undo the regroup and send results back to the ranks the rows came from.
        return all_to_all(y_QD[inverse_order(order_Q)], comm, send_splits, recv_splits)
