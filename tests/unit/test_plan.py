"""The planner: enumeration yields all and only the layouts `load_config` accepts; the shipped H200
constants are the fit of the shipped benchmark; the calibration table is bench/train_e2e.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.config import load_config
from moemesh.errors import ConfigError, UserError
from moemesh.plan.cost import GPUS, H200_CONSTANTS, TRAIN_E2E_CONFIGS, fit
from moemesh.plan.search import enumerate_plans, rank

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.num_experts=8", "model.n_kv_heads=4", "train.global_batch=8"]


@pytest.mark.parametrize("gpus", [1, 8, 12, 16])
def test_enumeration_is_all_and_only_valid_layouts(gpus):
    cfg = load_config("tiny", TINY)
    found = {(c.dp, c.ep, c.tp, c.sequence_parallel) for c in enumerate_plans(cfg, gpus, 8, GPUS["h200"], H200_CONSTANTS)}
    expected = set()
    for dp in range(1, gpus + 1):
        for ep in range(1, gpus + 1):
            for tp in range(1, gpus + 1):
                for sp in (False, True):
                    if dp * ep * tp != gpus or (sp and tp == 1):
                        continue
                    try:
                        load_config("tiny", [*TINY, f"parallel.dp={dp}", f"parallel.ep={ep}", f"parallel.tp={tp}",
                                             f"parallel.sequence_parallel={str(sp).lower()}"])
                    except ConfigError:
                        continue
                    expected.add((dp, ep, tp, sp))
    assert found == expected
    assert bool(found) == (gpus != 12)  # 12 = 3 * 4 needs a factor 3 that nothing in the config divides


def test_ranking_prefers_fewer_collectives_on_one_node():
    cfg = load_config("gpu", ["train.global_batch=64"])
    best = rank(enumerate_plans(cfg, 8, 8, GPUS["h200"], H200_CONSTANTS))[0]
    assert best.fits and best.step_s > 0 and best.bottleneck in best.terms


def test_shipped_constants_are_the_fit_of_the_shipped_benchmark():
    fitted = fit(ROOT / "bench" / "results" / "train_e2e.json")
    for name in ("e_gemm", "c_elem", "c_opt"):
        assert getattr(fitted, name) == pytest.approx(getattr(H200_CONSTANTS, name), rel=2e-3), name


def test_calibration_configs_are_the_benchmarks():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from train_e2e import CONFIGS

    assert {name: list(ov) for name, (_, ov) in CONFIGS.items()} == TRAIN_E2E_CONFIGS


def test_foreign_calibration_file(tmp_path: Path):
    (tmp_path / "x.json").write_text('{"results": {}}')
    with pytest.raises(UserError, match="not a GPU benchmark of this project"):
        fit(tmp_path / "x.json")
    with pytest.raises(UserError, match="not a GPU benchmark"):
        fit(ROOT / "bench" / "results" / "moe_layer.json")
