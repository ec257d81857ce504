"""`moemesh plot RUN_DIR`: pictures of a run from its metrics.jsonl.

  loss.png         loss and lm_loss per logged step (train), val_loss where it was computed
  expert_load.png  one heatmap per MoE layer: expert (rows) x logged step (columns), colour = the
                   fraction of routed assignments that chose the expert, relative to a uniform router
                   (1.0 = 1/num_experts), so layers and runs with different expert counts read alike
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moemesh.errors import UserError


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"plot: {run_dir}: no such run dir")
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"plot: {run_dir} has no metrics.jsonl (not a moemesh run dir, or no step logged yet)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"plot: cannot read {path} ({exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"plot: {path} line {number} is not JSON") from None
        if not isinstance(record, dict) or "step" not in record:
            raise UserError(f"plot: {path} line {number} has no step (not a moemesh metrics file)")
        records.append(record)
    if not records:
        raise UserError(f"plot: {path} is empty (no step logged yet)")
    return records


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    records = read_metrics(run_dir)
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"plot: cannot create {out_dir} ({exc.strerror or exc})") from None
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("lm_loss", "-")):
        pts = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
        if pts:
            ax.plot(*zip(*pts), style, label=f"train {key}", lw=1.5)
    val = [(r["step"], r["val_loss"]) for r in records if _finite(r.get("val_loss"))]
    if val:
        ax.plot(*zip(*val), "o--", label="val_loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(f"loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out_dir / "loss.png"))
    loads = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
    if loads:
        steps = [s for s, _ in loads]
        num_layers = len(loads[0][1])
        fig, axes = plt.subplots(num_layers, 1, figsize=(8, 0.4 + 1.6 * num_layers), squeeze=False, sharex=True)
        vmax = max(max(max(layer) for layer in load) * len(load[0]) for _, load in loads)
        for layer in range(num_layers):
            grid = np.array([load[layer] for _, load in loads], dtype=float).T * len(loads[0][1][layer])  # E x steps
            ax = axes[layer][0]
            image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=max(vmax, 1.0),
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, grid.shape[0] - 0.5),
                              interpolation="nearest")
            ax.set_ylabel(f"layer {layer}\nexpert")
        axes[-1][0].set_xlabel("step")
        fig.colorbar(image, ax=[a[0] for a in axes], label="load ÷ uniform (1 = 1/E)")
        axes[0][0].set_title(f"expert load: {run_dir.name}")
        written.append(_save(fig, out_dir / "expert_load.png"))
    return written


def _save(fig, path: Path) -> Path:
    from matplotlib import pyplot as plt

    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise UserError(f"plot: cannot write {path} ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return path


def plot_command(run_dir: str, out: str | None) -> int:
    written = plot_run(Path(run_dir), Path(out) if out else Path(run_dir))
    for path in written:
        print(f"moemesh: wrote {path}")
    return 0
