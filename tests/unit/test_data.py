"""Token sources: determinism, shard independence, the synthetic chain's entropy floor, exact windows
of text/bin files, and one-line user errors."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moemesh.config import DataConfig
from moemesh.errors import UserError
from moemesh.train.data import MarkovSource, _generator, build_source, shard_batch, unigram_entropy

TINYSHAKESPEARE = Path(__file__).resolve().parents[1] / "fixtures" / "tinyshakespeare_150k.txt"
V, K, SEED = 128, 4, 0


@pytest.fixture(scope="module")
def chain() -> MarkovSource:
    return build_source(DataConfig(source="synthetic", branching=K), vocab_size=V, seq_len=64, seed=SEED)


@pytest.fixture(scope="module")
def sample_BT(chain) -> torch.Tensor:
    # ~260k transitions: plug-in entropy bias is about (V*K - V) / 2N = 7e-4 nats, far inside tolerance.
    return torch.cat([chain.global_batch(step, 256, 255) for step in range(4)])


def _transition_counts(batch_BT: torch.Tensor) -> torch.Tensor:
    pairs_N = batch_BT[:, :-1].flatten() * V + batch_BT[:, 1:].flatten()
    return torch.bincount(pairs_N, minlength=V * V).reshape(V, V).double()


def _text_file(tmp_path: Path, content: bytes, name: str = "data.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _window_at(haystack: np.ndarray, row: np.ndarray) -> list[int]:
    """Offsets where `row` occurs in `haystack`."""
    windows_NT = np.lib.stride_tricks.sliding_window_view(haystack, len(row))
    return np.flatnonzero((windows_NT == row).all(axis=1)).tolist()


# --- every source ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["synthetic", "text", "bin"])
def test_batches_are_deterministic_and_shard_independent(tmp_path, source):
    text = _text_file(tmp_path, "The quick brown fox — naïve café, ✓ jumps. ".encode() * 40)
    binary = tmp_path / "tokens.bin"
    np.arange(3000, dtype="<u2").tofile(binary)
    data = DataConfig(source=source, path=str(binary if source == "bin" else text))
    build = lambda: build_source(data, vocab_size=4096, seq_len=32, seed=7)  # noqa: E731
    first, second = build(), build()

    batch_BT = first.global_batch(step=3, global_batch=12, seq_len=32)
    assert batch_BT.shape == (12, 33) and batch_BT.dtype == torch.int64
    assert int(batch_BT.min()) >= 0 and int(batch_BT.max()) < first.vocab_size
    assert torch.equal(batch_BT, second.global_batch(step=3, global_batch=12, seq_len=32))
    assert not torch.equal(batch_BT, first.global_batch(step=4, global_batch=12, seq_len=32))
    for num_shards in (1, 2, 3, 4, 6):
        shards = [shard_batch(batch_BT, s, num_shards) for s in range(num_shards)]
        assert torch.equal(torch.cat(shards), batch_BT)


def test_shard_batch_rejects_uneven_split():
    with pytest.raises(AssertionError):
        shard_batch(torch.zeros(10, 5, dtype=torch.int64), 0, 4)


# --- synthetic chain ---------------------------------------------------------------------------------


def test_chain_structure(chain):
    assert chain.vocab_size == V and chain.successors_VK.shape == (V, K)
    assert all(len(set(row)) == K for row in chain.successors_VK.tolist())
    assert torch.equal(chain.successors_VK[:, 0], (torch.arange(V) + 1) % V)  # the ring: irreducible
    assert (chain.successors_VK[0] == 0).any()  # the self loop: aperiodic
    torch.testing.assert_close(chain.probs_VK.sum(1), torch.ones(V, dtype=torch.float64))
    assert 0 < chain.entropy_floor < math.log(K)


def test_stationary_distribution_solves_linear_system(chain):
    transition_VV = torch.zeros(V, V, dtype=torch.float64).scatter_(1, chain.successors_VK, chain.probs_VK)
    system_VV = transition_VV.T - torch.eye(V, dtype=torch.float64)
    system_VV[-1] = 1.0  # replace one redundant balance equation by sum(pi) = 1
    rhs_V = torch.zeros(V, dtype=torch.float64)
    rhs_V[-1] = 1.0
    exact_V = torch.linalg.solve(system_VV, rhs_V)
    torch.testing.assert_close(chain.stationary_V, exact_V, rtol=0, atol=1e-10)  # float64 solve


def test_every_transition_is_in_the_successor_sets(chain, sample_BT):
    allowed_VV = torch.zeros(V, V, dtype=torch.bool)
    allowed_VV[torch.arange(V)[:, None], chain.successors_VK] = True
    seen_VV = _transition_counts(sample_BT) > 0
    assert not (seen_VV & ~allowed_VV).any()


def test_positions_are_stationary(chain):
    # 20k rows: the total variation of an empirical marginal from pi is ~0.03 by sampling noise, while
    # a uniform start would sit ~0.26 away from pi at position 0 (vocab 128, branching 4, seed 0).
    batch_BT = chain.global_batch(step=9, global_batch=20_000, seq_len=40)
    for pos in (0, 1, 40):
        freq_V = torch.bincount(batch_BT[:, pos], minlength=V).double() / batch_BT.shape[0]
        assert 0.5 * (freq_V - chain.stationary_V).abs().sum() < 0.06


def test_empirical_conditional_entropy_matches_floor(chain, sample_BT):
    counts_VV = _transition_counts(sample_BT)
    cond_VV = counts_VV / counts_VV.sum(1, keepdim=True).clamp_min(1)
    logs_VV = torch.where(counts_VV > 0, cond_VV.log(), torch.zeros_like(cond_VV))
    empirical = float(-(counts_VV * logs_VV).sum() / counts_VV.sum())
    assert empirical == pytest.approx(chain.entropy_floor, rel=0.02)


def test_bigram_cross_entropy_approaches_floor(chain, sample_BT):
    # Counts from one set of batches, evaluated on unseen ones: the cross-entropy of the best bigram
    # model approaches the floor, from above in expectation (first-order chain: a bigram model can be
    # the true model). Measured here: -0.1% (held-out sampling noise), hence the two-sided tolerance.
    counts_VV = _transition_counts(sample_BT) + 1e-3  # smoothing only guards log(0)
    model_VV = counts_VV / counts_VV.sum(1, keepdim=True)
    held_out_BT = torch.cat([chain.global_batch(step, 256, 255) for step in range(100, 102)])
    logp_N = model_VV.log()[held_out_BT[:, :-1].flatten(), held_out_BT[:, 1:].flatten()]
    cross_entropy = float(-logp_N.mean())
    assert cross_entropy == pytest.approx(chain.entropy_floor, rel=0.02)
    assert cross_entropy > chain.entropy_floor - 0.01  # sampling noise of the held-out mean


def test_deterministic_ring_has_zero_floor():
    ring = build_source(DataConfig(source="synthetic", branching=1), vocab_size=5, seq_len=8, seed=0)
    batch_BT = ring.global_batch(0, 4, 8)
    assert ring.entropy_floor == 0.0
    assert torch.equal(batch_BT[:, 1:], (batch_BT[:, :-1] + 1) % 5)


def test_chain_depends_on_seed():
    one = build_source(DataConfig(source="synthetic"), vocab_size=V, seq_len=8, seed=0)
    two = build_source(DataConfig(source="synthetic"), vocab_size=V, seq_len=8, seed=1)
    assert not torch.equal(one.successors_VK, two.successors_VK)
    assert one.entropy_floor != two.entropy_floor


# --- text and bin files ------------------------------------------------------------------------------


def test_text_windows_are_file_bytes(tmp_path):
    content = "Ünïcode text, bytes as tokens. ".encode() * 20 + bytes(range(32, 127))
    path = _text_file(tmp_path, content)
    source = build_source(DataConfig(source="text", path=str(path)), vocab_size=256, seq_len=16, seed=0)
    assert source.vocab_size == 256 and source.entropy_floor is None
    data = np.frombuffer(content, dtype=np.uint8)
    for row in source.global_batch(step=0, global_batch=8, seq_len=16).numpy():
        offsets = _window_at(data, row)
        assert offsets and 0 <= offsets[0] <= len(data) - 17


def test_text_windows_reach_both_ends(tmp_path):
    # A file of exactly seq_len + 2 bytes has two windows; both must appear over enough rows.
    path = _text_file(tmp_path, b"abcdefghij")
    source = build_source(DataConfig(source="text", path=str(path)), vocab_size=256, seq_len=8, seed=0)
    firsts = set(source.global_batch(0, 64, 8)[:, 0].tolist())
    assert firsts == {ord("a"), ord("b")}


@pytest.mark.parametrize("token_dtype,max_id", [("uint16", 60_000), ("uint32", 100_000)])
def test_bin_windows_are_file_tokens(tmp_path, token_dtype, max_id):
    tokens_N = np.random.default_rng(0).integers(0, max_id, size=2000).astype("<u2" if token_dtype == "uint16"
                                                                             else "<u4")
    tokens_N[17] = max_id  # the largest id must be accepted at vocab_size = max_id + 1
    path = tmp_path / "tokens.bin"
    tokens_N.tofile(path)
    data = DataConfig(source="bin", path=str(path), token_dtype=token_dtype)
    source = build_source(data, vocab_size=max_id + 1, seq_len=24, seed=3)
    batch_BT = source.global_batch(step=5, global_batch=8, seq_len=24)
    assert batch_BT.dtype == torch.int64 and int(batch_BT.max()) > 2**15  # no truncation or sign wrap
    for row in batch_BT.numpy():
        assert _window_at(tokens_N.astype(np.int64), row)


def test_unigram_entropy_of_small_file(tmp_path):
    path = _text_file(tmp_path, b"aabb" * 10)
    assert unigram_entropy(path) == pytest.approx(math.log(2))


def test_tinyshakespeare_unigram_entropy():
    data = TINYSHAKESPEARE.read_bytes()
    expected = -sum(n / len(data) * math.log(n / len(data)) for n in Counter(data).values())
    assert unigram_entropy(TINYSHAKESPEARE) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(3.29, abs=0.01)  # 3.31 for the whole of tinyshakespeare


# --- user errors -------------------------------------------------------------------------------------


def _error(data: DataConfig, vocab_size: int = 256, seq_len: int = 16) -> str:
    with pytest.raises(UserError) as info:
        build_source(data, vocab_size=vocab_size, seq_len=seq_len, seed=0)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("source", ["text", "bin"])
def test_missing_file(tmp_path, source):
    missing = tmp_path / "nope.dat"
    message = _error(DataConfig(source=source, path=str(missing)))
    assert f"data.path={missing}" in message and "no such file" in message


@pytest.mark.parametrize("source", ["text", "bin"])
def test_directory_is_not_a_file(tmp_path, source):
    assert f"data.path={tmp_path}" in _error(DataConfig(source=source, path=str(tmp_path)))


def test_text_not_utf8(tmp_path):
    path = _text_file(tmp_path, b"hello \xff\xfe world" * 10)
    message = _error(DataConfig(source="text", path=str(path)))
    assert f"data.path={path}" in message and "UTF-8" in message and "byte 6" in message


def test_text_too_short(tmp_path):
    path = _text_file(tmp_path, b"short")
    message = _error(DataConfig(source="text", path=str(path)), seq_len=16)
    assert message == (f"data.path={path} holds 5 tokens, fewer than one sequence of "
                       f"train.seq_len+1=17")


def test_text_needs_byte_vocab(tmp_path):
    path = _text_file(tmp_path, b"x" * 100)
    message = _error(DataConfig(source="text", path=str(path)), vocab_size=128)
    assert "model.vocab_size=128" in message and "256" in message


def test_bin_too_short(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(10, dtype="<u4").tofile(path)
    message = _error(DataConfig(source="bin", path=str(path), token_dtype="uint32"), seq_len=16)
    assert message == (f"data.path={path} holds 10 tokens, fewer than one sequence of "
                       f"train.seq_len+1=17")


def test_bin_size_not_multiple_of_width(tmp_path):
    path = _text_file(tmp_path, b"\x01\x00" * 50 + b"\x01", name="odd.bin")
    message = _error(DataConfig(source="bin", path=str(path), token_dtype="uint16"))
    assert f"data.path={path}" in message and "101 bytes" in message and "uint16" in message


def test_bin_id_beyond_vocab(tmp_path):
    path = tmp_path / "tokens.bin"
    tokens_N = np.zeros(100, dtype="<u2")
    tokens_N[42] = 300
    tokens_N.tofile(path)
    message = _error(DataConfig(source="bin", path=str(path)), vocab_size=256)
    assert f"data.path={path}" in message and "300" in message and "model.vocab_size=256" in message


def test_bad_choices():
    assert "data.source='csv'" in _error(DataConfig(source="csv"))
    assert "data.token_dtype='int8'" in _error(DataConfig(source="bin", path="x.bin", token_dtype="int8"))
    assert "data.branching=9" in _error(DataConfig(source="synthetic", branching=9), vocab_size=8)


def _walk_one_call_per_position(source: MarkovSource, step: int, global_batch: int, seq_len: int) -> torch.Tensor:
    """The batch as the code made it before the numpy walk: a torch draw and searchsorted per position."""
    gen = _generator(source.seed, "batch", step)
    batch_BT = torch.empty(global_batch, seq_len + 1, dtype=torch.int64)
    u_B = torch.rand(global_batch, generator=gen, dtype=torch.float64)
    state_B = torch.searchsorted(source._start_cdf_V, u_B, right=True)
    batch_BT[:, 0] = state_B
    for pos in range(1, seq_len + 1):
        cdf_BK = source._cdf_VK[state_B]
        u_B1 = torch.rand(cdf_BK.shape[0], 1, generator=gen, dtype=cdf_BK.dtype)
        state_B = source.successors_VK[state_B, torch.searchsorted(cdf_BK, u_B1, right=True).squeeze(1)]
        batch_BT[:, pos] = state_B
    return batch_BT


@pytest.mark.parametrize("vocab,branching,batch,seq", [(97, 3, 4, 50), (256, 1, 2, 17), (1000, 8, 7, 33),
                                                      (300, 5, 16, 40), (8192, 4, 1, 300)])
def test_markov_batches_are_those_of_the_per_position_walk(vocab, branching, batch, seq):
    """Both walks (numpy over rows from 16 rows on, Python per row below) hand out the very tokens of the
    previous code (runs and checkpoints stay comparable across the change), for every step."""
    source = MarkovSource(vocab, branching, seed=11)
    for step in (1, 2, 500):
        assert torch.equal(source.global_batch(step, batch, seq), _walk_one_call_per_position(source, step, batch, seq))
