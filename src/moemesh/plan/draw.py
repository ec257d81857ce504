"""`moemesh draw`: the device mesh as a textbook figure.

Every GPU is a box placed by its (d, e, t) coordinates: data replicas side by side, inside each replica
one row per expert rank and one column per TP rank. The groups drawn around and between the boxes
are the groups `Mesh` really builds (`plan/groups.py`, on the fake process group), not recomputed
here: a TP group is a frame around its GPUs, an expert group a vertical bar through its GPUs, a data
group a dashed line through its GPUs. Every group artist carries its axis and ranks in its `gid`
("model:0,1"), so a test can read the membership back from the figure itself.
"""

from __future__ import annotations

from pathlib import Path

from moemesh.errors import UserError

MAX_GPUS = 64  # beyond this the labels no longer fit a page
COLORS = {"model": "#1f77b4", "expert": "#d62728", "data": "#2ca02c"}
COLLECTIVES = {
    "model": "TP (model): all-reduce of partial sums around attention, MLP, MoE (fwd + bwd), vocab-parallel loss",
    "expert": "EP (expert): all-to-all of counts and tokens, dispatch and combine, each MoE layer (fwd + bwd)",
    "data": "DP (data): all-reduce of expert gradients, once per step",
    "data_expert": "data×expert: all-reduce of dense gradients, router statistics, metrics",
}
BOX_W, BOX_H, GAP_T, GAP_E, GAP_D = 1.6, 0.9, 0.25, 0.45, 0.9


def gpu_origin(d: int, e: int, t: int, ep: int, tp: int) -> tuple[float, float]:
    """Lower-left corner of GPU (d, e, t): replicas left to right, expert ranks top to bottom."""
    replica_w = tp * BOX_W + (tp - 1) * GAP_T
    x = d * (replica_w + GAP_D) + t * (BOX_W + GAP_T)
    y = (ep - 1 - e) * (BOX_H + GAP_E)
    return x, y


def experts_label(e: int, ep: int, num_experts: int | None, tp: int) -> str:
    if not num_experts:
        return ""
    per = num_experts // ep
    first, last = e * per, (e + 1) * per - 1
    held = f"E{first}" if per == 1 else f"E{first}–{last}"
    return held + (f" (F/{tp})" if tp > 1 else "")


def draw_mesh(dp: int, ep: int, tp: int, num_experts: int | None, out: Path):
    """Render the mesh into `out` (.png or .svg); returns the matplotlib Figure (closed, inspectable)."""
    world = dp * ep * tp
    if world > MAX_GPUS:
        raise UserError(f"draw: dp*ep*tp={world} GPUs do not fit a readable figure (at most {MAX_GPUS}); "
                        f"`moemesh plan` handles large worlds")
    if num_experts is not None and num_experts % ep:
        raise UserError(f"draw: --experts={num_experts} is not divisible by --ep={ep}")
    if out.suffix.lower() not in (".png", ".svg"):
        raise UserError(f"draw: -o {out}: the file name must end in .png or .svg")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch, Rectangle

    from moemesh.plan.groups import build_groups

    groups = build_groups(dp, ep, tp)
    replica_w = tp * BOX_W + (tp - 1) * GAP_T
    width = dp * replica_w + (dp - 1) * GAP_D
    height = ep * BOX_H + (ep - 1) * GAP_E
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * width + 1), max(3.5, 1.3 * height + 2.6)))
    centers = {}
    for rank, mine in sorted(groups.per_rank.items()):
        d, e, t = mine["coords"]
        x, y = gpu_origin(d, e, t, ep, tp)
        centers[rank] = (x + BOX_W / 2, y + BOX_H / 2)
        ax.add_patch(Rectangle((x, y), BOX_W, BOX_H, facecolor="#f4f4f4", edgecolor="black", lw=1, zorder=2,
                               gid=f"gpu:{rank}"))
        ax.text(x + BOX_W / 2, y + BOX_H * 0.68, f"GPU {rank}", ha="center", va="center", fontsize=9,
                weight="bold", zorder=5)
        ax.text(x + BOX_W / 2, y + BOX_H * 0.42, f"({d},{e},{t})", ha="center", va="center", fontsize=7, zorder=5)
        label = experts_label(e, ep, num_experts, tp)
        if label:
            ax.text(x + BOX_W / 2, y + BOX_H * 0.17, label, ha="center", va="center", fontsize=7,
                    color=COLORS["expert"], zorder=5)
    pad = 0.09
    for members in groups.groups("model"):
        xs = [centers[r][0] for r in members]
        ys = [centers[r][1] for r in members]
        ax.add_patch(FancyBboxPatch((min(xs) - BOX_W / 2 - pad, min(ys) - BOX_H / 2 - pad),
                                    max(xs) - min(xs) + BOX_W + 2 * pad, max(ys) - min(ys) + BOX_H + 2 * pad,
                                    boxstyle="round,pad=0.02", fill=False, edgecolor=COLORS["model"], lw=2.2,
                                    zorder=3, gid="model:" + ",".join(map(str, members))))
    for members in groups.groups("expert"):
        pts = [centers[r] for r in members]
        xs = [p[0] - BOX_W * 0.38 for p in pts]
        ax.add_line(Line2D(xs, [p[1] for p in pts], color=COLORS["expert"], lw=3, marker="o", ms=5, zorder=4,
                           alpha=0.8, gid="expert:" + ",".join(map(str, members))))
    step = min(0.1, 0.35 / tp)  # each TP index's data lines at their own height, so they never overlap
    for members in groups.groups("data"):
        pts = [centers[r] for r in members]
        below = BOX_H * 0.5 + 0.05 + step * groups.per_rank[members[0]]["coords"][2]
        ax.add_line(Line2D([p[0] for p in pts], [p[1] - below for p in pts], color=COLORS["data"],
                           lw=1.6, ls="--", marker="s", ms=3, zorder=4,
                           gid="data:" + ",".join(map(str, members))))
    for d in range(dp):
        x0 = d * (replica_w + GAP_D)
        ax.text(x0 + replica_w / 2, height + 0.3, f"data replica d={d}", ha="center", fontsize=9, color=COLORS["data"])
    handles = [Line2D([], [], color=COLORS[a], lw=2.5, ls="--" if a == "data" else "-") for a in ("model", "expert", "data")]
    handles.append(Line2D([], [], color="gray", lw=0))
    ax.legend(handles, [COLLECTIVES[a] for a in ("model", "expert", "data", "data_expert")], loc="upper center",
              bbox_to_anchor=(0.5, -0.02), fontsize=7.5, frameon=False)
    ax.set_title(f"moemesh mesh dp={dp} × ep={ep} × tp={tp} = {world} GPUs (rank = (d·ep + e)·tp + t)"
                 + (f", {num_experts} experts" if num_experts else ""), fontsize=10)
    ax.set_xlim(-0.3, width + 0.3)
    ax.set_ylim(-0.45, height + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    try:
        fig.savefig(out, bbox_inches="tight", dpi=130)
    except OSError as exc:
        raise UserError(f"draw: cannot write {out} ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return fig


def figure_groups(fig) -> dict[str, list[tuple[int, ...]]]:
    """Group membership as drawn: for every group artist, the GPUs whose centre its geometry covers
    (inside a TP frame; on a vertex of an expert or data line)."""
    ax = fig.axes[0]
    gpus = {}
    for patch in ax.patches:
        gid = patch.get_gid() or ""
        if gid.startswith("gpu:"):
            x, y = patch.get_xy()
            gpus[int(gid[4:])] = (x, y, x + patch.get_width(), y + patch.get_height())
    found: dict[str, list[tuple[int, ...]]] = {"model": [], "expert": [], "data": []}
    for patch in ax.patches:
        gid = patch.get_gid() or ""
        if gid.startswith("model:"):
            x0, y0 = patch.get_x(), patch.get_y()
            x1, y1 = x0 + patch.get_width(), y0 + patch.get_height()
            found["model"].append(tuple(sorted(r for r, (a, b, c, d) in gpus.items()
                                               if x0 <= (a + c) / 2 <= x1 and y0 <= (b + d) / 2 <= y1)))
    for line in ax.lines:
        axis = (line.get_gid() or "").partition(":")[0]
        if axis in ("expert", "data"):
            members = [r for px, py in zip(line.get_xdata(), line.get_ydata())
                       for r, (a, b, c, d) in gpus.items() if a <= px <= c and b - 0.95 * GAP_E <= py <= d]
            found[axis].append(tuple(sorted(members)))
    return {axis: sorted(v) for axis, v in found.items()}


def draw_command(dp: int, ep: int, tp: int, num_experts: int | None, config: str | None, overrides, out: str) -> int:
    if config is not None or overrides:
        from moemesh.config import load_config

        cfg = load_config(config, list(overrides))
        dp, ep, tp = dp or cfg.parallel.dp, ep or cfg.parallel.ep, tp or cfg.parallel.tp
        num_experts = num_experts or cfg.model.num_experts
    dp, ep, tp = dp or 1, ep or 1, tp or 1
    for name, value in (("--dp", dp), ("--ep", ep), ("--tp", tp)):
        if value < 1:
            raise UserError(f"draw: {name}={value} must be >= 1")
    path = Path(out)
    draw_mesh(dp, ep, tp, num_experts, path)
    print(f"moemesh: mesh dp={dp} ep={ep} tp={tp} drawn to {path}")
    return 0


def save_run_drawing(cfg, run_dir: Path) -> None:
    """`moemesh train` leaves mesh.png in a multi-rank run dir. Called by the launcher after the ranks
    have ended (its process never holds a process group then). A picture must never fail a finished
    run, so any problem (no matplotlib, an unwritable dir) is one warning line."""
    p = cfg.parallel
    if p.world_size == 1 or p.world_size > MAX_GPUS:
        return
    try:
        draw_mesh(p.dp, p.ep, p.tp, cfg.model.num_experts, run_dir / "mesh.png")
    except Exception as exc:  # noqa: BLE001 - see the docstring
        from moemesh.errors import report

        report(f"warning: mesh.png not drawn ({exc.__class__.__name__}: {exc})")
