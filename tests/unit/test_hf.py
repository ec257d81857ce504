"""Hugging Face Mixtral in and out, in one process (no process groups): tiny random `MixtralForCausalLM`s
built locally (no network), imported through the CLI entry point; logits, the mapping, and every bad input.

Tolerance: logits within 1e-5 relative (max |a - b| / max |b|), fp32 on CPU. The two implementations
compute the same function in another order (per-expert loops vs grouped GEMM, float32 vs float64 rotary
angles); ~2e-7 is typical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from moemesh.cli import main  # noqa: E402
from moemesh.config import load_config  # noqa: E402
from moemesh.errors import UserError  # noqa: E402
from moemesh.hf.mixtral import check_exportable, model_values_from_hf, to_hf_config  # noqa: E402
from moemesh.model.generate import logits  # noqa: E402
from moemesh.model.layers import apply_rotary, rotary_tables  # noqa: E402
from moemesh.sample import load_model  # noqa: E402
from moemesh.train.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint  # noqa: E402
from moemesh.train.ckpt_paths import resolve_checkpoint  # noqa: E402
from moemesh.train.data import build_source  # noqa: E402
from moemesh.train.loop import Trainer  # noqa: E402

TOL = 1e-5
# GQA 2:1 top-2; multi-query 6:1 top-1, 3 experts; plain multi-head top-3 of 8, 3 layers; odd vocab sizes
CONFIGS = {
    "gqa2-top2": dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                      rope_theta=500.0),
    "mqa-top1": dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=1,
                     num_attention_heads=6, num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=1,
                     rope_theta=1e6),
    "mha-top3": dict(vocab_size=131, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=3,
                     rope_theta=10000.0, rms_norm_eps=1e-6),
}


def _hf_model(spec: dict, seed: int = 0) -> MixtralForCausalLM:
    spec = dict(spec)
    theta = spec.pop("rope_theta")
    config = MixtralConfig(**spec, max_position_embeddings=64, initializer_range=0.1,
                           rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))


def _one_error(capfd, code: int, *texts: str) -> str:
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("moemesh: error: "), (code, out, err)
    for text in texts:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[MixtralForCausalLM, Path]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, spec in CONFIGS.items():
        model = _hf_model(spec)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_import_gives_the_logits_of_transformers(hf_dirs, tmp_path, capfd, name):
    model, hf_dir = hf_dirs[name]
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run"), "--set", "train.steps=3"]) == 0
    checkpoint = resolve_checkpoint(str(tmp_path / "run"))
    assert checkpoint.name == "step_000000"
    cfg = checkpoint_config(checkpoint)
    top_k = model.config.num_experts_per_tok
    assert (cfg.model.router, cfg.model.renormalize, cfg.model.top_k) == ("softmax", True, top_k)
    tokens = _tokens(cfg.model.vocab_size)
    err = _rel_err(logits(load_model(checkpoint, cfg), tokens), model(tokens).logits)
    print(f"{name}: import logits rel err {err:.2e}")
    assert err <= TOL


def test_import_reads_the_fused_layout_of_transformers_5(hf_dirs, tmp_path):
    """Files holding `mlp.experts.gate_up_proj` / `down_proj` (transformers 5's in-memory names)."""
    model, hf_dir = hf_dirs["gqa2-top2"]
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((hf_dir / "config.json").read_text())
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    assert main(["import-hf", str(fused), str(tmp_path / "run")]) == 0
    checkpoint = resolve_checkpoint(str(tmp_path / "run"))
    tokens = _tokens(101)
    assert _rel_err(logits(load_model(checkpoint, checkpoint_config(checkpoint)), tokens), model(tokens).logits) <= TOL


def test_export_of_an_import_loads_in_transformers_with_the_same_logits(hf_dirs, tmp_path):
    model, hf_dir = hf_dirs["mha-top3"]
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run")]) == 0
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--max-shard-size", "0KB"]) == 2
    (tmp_path / "out").mkdir()  # an empty OUT_DIR is fine
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--max-shard-size", "64KiB"]) == 0
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert "model.layers.2.block_sparse_moe.experts.7.w2.weight" in index["weight_map"]
    again = MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = _tokens(131)
    assert _rel_err(again(tokens).logits, model(tokens).logits) <= TOL


def test_imported_checkpoint_continues_like_a_fresh_optimizer(hf_dirs, tmp_path):
    """Loading step_000000 (zero moments, AdamW step 0) then training equals training the same weights
    with a new AdamW: bit for bit."""
    _, hf_dir = hf_dirs["gqa2-top2"]
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run"), "--set", "train.steps=3"]) == 0
    cfg = load_config(str(tmp_path / "run/config.toml"))
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    resumed = Trainer(cfg, None, source, torch.device("cpu"))
    assert load_checkpoint(resumed, tmp_path / "run/checkpoints/step_000000") == 0
    fresh = Trainer(cfg, None, source, torch.device("cpu"))
    fresh.model.load_state_dict(resumed.model.state_dict())
    for step in (1, 2, 3):
        assert torch.equal(resumed.step(step)[0], fresh.step(step)[0])
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), fresh.model.parameters()))


def test_config_round_trip_and_rotary_convention():
    cfg = load_config("tiny", ["model.rope_theta=500", "model.max_seq_len=96"])
    values = model_values_from_hf(to_hf_config(cfg.model, "float32"), "config.json")
    for key, value in values.items():
        assert getattr(cfg.model, key.removeprefix("model.")) == value, key
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    cos, sin = rotary_tables(16, 10, 500.0)
    full_cos, full_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    hf_q, hf_k = apply_rotary_pos_emb(q, k, full_cos, full_sin)
    assert torch.allclose(apply_rotary(q, cos, sin), hf_q, atol=1e-6)
    assert torch.allclose(apply_rotary(k, cos, sin), hf_k, atol=1e-6)


@pytest.mark.parametrize("override, field", [
    ("model.router=sigmoid", "model.router='sigmoid'"),
    ("model.renormalize=false", "model.renormalize=false"),
    ("model.num_shared_experts=1", "model.num_shared_experts=1"),
    ("model.num_dense_layers=1", "model.num_dense_layers=1"),
])
def test_models_without_a_mixtral_equivalent_are_refused(override, field):
    with pytest.raises(UserError, match="no Mixtral equivalent") as exc:
        check_exportable(load_config("tiny", [override]).model)
    assert field in str(exc.value)


def test_export_refusal_writes_nothing(tmp_path, capfd):
    cfg = load_config("tiny", ["model.router=sigmoid", f"run.dir={tmp_path / 'run'}"])
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    save_checkpoint(Trainer(cfg, None, source, torch.device("cpu")), tmp_path / "run", 0)
    code = main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")])
    _one_error(capfd, code, "model.router='sigmoid'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("")
    _one_error(capfd, main(["export-hf", str(tmp_path / "run"), str(tmp_path / "full")]), "not an empty directory")
    _one_error(capfd, main(["export-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")]), "nowhere")


# --- bad HF directories: one line naming the file or field, exit 2, nothing written ----------------------

def _edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def _shard(hf_dir: Path) -> Path:
    return hf_dir / "model.safetensors"


def _split(hf_dir: Path) -> None:
    """Rewrite the single file as two shards and an index (the Hub's sharded layout)."""
    from safetensors.torch import load_file

    state = load_file(_shard(hf_dir))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(hf_dir / file))
    weight_map = {n: file for file, part in halves.items() for n in part}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _shard(hf_dir).unlink()


def _retype(hf_dir: Path, name: str, tensor) -> None:
    from safetensors.torch import load_file

    state = load_file(_shard(hf_dir))
    state[name] = tensor(state[name]) if callable(tensor) else tensor
    if state[name] is None:
        del state[name]
    save_file(state, str(_shard(hf_dir)))


GATE = "model.layers.0.block_sparse_moe.gate.weight"
BAD_DIRS = [
    pytest.param(lambda d: _edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
                 ["config.json", "model_type='llama'"], id="other-architecture"),
    pytest.param(lambda d: _edit_config(d, architectures=["MixtralModel"]), ["architectures"], id="no-lm-head"),
    pytest.param(lambda d: _edit_config(d, sliding_window=16), ["sliding_window=16"], id="sliding-window"),
    pytest.param(lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
                 ["rope_parameters.rope_type='yarn'"], id="rope-yarn"),
    pytest.param(lambda d: _edit_config(d, rope_scaling={"type": "linear", "factor": 2.0}), ["rope_scaling="],
                 id="rope-scaling-legacy"),
    pytest.param(lambda d: _edit_config(d, head_dim=16), ["head_dim=16"], id="head-dim"),
    pytest.param(lambda d: _edit_config(d, tie_word_embeddings=True), ["tie_word_embeddings"], id="tied"),
    pytest.param(lambda d: _edit_config(d, hidden_act="gelu"), ["hidden_act='gelu'"], id="activation"),
    pytest.param(lambda d: _edit_config(d, num_hidden_layers="2"), ["num_hidden_layers='2'"], id="field-type"),
    pytest.param(lambda d: (d / "config.json").unlink(), ["config.json", "missing"], id="no-config"),
    pytest.param(lambda d: _shard(d).unlink(), ["model.safetensors"], id="no-weights"),
    pytest.param(lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:5000]), ["model.safetensors", "truncated"],
                 id="truncated-file"),
    pytest.param(lambda d: (_split(d), (d / "model-00002-of-00002.safetensors").unlink()),
                 ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"], id="missing-shard"),
    pytest.param(lambda d: (_split(d), (d / "model-00001-of-00002.safetensors").write_bytes(b"\2" + b"\0" * 7 + b"{}")),
                 ["model-00001-of-00002.safetensors", "does not hold it"], id="index-names-absent-tensor"),
    pytest.param(lambda d: _retype(d, GATE, lambda t: t.to(torch.int64)), [GATE, "dtype int64"], id="dtype"),
    pytest.param(lambda d: _retype(d, GATE, lambda t: t[:3]), [GATE, "shape [3, 32]", "[4, 32]"], id="shape"),
    pytest.param(lambda d: _retype(d, GATE, lambda t: None), [GATE, "no tensor"], id="missing-tensor"),
    pytest.param(lambda d: _retype(d, "model.layers.0.mlp.shared_expert.weight", torch.zeros(2)),
                 ["model.layers.0.mlp.shared_expert.weight", "no place"], id="foreign-tensor"),
]


@pytest.mark.parametrize("damage, texts", BAD_DIRS)
def test_bad_hf_directory_is_refused_and_nothing_is_written(hf_dirs, tmp_path, capfd, damage, texts):
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_dirs["gqa2-top2"][1], hf_dir)
    damage(hf_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    _one_error(capfd, main(["import-hf", str(hf_dir), str(tmp_path / "run")]), *texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run dir, no staging dir


@pytest.mark.parametrize("args, texts", [
    (["--set", "model.dim=64"], ["model.dim", "config.json"]),
    (["--set", "run.dir=elsewhere"], ["run.dir"]),
    (["--set", "train.seq_len=128"], ["train.seq_len=128", "model.max_seq_len=64"]),
    (["--set", "data.source=text"], ["data.path"]),
])
def test_import_refuses_overrides_that_contradict_the_weights(hf_dirs, tmp_path, capfd, args, texts):
    _one_error(capfd, main(["import-hf", str(hf_dirs["gqa2-top2"][1]), str(tmp_path / "run"), *args]), *texts)
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_run_dir_in_use(hf_dirs, tmp_path, capfd):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text("")
    code = main(["import-hf", str(hf_dirs["gqa2-top2"][1]), str(tmp_path / "run")])
    _one_error(capfd, code, "not an empty directory")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]
