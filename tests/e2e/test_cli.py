"""Every bad input of the Core issue, through the real CLI in a subprocess, as a user meets it.

Each case must end with exit code 2, exactly one stderr line `moemesh: error: ...` that names the field
or file, no traceback, and nothing new under the working directory (the default run dir `runs/tiny` is
relative to it, so a run dir created by mistake would show up there too).

Config errors fail before torch is imported (~0.1 s a case); data and run-dir errors import torch first
(~1.5 s a case on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TEXT = ["--set", "data.source=text", "--set", "model.vocab_size=256"]
# Overrides put first, so that a case that wrongly passes validation trains 2 steps, not 200.
CHEAP = ["--set", "train.steps=2", "--set", "run.progress=false", "--set", "run.tensorboard=false"]
_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
LONG = "x" * 300


def _bin(values, dtype) -> bytes:
    return np.asarray(values, dtype=dtype).tobytes()


# id, extra CLI args, files to create first (bytes, or None for a directory), substrings of the error
CASES = [
    pytest.param(["--set", "model.num_expert=4"], {}, ["'model.num_expert'", "did you mean 'model.num_experts'"],
                 id="unknown-key-set"),
    pytest.param(["bad.toml"], {"bad.toml": b"[model]\nnum_expert = 4\n"},
                 ["'model.num_expert'", "did you mean 'model.num_experts'"], id="unknown-key-toml"),
    pytest.param(["bad.toml"], {"bad.toml": b"[modle]\ndim = 64\n"}, ["bad.toml", "[modle]", "'model'"],
                 id="unknown-section-toml"),
    pytest.param(["--set", "train.steps=abc"], {}, ["train.steps", "integer"], id="wrong-type-set"),
    pytest.param(["bad.toml"], {"bad.toml": b'[train]\nsteps = "100"\n'}, ["train.steps", "integer"],
                 id="wrong-type-toml"),
    pytest.param(["--set", "run.progress=maybe"], {}, ["run.progress", "true or false"], id="wrong-type-bool"),
    pytest.param(["--set", "model.router=topk"], {}, ["model.router", "softmax", "sigmoid"], id="bad-choice"),
    pytest.param(["--set", "model.dim=0"], {}, ["model.dim=0", "> 0"], id="zero-size"),
    pytest.param(["--set", "train.global_batch=-4"], {}, ["train.global_batch=-4", "> 0"], id="negative-size"),
    pytest.param(["--set", "model.top_k=5"], {}, ["model.top_k=5", "model.num_experts=4"], id="top-k-too-big"),
    pytest.param(["--set", "model.n_kv_heads=3"], {}, ["model.n_heads=4", "model.n_kv_heads=3"],
                 id="heads-not-divisible"),
    pytest.param(["--set", "train.seq_len=512"], {}, ["train.seq_len=512", "model.max_seq_len=256"],
                 id="seq-len-too-long"),
    pytest.param(["no-such-preset"], {}, ["no-such-preset", "tiny"], id="unknown-preset"),
    pytest.param(["missing.toml"], {}, ["missing.toml", "no such file"], id="missing-config-file"),
    pytest.param(["broken.toml"], {"broken.toml": b"[model\ndim = 64\n"}, ["broken.toml", "invalid TOML"],
                 id="invalid-toml"),
    pytest.param(["--set", "train.steps"], {}, ["train.steps", "key=value"], id="set-without-equals"),
    pytest.param(["--set", "=3"], {}, ["key=value"], id="set-without-key"),
    pytest.param(["--no-such-flag"], {}, ["--no-such-flag"], id="unknown-flag"),
    pytest.param(["--set", "data.source=text"], {}, ["data.path"], id="data-path-empty"),
    pytest.param(["--set", "train.cuda_graph=on"], {}, ["train.cuda_graph='on'", "'cpu'", "'auto' or 'off'"],
                 id="cuda-graph-on-cpu"),
    # data: each of these imports torch before failing, in preflight, before the run dir exists
    pytest.param(TEXT + ["--set", "data.path=missing.txt"], {}, ["data.path=missing.txt", "no such file"],
                 id="missing-data-file"),
    pytest.param(TEXT + ["--set", "data.path=adir"], {"adir": None}, ["data.path=adir", "not a regular file"],
                 id="data-path-is-directory"),
    pytest.param(TEXT + ["--set", "data.path=afile/data.txt"], {"afile": b"x"}, ["data.path=afile/data.txt"],
                 id="data-path-under-file"),
    pytest.param(TEXT + ["--set", "data.path=locked.txt"], {"locked.txt": b"hello world " * 100},
                 ["data.path=locked.txt", "cannot read"], id="text-file-unreadable",
                 marks=pytest.mark.skipif(_ROOT, reason="root reads a chmod 000 file anyway")),
    pytest.param(["--set", "data.source=bin", "--set", "data.path=locked.bin"], {"locked.bin": b"\x01" * 1000},
                 ["data.path=locked.bin", "cannot read"], id="bin-file-unreadable",
                 marks=pytest.mark.skipif(_ROOT, reason="root reads a chmod 000 file anyway")),
    pytest.param(TEXT + ["--set", "data.path=short.txt"], {"short.txt": b"hello"},
                 ["data.path=short.txt", "5 tokens", "train.seq_len+1=65"], id="data-shorter-than-sequence"),
    pytest.param(TEXT + ["--set", "data.path=latin1.txt"], {"latin1.txt": "caf\u00e9 ".encode("latin-1") * 100},
                 ["data.path=latin1.txt", "UTF-8"], id="text-not-utf8"),
    pytest.param(["--set", "data.source=bin", "--set", "data.path=odd.bin"], {"odd.bin": b"\x01" * 1001},
                 ["data.path=odd.bin", "1001 bytes", "multiple of 2"], id="bin-size-not-multiple"),
    pytest.param(["--set", "data.source=bin", "--set", "data.path=big.bin"],
                 {"big.bin": _bin([1000] * 100, np.uint16)},
                 ["data.path=big.bin", "1000", "model.vocab_size=128"], id="bin-id-beyond-vocab"),
    pytest.param(["--set", "data.source=bin", "--set", "data.token_dtype=uint32", "--set", "data.path=short.bin"],
                 {"short.bin": _bin(range(10), np.uint32)}, ["data.path=short.bin", "10 tokens"],
                 id="bin-shorter-than-sequence"),
    # run dir: checked after the data, before anything is written
    pytest.param(["--set", "run.dir=afile/run"], {"afile": b"x"}, ["run.dir=afile/run", "not writable"],
                 id="run-dir-under-file"),
    pytest.param(["--set", "run.dir=afile"], {"afile": b"x"}, ["run.dir=afile", "not a directory"],
                 id="run-dir-is-file"),
    pytest.param(["--set", "run.dir=new/" + "x" * 300 + "/run"], {}, ["run.dir=new/", "not writable"],
                 id="run-dir-name-too-long"),
    # a path component over NAME_MAX (255 bytes): Path.exists() raises ENAMETOOLONG instead of answering
    pytest.param([LONG + ".toml"], {}, [f"config {LONG}.toml", "too long"], id="config-name-too-long"),
    pytest.param(TEXT + ["--set", f"data.path={LONG}"], {}, [f"data.path={LONG}", "too long"],
                 id="data-path-name-too-long"),
    pytest.param(["--set", f"run.dir={LONG}"], {}, [f"run.dir={LONG}", "not writable", "too long"],
                 id="run-dir-component-too-long"),
    pytest.param(["--set", "run.dir=/proc/moemesh-e2e-run"], {}, ["run.dir=/proc/moemesh-e2e-run", "not writable"],
                 id="run-dir-in-proc", marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc")),
]


def _tree(root: Path) -> dict[str, int | None]:
    """Every path under root with its size (None for directories); stat needs no read permission."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("args, files, expected", CASES)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, args, files, expected):
    for name, content in files.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content)
    for name in files:
        if name.startswith("locked."):
            (tmp_path / name).chmod(0)
    before = _tree(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "moemesh", "train", *CHEAP, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    assert lines[0].startswith("moemesh: error: ") and len(lines[0]) > len("moemesh: error: ")
    for text in expected:
        assert text in lines[0], f"{text!r} missing from: {lines[0]}"
    assert proc.stdout == ""
    assert _tree(tmp_path) == before, "the failed run left files behind"
    assert not Path("/proc/moemesh-e2e-run").exists()
