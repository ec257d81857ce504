"""`moemesh sample`: load a checkpoint's full weights in this process and print the prompt and a
continuation. Text runs read and print bytes (UTF-8, undecodable bytes shown as U+FFFD); synthetic and
bin runs read and print space-separated token ids."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

from moemesh.config import Config
from moemesh.errors import UserError
from moemesh.model.transformer import Transformer
from moemesh.model.layers import rotary_tables
from moemesh.train.checkpoint import checkpoint_config, read_model_state
from moemesh.train.ckpt_paths import resolve_checkpoint


def encode(prompt: str, cfg: Config) -> list[int]:
    vocab = cfg.model.vocab_size
    if cfg.data.source == "text":
        ids = list(os.fsencode(prompt))  # the bytes as given, also when they are not UTF-8
    else:
        try:
            ids = [int(word) for word in prompt.split()]
        except ValueError:
            raise UserError(f"--prompt {prompt!r}: expected space-separated token ids "
                            f"(this run's data.source={cfg.data.source!r} has no text tokens)") from None
    if not ids:
        raise UserError("--prompt is empty: give at least one token")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        what = "byte" if cfg.data.source == "text" else "token id"
        raise UserError(f"--prompt: {what} {bad} is outside the vocabulary (model.vocab_size={vocab})")
    return ids


def decode(ids: list[int], cfg: Config) -> str:
    if cfg.data.source == "text":
        replacement = "\ufffd".encode()
        return b"".join(bytes([i]) if i < 256 else replacement for i in ids).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))


def load_model(checkpoint: Path, cfg: Config) -> Transformer:
    """The single-process model with a checkpoint's weights, for inference (dropless MoE)."""
    model_cfg = dataclasses.replace(cfg.model, dispatch="dropless")
    state = read_model_state(checkpoint, cfg)
    with torch.device("meta"):  # no initialisation: every weight is loaded
        model = Transformer(model_cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    cos, sin = rotary_tables(model_cfg.head_dim, model_cfg.max_seq_len, model_cfg.rope_theta)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    return model.eval()


def sample_command(target: str, prompt: str, tokens: int, temperature: float, top_k: int, seed: int) -> int:
    if tokens < 1:
        raise UserError(f"--tokens {tokens}: must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature {temperature}: must be >= 0 (0 is greedy)")
    if top_k < 0:
        raise UserError(f"--top-k {top_k}: must be >= 0 (0 keeps every token)")
    checkpoint = resolve_checkpoint(target)
    cfg = checkpoint_config(checkpoint)
    ids = encode(prompt, cfg)
    if len(ids) + tokens > cfg.model.max_seq_len:
        raise UserError(f"--prompt ({len(ids)} tokens) and --tokens {tokens} exceed model.max_seq_len="
                        f"{cfg.model.max_seq_len} positions")
    from moemesh.model.generate import generate

    out = generate(load_model(checkpoint, cfg), ids, tokens, temperature, top_k, seed)
    sys.stdout.write(decode(ids + out, cfg) + "\n")
    sys.stdout.flush()
    return 0
