"""Hugging Face model directories: config.json plus safetensors weights (one file, or shards and
`model.safetensors.index.json`). Reading checks every file before a tensor is used; writing goes through a
staging directory that is renamed into place, so an output directory is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from moemesh.errors import UserError
from moemesh.train.ckpt_paths import fsync_path

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("Hugging Face interop needs the safetensors package: pip install 'moemesh[hf]'") from None
    return safe_open, save_file


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / CONFIG
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: no such directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing (not a Hugging Face model directory?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    return config


class WeightReader:
    """Every tensor of a Hugging Face directory, by name; files opened (and their headers checked against
    their sizes: a truncated shard fails here) before any tensor is read."""

    def __init__(self, hf_dir: Path):
        safe_open, _ = _safetensors()
        self.files = self._weight_map(hf_dir)
        self.handles = {}
        for file in sorted(set(self.files.values())):
            try:
                self.handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # SafetensorError: a header that does not fit the file, not safetensors
                raise UserError(f"{file}: not a readable safetensors file ({_first_line(exc)}; truncated?)") from None
        for name, file in self.files.items():
            if name not in self.handles[file].keys():
                raise UserError(f"{hf_dir / INDEX}: names {name} in {file.name}, which does not hold it")

    @staticmethod
    def _weight_map(hf_dir: Path) -> dict[str, Path]:
        index = hf_dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError) as exc:
                raise UserError(f"{index}: unreadable or without a weight_map ({exc.__class__.__name__})") from None
            files = {name: hf_dir / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise UserError(f"{index}: names {file.name}, which is missing")
            return files
        single = hf_dir / SINGLE
        if not single.is_file():
            others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.safetensors"))
            found = f" (found {', '.join(others[:3])}: pickled .bin weights are not read)" if others else ""
            raise UserError(f"{hf_dir}: no {SINGLE} or {INDEX}{found}")
        safe_open, _ = _safetensors()
        try:
            with safe_open(str(single), framework="pt") as handle:
                return {name: single for name in handle.keys()}
        except Exception as exc:
            raise UserError(f"{single}: not a readable safetensors file ({_first_line(exc)}; truncated?)") from None

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor as fp32, after checking that it exists, is floating point and has `shape`."""
        file = self.files.get(name)
        if file is None:
            raise UserError(f"{self._where()}: no tensor {name}")
        tensor = self.handles[file].get_tensor(name)
        if tensor.dtype not in FLOAT_DTYPES:
            raise UserError(f"{file}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                            f"expected float32, bfloat16 or float16")
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"{file}: {name} has shape {list(tensor.shape)}, config.json says {list(shape)}")
        return tensor.float()

    def _where(self) -> str:
        files = sorted({str(p) for p in self.files.values()})
        return files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


def check_output_dir(out_dir: Path) -> None:
    """OUT_DIR may not exist yet, or be an empty directory; its parent must exist."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not an empty directory (choose another, or remove it)")
    if not out_dir.parent.is_dir():
        raise UserError(f"{out_dir}: its parent directory {out_dir.parent} does not exist")


def plan_shards(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype, max_bytes: int) -> list[list[int]]:
    """Consecutive tensors grouped into shards of at most max_bytes (a bigger tensor gets one to itself)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, tensor) in enumerate(tensors):
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _readable_by_all(directory: Path) -> None:
    """safetensors creates its files 0600; give them the mode any other new file gets (0666 less umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def write_hf_dir(out_dir: Path, config: dict[str, Any], tensors: Iterator[tuple[str, torch.Tensor]],
                 dtype: torch.dtype, max_shard_bytes: int) -> list[Path]:
    """config.json, `model-0000i-of-0000n.safetensors` shards and the index, written into a staging
    directory beside `out_dir` and renamed to it; returns the shard paths."""
    _, save_file = _safetensors()
    named = list(tensors)
    shards = plan_shards(named, dtype, max_shard_bytes)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    weight_map, total = {}, 0
    try:
        staging.mkdir()
        for number, members in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            part = {named[i][0]: named[i][1].to(dtype).contiguous() for i in members}
            try:
                save_file(part, str(staging / file), metadata={"format": "pt"})
            except OSError:
                raise
            except Exception as exc:  # safetensors reports a failed write in its own error type
                raise OSError(_first_line(exc)) from None
            weight_map.update({name: file for name in part})
            total += sum(t.numel() * t.element_size() for t in part.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _readable_by_all(staging)
        (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for path in staging.iterdir():
            fsync_path(path)
        os.rename(staging, out_dir)  # replaces an empty out_dir too
        fsync_path(out_dir.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{out_dir}: cannot write it ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / f for f in sorted(set(weight_map.values()))]

