"""Checkpoints resume exactly, and at any layout: one launch of 8 gloo ranks runs every check.

fp32 on CPU. Same layout: 8 steps straight vs 4 steps + save + a fresh trainer that loads + 4 steps must
give bit-identical losses (steps 5-8) and parameters: DCP stores the exact bytes, the LR schedule and the
data stream are functions of the step. Another layout (the checkpoint written at (2, 2, 2) loaded at
(1, 4, 2), (4, 1, 2) and in one process): the next losses equal continuing at (2, 2, 2) within 1e-5
relative, the parity tolerance (sharded sums in another order, ~1e-7 per step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moemesh.config import load_config
from moemesh.launch import finish, launch_local
from moemesh.parallel.apply import gather_full_state
from moemesh.parallel.mesh import Mesh
from moemesh.train.checkpoint import load_checkpoint, save_checkpoint
from moemesh.train.data import build_source
from moemesh.train.loop import Trainer

TOL = 1e-5
ROUTERS = {"softmax": [], "sigmoid": ["model.router=sigmoid", "model.bias_update_rate=0.01"]}
RESUME_LAYOUTS = [(1, 4, 2), (4, 1, 2), (1, 1, 1)]


def _trainer(router: str, layout, run_dir: Path, mesh_cache: dict) -> Trainer:
    dp, ep, tp = layout
    cfg = load_config("tiny", ["train.steps=8", "train.warmup_steps=2", *ROUTERS[router], f"parallel.dp={dp}",
                               f"parallel.ep={ep}", f"parallel.tp={tp}", f"run.dir={run_dir}",
                               "run.keep_checkpoints=1"])
    mesh = None
    if layout != (1, 1, 1):
        if layout not in mesh_cache:
            mesh_cache[layout] = Mesh(dp, ep, tp, "cpu")
        mesh = mesh_cache[layout]
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    return Trainer(cfg, mesh, source, torch.device("cpu"))


def _steps(trainer: Trainer, steps) -> list[list[float]]:
    return [[*trainer.step(step)[0].tolist()] for step in steps]


def _full(trainer: Trainer) -> dict[str, torch.Tensor]:
    return gather_full_state(trainer.model, trainer.layout, trainer.mesh)


def _checks(out_path: str, tmp: str) -> int:
    dist.init_process_group("gloo")
    rank, results, meshes = dist.get_rank(), {}, {}
    for router in ROUTERS:
        run_dir = Path(tmp) / router
        straight = _trainer(router, (2, 2, 2), run_dir / "straight", meshes)
        want = _steps(straight, range(1, 9))
        want_state = _full(straight)
        # 4 steps, save, then a new trainer (fresh weights from the seed) loads and runs 4 more
        first = _trainer(router, (2, 2, 2), run_dir, meshes)
        _steps(first, range(1, 5))
        path = save_checkpoint(first, run_dir, 4)
        again = _trainer(router, (2, 2, 2), run_dir, meshes)
        assert load_checkpoint(again, path) == 4
        got = _steps(again, range(5, 9))
        got_state = _full(again)
        results[f"{router}-2x2x2"] = {
            "losses_equal": got == want[4:],
            "params_equal": all(torch.equal(got_state[n], want_state[n]) for n in want_state),
            "expert_bias_moved": any(n.endswith("expert_bias") and want_state[n].abs().sum() > 0 for n in want_state)}
        for layout in RESUME_LAYOUTS:
            if layout == (1, 1, 1) and rank != 0:
                continue
            other = _trainer(router, layout, run_dir, meshes)
            assert load_checkpoint(other, path) == 4
            losses = _steps(other, range(5, 9))
            state = _full(other)
            results[f"{router}-{'x'.join(map(str, layout))}"] = {
                "loss_rel_err": max(abs(a - b) / abs(b) for row, ref in zip(losses, want[4:]) for a, b in zip(row, ref)),
                "param_rel_err": max(float((state[n] - want_state[n]).norm() / want_state[n].norm().clamp_min(1e-30))
                                     for n in want_state)}
        # a straight single-process run, then the same stop-and-resume in one process: bit-identical too
        if rank == 0:
            single = _trainer(router, (1, 1, 1), run_dir / "single", meshes)
            want1 = _steps(single, range(1, 9))
            first1 = _trainer(router, (1, 1, 1), run_dir / "single-resumed", meshes)
            _steps(first1, range(1, 5))
            path1 = save_checkpoint(first1, run_dir / "single-resumed", 4)
            again1 = _trainer(router, (1, 1, 1), run_dir / "single-resumed", meshes)
            load_checkpoint(again1, path1)
            got1 = _steps(again1, range(5, 9))
            results[f"{router}-single"] = {
                "losses_equal": got1 == want1[4:],
                "params_equal": all(torch.equal(a, b) for a, b in zip(_full(again1).values(), _full(single).values()))}
        dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    return finish(0, exit_process=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checkpoints")
    failed = launch_local(_checks, (str(tmp / "results.json"), str(tmp)), 8)
    assert failed is None, failed
    return json.loads((tmp / "results.json").read_text())


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("layout", ["2x2x2", "single"])
def test_stop_and_resume_is_bit_identical(results, router, layout):
    r = results[f"{router}-{layout}"]
    assert r["losses_equal"] and r["params_equal"], r
    if layout == "2x2x2" and router == "sigmoid":
        assert r["expert_bias_moved"]  # the router's bias is part of what must round-trip


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("layout", ["x".join(map(str, lay)) for lay in RESUME_LAYOUTS])
def test_checkpoint_of_2x2x2_resumes_at_another_layout(results, router, layout):
    r = results[f"{router}-{layout}"]
    assert r["loss_rel_err"] <= TOL and r["param_rel_err"] <= TOL, r
