"""Finds host syncs inside a training step on the GPU: runs warm-up steps, then one step under
torch.cuda.set_sync_debug_mode("error") and prints the stack of the first synchronizing call.

    PYTHONPATH=src python3 bench/sync_check.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback

import torch

from child import warm_trainer  # bench/child.py (bench/ is on sys.path when run as a script)
from moemesh.config import load_config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("gpu", ["model.n_layers=2", f"run.dir={tmp}", *args.set])
        trainer = warm_trainer(cfg, 3)
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.step(4)
            print("no host sync inside step 4", args.set)
        except RuntimeError:
            print("host sync inside step 4", args.set)
            traceback.print_exc(limit=12)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
