"""Router, aux/z losses, permutation, capacity and grouped GEMM against hand-computed references."""

import math

import pytest
import torch

from moemesh.model.grouped import grouped_mm, grouped_mm_loop, grouped_mm_supported
from moemesh.model.layers import SwiGLU
from moemesh.model.moe import (MoE, RowOrder, Router, RoutingStats, balance_losses, capacity_per_group, combine,
                               count_ids, gather_tokens, permute, permute_rows)

LOGITS = [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 5.0, 0.0, 1.0]]


def router_with_logits(kind, renormalize=False, top_k=2):
    router = Router(dim=4, num_experts=4, top_k=top_k, kind=kind, renormalize=renormalize)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    return router, torch.tensor(LOGITS)


def softmax_row(row):
    total = sum(math.exp(v) for v in row)
    return [math.exp(v) / total for v in row]


def test_softmax_router_topk_and_weights():
    router, x = router_with_logits("softmax")
    routing = router(x)
    assert routing.experts_TK.tolist() == [[0, 1], [3, 2], [1, 3]]
    for t, row in enumerate(LOGITS):
        p = softmax_row(row)
        expected = [p[e] for e in routing.experts_TK[t].tolist()]
        assert routing.weights_TK[t].tolist() == pytest.approx(expected, rel=1e-6)


def test_softmax_renormalized_equals_softmax_over_chosen_logits():
    router, x = router_with_logits("softmax", renormalize=True)
    routing = router(x)
    # Mixtral: softmax over the chosen logits only.
    for t, row in enumerate(LOGITS):
        chosen = [row[e] for e in routing.experts_TK[t].tolist()]
        assert routing.weights_TK[t].tolist() == pytest.approx(softmax_row(chosen), rel=1e-6)


def test_sigmoid_router_bias_changes_choice_not_weight():
    router, x = router_with_logits("sigmoid")
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    routing = router(x)
    assert routing.experts_TK.tolist() == [[2, 0], [2, 3], [2, 1]]
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert routing.weights_TK[0].tolist() == pytest.approx([sig(2.0), sig(4.0)], rel=1e-6)
    # aux-loss probabilities are the normalised unbiased scores
    row = [sig(v) for v in LOGITS[0]]
    assert routing.probs_TE[0].tolist() == pytest.approx([v / sum(row) for v in row], rel=1e-6)


def test_bias_update_moves_toward_equal_load():
    router, _ = router_with_logits("sigmoid")
    router.update_bias(torch.tensor([5.0, 1.0, 3.0, 3.0]), rate=0.1)
    assert router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_aux_and_z_loss_hand_computed():
    router, x = router_with_logits("softmax")
    routing = router(x)
    perm = permute(routing.experts_TK, 4, capacity=None)
    aux, z = balance_losses(RoutingStats.of(routing, perm), top_k=2)
    # assignments: expert 0:1, 1:2, 2:1, 3:2 of 6
    f = [1 / 6, 2 / 6, 1 / 6, 2 / 6]
    probs = [softmax_row(r) for r in LOGITS]
    P = [sum(p[e] for p in probs) / 3 for e in range(4)]
    assert aux.item() == pytest.approx(4 * sum(fe * pe for fe, pe in zip(f, P)), rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in r)) for r in LOGITS]
    assert z.item() == pytest.approx(sum(v * v for v in lse) / 3, rel=1e-6)


def test_stats_of_split_batch_sum_to_whole_batch_losses():
    # the parallel issue relies on this: aux/z from summed shard stats equal the whole-batch values
    torch.manual_seed(0)
    router = Router(8, 6, 2, "softmax", True)
    x = torch.randn(10, 8)
    def stats(xs):
        r = router(xs)
        return RoutingStats.of(r, permute(r.experts_TK, 6, None))
    whole = balance_losses(stats(x), 2)
    split = balance_losses(stats(x[:4]) + stats(x[4:]), 2)
    assert torch.allclose(torch.stack(whole), torch.stack(split), rtol=1e-6)


def test_permute_dropless_groups_by_expert_in_token_order():
    experts_TK = torch.tensor([[1, 0], [1, 2], [0, 1]])
    perm = permute(experts_TK, 3, capacity=None)
    assert perm.order_R.tolist() == [1, 4, 0, 2, 5, 3]
    assert perm.counts_E.tolist() == [2, 3, 1]


def test_capacity_drops_latest_tokens_first():
    # expert 1 is chosen by tokens 0, 1, 2, 3 (choice 0); capacity 2 keeps tokens 0, 1
    experts_TK = torch.tensor([[1, 0], [1, 2], [1, 0], [1, 2]])
    capacity = capacity_per_group(tokens_per_group=4, top_k=2, num_experts=4, factor=1.0)
    assert capacity == 2
    perm = permute(experts_TK, 4, capacity=capacity)
    kept = sorted(perm.order_R.tolist())
    # assignments (token*2+choice): expert1 -> 0,2 kept; 4,6 dropped; expert0 -> 1,5; expert2 -> 3,7
    assert kept == [0, 1, 2, 3, 5, 7]
    assert perm.num_dropped.item() == 2
    assert perm.counts_E.tolist() == [2, 2, 2, 0]


def test_capacity_applies_per_group():
    experts_TK = torch.tensor([[1], [1], [1], [1]])
    one_group = permute(experts_TK, 2, capacity=1, groups=1)
    two_groups = permute(experts_TK, 2, capacity=1, groups=2)
    assert one_group.order_R.tolist() == [0]
    assert two_groups.order_R.tolist() == [0, 2]  # first token of each group


def test_combine_weights_and_sums_choices():
    y_RD = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    order_R = torch.tensor([3, 0, 1])
    weights_TK = torch.tensor([[0.5, 0.25], [0.1, 0.9]])
    out = combine(y_RD, RowOrder.of(order_R, 2, 2), weights_TK)
    # token0: slots 0 (row1, w .5) and 1 (row2, w .25); token1: slot 3 (row0, w .9), slot 2 dropped
    torch.testing.assert_close(out, torch.tensor([[1.75, 1.75], [0.9, 0.9]]))


def _gathered_reference(x, w, counts):
    """x[r] @ w[expert of row r], with each row's weight gathered: shares no code with grouped_mm_loop."""
    expert_R = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.einsum("rd,rdf->rf", x, w[expert_R])


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [0, 0, 0, 0]])
@pytest.mark.parametrize("dims", [(8, 12), (5, 7)], ids=["aligned", "odd"])  # odd: 16-byte rule fails
def test_grouped_mm_paths_equal_gathered_reference_fwd_bwd(counts, impl, dims):
    torch.manual_seed(1)
    (D, F), E = dims, 4
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), D, requires_grad=True)
    w = torch.randn(E, D, F, requires_grad=True)
    if impl == "grouped_mm":
        assert grouped_mm_supported(x, w) == (dims == (8, 12))  # the fast path really runs when aligned
    fn = grouped_mm if impl == "grouped_mm" else grouped_mm_loop
    grad = torch.randn(sum(counts), F)
    y = fn(x, w, offsets)
    y.backward(grad)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = _gathered_reference(x, w, counts)
    ref.backward(grad)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)
    for e in range(E):
        if counts[e] == 0:
            assert gw[e].abs().max() == 0


def test_grouped_mm_accepts_stride0_gradient():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 8, 8, requires_grad=True)
    grouped_mm(x, w, torch.tensor([2, 6], dtype=torch.int32)).sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_dropless_identical_experts_equal_dense_swiglu(router):
    torch.manual_seed(0)
    D, F_, E = 16, 32, 4
    moe = MoE(dim=D, num_experts=E, top_k=2, ffn_dim=F_, router=router)
    dense = SwiGLU(D, F_)
    with torch.no_grad():
        moe.router.gate.weight.normal_()
        moe.experts.w1_EDF.copy_(dense.w1.weight.t().expand(E, D, F_))
        moe.experts.w3_EDF.copy_(dense.w3.weight.t().expand(E, D, F_))
        moe.experts.w2_EFD.copy_(dense.w2.weight.t().expand(E, F_, D))
    x = torch.randn(3, 5, D)
    y, _, _ = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-6, atol=1e-6)


def test_shared_expert_adds_dense_path():
    torch.manual_seed(0)
    moe = MoE(dim=8, num_experts=4, top_k=1, ffn_dim=16, num_shared_experts=2)
    x = torch.randn(2, 3, 8)
    y, _, _ = moe(x)
    with torch.no_grad():
        moe.experts.w2_EFD.zero_()
    y_shared_only, _, _ = moe(x)
    torch.testing.assert_close(y_shared_only, moe.shared(x))
    assert not torch.allclose(y, y_shared_only)


def test_capacity_mode_zero_output_for_dropped_tokens():
    torch.manual_seed(0)
    moe = MoE(dim=8, num_experts=4, top_k=1, ffn_dim=16, dispatch="capacity", capacity_factor=0.25)
    with torch.no_grad():  # every token to expert 2
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[2] = 1.0
    x = torch.randn(1, 16, 8).abs()
    y, _, _ = moe(x)
    capacity = capacity_per_group(16, 1, 4, 0.25)  # 1
    assert capacity == 1
    assert y[0, 0].abs().sum() > 0 and y[0, 1:].abs().sum() == 0
    load, dropped = moe.expert_load()
    assert load.tolist() == [0, 0, 1, 0] and dropped == pytest.approx(15 / 16)


def test_count_ids_matches_bincount_including_absent_ids():
    ids = torch.tensor([3, 0, 3, 3, 5])
    assert count_ids(ids, 7).tolist() == torch.bincount(ids, minlength=7).tolist() == [1, 0, 0, 3, 0, 1, 0]


def _indexing_reference(x_TD, y_RD, order_R, weights_TK):
    """The same stages by plain indexing (the path kept for dropped assignments)."""
    T, K = weights_TK.shape
    rows = x_TD[order_R // K]
    slots = torch.zeros(T * K, y_RD.shape[-1], dtype=y_RD.dtype)
    slots[order_R] = y_RD * weights_TK.reshape(-1)[order_R][:, None].to(y_RD.dtype)
    return rows, slots.view(T, K, -1).sum(dim=1, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropless_gather_and_combine_equal_indexing_forward_and_backward(dtype):
    """With every assignment kept, gather_tokens and combine take their permutation paths (gathers only,
    no sort-based accumulation); values and gradients equal the indexing reference."""
    torch.manual_seed(0)
    T, K, D, E = 12, 3, 8, 5
    experts_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    perm = permute(experts_TK, E, capacity=None)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    mix = torch.randn(D, D, dtype=dtype)
    probe = torch.randn(T, D)  # a different gradient for every token
    outs, grads = [], []
    for use_perm_path in (True, False):
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        if use_perm_path:
            order = RowOrder.of(perm.order_R, T, K)
            rows = gather_tokens(xi, order)
            out = combine(rows @ mix, order, wi)
        else:
            rows, _ = _indexing_reference(xi, xi[:1], perm.order_R, wi)
            _, out = _indexing_reference(xi, rows @ mix, perm.order_R, wi)
        (out * probe).sum().backward()
        outs.append(out)
        grads.append((xi.grad, wi.grad))
    assert torch.equal(outs[0], outs[1])  # same products, same fp32 sum order
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(grads[0][0], grads[1][0], **tol)  # x: K copies summed (fp32 here)
    torch.testing.assert_close(grads[0][1], grads[1][1], **tol)


def test_gather_tokens_with_drops_indexes():
    experts_TK = torch.tensor([[1, 0], [1, 2], [1, 0], [1, 2]])
    perm = permute(experts_TK, 4, capacity=2)
    x = torch.arange(8.0).view(4, 2).requires_grad_()
    assert torch.equal(gather_tokens(x, RowOrder.of(perm.order_R, 4, 2)), x[perm.order_R // 2])


def test_permute_rows_is_indexing_forward_and_backward():
    torch.manual_seed(0)
    order = torch.randperm(9)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(9)
    x = torch.randn(9, 4, requires_grad=True)
    probe = torch.randn(9, 4)
    (permute_rows(x, order, inverse) * probe).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (x[order] * probe).sum().backward()
    assert torch.equal(permute_rows(x, order, inverse), x[order]) and torch.equal(got, x.grad)
