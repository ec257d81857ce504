"""Index math of the chunked expert-parallel dispatch (parallel.ep_overlap_chunks), without process
groups: cutting expert-sorted rows into token chunks keeps every row once, each chunk sorted by expert,
and the chunk counts add up to the whole micro-batch's counts."""

from __future__ import annotations

import pytest
import torch

from moemesh.config import load_config
from moemesh.errors import ConfigError
from moemesh.model.moe import permute
from moemesh.parallel.expert import chunk_rows


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 7])
@pytest.mark.parametrize("capacity", [None, 3])
def test_chunks_partition_rows_by_token_then_expert(num_chunks, capacity):
    gen = torch.Generator().manual_seed(0)
    num_tokens, top_k, num_experts = 20, 2, 4
    experts_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    perm = permute(experts_TK, num_experts, capacity)
    order_R, counts_CE = chunk_rows(perm.order_R, perm.counts_E, num_tokens, top_k, num_chunks)
    assert sorted(order_R.tolist()) == sorted(perm.order_R.tolist())  # the same kept rows, each once
    assert torch.equal(counts_CE.sum(dim=0), perm.counts_E)
    token_R, expert_R = order_R // top_k, experts_TK.reshape(-1)[order_R]
    chunk_R = token_R * num_chunks // num_tokens
    start = 0
    for c in range(num_chunks):
        rows = slice(start, start + int(counts_CE[c].sum()))
        assert (chunk_R[rows] == c).all()
        # sorted by expert, and within an expert in token order (as permute left them)
        assert torch.equal(expert_R[rows], torch.repeat_interleave(torch.arange(num_experts), counts_CE[c]))
        key = expert_R[rows] * num_tokens * top_k + order_R[rows]
        assert torch.equal(key, key.sort().values)
        start = rows.stop
    assert start == order_R.numel()


def test_more_chunks_than_tokens_is_refused():
    # 16 sequences of 64 tokens over dp*ep = 4: 256 tokens per rank
    load_config("tiny", ["parallel.ep=4", "parallel.ep_overlap_chunks=256"])
    with pytest.raises(ConfigError, match="parallel.ep_overlap_chunks=257 exceeds the tokens of one rank's micro-batch"):
        load_config("tiny", ["parallel.ep=4", "parallel.ep_overlap_chunks=257"])
    with pytest.raises(ConfigError, match="parallel.ep_overlap_chunks=0 must be > 0"):
        load_config("tiny", ["parallel.ep_overlap_chunks=0"])
