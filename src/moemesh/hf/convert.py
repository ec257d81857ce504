"""`moemesh export-hf` and `moemesh import-hf`: checkpoints <-> local Hugging Face Mixtral directories.

Export reads a checkpoint's full tensors in one process (DCP reshards whatever layout wrote it), maps them
(`mixtral.to_hf`) and writes config.json, safetensors shards and their index into a staging directory that
is renamed to OUT_DIR. Import maps config.json to model.* (other sections: defaults and --set), reads and
checks every tensor, loads them into a single-process Trainer and writes checkpoint step_000000 through
`save_checkpoint` (the format cannot drift), so that `moemesh train RUN_DIR/config.toml` continues from it
at any layout with a fresh AdamW (zero moments, step count 0: the same first update as a new optimizer).
Nothing here touches the network: transformers is never imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from moemesh.config import config_from_values, to_toml
from moemesh.errors import ConfigError, UserError
from moemesh.hf.files import CONFIG, DTYPES, WeightReader, check_output_dir, read_config, write_hf_dir
from moemesh.hf.mixtral import (FROM_HF, canonical_name, from_hf, known_names, model_values_from_hf, to_hf,
                                to_hf_config)
from moemesh.train.checkpoint import checkpoint_config, read_model_state, save_checkpoint
from moemesh.train.ckpt_paths import CHECKPOINTS, MANIFEST, resolve_checkpoint
from moemesh.train.rundir import resolved_config

IGNORED = (".rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed from rope_theta


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '64KiB', '1000' (bytes), as transformers' max_shard_size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UserError(f"--max-shard-size {text}: expected a positive size such as 5GB, 500MB or 64KiB")
    return int(float(match.group(1)) * _UNITS[unit])


def export_command(target: str, out_dir: str, dtype: str, max_shard_size: str) -> int:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    out = Path(out_dir)
    check_output_dir(out)
    checkpoint = resolve_checkpoint(target)
    cfg = checkpoint_config(checkpoint)
    config = to_hf_config(cfg.model, dtype)  # refuses a model without a Mixtral equivalent before any read
    state = read_model_state(checkpoint, cfg)
    shards = write_hf_dir(out, config, to_hf(state, cfg.model), DTYPES[dtype], max_shard_bytes)
    step = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))["step"]
    print(f"moemesh: exported {checkpoint} (step {step}) to {out}: MixtralForCausalLM, {dtype}, "
          f"{len(shards)} safetensors shard(s)", flush=True)
    return 0


def import_command(hf_dir: str, run_dir: str, overrides: list[str]) -> int:
    hf, run = Path(hf_dir), Path(run_dir)
    origin = str(hf / CONFIG)
    values = model_values_from_hf(read_config(hf), origin)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.removeprefix("model.") in FROM_HF and key.startswith("model."):
            raise UserError(f"--set {key}: fixed by {origin} (the weights depend on it); "
                            f"it cannot be changed on import")
        if key == "run.dir":
            raise UserError(f"--set {key}: the run dir is RUN_DIR ({run_dir})")
    try:
        cfg = config_from_values({**values, "run.dir": run_dir}, overrides)
    except ConfigError as exc:  # from config.json's values or from a --set
        raise UserError(f"{origin} (mapped to model.*) with the --set values: {exc}") from None
    check_output_dir(run)
    from moemesh.train.loop import Trainer, preflight

    source = preflight(cfg)  # the data a fine-tuning run will read, checked now
    state = _read_weights(hf, cfg)
    staging = run.parent / f".{run.name}.tmp-import-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        trainer = Trainer(cfg, None, source, torch.device("cpu"))
        trainer.model.load_state_dict(state, strict=True)
        save_checkpoint(trainer, staging, 0)
        (staging / "config.toml").write_text(to_toml(resolved_config(cfg)), encoding="utf-8")
        os.rename(staging, run)  # replaces an empty run dir too
    except OSError as exc:
        raise UserError(f"{run}: cannot write it ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    m = cfg.model
    print(f"moemesh: imported {hf} ({sum(t.numel() for t in state.values()) / 1e6:.2f} M parameters, "
          f"{m.num_experts} experts top-{m.top_k}) into {run}/{CHECKPOINTS}/step_000000; "
          f"continue with: moemesh train {run}/config.toml", flush=True)
    return 0


def _read_weights(hf: Path, cfg) -> dict[str, torch.Tensor]:
    reader = WeightReader(hf)
    by_canonical = {canonical_name(name): name for name in reader.names()}
    known = known_names(cfg.model)
    for name in sorted(by_canonical):
        if name not in known and not name.endswith(IGNORED):
            original = by_canonical[name]
            raise UserError(f"{reader.files[original]}: holds {original}, which the MixtralForCausalLM of "
                            f"{hf / CONFIG} has no place for")
    return from_hf(set(by_canonical), lambda name, shape: reader.get(by_canonical.get(name, name), shape), cfg.model)
