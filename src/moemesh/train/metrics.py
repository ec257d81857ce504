"""Run outputs on the main rank: metrics.jsonl, TensorBoard events, a progress bar, summary.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: bool):
        self.jsonl = open(run_dir / "metrics.jsonl", "w", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5)

    def log(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
            for layer, load in enumerate(record.get("expert_load", [])):
                for expert, frac in enumerate(load):
                    self.tb.add_scalar(f"expert_load/layer{layer}/expert{expert}", frac, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"moemesh: {summary['steps']} steps in {summary['elapsed_s']:.1f} s, "
             f"{summary['tokens_per_s']:.0f} tokens/s, final lm loss {summary['final_lm_loss']:.4f} nats/token"]
    if summary.get("entropy_floor") is not None:
        lines.append(f"entropy floor of the synthetic source {summary['entropy_floor']:.4f} nats/token: "
                     f"loss is {100 * summary['gap_to_floor']:.1f}% above it")
    lines.append(f"run dir: {summary['run_dir']}")
    return "\n".join(lines)
