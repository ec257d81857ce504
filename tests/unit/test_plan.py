"""The planner: enumeration yields all and only the layouts `load_config` accepts; the shipped H200
constants predict what the previous model did; the per-term fit recovers known constants from
synthetic kernel-class times and respects its bounds; the calibration and held-out lists of
bench/plan_validate.py are what docs/planner.md says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moemesh.config import load_config
from moemesh.errors import ConfigError, UserError
from moemesh.parallel.layout import build_layout
from moemesh.plan.cost import (GPUS, H200_CONSTANTS, LOWER, MESH, PARAMS, TERMS, TRAIN_E2E_CONFIGS, Constants,
                               compute_terms, fit, fit_mesh, load_mesh_runs, nnls, run_features)
from moemesh.plan.kernels import CLASSES
from moemesh.plan.memory import CountsByLayout, meta_model, param_counts
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


PREVIOUS = [ROOT / "bench" / "results" / "plan_validate.json", ROOT / "bench" / "results" / "plan_validate_v2.json"]
PREVIOUS_REPORT = ROOT / "bench" / "results" / "plan_report_v2.json"  # the previous model on plan_validate_v2.json
V3 = [ROOT / "bench" / "results" / "plan_validate_v3.json", ROOT / "bench" / "results" / "plan_validate_v3_rest.json"]
MESH_FILES = [ROOT / "bench" / "results" / f"mesh_{name}.json"
              for name in ("skeleton_x2", "calibration_x2", "calibration_x4", "calibration_x2_graph")]
CURRENT = [*V3, ROOT / "bench" / "results" / "plan_validate_v4.json", *MESH_FILES]
# Plausible constants inside the bounds (the fit test's truth): 70 % of peak for large dense GEMMs, ...
TRUTH = Constants(gemm_a=1.4, gemm_b=0.3, grouped_a=1.6, grouped_b=0.8, grouped_us=4.0, attn_a=1.8, attn_b=0.6,
                  elem_layer=30.0, elem_moe=12.0, elem_ffn=6.0, elem_vocab=3.0, elem_us=400.0, head_bytes=9.0,
                  opt_bytes=36.0, opt_us=5.0, idle_layer_ms=0.4, idle_step_ms=2.0, graph_idle_layer_ms=0.05,
                  graph_idle_step_ms=1.0, mesh_host_layer_ms=6.0, mesh_host_step_ms=10.0, mesh_host_tp_layer_ms=3.0,
                  mesh_host_ep_moe_ms=2.5, mesh_host_sync_layer_ms=1.5, mesh_overlap_p=1.6,
                  tp_comm=H200_CONSTANTS.tp_comm)  # (a fit without graphed TP runs keeps the shipped tp_comm)


def bench(name: str):
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module(name)


def write_measurements(path: Path, runs: dict[str, tuple[str, list[str], Constants, float]],
                       graphed: bool = False) -> dict[str, dict]:
    """A bench/plan_validate.py file (format 4) whose run `label: (set, overrides, constants, factor)` measures
    `factor` x what `constants` predict, term by term: every kernel class, and a step time equal to the sum
    of the terms (so idle is the idle term), each step a CUDA graph or not. Returns the predicted terms in
    seconds."""
    from moemesh.plan.kernels import class_profile

    out, terms = {}, {}
    for label, (name, overrides, constants, factor) in runs.items():
        terms[label] = t = compute_terms(run_features(overrides, GPUS["h200"], graphed), constants)
        cfg = load_config("gpu", overrides)
        profile = class_profile([], 1e3, 2)  # the layout of a real profile, then the synthetic times
        profile["classes"] = {c: {"ms": t[c] * factor * 1e3, "kernels": 100.0} for c in CLASSES}
        out[label] = {"set": name, "overrides": overrides, "profile": profile, "measured": {"cuda_graph": graphed},
                      "tokens_per_s": cfg.train.global_batch * cfg.train.seq_len / (sum(t.values()) * factor)}
    path.write_text(json.dumps({"format": "moemesh plan_validate 4", "gpu": "synthetic", "runs": out}))
    return terms


def test_shipped_constants_are_the_fit_of_the_shipped_measurements():
    """H200_CONSTANTS is what `fit` makes of bench/results/plan_validate_v3*.json's and v4's calibration runs
    and the mesh_{skeleton,calibration}_x*.json multi-GPU runs (to the 5 digits written), so the shipped
    numbers can be regenerated and no hand edit hides in them."""
    fitted = fit(CURRENT)
    for name in PARAMS:
        assert getattr(H200_CONSTANTS, name) == pytest.approx(getattr(fitted, name), rel=1e-4, abs=1e-9), name


def test_memory_of_the_pytorch_path_is_what_the_v2_report_predicted():
    """The runs of plan_validate_v2.json predate train.fused_kernels: with the kernels off, the memory
    model predicts what the v2 report did on all 29 configs (the PyTorch path's activations unchanged)."""
    report = json.loads(PREVIOUS_REPORT.read_text())
    overrides = json.loads(PREVIOUS[1].read_text())["runs"]
    predict = bench("plan_report").predict
    for row in report["rows"]:
        p = predict([*overrides[row["label"]]["overrides"], "train.fused_kernels=false"], H200_CONSTANTS)
        assert p["memory_gib"] == pytest.approx(row["predicted_memory_gib"], rel=1e-9), row["label"]


def test_shipped_constants_keep_gemms_below_the_measured_peak():
    for n in (1, 128, 1408, 4096, 1e9):
        assert 0 < H200_CONSTANTS.gemm_efficiency(n) <= 1 and 0 < H200_CONSTANTS.grouped_efficiency(n) <= 1
        assert 0 < H200_CONSTANTS.attention_efficiency(n) <= 1
    assert H200_CONSTANTS.gemm_efficiency(1408) <= H200_CONSTANTS.gemm_efficiency(4096)


def test_every_constant_has_a_term_and_a_bound():
    fields = [f for f in Constants.__dataclass_fields__ if f != "source"]
    assert list(PARAMS) == fields and {t for t, _ in PARAMS.values()} == {*TERMS, "mesh", "tp"}
    assert set(TERMS) == {*CLASSES, "idle"} and {n for n, (t, _) in PARAMS.items() if t == "mesh"} == set(MESH)
    for name in fields:  # a docstring line per constant
        assert f"\n    {name} " in Constants.__doc__, name


def test_fit_recovers_known_constants(tmp_path: Path):
    """Kernel-class times made from known constants on the calibration configs, their steps launched op by
    op in one file and replayed as CUDA graphs in another: the per-term fit gives those constants back, both
    idle pairs included. A held-out run made with other constants, and a calibration run whose profile
    failed, are ignored."""
    pv = bench("plan_validate")
    other = Constants(**{n: 3 * getattr(TRUTH, n) for n in PARAMS})
    runs = {label: ("calibration", o, TRUTH, 1.0) for label, o in pv.CALIBRATION.items()}
    held = next(iter(pv.HELDOUT))
    runs[held] = ("heldout", pv.HELDOUT[held], other, 1.0)
    runs["failed-profile"] = ("calibration", next(iter(pv.RETIRED.values())), other, 1.0)
    write_measurements(tmp_path / "m.json", runs)
    data = json.loads((tmp_path / "m.json").read_text())
    data["runs"]["failed-profile"]["profile"] = {"error": "RuntimeError: CUDA out of memory"}
    (tmp_path / "m.json").write_text(json.dumps(data))
    write_measurements(tmp_path / "g.json", {label: ("calibration", o, TRUTH, 1.0) for label, o in pv.CALIBRATION.items()},
                       graphed=True)
    fitted = fit([tmp_path / "m.json", tmp_path / "g.json"])
    for name in PARAMS:
        want = H200_CONSTANTS if name in MESH else TRUTH  # no mesh run: the shipped mesh constants
        assert getattr(fitted, name) == pytest.approx(getattr(want, name), rel=1e-6), name
    assert str(tmp_path / "m.json") in fitted.source


def write_mesh_measurements(path: Path, layouts: list[tuple[int, int, int]], configs: dict[str, list[str]],
                            constants: Constants, graphed: bool = False, scale: float = 1.0) -> None:
    """A bench/mesh_runs.py file whose runs take exactly what `constants` predict at their layouts (times
    `scale`), launched op by op or (`graphed`) replayed as one CUDA graph."""
    from moemesh.plan.cost import MeshRun, mesh_run_terms

    runs = {}
    for name, overrides in configs.items():
        for layout in layouts:
            run = MeshRun(name, overrides, layout, False, "none", 1.0, None, graphed=graphed)
            terms, _ = mesh_run_terms(run, constants, GPUS["h200"])
            runs[f"{name}/{'x'.join(map(str, layout))}"] = {
                "layout": list(layout), "overrides": overrides, "sequence_parallel": False,
                "activation_checkpointing": "none", "cuda_graph": graphed,
                "step_ms": sum(terms.values()) * 1e3 * scale, "peak_gib": 10.0}
    path.write_text(json.dumps({"gpu": "synthetic", "launches": [], "runs": runs}))


def test_the_mesh_fit_recovers_known_host_constants_and_p(tmp_path: Path):
    """Multi-GPU step times made from known constants at the layouts of 2 and 4 GPUs (and a 1-GPU run, which
    the mesh fit leaves out), skeleton configs among them: fitted after the single-GPU files, the mesh's host
    constants and p come back; the others are the single-GPU fit's."""
    pv, skeleton = bench("plan_validate"), bench("host_probe").SKELETON  # bench/mesh_sweep.sh's skeleton
    configs = {"gpu": [], "d2048": ["model.n_layers=4", "model.dim=2048", "model.n_heads=16", "model.n_kv_heads=4"],
               "e32-top4": ["model.num_experts=32", "model.top_k=4", "model.ffn_dim=704"],
               "skeleton-L2": [*skeleton, "model.n_layers=2"], "skeleton-L8": skeleton}  # valid at tp=4
    layouts = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2)]
    write_mesh_measurements(tmp_path / "mesh.json", layouts, configs, TRUTH)
    write_measurements(tmp_path / "m.json", {label: ("calibration", o, TRUTH, 1.0) for label, o in pv.CALIBRATION.items()})
    fitted = fit([tmp_path / "m.json", tmp_path / "mesh.json"])
    for name in (*MESH, "gemm_b", "idle_step_ms"):  # rel 1e-3: the golden section finds p to 1e-4
        assert getattr(fitted, name) == pytest.approx(getattr(TRUTH, name), rel=1e-3), name
    assert fitted.graph_idle_step_ms == H200_CONSTANTS.graph_idle_step_ms  # no graph run: the shipped pair
    assert "mesh.json" in fitted.source


def test_the_mesh_fit_leaves_out_steps_replayed_as_cuda_graphs(tmp_path: Path):
    """A graphed mesh step has no host term: such runs, even far off the model, change nothing of the fit
    of the host constants; a file of graphed runs alone has nothing to fit them on (one line)."""
    skeleton = bench("host_probe").SKELETON
    configs = {"gpu": [], "skeleton-L2": [*skeleton, "model.n_layers=2"], "skeleton-L8": skeleton}
    layouts = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
    write_mesh_measurements(tmp_path / "eager.json", layouts, configs, TRUTH)
    write_mesh_measurements(tmp_path / "graphs.json", [(2, 1, 1), (1, 1, 2)], configs, TRUTH, graphed=True, scale=3.0)
    alone = fit_mesh(load_mesh_runs(tmp_path / "eager.json"), TRUTH, GPUS["h200"])
    both = fit_mesh(load_mesh_runs(tmp_path / "eager.json") + load_mesh_runs(tmp_path / "graphs.json"), TRUTH,
                    GPUS["h200"])
    assert all(r.graphed for r in load_mesh_runs(tmp_path / "graphs.json"))
    for name in MESH:
        assert getattr(both, name) == getattr(alone, name), name
    with pytest.raises(UserError, match="no multi-GPU run launched op by op"):
        fit_mesh(load_mesh_runs(tmp_path / "graphs.json"), TRUTH, GPUS["h200"])


def test_tp_collectives_are_fitted_to_graphed_runs_and_the_host_to_op_by_op_ones(tmp_path: Path):
    """Steps replayed as CUDA graphs at tp > 1 give TP's collectives' constant (their time is the device's);
    the runs launched op by op then give the host's constants and p, at that TP time. Graphed runs alone
    fit TP and keep the host's; graphed runs without TP have nothing to fit."""
    import dataclasses

    pv, skeleton = bench("plan_validate"), bench("host_probe").SKELETON
    # (the single-GPU file has no graphed run, so the fit keeps the shipped graph idle pair: so does the truth)
    truth = dataclasses.replace(TRUTH, tp_comm=1.7, graph_idle_layer_ms=H200_CONSTANTS.graph_idle_layer_ms,
                                graph_idle_step_ms=H200_CONSTANTS.graph_idle_step_ms)
    configs = {"gpu": [], "d2048": ["model.n_layers=4", "model.dim=2048", "model.n_heads=16", "model.n_kv_heads=4"],
               "skeleton-L2": [*skeleton, "model.n_layers=2"], "skeleton-L8": skeleton}
    write_measurements(tmp_path / "m.json",
                       {label: ("calibration", o, truth, 1.0) for label, o in pv.CALIBRATION.items()})
    write_mesh_measurements(tmp_path / "eager.json", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2)],
                            configs, truth)
    write_mesh_measurements(tmp_path / "graphs.json", [(2, 1, 1), (1, 1, 2), (2, 1, 2)], configs, truth, graphed=True)
    both = fit([tmp_path / "m.json", tmp_path / "eager.json", tmp_path / "graphs.json"])
    assert both.tp_comm == pytest.approx(1.7, rel=1e-6)
    for name in MESH:
        assert getattr(both, name) == pytest.approx(getattr(truth, name), rel=1e-3), name
    alone = fit([tmp_path / "m.json", tmp_path / "graphs.json"])
    assert alone.tp_comm == pytest.approx(1.7, rel=1e-6)
    assert all(getattr(alone, name) == getattr(H200_CONSTANTS, name) for name in MESH)
    write_mesh_measurements(tmp_path / "dp.json", [(2, 1, 1)], configs, truth, graphed=True)
    with pytest.raises(UserError, match="dp.json: no multi-GPU run launched op by op, and none replayed as a CUDA "
                                        "graph at tp > 1"):
        fit([tmp_path / "m.json", tmp_path / "dp.json"])
    fast = dataclasses.replace(truth, tp_comm=0.5)  # faster than the measured bandwidth: held at the bound
    write_mesh_measurements(tmp_path / "fast.json", [(1, 1, 2)], configs, fast, graphed=True)
    assert fit([tmp_path / "m.json", tmp_path / "fast.json"]).tp_comm == 1.0


def test_runs_from_before_graphed_mesh_steps_read_as_they_ran(tmp_path: Path):
    """Files without `cuda_graph` predate graphed mesh steps: their multi-GPU runs were launched op by op;
    a single-GPU run's launch is not known (None: as the planner assumes)."""
    runs = {l: {"layout": list(layout), "overrides": [], "sequence_parallel": False, "activation_checkpointing": "none",
                "step_ms": 100.0} for l, layout in (("a/2x1x1", (2, 1, 1)), ("a/1x1x1", (1, 1, 1)))}
    (tmp_path / "old.json").write_text(json.dumps({"launches": [], "runs": runs}))
    got = {r.label: r.graphed for r in load_mesh_runs(tmp_path / "old.json")}
    assert got == {"a/2x1x1": False, "a/1x1x1": None}


def test_fit_stops_at_the_bounds(tmp_path: Path):
    """Measurements faster than physics allows (every class at a tenth of TRUTH's, no idle): each constant
    that would go below its bound stays at it, so no GEMM is fitted above the peak, no byte term above the
    copy bandwidth."""
    pv = bench("plan_validate")
    fast = Constants(**{n: getattr(TRUTH, n) / 10 for n in PARAMS})
    write_measurements(tmp_path / "m.json", {label: ("calibration", o, fast, 1.0) for label, o in pv.CALIBRATION.items()})
    fitted = fit(tmp_path / "m.json")
    for name, lower in LOWER.items():
        assert getattr(fitted, name) >= lower, name
    for name in ("gemm_a", "grouped_a", "attn_a", "opt_bytes"):
        assert getattr(fitted, name) == LOWER[name], name
    assert fitted.gemm_efficiency(1e9) == pytest.approx(1.0) and fitted.attention_efficiency(1e9) == pytest.approx(1.0)


def test_fit_respects_the_bounds():
    """Data that wants a negative coefficient: the solution satisfies the optimality (KKT) conditions of
    least squares with x >= 0; data from non-negative coefficients is solved exactly."""
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(size=(12, 3)))
    y = a @ np.array([-1.0, 2.0, 0.5])
    assert (np.linalg.lstsq(a, y, rcond=None)[0] < 0).any()  # the bound binds
    x = nnls(a, y)
    gradient = a.T @ (y - a @ x)
    assert (x >= 0).all() and (x == 0).any()
    assert np.abs(gradient[x > 0]).max() < 1e-9 and (gradient[x == 0] <= 1e-9).all()
    assert nnls(a, a @ np.array([1.0, 2.0, 0.5])) == pytest.approx([1.0, 2.0, 0.5], rel=1e-9)


def _measured_configs(path: Path) -> dict:
    runs = json.loads(path.read_text())["runs"]
    return {label: load_config("gpu", [o for o in run["overrides"] if not o.startswith(("train.steps=", "run.log_every="))])
            for label, run in runs.items()}


def test_validation_lists():
    """Calibration = v3's 13 held-out configs (spent as a test); every config of v1-v3 is calibration or
    retired; the held-out configs were never measured (none in v1-v3, train_e2e.py or retired), span every
    dimension and fit in memory; the lists alternate."""
    pv = bench("plan_validate")
    configs = {label: load_config("gpu", o) for label, o in pv.CALIBRATION.items()}
    earlier = [_measured_configs(p) for p in [*PREVIOUS, *V3]]
    v3_held = {label for p in V3 for label, run in json.loads(p.read_text())["runs"].items() if run["set"] == "heldout"}
    v3 = {**earlier[2], **earlier[3]}
    assert len(v3_held) == 13 and set(configs) == v3_held and all(configs[label] == v3[label] for label in v3_held)
    assert set().union(*earlier) == set(configs) | set(pv.RETIRED)
    for name, overrides in TRAIN_E2E_CONFIGS.items():
        assert pv.RETIRED[name] == overrides or load_config("gpu", pv.RETIRED[name]) == load_config("gpu", overrides)
    used = [*configs.values(), *(c for e in earlier for c in e.values()),
            *(load_config("gpu", o) for o in pv.RETIRED.values())]
    held = {label: load_config("gpu", o) for label, o in pv.HELDOUT.items()}
    assert len(held) >= 13 and not any(u == h for u in used for h in held.values())
    for field, low, high in (("model.dim", 512, 4096), ("model.num_experts", 8, 128), ("model.top_k", 1, 8),
                             ("model.ffn_dim", 256, 9728), ("train.seq_len", 1024, 8192),
                             ("model.vocab_size", 8192, 32000)):
        section, key = field.split(".")
        values = {getattr(getattr(c, section), key) for c in held.values()}
        assert min(values) == low and max(values) == high and len(values) >= 4, (field, values)
    for field in ("train.global_batch", "model.n_layers"):
        section, key = field.split(".")
        assert len({getattr(getattr(c, section), key) for c in held.values()}) >= 4, field
    assert {c.train.activation_checkpointing for c in held.values()} == {"none", "moe", "full"}
    assert sum(c.train.seq_len >= 4096 for c in held.values()) >= 4
    assert sum(c.model.num_experts >= 32 and c.model.ffn_dim <= 1024 for c in held.values()) >= 3
    order = pv.selected("all")
    assert [s for s, _, _ in order[:4]] == ["calibration", "heldout"] * 2 and len(order) == len(configs) + len(held)


def test_validation_configs_fit_the_gpu():
    """Predicted allocated peak (within 8 % on v2) at most 80 GiB of the H200's 139: room for the error and
    for a timed run's memory the allocator has not yet returned when the profile's Trainer is built."""
    pv = bench("plan_validate")
    predict = bench("plan_report").predict
    for label, overrides in {**pv.CALIBRATION, **pv.HELDOUT}.items():
        assert predict(overrides, H200_CONSTANTS)["memory_gib"] < 80, label


def test_calibration_configs_are_the_benchmarks():
    assert {name: list(ov) for name, (_, ov) in bench("train_e2e").CONFIGS.items()} == TRAIN_E2E_CONFIGS


@pytest.mark.parametrize("overrides", [["model.num_shared_experts=1", "model.num_dense_layers=1"], []])
@pytest.mark.parametrize("sp", [False, True])
def test_counts_by_layout_equal_each_layouts_table(overrides, sp):
    cfg = load_config("tiny", ["model.num_experts=8", "model.n_kv_heads=4", *overrides])
    model = meta_model(cfg.model)
    by_layout = CountsByLayout(model, sp)
    for ep, tp in [(1, 1), (2, 1), (1, 2), (4, 2), (8, 4), (2, 4)]:
        assert by_layout(ep, tp) == param_counts(build_layout(model, 3, ep, tp, sp and tp > 1)), (ep, tp)
        table = build_layout(model, 3, ep, tp, sp and tp > 1)
        generic = by_layout.layout(3, ep, tp)
        assert {n: generic.local_shape(n) for n in generic.params} == {n: table.local_shape(n) for n in table.params}


def test_foreign_calibration_file(tmp_path: Path):
    """Not a benchmark, or a benchmark without kernel classes (format 2): one line saying why."""
    with pytest.raises(UserError, match="no calibration run with kernel times per class .*plan_validate 3"):
        fit(PREVIOUS[1])
    (tmp_path / "x.json").write_text('{"results": {}}')
    with pytest.raises(UserError, match="not a GPU benchmark of this project"):
        fit(tmp_path / "x.json")
    with pytest.raises(UserError, match="not a GPU benchmark"):
        fit(ROOT / "bench" / "results" / "moe_layer.json")


def test_a_mesh_steps_host_time_by_layout_and_recompute():
    """The host's launches per layer pass: a recomputed forward adds the AGAIN share where its launches run
    again (every layer under "full"; the MoE layers, with their all-to-alls and split syncs, under "moe"),
    TP's collectives only under "full" (outside the recomputed function) and the gradient hooks never."""
    from moemesh.config import load_config
    from moemesh.parallel.layout import build_layout
    from moemesh.plan.cost import AGAIN, MESH_HOST, features, shape_of
    from moemesh.plan.memory import meta_model

    cfg = load_config("gpu", ["model.num_dense_layers=2"])  # 8 layers, 6 of them MoE
    L, M = 8, 6
    want = {  # (dp, ep, tp), recompute -> (layer, step, tp, ep, sync) in host passes
        ((2, 1, 1), "none"): (L, 1, 0, 0, L), ((1, 1, 2), "none"): (L, 1, L, 0, 0), ((1, 2, 1), "none"): (L, 1, 0, M, L),
        ((1, 2, 1), "moe"): (L + AGAIN * M, 1, 0, M * (1 + AGAIN), L),
        ((2, 2, 2), "moe"): (L + AGAIN * M, 1, L, M * (1 + AGAIN), L),
        ((2, 2, 2), "full"): (L * (1 + AGAIN), 1, L * (1 + AGAIN), M * (1 + AGAIN), L),
    }
    for ((dp, ep, tp), recompute), passes in want.items():
        shape = shape_of(cfg, build_layout(meta_model(cfg.model), dp, ep, tp, False))
        f = features(shape, dp, ep, tp, recompute, GPUS["h200"], 1.0, False)
        assert [f[n] * 1e3 for n in MESH_HOST] == pytest.approx(passes), (dp, ep, tp, recompute)
    one = features(shape_of(cfg, build_layout(meta_model(cfg.model), 1, 1, 1, False)), 1, 1, 1, "none",
                   GPUS["h200"], 1.0, True)
    assert all(one[n] == 0 for n in MESH_HOST) and one["graph_idle_layer_ms"] == L * 1e-3


def test_a_skeleton_sweep_alone_refits_the_host_but_keeps_p():
    """bench/mesh_sweep.sh's skeleton runs are host time alone: they cannot tell how host and device
    combine, so a fit on them keeps the shipped p and fits the host constants at it."""
    skeleton = ROOT / "bench" / "results" / "mesh_skeleton_x2.json"
    fitted = fit(skeleton)
    assert fitted.mesh_overlap_p == H200_CONSTANTS.mesh_overlap_p
    assert fitted.mesh_host_layer_ms != H200_CONSTANTS.mesh_host_layer_ms and fitted.mesh_host_layer_ms > 0
    assert "mesh_skeleton_x2.json" in fitted.source
