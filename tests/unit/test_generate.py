"""Decoding with the KV cache equals recomputing the whole sequence; sampling is a function of the seed;
prompts are bytes for text runs and token ids otherwise. Single process, random tiny models."""

from __future__ import annotations

import pytest
import torch

from moemesh.config import load_config
from moemesh.errors import UserError
from moemesh.model.generate import KVCache, forward_cached, generate, logits
from moemesh.model.transformer import Transformer
from moemesh.sample import decode, encode

MODELS = {
    "tiny": [],
    "mqa-dense-first-shared": ["model.n_kv_heads=1", "model.num_dense_layers=1", "model.num_shared_experts=1",
                               "model.n_layers=3", "model.top_k=1"],
}


def _model(overrides: list[str]) -> Transformer:
    cfg = load_config("tiny", [*overrides, "model.init_std=0.2"])  # larger weights: decisive logits
    torch.manual_seed(0)
    return Transformer(cfg.model).eval()


def _greedy_without_cache(model: Transformer, prompt: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", MODELS)
def test_cached_logits_equal_the_full_forward(name):
    model = _model(MODELS[name])
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model, 2, 24)
    parts = [forward_cached(model, tokens[:, :10], cache)]  # a prompt, then one position at a time
    parts += [forward_cached(model, tokens[:, i:i + 1], cache) for i in range(10, 24)]
    full = logits(model, tokens)
    assert float((torch.cat(parts, 1) - full).abs().max() / full.abs().max()) < 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_greedy_with_cache_equals_greedy_without(name):
    model = _model(MODELS[name])
    prompt = [5, 17, 3, 99]
    assert generate(model, prompt, 30, temperature=0) == _greedy_without_cache(model, prompt, 30)


def test_sampling_is_a_function_of_the_seed():
    model = _model([])
    first = generate(model, [1, 2, 3], 40, temperature=1.0, top_k=20, seed=7)
    assert generate(model, [1, 2, 3], 40, temperature=1.0, top_k=20, seed=7) == first
    assert generate(model, [1, 2, 3], 40, temperature=1.0, top_k=20, seed=8) != first
    assert generate(model, [1, 2, 3], 20, temperature=1.0, top_k=1, seed=9) == generate(model, [1, 2, 3], 20)


def test_prompts_and_outputs():
    text = load_config("shakespeare", ["data.path=x.txt"])
    assert encode("Hé", text) == [72, 195, 169]
    assert decode([72, 195, 169, 195, 300], text) == "Hé\ufffd\ufffd"  # a cut UTF-8 sequence, an id >= 256
    ids = load_config("tiny")
    assert encode(" 3 17  42 ", ids) == [3, 17, 42] and decode([3, 17, 42], ids) == "3 17 42"
    with pytest.raises(UserError, match="token id 128 is outside the vocabulary"):
        encode("1 128", ids)
    with pytest.raises(UserError, match="space-separated token ids"):
        encode("To be", ids)
    with pytest.raises(UserError, match="empty"):
        encode("", text)
