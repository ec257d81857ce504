"""Expert parallelism: each rank of an `expert` group holds num_experts / ep consecutive experts.

The dispatcher replaces `MoE.dispatcher`. Rows leave in the order `permute` sorted them (by global
expert id, hence by destination rank), run on their expert's rank, and come back the same way.
All-to-alls run among ranks with the same TP index (the expert group), so each TP rank exchanges the
same tokens with its counterparts, which hold the same slice of each expert's hidden dim.

With `num_chunks` > 1 (parallel.ep_overlap_chunks) the rank's tokens are cut into that many contiguous
chunks, and the token all-to-alls of the chunks are in flight while the experts compute on the chunks
that have arrived (forward and backward); routing, capacity and the counts are those of the whole
micro-batch. What changes is how each expert's weight gradient is summed: autograd adds the chunks'
gradients, in the gradient's dtype (bf16 with bf16 parameters: one more rounding per chunk, measured
5.3e-3 -> 5.9e-3 relative error against fp64 from 1 to 4 chunks; in fp32 only the order of the sums).
Legend: T tokens, D dim, K top-k, R rows sent, Q rows received, E experts (global), L local experts,
C chunks, S source ranks.
"""

from __future__ import annotations

import torch

from moemesh.model.moe import (GroupedExperts, Permutation, RowOrder, combine, count_ids, gather_tokens,
                               permute_rows, to_compute_dtype)
from moemesh.parallel.comm import AxisComm, all_to_all, copy_to_group, launch_all_to_all, wait_all_to_all


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


def chunk_rows(order_R: torch.Tensor, counts_E: torch.Tensor, num_tokens: int, top_k: int,
               num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert -> rows sorted by (token chunk, expert): the new order_R and counts_CE.
    Chunk c holds the tokens t with floor(t*C/T) == c; a stable sort keeps expert order."""
    num_experts = counts_E.numel()
    expert_R = torch.repeat_interleave(torch.arange(num_experts, device=counts_E.device), counts_E,
                                       output_size=order_R.numel())  # output_size: no host sync
    chunk_R = order_R // top_k * num_chunks // num_tokens
    by_chunk = torch.argsort(chunk_R, stable=True)
    counts_CE = count_ids(chunk_R * num_experts + expert_R, num_chunks * num_experts).view(num_chunks, num_experts)
    return order_R[by_chunk], counts_CE


class ExpertParallelDispatcher:
    def __init__(self, expert_comm: AxisComm | None, model_comm: AxisComm | None, num_chunks: int = 1):
        self.expert_comm, self.model_comm, self.num_chunks = expert_comm, model_comm, num_chunks
        self.fused = False

    def __call__(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, perm: Permutation,
                 experts: GroupedExperts) -> torch.Tensor:
        top_k = weights_TK.shape[1]
        if self.model_comm is not None:
            # Each TP rank computes with a slice of every expert: input and weight gradients are partial.
            x_TD = copy_to_group(x_TD, self.model_comm)
            weights_TK = copy_to_group(weights_TK, self.model_comm)
        if self.expert_comm is not None and self.num_chunks > 1:
            return self._run_chunked(x_TD, weights_TK, perm, experts)
        rows = RowOrder.of(perm.order_R, x_TD.shape[0], top_k)
        x_RD = to_compute_dtype(gather_tokens(x_TD, rows, self.fused))  # bf16 rows on the wire under autocast
        if self.expert_comm is None:
            y_RD = experts(x_RD, perm.counts_E)
        else:
            y_RD = self._run_remote(x_RD, perm.counts_E, experts)
        return combine(y_RD, rows, weights_TK, self.fused)

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
        inverse_Q = inverse_order(order_Q)
        y_QD = experts(permute_rows(recv_QD, order_Q, inverse_Q), recv_counts_SL.sum(dim=0))
        # 4. Undo the regroup and send results back to the ranks the rows came from.
        return all_to_all(permute_rows(y_QD, inverse_Q, order_Q), comm, send_splits, recv_splits)

    def _run_chunked(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, perm: Permutation,
                     experts: GroupedExperts) -> torch.Tensor:
        comm, num_chunks = self.expert_comm, self.num_chunks
        ep = comm.size
        (num_tokens, top_k), num_local = weights_TK.shape, perm.counts_E.numel() // ep
        # 0. Cut the rows into token chunks, each still sorted by expert (hence by destination rank).
        order_R, counts_CE = chunk_rows(perm.order_R, perm.counts_E, num_tokens, top_k, num_chunks)
        # 1. Exchange the counts of every chunk in one all-to-all (to each rank: [C, its L experts]),
        #    and learn all split sizes in one host sync.
        send_counts = counts_CE.view(num_chunks, ep, num_local).transpose(0, 1).reshape(-1)
        recv_counts_SCL = comm.all_to_all(send_counts, [num_chunks * num_local] * ep,
                                          [num_chunks * num_local] * ep).view(ep, num_chunks, num_local)
        sizes = torch.cat([counts_CE.view(num_chunks, ep, num_local).sum(dim=2).reshape(-1),
                           recv_counts_SCL.sum(dim=2).t().reshape(-1)]).tolist()
        send_splits = [sizes[c * ep:(c + 1) * ep] for c in range(num_chunks)]
        recv_splits = [sizes[(num_chunks + c) * ep:(num_chunks + c + 1) * ep] for c in range(num_chunks)]
        rows = RowOrder.of(order_R, num_tokens, top_k)
        x_RD = to_compute_dtype(gather_tokens(x_TD, rows, self.fused))
        # 2. Launch every chunk's rows towards their experts.
        flights = [launch_all_to_all(x_rows, comm, recv_splits[c], send_splits[c])
                   for c, x_rows in enumerate(x_RD.split([sum(splits) for splits in send_splits]))]
        # 3. Chunk by chunk: wait for its rows, run the local experts on them (while later chunks are still
        #    on the wire), launch the results back.
        returns = []
        for c, (buffer, flight) in enumerate(flights):
            recv_QD = wait_all_to_all(buffer, flight, comm, recv_splits[c], send_splits[c])
            counts_SL = recv_counts_SCL[:, c]
            order_Q = regroup_order(counts_SL)
            inverse_Q = inverse_order(order_Q)
            y_QD = experts(permute_rows(recv_QD, order_Q, inverse_Q), counts_SL.sum(dim=0))
            returns.append((*launch_all_to_all(permute_rows(y_QD, inverse_Q, order_Q), comm, send_splits[c],
                                               recv_splits[c]), c))
        # 4. Wait for the results of every chunk, then combine in the (chunk, expert) row order.
        y_RD = torch.cat([wait_all_to_all(buffer, flight, comm, send_splits[c], recv_splits[c])
                          for buffer, flight, c in returns])
        return combine(y_RD, rows, weights_TK, self.fused)
