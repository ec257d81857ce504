"""moemesh <-> Hugging Face Mixtral (`MixtralForCausalLM`): the one place that knows both namings.

Config (config.json field <- model.* field):
  vocab_size <- vocab_size          hidden_size <- dim                intermediate_size <- ffn_dim
  num_hidden_layers <- n_layers     num_attention_heads <- n_heads    num_key_value_heads <- n_kv_heads
  num_local_experts <- num_experts  num_experts_per_tok <- top_k      max_position_embeddings <- max_seq_len
  rms_norm_eps <- norm_eps          rope_parameters.rope_theta (and legacy rope_theta) <- rope_theta
  initializer_range <- init_std     router_aux_loss_coef <- aux_loss_coef / top_k
transformers' load-balancing loss sums over the k choices where moemesh's averages them, so the same loss
needs a coefficient k times smaller there. Mixtral's router is a softmax whose top-k weights are
renormalized: moemesh router="softmax", renormalize=true. Training policies without a Mixtral field
(dispatch, capacity_factor, z_loss_coef) are not exported; inference in transformers is dropless.

Tensors (nn.Linear weights are [out, in] on both sides; stacked experts are [in, out] per expert):
  tok_embeddings.weight               model.embed_tokens.weight
  layers.N.attention_norm.weight      model.layers.N.input_layernorm.weight
  layers.N.attention.w{q,k,v,o}.weight  model.layers.N.self_attn.{q,k,v,o}_proj.weight
  layers.N.ffn_norm.weight            model.layers.N.post_attention_layernorm.weight
  layers.N.ffn.router.gate.weight     model.layers.N.block_sparse_moe.gate.weight
  layers.N.ffn.experts.w1_EDF[e]      model.layers.N.block_sparse_moe.experts.e.w1.weight, transposed [F, D]
  layers.N.ffn.experts.w3_EDF[e]      ... experts.e.w3.weight, transposed [F, D]
  layers.N.ffn.experts.w2_EFD[e]      ... experts.e.w2.weight, transposed [D, F]
  norm.weight, output.weight          model.norm.weight, lm_head.weight
Files on the Hub (and what `export` writes) use that per-expert layout; transformers >= 5 fuses experts in
memory as `model.layers.N.mlp.experts.gate_up_proj` [E, 2F, D] (w1 rows, then w3 rows) and
`mlp.experts.down_proj` [E, D, F], with the router at `mlp.gate.weight`; `from_hf` reads both. The
rotary embedding is the half-split one on both sides (moemesh `apply_rotary` == transformers `rotate_half`),
so q/k rows need no permutation.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from moemesh.config import ModelConfig
from moemesh.errors import UserError

ARCHITECTURE = "MixtralForCausalLM"
# model.* field -> config.json field, for the fields that are copied as they are
FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "ffn_dim": "intermediate_size",
          "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
          "num_experts": "num_local_experts", "top_k": "num_experts_per_tok",
          "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps", "init_std": "initializer_range"}
# transformers' MixtralConfig defaults for fields a config.json may leave out
HF_DEFAULTS = {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
               "rope_theta": 1e6, "router_aux_loss_coef": 0.001, "num_experts_per_tok": 2, "num_local_experts": 8}
# model.* fields that config.json fixes: a --set of these on import would no longer match the weights
FROM_HF = ("vocab_size", "dim", "ffn_dim", "n_layers", "n_heads", "n_kv_heads", "num_experts", "top_k", "norm_eps",
           "rope_theta", "router", "renormalize", "num_shared_experts", "num_dense_layers")


# --- config -------------------------------------------------------------------------------------------

def check_exportable(m: ModelConfig) -> None:
    """One line naming the first model.* field that MixtralForCausalLM cannot express."""
    refusals = [
        (m.router != "softmax", f"model.router={m.router!r}: Mixtral's router is a softmax"),
        (not m.renormalize, "model.renormalize=false: Mixtral always renormalizes the top-k router weights"),
        (m.num_shared_experts > 0, f"model.num_shared_experts={m.num_shared_experts}: Mixtral has no shared experts"),
        (m.num_dense_layers > 0, f"model.num_dense_layers={m.num_dense_layers}: every Mixtral layer is MoE"),
    ]
    for refused, message in refusals:
        if refused:
            raise UserError(f"{message}; this model has no Mixtral equivalent and cannot be exported")


def to_hf_config(m: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json of the equivalent MixtralForCausalLM (read by transformers 4.x and 5.x)."""
    check_exportable(m)
    config: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": "mixtral"}
    config.update({hf: getattr(m, ours) for ours, hf in FIELDS.items()})
    config.update({
        "head_dim": m.head_dim, "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
        "attention_dropout": 0.0, "router_jitter_noise": 0.0, "output_router_logits": False,
        "router_aux_loss_coef": m.aux_loss_coef / m.top_k,
        "rope_theta": m.rope_theta,  # transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        # token ids are bytes or the data's own ids: no special tokens
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "use_cache": True, "dtype": dtype, "torch_dtype": dtype,
    })
    return config


def _field(hf: dict[str, Any], key: str, kind: type, origin: str) -> Any:
    value = hf.get(key, HF_DEFAULTS.get(key))
    if value is None:
        raise UserError(f"{origin}: {key} is missing")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
        isinstance(value, int) and not isinstance(value, bool))
    if not ok or (kind is float and not math.isfinite(value)):
        raise UserError(f"{origin}: {key}={value!r} is not {'a number' if kind is float else 'an integer'}")
    return float(value) if kind is float else value


def model_values_from_hf(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    """{model.<field>: value} for a Mixtral config.json; one line naming the field moemesh cannot represent."""
    if hf.get("model_type") != "mixtral":
        raise UserError(f"{origin}: model_type={hf.get('model_type')!r} is not 'mixtral' "
                        f"(import-hf reads {ARCHITECTURE} only)")
    architectures = hf.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in architectures:
        raise UserError(f"{origin}: architectures={architectures} does not name {ARCHITECTURE}")
    _refuse_unrepresentable(hf, origin)
    values: dict[str, Any] = {}
    for ours, theirs in FIELDS.items():
        kind = float if ours in ("norm_eps", "init_std") else int
        if theirs == "num_key_value_heads" and hf.get(theirs) is None:
            theirs = "num_attention_heads"  # transformers: None means plain multi-head attention
        values[f"model.{ours}"] = _field(hf, theirs, kind, origin)
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    values["model.rope_theta"] = _field({"rope_theta": theta}, "rope_theta", float, origin)
    aux = _field(hf, "router_aux_loss_coef", float, origin)
    values.update({"model.router": "softmax", "model.renormalize": True, "model.num_shared_experts": 0,
                   "model.num_dense_layers": 0, "model.aux_loss_coef": aux * values["model.top_k"]})
    heads, dim = values["model.n_heads"], values["model.dim"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and (heads <= 0 or head_dim * heads != dim):
        raise UserError(f"{origin}: head_dim={head_dim} is not hidden_size/num_attention_heads={dim}/{heads} "
                        f"(moemesh derives the head size from them)")
    return values


def _refuse_unrepresentable(hf: dict[str, Any], origin: str) -> None:
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = hf.get("rope_scaling")
    window = hf.get("sliding_window")
    refusals = [
        (rope_type != "default", f"rope_parameters.rope_type={rope_type!r}: moemesh has the default rotary only"),
        (scaling is not None and (scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict)
                                  else scaling) != "default",
         f"rope_scaling={scaling!r}: moemesh has the default rotary only"),
        (window is not None and window < hf.get("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"]),
         f"sliding_window={window}: moemesh attends to the whole sequence"),
        (hf.get("hidden_act", "silu") != "silu",
         f"hidden_act={hf.get('hidden_act')!r}: moemesh experts are SwiGLU (silu)"),
        (bool(hf.get("tie_word_embeddings", False)), "tie_word_embeddings=true: moemesh's LM head is untied"),
        (bool(hf.get("attention_bias", False)), "attention_bias=true: moemesh's projections have no bias"),
        (bool(hf.get("mlp_bias", False)), "mlp_bias=true: moemesh's experts have no bias"),
        ("quantization_config" in hf, "quantization_config: quantized weights are not read"),
    ]
    for refused, message in refusals:
        if refused:
            raise UserError(f"{origin}: {message}")


# --- tensors ------------------------------------------------------------------------------------------

_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


def _dense_names(m: ModelConfig) -> Iterator[tuple[str, str]]:
    """(moemesh name, HF name) of every tensor that maps one to one."""
    yield "tok_embeddings.weight", "model.embed_tokens.weight"
    for n in range(m.n_layers):
        hf = f"model.layers.{n}"
        yield f"layers.{n}.attention_norm.weight", f"{hf}.input_layernorm.weight"
        for ours, theirs in _ATTENTION.items():
            yield f"layers.{n}.attention.{ours}.weight", f"{hf}.self_attn.{theirs}.weight"
        yield f"layers.{n}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight"
        yield f"layers.{n}.ffn.router.gate.weight", f"{hf}.block_sparse_moe.gate.weight"
    yield "norm.weight", "model.norm.weight"
    yield "output.weight", "lm_head.weight"


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) in the Hub's per-expert layout, from a full moemesh state dict."""
    check_exportable(m)
    for ours, theirs in _dense_names(m):
        yield theirs, state[ours]
    for n in range(m.n_layers):
        experts = f"layers.{n}.ffn.experts"
        for e in range(m.num_experts):
            at = f"model.layers.{n}.block_sparse_moe.experts.{e}"
            yield f"{at}.w1.weight", state[f"{experts}.w1_EDF"][e].T  # [F, D]
            yield f"{at}.w2.weight", state[f"{experts}.w2_EFD"][e].T  # [D, F]
            yield f"{at}.w3.weight", state[f"{experts}.w3_EDF"][e].T  # [F, D]


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the per-expert (file) layout, by HF name."""
    with torch.device("meta"):
        from moemesh.model.transformer import Transformer

        model = Transformer(m)
    state = dict(model.named_parameters())
    return {name: tuple(t.shape) for name, t in to_hf(state, m)}


def fused_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of transformers 5's fused in-memory expert tensors, by HF name."""
    return {name: shape for n in range(m.n_layers) for name, shape in (
        (f"model.layers.{n}.mlp.experts.gate_up_proj", (m.num_experts, 2 * m.ffn_dim, m.dim)),
        (f"model.layers.{n}.mlp.experts.down_proj", (m.num_experts, m.dim, m.ffn_dim)))}


def canonical_name(name: str) -> str:
    """Names as `from_hf` asks for them: the block is `block_sparse_moe` (transformers 5 says `mlp`), except
    for the fused expert tensors, which only exist under `mlp`."""
    if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
        return name
    return name.replace(".mlp.", ".block_sparse_moe.")


def from_hf(names: set[str], get: Callable[[str, tuple[int, ...]], torch.Tensor],
            m: ModelConfig) -> dict[str, torch.Tensor]:
    """The full moemesh state dict (fp32) from HF tensors, per-expert or fused layout, layer by layer.
    `names` are canonical names (`canonical_name`); `get(name, expected_shape)` reads one (it checks the
    shape and dtype). Routers' expert bias is zero (a softmax router does not use it)."""
    shapes = hf_shapes(m)
    state = {ours: get(theirs, shapes[theirs]) for ours, theirs in _dense_names(m)}
    F_, D = m.ffn_dim, m.dim
    for n in range(m.n_layers):
        experts, fused = f"layers.{n}.ffn.experts", f"model.layers.{n}.mlp.experts"
        if f"{fused}.gate_up_proj" in names or f"{fused}.down_proj" in names:
            gate_up_EXD = get(f"{fused}.gate_up_proj", (m.num_experts, 2 * F_, D))
            state[f"{experts}.w1_EDF"] = gate_up_EXD[:, :F_].transpose(1, 2).contiguous()
            state[f"{experts}.w3_EDF"] = gate_up_EXD[:, F_:].transpose(1, 2).contiguous()
            state[f"{experts}.w2_EFD"] = get(f"{fused}.down_proj", (m.num_experts, D, F_)).transpose(1, 2).contiguous()
        else:
            at = f"model.layers.{n}.block_sparse_moe.experts"
            per_expert = (("w1_EDF", "w1", (F_, D)), ("w3_EDF", "w3", (F_, D)), ("w2_EFD", "w2", (D, F_)))
            for ours, theirs, shape in per_expert:
                state[f"{experts}.{ours}"] = torch.stack(
                    [get(f"{at}.{e}.{theirs}.weight", shape).T for e in range(m.num_experts)])
        state[f"layers.{n}.ffn.router.expert_bias"] = torch.zeros(m.num_experts)
    return state


def known_names(m: ModelConfig) -> set[str]:
    """Every canonical HF name a Mixtral of this config may hold (either expert layout)."""
    return set(hf_shapes(m)) | set(fused_shapes(m))
