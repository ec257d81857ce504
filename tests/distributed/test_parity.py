"""Parity matrix: training at each (dp, ep, tp) layout equals the single-process run.

fp32 on CPU with gloo. Tolerance 1e-5 relative (per-step losses and global gradient norm before clipping,
which Adam's scale invariance would otherwise hide; per-tensor ||p - p_ref|| / ||p_ref||
of the gathered full parameters after the last step): sharded matmuls and reductions sum in a
different order, which moves fp32 results by ~1e-7, and four AdamW steps amplify that only mildly.
One launch per world size runs all its cases. The harness runs every case with the overlaps on
(`parity.OVERLAP`; a case may turn one off): the same tolerances hold with them.
"""

from __future__ import annotations

import json

import pytest

from moemesh.launch import launch_local
from moemesh.parity import OVERLAP, Case, run_cases

TOL = 1e-5
# Also relative to how far each tensor moved in training (||p - p_ref|| / ||p_ref - p_init||): catches a
# layout that applies only part of an update. 1e-3: the 1e-5 above over updates of ~1e-2 of the weights.
UPDATE_TOL = 1e-3
TP4 = ["model.n_kv_heads=4"]
BF16 = ["train.param_dtype=bfloat16"]
NO_OVERLAP = ["parallel.overlap_grad_reduce=false", "parallel.ep_overlap_chunks=1"]
TWINS = [("dp2-bf16-masters", "dp2-bf16-masters-no-overlap")]  # (overlap on, the same run with it off)
CASES = {
    2: [
        Case("tp2-sp", (1, 1, 2), ["parallel.sequence_parallel=true"]),
        Case("ep2-capacity", (1, 2, 1), ["model.dispatch=capacity", "model.capacity_factor=1.0"]),
        Case("dp2-sigmoid-shared", (2, 1, 1), ["model.router=sigmoid", "model.num_shared_experts=1"]),
        Case("tp2-dropless-clipped", (1, 1, 2), ["train.grad_clip=0.1"]),
        # Both overlaps off: the plain paths (one all-to-all per direction, gradients reduced after backward).
        Case("ep2-dropless-no-overlap", (1, 2, 1), NO_OVERLAP),
        Case("tp2-sp-recompute-full", (1, 1, 2),
             ["parallel.sequence_parallel=true", "train.activation_checkpointing=full"]),
        # bf16 parameters, fp32 masters: bucketed fp32 reduction during backward, bit for bit the same as
        # after it (two ranks: a sum of two is the same in any order). No reference: bf16 is not within 1e-5.
        Case("dp2-bf16-masters", (2, 1, 1), BF16, reference=False),
        Case("dp2-bf16-masters-no-overlap", (2, 1, 1), [*BF16, "parallel.overlap_grad_reduce=false"],
             reference=False),
    ],
    4: [
        Case("tp4-shared", (1, 1, 4), [*TP4, "model.num_shared_experts=2"]),
        Case("ep4-64experts-top8-3chunks", (1, 4, 1),
             ["model.num_experts=64", "model.top_k=8", "model.ffn_dim=32", "parallel.ep_overlap_chunks=3"]),
        Case("dp2-ep2-capacity-sigmoid-clipped", (2, 2, 1),
             ["model.dispatch=capacity", "model.capacity_factor=1.0", "model.router=sigmoid", "train.grad_clip=0.1"]),
        Case("dp2-tp2-sp", (2, 1, 2), ["parallel.sequence_parallel=true"]),
        Case("ep2-tp2-capacity-shared-sp", (1, 2, 2),
             ["model.dispatch=capacity", "model.capacity_factor=1.0", "model.num_shared_experts=1",
              "parallel.sequence_parallel=true", "parallel.check_collectives=true"]),
        Case("ep2-tp2-recompute-moe-shared", (1, 2, 2),
             ["train.activation_checkpointing=moe", "model.num_shared_experts=1"]),
        Case("ep4-imbalance-dropless", (1, 4, 1), ["model.top_k=1"], steps=2, force_expert=3),
        Case("ep4-imbalance-capacity", (1, 4, 1),
             ["model.top_k=1", "model.dispatch=capacity", "model.capacity_factor=1.0"], steps=2, force_expert=3),
        Case("planted-mismatch", (2, 2, 1), ["parallel.check_collectives=true"], steps=1, skip_stats_on_rank=1),
    ],
    8: [
        Case("dp2-ep2-tp2-clipped", (2, 2, 2), ["train.grad_clip=0.1"]),
        Case("dp2-ep2-tp2-capacity-sigmoid-shared-sp", (2, 2, 2),
             ["model.dispatch=capacity", "model.capacity_factor=1.0", "model.router=sigmoid",
              "model.num_shared_experts=1", "parallel.sequence_parallel=true"]),
        Case("dp4-tp2-dense-first", (4, 1, 2), ["model.num_dense_layers=1", "parallel.check_collectives=true"]),
    ],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world, cases in CASES.items():
        path = tmp_path_factory.mktemp(f"parity{world}") / "results.json"
        failed = launch_local(run_cases, (cases, str(path)), world)
        assert failed is None, failed
        out.update({r["name"]: r for r in json.loads(path.read_text())})
    return out


PARITY = [c for cases in CASES.values() for c in cases if c.skip_stats_on_rank is None and c.reference]


@pytest.mark.parametrize("case", PARITY, ids=[c.name for c in PARITY])
def test_layout_matches_single_process(results, case):
    r = results[case.name]
    assert r["names_match"]
    assert r["shard_roundtrip"], "layout.shard_state(gathered) differs from some rank's parameters"
    assert r["loss_rel_err"] <= TOL, (r["losses"], r["ref_losses"])
    assert r["param_rel_err"] <= TOL, (r["worst_param"], r["param_rel_err"])
    assert r["update_rel_err"] <= UPDATE_TOL, (r["worst_update_param"], r["update_rel_err"])


def test_imbalance_capacity_drops_documented_tokens(results):
    r = results["ep4-imbalance-capacity"]
    # top_k=1, every token to expert 3; capacity per rank is ceil(1.0 * T_local * 1 / E), so an expert
    # keeps T_local / E of a rank's T_local tokens and 1 - 1/E of all assignments drop.
    num_experts = 4
    for step in r["dropped"]:
        assert step == pytest.approx([1 - 1 / num_experts] * len(step))
    assert r["dropped"] == r["ref_dropped"]


def test_imbalance_dropless_sends_every_token_to_one_expert(results):
    r = results["ep4-imbalance-dropless"]
    assert r["load"] == [[0.0, 0.0, 0.0, 1.0]] * 2  # per layer: the forced routing really happened
    assert r["dropped"][-1] == [0.0, 0.0]


def test_planted_collective_mismatch_is_named(results):
    message = results["planted-mismatch"]["mismatch"]
    assert "collective order differs" in message and "layer 0" in message
    assert "ranks [1] issue all_to_all on expert" in message
    assert "ranks [0, 2, 3] issue all_reduce on data_expert" in message


@pytest.mark.parametrize("case", PARITY, ids=[c.name for c in PARITY])
def test_gradient_buckets_are_reduced_during_backward(results, case):
    """The harness turns overlap_grad_reduce on with ~50 KB buckets, so the tiny model gets several, and
    every one is launched from a backward hook (also in the forced-routing cases, whose router weights
    are frozen: a bucket does not wait for a parameter without a gradient)."""
    dp, ep, tp = case.layout
    overlap = results[case.name]["grad_overlap"]
    if "parallel.overlap_grad_reduce=false" in case.overrides:
        assert not overlap["overlap"]
        return
    assert overlap["overlap"]
    sequence_parallel = "parallel.sequence_parallel=true" in case.overrides
    if dp * ep == 1 and not sequence_parallel:  # TP alone: every gradient is already whole
        assert overlap["buckets"] == 0
        return
    assert overlap["buckets"] >= (2 if dp * ep > 1 else 1)
    assert overlap["launched_in_backward"] == overlap["buckets"], overlap


@pytest.mark.parametrize("case", PARITY, ids=[c.name for c in PARITY])
def test_a_closed_trainer_is_freed(results, case):
    """The bucket hooks live in autograd's C++ state, out of the garbage collector's sight: they must not
    keep the model alive once the Trainer is gone (a second run in one process ran out of GPU memory)."""
    assert results[case.name]["grad_overlap"]["freed"]


def _chunks(case) -> int:
    settings = dict(o.split("=", 1) for o in [*OVERLAP, *case.overrides])
    return int(settings["parallel.ep_overlap_chunks"])


@pytest.mark.parametrize("case", PARITY, ids=[c.name for c in PARITY])
def test_expert_all_to_all_chunks_are_in_flight_together(results, case):
    """With ep_overlap_chunks=C every chunk's all-to-all is launched before the experts run on the first
    one, in forward and (the reverse all-to-alls of the gradients) in backward: C in flight at once."""
    in_flight = results[case.name]["grad_overlap"]["all_to_all_in_flight"]
    chunks = _chunks(case) if case.layout[1] > 1 and _chunks(case) > 1 else 0
    assert in_flight == {"forward": chunks, "backward": chunks}


@pytest.mark.parametrize("on, off", TWINS)
def test_overlap_off_gives_the_same_bits(results, on, off):
    assert results[on]["grad_overlap"]["overlap"] and not results[off]["grad_overlap"]["overlap"]
    assert results[on]["losses"] == results[off]["losses"]
    assert results[on]["state_sha"] == results[off]["state_sha"]
