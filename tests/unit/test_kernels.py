"""Runs tests/unit/interpreted_kernels.py (the Triton kernels against the PyTorch code) and
tests/unit/interpreted_memory.py (the planner's activation term with the kernels on) in one process
started with TRITON_INTERPRET=1, which Triton's interpreter needs from the first import of triton."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_kernels_under_the_interpreter():
    checks = [str(Path(__file__).with_name(name)) for name in ("interpreted_kernels.py", "interpreted_memory.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *checks],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
