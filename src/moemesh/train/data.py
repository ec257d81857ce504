"""Token sources: where training batches come from.

Every source hands out the *global* batch of a step as a pure function of (seed, step, data), so the
batch a row sees never depends on how many processes exist; `shard_batch` then cuts out one data
shard's rows. Three sources:

- synthetic: a random sparse first-order Markov chain whose entropy rate is known exactly, so the loss
  a perfect model would reach (`entropy_floor`) is a number, not a guess.
- text: a UTF-8 file read as bytes (token = byte value).
- bin: nanoGPT layout, raw little-endian uint16/uint32 token ids, memory-mapped.

Shape legend: B rows of a batch, T tokens per row (seq_len + 1: inputs and shifted targets),
V vocabulary states, K successors per state (data.branching).
"""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from moemesh.config import DataConfig
from moemesh.errors import UserError

PYTHON_WALK_ROWS = 16  # a synthetic batch of fewer rows is walked in plain Python (MarkovSource._walk_rows)
_TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_BYTE_VOCAB = 256


class TokenSource(Protocol):
    vocab_size: int  # ids emitted are < vocab_size
    entropy_floor: float | None  # nats per predicted token: exact for synthetic, None otherwise

    def global_batch(self, step: int, global_batch: int, seq_len: int) -> torch.Tensor:
        """int64 [global_batch, seq_len + 1]; inputs = [:, :-1], targets = [:, 1:]."""
        ...


def build_source(data: DataConfig, vocab_size: int, seq_len: int, seed: int, check_ids: bool = True) -> TokenSource:
    """`check_ids=False` skips the full scan of a .bin file for ids >= vocab_size: for worker processes
    whose launcher already checked the same file."""
    if data.source == "synthetic":
        return MarkovSource(vocab_size, data.branching, seed)
    if data.source == "text":
        return _build_text(data.path, vocab_size, seq_len, seed)
    if data.source == "bin":
        return _build_bin(data.path, data.token_dtype, vocab_size, seq_len, seed, check_ids)
    raise UserError(f"data.source={data.source!r} is not one of synthetic, text, bin")


def shard_batch(batch_BT: torch.Tensor, shard: int, num_shards: int) -> torch.Tensor:
    """Rows [shard*B/n, (shard+1)*B/n): contiguous, so shards concatenated in order give the batch."""
    num_rows = batch_BT.shape[0]
    assert num_rows % num_shards == 0, f"batch of {num_rows} rows does not split into {num_shards} shards"
    assert 0 <= shard < num_shards, f"shard {shard} out of range for {num_shards} shards"
    rows = num_rows // num_shards
    return batch_BT[shard * rows:(shard + 1) * rows]


def unigram_entropy(path: str | Path) -> float:
    """Entropy in nats/byte of a file's byte unigram distribution: the loss of a context-free model."""
    counts_V = np.bincount(_as_bytes(_read_bytes(str(path))), minlength=_BYTE_VOCAB).astype(np.float64)
    probs_V = counts_V[counts_V > 0] / counts_V.sum()
    return float(-(probs_V * np.log(probs_V)).sum())


def _generator(seed: int, stream: str, step: int = 0) -> torch.Generator:
    # A hash rather than seed * C + step: the chain's stream and the batch streams of every (seed, step)
    # never collide, and the value is the same on every Python version and process.
    digest = hashlib.blake2b(f"moemesh:{stream}:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# ---------------------------------------------------------------------------------------------------
# synthetic: random sparse Markov chain


class MarkovSource:
    """Stationary samples of a random sparse first-order Markov chain over `vocab_size` states.

    State s moves to K = `branching` distinct successors: always (s + 1) % V, which makes the chain
    irreducible (the ring visits every state), plus K - 1 uniformly random others. State 0 gets a self
    loop when K >= 2, so the chain is also aperiodic; pi is unique either way (irreducibility suffices).
    Rows start from pi, so every position is stationary and the best possible next-token loss is the
    entropy rate. K = 1 is the deterministic ring: entropy_floor = 0.
    """

    def __init__(self, vocab_size: int, branching: int, seed: int):
        if not 1 <= branching <= vocab_size:
            raise UserError(f"data.branching={branching} must lie in [1, model.vocab_size={vocab_size}]")
        self.vocab_size = vocab_size
        self.seed = seed
        self.successors_VK, self.probs_VK = _random_chain(vocab_size, branching, _generator(seed, "chain"))
        self.stationary_V = _stationary(self.successors_VK, self.probs_VK)
        self.entropy_floor = _entropy_rate(self.stationary_V, self.probs_VK)
        self._cdf_VK = _cdf(self.probs_VK)
        self._start_cdf_V = _cdf(self.stationary_V)
        self._lists: tuple[list, list] | None = None  # the CDF and successor tables as Python lists

    def global_batch(self, step: int, global_batch: int, seq_len: int) -> torch.Tensor:
        """Each position's successor choice is a draw of one uniform per row against the state's CDF. The
        walk is sequential in position, so it runs on uniforms drawn up front (the same values, in the
        same order, as one draw per position): in numpy, one vectorised pass per position over the rows
        (~4 us a position), or for few rows in plain Python, one bisection per token (~0.3 us a token):
        an 8192-token row took ~33 ms the first way, as long as a GPU step at that sequence length."""
        gen = _generator(self.seed, "batch", step)
        u_B = torch.rand(global_batch, generator=gen, dtype=torch.float64)
        u_TB = torch.rand(seq_len, global_batch, generator=gen, dtype=self._cdf_VK.dtype).numpy()
        state_B = torch.searchsorted(self._start_cdf_V, u_B, right=True).numpy()
        if global_batch < PYTHON_WALK_ROWS:
            return torch.from_numpy(self._walk_rows(state_B, u_TB))
        cdf_VK, successors_VK = self._cdf_VK.numpy(), self.successors_VK.numpy()
        batch_BT = np.empty((global_batch, seq_len + 1), dtype=np.int64)
        batch_BT[:, 0] = state_B
        for pos in range(seq_len):
            # searchsorted(cdf, u, right=True) = the number of CDF entries <= u
            choice_B = (cdf_VK[state_B] <= u_TB[pos, :, None]).sum(axis=1)
            state_B = successors_VK[state_B, choice_B]
            batch_BT[:, pos + 1] = state_B
        return torch.from_numpy(batch_BT)

    def _walk_rows(self, state_B: np.ndarray, u_TB: np.ndarray) -> np.ndarray:
        """The same walk row by row in Python: bisect_right(cdf, u) is the count of CDF entries <= u, and
        Python floats hold the CDF's and the uniforms' values exactly, so the tokens are the same."""
        if self._lists is None:  # made once: ~1 ms per 8192 states
            self._lists = (self._cdf_VK.tolist(), self.successors_VK.tolist())
        cdf, successors = self._lists
        batch_BT = np.empty((len(state_B), u_TB.shape[0] + 1), dtype=np.int64)
        for row, (state, u_T) in enumerate(zip(state_B.tolist(), u_TB.T.tolist())):
            walk = [state]
            for u in u_T:
                state = successors[state][bisect.bisect_right(cdf[state], u)]
                walk.append(state)
            batch_BT[row] = walk
        return batch_BT


def _random_chain(num_states: int, branching: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Successor ids [V, K] (distinct per row) and their probabilities [V, K] (float64, rows sum to 1)."""
    states_V = torch.arange(num_states)
    # Extras are (s + 1 + offset) % V with distinct offsets in [1, V - 1]: never s + 1 again.
    offsets_VK = 1 + _distinct_ints(num_states, branching - 1, num_states - 1, gen)
    successors_VK = torch.cat([states_V[:, None] + 1, states_V[:, None] + 1 + offsets_VK], dim=1) % num_states
    if branching >= 2 and not (successors_VK[0] == 0).any():
        successors_VK[0, 1] = 0  # one self loop makes the irreducible chain aperiodic
    # Normalised exponentials = Dirichlet(1): probabilities uniform over the simplex.
    weights_VK = torch.empty(num_states, branching, dtype=torch.float64).exponential_(generator=gen)
    return successors_VK, weights_VK / weights_VK.sum(dim=1, keepdim=True)


def _distinct_ints(num_rows: int, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[num_rows, k]: per row a uniform random k-subset of [0, n), by Floyd's algorithm.

    k rounds vectorised over rows, memory independent of n: a [V, V] score matrix for topk would need
    V^2 floats (20 GB at V = 50k).
    """
    chosen_RK = torch.empty(num_rows, k, dtype=torch.int64)
    for i, j in enumerate(range(n - k, n)):
        pick_R = torch.randint(0, j + 1, (num_rows,), generator=gen)
        taken_R = (chosen_RK[:, :i] == pick_R[:, None]).any(dim=1)
        chosen_RK[:, i] = torch.where(taken_R, j, pick_R)
    return chosen_RK


def _stationary(successors_VK: torch.Tensor, probs_VK: torch.Tensor, tol: float = 1e-13) -> torch.Tensor:
    """pi with pi P = pi, by power iteration on the lazy chain (I + P) / 2 in float64.

    The lazy chain has the same pi and converges even if P were periodic (branching=1 is a pure ring).
    """
    num_states = successors_VK.shape[0]
    pi_V = torch.full((num_states,), 1.0 / num_states, dtype=torch.float64)
    flat_successors = successors_VK.flatten()
    for _ in range(1_000_000):
        moved_V = torch.zeros_like(pi_V).index_add_(0, flat_successors, (pi_V[:, None] * probs_VK).flatten())
        next_V = 0.5 * (pi_V + moved_V)
        next_V /= next_V.sum()
        if (next_V - pi_V).abs().sum() < tol:
            return next_V
        pi_V = next_V
    raise AssertionError("power iteration for the stationary distribution did not converge")


def _entropy_rate(pi_V: torch.Tensor, probs_VK: torch.Tensor) -> float:
    """H = sum_s pi_s H(P_s) in nats: the expected loss of the true conditional at a stationary position."""
    row_entropy_V = -(probs_VK * probs_VK.log()).sum(dim=1)
    return float((pi_V * row_entropy_V).sum())


def _cdf(probs: torch.Tensor) -> torch.Tensor:
    cdf = probs.cumsum(dim=-1)
    cdf[..., -1] = 1.0  # rounding must not leave a sliver above the last bucket
    return cdf


# ---------------------------------------------------------------------------------------------------
# text and bin: random windows of a token array


class WindowSource:
    """Rows are windows of T = seq_len + 1 consecutive tokens at uniform random starts."""

    def __init__(self, tokens_N: np.ndarray, vocab_size: int, seed: int):
        self.tokens_N = tokens_N  # uint8 array (text) or read-only memmap (bin); never loaded whole for bin
        self.vocab_size = vocab_size
        self.entropy_floor = None
        self.seed = seed

    def global_batch(self, step: int, global_batch: int, seq_len: int) -> torch.Tensor:
        num_tokens = len(self.tokens_N)
        assert num_tokens >= seq_len + 1, f"{num_tokens} tokens cannot fill a window of {seq_len + 1}"
        gen = _generator(self.seed, "batch", step)
        # Starts uniform in [0, N - seq_len - 1], so every window lies inside the data.
        starts_B = torch.randint(0, num_tokens - seq_len, (global_batch,), generator=gen)
        index_BT = starts_B[:, None] + torch.arange(seq_len + 1)
        return torch.from_numpy(self.tokens_N[index_BT.numpy()].astype(np.int64))


def _build_text(path: str, vocab_size: int, seq_len: int, seed: int) -> WindowSource:
    if vocab_size < _BYTE_VOCAB:
        raise UserError(f"model.vocab_size={vocab_size} must be >= 256 for data.source='text' (byte tokens)")
    raw = _read_bytes(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"data.path={path}: not valid UTF-8 (byte {exc.start}); data.source='text' reads "
                        f"UTF-8 text, use data.source='bin' for pre-tokenized ids") from None
    _check_length(path, len(raw), seq_len)
    return WindowSource(_as_bytes(raw), _BYTE_VOCAB, seed)


def _build_bin(path: str, token_dtype: str, vocab_size: int, seq_len: int, seed: int,
               check_ids: bool) -> WindowSource:
    if token_dtype not in _TOKEN_DTYPES:
        raise UserError(f"data.token_dtype={token_dtype!r} is not one of {', '.join(_TOKEN_DTYPES)}")
    dtype = _TOKEN_DTYPES[token_dtype]
    size = _file_size(path)
    if size % dtype.itemsize:
        raise UserError(f"data.path={path}: {size} bytes is not a multiple of {dtype.itemsize} "
                        f"(data.token_dtype={token_dtype}); is it a {token_dtype} .bin file?")
    _check_length(path, size // dtype.itemsize, seq_len)
    try:
        tokens_N = np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise UserError(f"data.path={path}: cannot read it ({exc.__class__.__name__}: {exc.strerror})") from None
    max_id = _max_token(tokens_N) if check_ids else -1
    if max_id >= vocab_size:
        raise UserError(f"data.path={path} holds token id {max_id} >= model.vocab_size={vocab_size} "
                        f"(set model.vocab_size >= {max_id + 1}, or check data.token_dtype={token_dtype})")
    return WindowSource(tokens_N, vocab_size, seed)


def _max_token(tokens_N: np.ndarray, chunk: int = 1 << 24) -> int:
    # Chunked so a multi-GB memmap is scanned without being held in memory at once.
    return max(int(tokens_N[i:i + chunk].max()) for i in range(0, len(tokens_N), chunk))


def _check_length(path: str, num_tokens: int, seq_len: int) -> None:
    if num_tokens < seq_len + 1:
        raise UserError(f"data.path={path} holds {num_tokens} tokens, fewer than one sequence of "
                        f"train.seq_len+1={seq_len + 1}")


def _file_size(path: str) -> int:
    file = Path(path)
    try:
        if not file.exists():
            raise UserError(f"data.path={path}: no such file")
        if not file.is_file():
            raise UserError(f"data.path={path}: not a regular file")
        return file.stat().st_size
    except OSError as exc:  # e.g. ENAMETOOLONG, which Path.exists() raises rather than answering False
        raise UserError(f"data.path={path}: cannot read it ({exc.strerror or exc})") from None


def _read_bytes(path: str) -> bytes:
    _file_size(path)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"data.path={path}: cannot read it ({exc.__class__.__name__}: {exc.strerror})") from None


def _as_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8)
