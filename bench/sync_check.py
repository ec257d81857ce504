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

from moemesh.config import load_config
from moemesh.train.data import build_source
from moemesh.train.loop import Trainer, resolve_device


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("gpu", ["model.n_layers=2", f"run.dir={tmp}", *args.set])
        device = resolve_device(cfg)
        source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
        trainer = Trainer(cfg, None, source, device)
        for step in range(1, 4):
            trainer.step(step)
        torch.cuda.synchronize()
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
