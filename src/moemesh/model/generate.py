"""Inference on the single-device model: full-sequence logits, and decoding with a KV cache.

The training forward (`Transformer.forward`, which returns losses) is not touched: `logits` runs the same
blocks and returns the LM head's output, and `forward_cached` is a second forward that reuses the
modules' weights but keeps each layer's rotated keys and values, so that a new token costs one position.
`generate` samples with it; temperature 0 is greedy. The MoE layers run as built: load the model with
dispatch="dropless" for inference (a capacity limit would make a token's output depend on its batch).

Legend: B batch, S new positions, P positions so far (cache length), D model dim, H heads, G kv heads,
Dh head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moemesh.model.attention import Attention
from moemesh.model.layers import apply_rotary
from moemesh.model.moe import MoE
from moemesh.model.transformer import Transformer


@torch.no_grad()
def logits(model: Transformer, tokens_BS: torch.Tensor) -> torch.Tensor:
    """[B, S, V] next-token logits of every position, by the training blocks (no cache)."""
    h_BSD = model.tok_embeddings(tokens_BS)
    for block in model.layers:
        h_BSD, _, _ = block(h_BSD, model.rope_cos, model.rope_sin)
    return model.output(model.norm(h_BSD)).float()


class KVCache:
    """Rotated keys and values of every layer, [B, G, max_len, Dh] each; `length` positions are filled."""

    def __init__(self, model: Transformer, batch: int, max_len: int):
        if max_len > model.cfg.max_seq_len:
            raise ValueError(f"{max_len} positions exceed model.max_seq_len={model.cfg.max_seq_len}")
        attn = model.layers[0].attention
        weight = attn.wk.weight
        shape = (batch, attn.n_kv_heads, max_len, attn.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in model.layers]
        self.values = [weight.new_zeros(shape) for _ in model.layers]
        self.length = 0


def _attend(attn: Attention, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
            layer: int) -> torch.Tensor:
    B, S, _ = x_BSD.shape
    start, end = cache.length, cache.length + S
    q_BHSD = attn.wq(x_BSD).view(B, S, attn.n_heads, attn.head_dim).transpose(1, 2)
    k_BGSD = attn.wk(x_BSD).view(B, S, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v_BGSD = attn.wv(x_BSD).view(B, S, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    cache.keys[layer][:, :, start:end] = apply_rotary(k_BGSD, cos, sin)
    cache.values[layer][:, :, start:end] = v_BGSD
    # query at position start + i sees keys at positions <= start + i
    mask_SP = torch.arange(end, device=x_BSD.device)[None, :] <= torch.arange(start, end, device=x_BSD.device)[:, None]
    out_BHSD = F.scaled_dot_product_attention(
        apply_rotary(q_BHSD, cos, sin), cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end],
        attn_mask=mask_SP, enable_gqa=attn.n_heads != attn.n_kv_heads)
    return attn.wo(out_BHSD.transpose(1, 2).reshape(B, S, attn.n_heads * attn.head_dim))


@torch.no_grad()
def forward_cached(model: Transformer, tokens_BS: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """[B, S, V] logits of `tokens_BS`, the positions after the cache's; appends them to the cache."""
    start = cache.length
    # apply_rotary takes the first S rows of the tables it is given
    cos, sin = model.rope_cos[start:], model.rope_sin[start:]
    h_BSD = model.tok_embeddings(tokens_BS)
    for layer, block in enumerate(model.layers):
        h_BSD = h_BSD + _attend(block.attention, block.attention_norm(h_BSD), cos, sin, cache, layer)
        if isinstance(block.ffn, MoE):
            h_BSD = h_BSD + block.ffn(block.ffn_norm(h_BSD))[0]
        else:
            h_BSD = h_BSD + block.ffn(block.ffn_norm(h_BSD))
    cache.length += tokens_BS.shape[1]
    return model.output(model.norm(h_BSD)).float()


def pick(logits_V: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """The next token: argmax at temperature 0, else a draw from softmax(logits / T) over the top k (0: all)."""
    if temperature == 0:
        return int(logits_V.argmax())
    scaled_V = logits_V.float() / temperature
    if 0 < top_k < scaled_V.numel():
        kth = scaled_V.topk(top_k).values[-1]
        scaled_V = scaled_V.masked_fill(scaled_V < kth, float("-inf"))
    return int(torch.multinomial(scaled_V.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], num_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0) -> list[int]:
    """`num_tokens` tokens continuing `prompt`, with a KV cache; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    device = model.output.weight.device
    cache = KVCache(model, 1, len(prompt) + num_tokens)
    next_logits = forward_cached(model, torch.tensor([prompt], device=device), cache)[0, -1]
    out: list[int] = []
    while True:
        out.append(pick(next_logits.cpu(), temperature, top_k, generator))
        if len(out) == num_tokens:
            return out
        next_logits = forward_cached(model, torch.tensor([[out[-1]]], device=device), cache)[0, -1]
