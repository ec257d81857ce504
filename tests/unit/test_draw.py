"""`moemesh draw`: the figure renders, and the group membership read back from the figure's own
artists (which GPU boxes each TP frame encloses, which GPUs each expert/data line passes through) is
the membership of the real Mesh."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.errors import UserError
from moemesh.plan.draw import draw_mesh, figure_groups
from moemesh.plan.groups import build_groups


@pytest.mark.parametrize("dp, ep, tp, suffix", [(2, 2, 2, "png"), (1, 4, 2, "svg"), (4, 2, 1, "png"),
                                                (2, 1, 8, "png"), (1, 1, 1, "svg")])
def test_figure_matches_mesh(tmp_path: Path, dp, ep, tp, suffix):
    out = tmp_path / f"mesh.{suffix}"
    fig = draw_mesh(dp, ep, tp, 8, out)
    assert 10_000 < out.stat().st_size < 2_000_000
    real = build_groups(dp, ep, tp)
    drawn = figure_groups(fig)
    for axis in ("model", "expert", "data"):
        assert drawn[axis] == real.groups(axis), axis
    texts = [t.get_text() for t in fig.axes[0].texts]
    if ep > 1:
        assert f"E0–{8 // ep - 1}" + (f" (F/{tp})" if tp > 1 else "") in texts


def test_bad_requests(tmp_path: Path):
    with pytest.raises(UserError, match="not divisible by --ep=4"):
        draw_mesh(1, 4, 1, 6, tmp_path / "m.png")
    with pytest.raises(UserError, match="at most 64"):
        draw_mesh(8, 4, 4, 8, tmp_path / "m.png")
    with pytest.raises(UserError, match=".png or .svg"):
        draw_mesh(2, 1, 1, 8, tmp_path / "m.pdf")
    assert list(tmp_path.iterdir()) == []
