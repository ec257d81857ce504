"""Run configuration: nested dataclasses, one per concern, loaded from TOML with dotted overrides.

`load_config(path_or_preset, overrides)` returns a validated `Config`; every user mistake raises
`ConfigError` whose message names the dotted field and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from moemesh.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 128
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # MoE feed-forward
    num_experts: int = 4
    top_k: int = 2
    ffn_dim: int = 128  # hidden size of one routed (or shared) expert
    router: str = "softmax"  # "softmax" (Mixtral) | "sigmoid" (DeepSeek-V3, biased, aux-loss-free)
    renormalize: bool = True  # divide the top-k weights by their sum
    num_shared_experts: int = 0  # always-on experts of ffn_dim each, beside the routed ones
    num_dense_layers: int = 0  # the first N layers use a dense SwiGLU MLP instead of MoE
    dense_ffn_dim: int = 256
    dispatch: str = "dropless"  # "dropless" | "capacity"
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.001  # sigmoid router: step of the load-balancing bias per train step

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class ParallelConfig:
    dp: int = 1
    ep: int = 1
    tp: int = 1
    sequence_parallel: bool = False
    check_collectives: bool = False
    backend: str = "auto"  # "auto" (nccl on cuda, gloo on cpu) | "gloo" | "nccl"
    timeout_s: int = 300
    overlap_grad_reduce: bool = True  # all-reduce gradients in buckets during backward (else all after it)
    bucket_mb: float = 25.0  # size of one gradient bucket (fp32 MiB) with overlap_grad_reduce
    ep_overlap_chunks: int = 1  # split each rank's tokens into N chunks whose all-to-alls overlap expert compute

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16  # sequences per optimizer step, summed over all data x expert coordinates
    seq_len: int = 64
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decays to this
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # on the global gradient norm; 0 disables
    seed: int = 0
    dtype: str = "auto"  # "auto" (bf16 autocast on cuda, fp32 on cpu) | "float32" | "bfloat16"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    resume: str = "auto"  # "auto" (newest complete checkpoint of run.dir, if any) | "none" | a checkpoint path
    allow_data_change: bool = False  # resume even if data.* or the batch shape differ from the checkpoint's
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient norm that may be skipped before stopping
    param_dtype: str = "auto"  # "auto" (bfloat16 with fp32 master weights when training in bf16 on cuda) | "float32" | "bfloat16"
    activation_checkpointing: str = "none"  # "none" | "moe" (recompute MoE layers in backward) | "full" (blocks)
    fused_master_step: bool = True  # bf16 params on cuda: AdamW on the masters in one Triton pass (false: torch's)
    compile: bool = False  # torch.compile the dense parts of each block (norms, attention); needs parallel.tp=1
    fused_kernels: bool = True  # on cuda: RMSNorm, rotary, SwiGLU activation, MoE gather/combine as Triton kernels
    cuda_graph: str = "auto"  # "auto" (one CUDA graph per step where it can be captured: train/cuda_graph.py) | "on" | "off"


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" | "text" | "bin"
    path: str = ""  # for "text" (UTF-8, byte tokens) and "bin" (pre-tokenized, nanoGPT layout)
    token_dtype: str = "uint16"  # "bin" only: "uint16" | "uint32"
    branching: int = 4  # synthetic: successors per state of the random sparse Markov chain
    val_fraction: float = 0.0  # text/bin: the last fraction of the tokens is held out for the validation loss


@dataclass
class RunConfig:
    dir: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    checkpoints: bool = True  # false: write no checkpoint at all (benchmarks; a stop then loses the run)
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end and on a signal)
    keep_checkpoints: int = 2  # newest complete checkpoints kept in run.dir/checkpoints
    overwrite: bool = False  # start afresh in a run dir that holds an earlier run's outputs
    max_restarts: int = 0  # local launch: restart every rank from the last checkpoint after a failure, N times
    debug: bool = False  # show every rank's traceback on failure
    peak_tflops: float = 780.0  # per-GPU bf16 peak for MFU (measured 8192^3 matmul on an H200)
    eval_every: int = 0  # steps between validation losses (and at the last step); 0: none
    eval_batches: int = 4  # global batches (train.global_batch x train.seq_len) per validation loss


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        _validate(self)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "run": RunConfig,
}
CHOICES = {
    "model.router": ("softmax", "sigmoid"),
    "model.dispatch": ("dropless", "capacity"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "train.dtype": ("auto", "float32", "bfloat16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.activation_checkpointing": ("none", "moe", "full"),
    "train.param_dtype": ("auto", "float32", "bfloat16"),
    "train.cuda_graph": ("auto", "on", "off"),
    "data.source": ("synthetic", "text", "bin"),
    "data.token_dtype": ("uint16", "uint32"),
}
POSITIVE = (
    "model.vocab_size model.dim model.n_layers model.n_heads model.n_kv_heads model.max_seq_len "
    "model.num_experts model.top_k model.ffn_dim model.dense_ffn_dim model.rope_theta model.norm_eps "
    "model.init_std model.capacity_factor parallel.dp parallel.ep parallel.tp parallel.timeout_s "
    "parallel.bucket_mb parallel.ep_overlap_chunks "
    "train.steps train.global_batch train.seq_len train.lr data.branching run.log_every run.keep_checkpoints "
    "run.peak_tflops run.eval_batches"
).split()
NON_NEGATIVE = (
    "model.num_shared_experts model.num_dense_layers model.aux_loss_coef model.z_loss_coef "
    "model.bias_update_rate train.min_lr train.warmup_steps train.weight_decay train.grad_clip train.seed "
    "train.skip_nonfinite run.checkpoint_every run.max_restarts run.eval_every data.val_fraction"
).split()


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("moemesh.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from a preset name or TOML path (default preset `tiny`), then `key=value` overrides."""
    cfg = Config()
    _apply_table(cfg, _read_source(source or "tiny"), origin=source or "tiny")
    for item in overrides:
        _apply_override(cfg, item)
    return cfg.validate()


def config_from_values(values: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The defaults, then `values` ({dotted key: value}, e.g. translated from another format), then
    `key=value` overrides; validated."""
    cfg = Config()
    for key, value in values.items():
        _set_field(cfg, key, value)
    for item in overrides:
        _apply_override(cfg, item)
    return cfg.validate()


def _read_source(source: str) -> dict[str, Any]:
    path = Path(source)
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. ENAMETOOLONG, which Path.exists() raises rather than answering False
        raise ConfigError(f"config {source}: cannot read it ({exc.strerror or exc})") from None
    if source in preset_names() and not exists:
        text = resources.files("moemesh.presets").joinpath(f"{source}.toml").read_text()
        return _parse_toml(text, f"preset {source}")
    if not exists:
        raise ConfigError(f"config {source}: no such file, and not a preset (presets: {', '.join(preset_names())})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {source}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    return _parse_toml(text, f"config {source}")


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: invalid TOML ({exc})") from None


def _apply_table(cfg: Config, table: dict[str, Any], origin: str) -> None:
    for section, values in table.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{origin}: unknown section [{section}]{_suggest(section, _SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {section} must be a table [{section}]")
        for key, value in values.items():
            try:
                _set_field(cfg, f"{section}.{key}", value)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {exc}") from None


def _apply_override(cfg: Config, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key = key.strip()
    field_type = _field_type(key)
    _set_field(cfg, key, _parse_value(raw.strip(), field_type, key))


def _field_type(key: str) -> type:
    section, _, name = key.partition(".")
    if section not in _SECTION_TYPES:
        all_keys = [f"{s}.{f.name}" for s, t in _SECTION_TYPES.items() for f in fields(t)]
        raise ConfigError(f"unknown config key {key!r}{_suggest(key, all_keys)}")
    known = {f.name: f for f in fields(_SECTION_TYPES[section])}
    if name not in known:
        raise ConfigError(f"unknown config key {key!r}{_suggest(name, known, prefix=section + '.')}")
    return _TYPES[known[name].type]


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _parse_value(raw: str, field_type: type, key: str) -> Any:
    if field_type is str:
        return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw
    if field_type is bool:
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    try:
        return field_type(raw) if field_type is float else int(raw, 0)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected {'a number' if field_type is float else 'an integer'}") from None


def _set_field(cfg: Config, key: str, value: Any) -> None:
    field_type = _field_type(key)
    section, _, name = key.partition(".")
    ok = (isinstance(value, bool) if field_type is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if field_type is float
          else isinstance(value, int) and not isinstance(value, bool) if field_type is int
          else isinstance(value, str))
    if not ok:
        expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[field_type]
        raise ConfigError(f"{key}={value!r}: expected {expected}")
    setattr(getattr(cfg, section), name, float(value) if field_type is float else value)


def _suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _get(cfg: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


MAX_INT = 2**63 - 1  # every integer field must fit an int64 (torch seeds, tensor sizes)
LIMITS = {"parallel.timeout_s": 7 * 24 * 3600}


def _check_magnitude(key: str, value: float) -> None:
    shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}...({len(str(value))} digits)"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={shown} must be a finite number")
    limit = LIMITS.get(key, MAX_INT)
    if isinstance(value, int) and abs(value) > limit:
        raise ConfigError(f"{key}={shown} must be at most {limit}")


def _validate(cfg: Config) -> None:
    for key, options in CHOICES.items():
        if _get(cfg, key) not in options:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(options)}")
    for key in POSITIVE:
        value = _get(cfg, key)
        _check_magnitude(key, value)
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        _check_magnitude(key, value)
        if not value >= 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    m, t, d = cfg.model, cfg.train, cfg.data
    checks = [
        (m.top_k <= m.num_experts, f"model.top_k={m.top_k} must be <= model.num_experts={m.num_experts}"),
        (m.dim % m.n_heads == 0, f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}"),
        (m.head_dim % 2 == 0, f"model.dim/model.n_heads={m.head_dim} must be even (rotary embedding)"),
        (m.n_heads % m.n_kv_heads == 0,
         f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}"),
        (m.num_dense_layers <= m.n_layers,
         f"model.num_dense_layers={m.num_dense_layers} must be <= model.n_layers={m.n_layers}"),
        (t.seq_len <= m.max_seq_len,
         f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}"),
        (t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be <= train.lr={t.lr}"),
        (t.beta1 < 1 and t.beta2 < 1 and t.beta1 >= 0 and t.beta2 >= 0,
         f"train.beta1={t.beta1} and train.beta2={t.beta2} must lie in [0, 1)"),
        (d.source == "synthetic" or d.path, f"data.path is empty: data.source={d.source!r} needs a file"),
        (d.source != "text" or m.vocab_size >= 256,
         f"model.vocab_size={m.vocab_size} must be >= 256 for data.source='text' (byte tokens)"),
        (d.source != "synthetic" or d.branching <= m.vocab_size,
         f"data.branching={d.branching} must be <= model.vocab_size={m.vocab_size}"),
        (d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be < 1"),
        (not t.compile or cfg.parallel.tp == 1,
         f"train.compile=true needs parallel.tp=1 (got {cfg.parallel.tp}): tensor parallelism's hooks are not compiled"),
        (d.source == "synthetic" or not cfg.run.eval_every or d.val_fraction > 0,
         f"run.eval_every={cfg.run.eval_every} needs data.val_fraction > 0 with data.source={d.source!r} "
         f"(the held-out part of the file)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_layout(cfg)


def _validate_layout(cfg: Config) -> None:
    """Divisibility rules of the (dp, ep, tp) layout; they hold before any process group exists."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    shards = p.dp * p.ep
    checks = [
        (m.num_experts % p.ep == 0, f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}"),
        (m.n_heads % p.tp == 0, f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}"),
        (m.n_kv_heads % p.tp == 0, f"model.n_kv_heads={m.n_kv_heads} is not divisible by parallel.tp={p.tp}"),
        (m.ffn_dim % p.tp == 0, f"model.ffn_dim={m.ffn_dim} is not divisible by parallel.tp={p.tp}"),
        (m.dense_ffn_dim % p.tp == 0,
         f"model.dense_ffn_dim={m.dense_ffn_dim} is not divisible by parallel.tp={p.tp}"),
        (m.vocab_size % p.tp == 0,
         f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp} "
         f"(pad it to {-(-m.vocab_size // p.tp) * p.tp}; extra ids are never produced by the data)"),
        (t.global_batch % shards == 0,
         f"train.global_batch={t.global_batch} is not divisible by parallel.dp*parallel.ep={shards}"),
        (p.ep_overlap_chunks <= t.global_batch // shards * t.seq_len,
         f"parallel.ep_overlap_chunks={p.ep_overlap_chunks} exceeds the tokens of one rank's micro-batch "
         f"(train.global_batch/(parallel.dp*parallel.ep)*train.seq_len={t.global_batch // shards * t.seq_len})"),
        (not p.sequence_parallel or t.seq_len % p.tp == 0,
         f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp} (needed by sequence_parallel)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def config_from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `Config.to_dict` for an already validated config (e.g. handed to worker processes)."""
    return Config(**{section: _SECTION_TYPES[section](**fields_) for section, fields_ in values.items()})


def to_toml(cfg: Config) -> str:
    """Serialize a Config (flat sections of scalars) as TOML that `load_config` reads back."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
