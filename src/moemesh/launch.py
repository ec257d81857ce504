"""How `moemesh train` runs: in this process (dp*ep*tp == 1), as a local mesh of processes that it
starts itself through torch.distributed's elastic launcher (as torchrun does), or as one rank of a
world that torchrun (one or many nodes) started.

Every check of user input runs before any process group exists. Workers end with a barrier, destroy
the process group and leave without interpreter teardown: gloo can abort at exit otherwise (ENV_NOTES).
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from moemesh.config import Config, ParallelConfig, config_from_dict
from moemesh.errors import UserError, report
from moemesh.parallel.comm import CollectiveMismatch
from moemesh.parallel.mesh import Mesh
from moemesh.train.data import TokenSource
from moemesh.train.loop import preflight, resolve_device, train
from moemesh.train.rundir import prepare_run_dir


WATCHDOG_MARGIN_S = 30


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def train_command(cfg: Config) -> int:
    source = preflight(cfg)
    world = cfg.parallel.world_size
    if under_torchrun():
        given = int(os.environ["WORLD_SIZE"])
        if given != world:
            raise UserError(f"torchrun started {given} processes but parallel.dp*ep*tp = "
                            f"{cfg.parallel.dp}*{cfg.parallel.ep}*{cfg.parallel.tp} = {world}")
        if int(os.environ["RANK"]) != 0:
            return _worker(cfg.to_dict(), cfg.run.dir, True, source)
        run_dir, lock = prepare_run_dir(cfg, resuming=False)
        with lock:  # held until this rank exits: _worker ends the process
            return _worker(cfg.to_dict(), str(run_dir), True, source)
    device = resolve_device(cfg)
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise UserError(f"parallel.dp*ep*tp={world} processes need {world} GPUs; {torch.cuda.device_count()} visible")
    # This process holds the run dir's lock for the whole run. Forked workers inherit its descriptor and
    # so share the lock (they never take it themselves); it ends when the last of them exits.
    run_dir, lock = prepare_run_dir(cfg, resuming=False)
    with lock:
        return _run_local(cfg, source, run_dir, world, device)


def _run_local(cfg: Config, source: TokenSource, run_dir: Path, world: int, device: torch.device) -> int:
    if world == 1:
        train(cfg, None, source, run_dir)
        return 0
    failed = launch_local(_worker, (cfg.to_dict(), str(run_dir), False), world, fork=device.type == "cpu")
    if failed:
        report(f"error: {failed}")
        return 1
    return 0


def launch_local(fn: Callable[..., Any], args: tuple, nprocs: int, fork: bool = True) -> str | None:
    """Run fn(*args) in `nprocs` local ranks through the elastic launcher; None, or what failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.1, start_method="fork" if fork else "spawn", local_addr="127.0.0.1")
    # Forking is only safe while no other thread of this process holds a lock. By default the workers
    # join the agent's own TCPStore, whose server thread here does a reverse DNS lookup (getnameinfo)
    # for each new connection, holding glibc's resolver lock, while this thread forks the next worker:
    # that worker then hangs forever in its first lookup. With this, worker 0 hosts the workers' store.
    saved = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        codes = elastic_launch(config, _with_threads)(fn, threads, *args)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
    except SignalException as exc:  # Ctrl-C or SIGTERM reached the agent: workers are already stopped
        raise KeyboardInterrupt from exc
    finally:
        if saved is None:
            os.environ.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
        else:
            os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = saved
    failed = {rank: code for rank, code in codes.items() if code != 0}
    if failed:
        return f"rank(s) {sorted(failed)} of {nprocs} failed (exit code {sorted(set(failed.values()))}); see above"
    return None


def _with_threads(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    """Set this rank's intra-op threads, then run fn. A forked child keeps the thread count torch read
    at import in the parent (all cores), so OMP_NUM_THREADS alone comes too late: 8 ranks x 2 threads
    on 2 cores ran a step ~10x slower."""
    torch.set_num_threads(threads)
    return fn(*args)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_mesh(parallel: ParallelConfig, device_type: str) -> Mesh:
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # The process group's own timeout is a backstop, later than the watchdog's (which polls each second):
    # at the same value gloo could raise first (1 run in 3 here) a bare "Timed out waiting 300000ms for
    # recv" that names no step, layer, collective or group.
    dist.init_process_group(backend, timeout=timedelta(seconds=parallel.timeout_s + WATCHDOG_MARGIN_S))
    mesh = Mesh(parallel.dp, parallel.ep, parallel.tp, device_type, parallel.check_collectives, parallel.timeout_s)
    mesh.trace.start_watchdog(mesh.rank)
    return mesh


def finish(code: int, exit_process: bool) -> int:
    """After success wait for every rank and destroy the process group, then leave without interpreter
    teardown (os._exit), or, under the elastic launcher, return the code to it: it waits for every
    rank's return value, and forked workers then end through os._exit (spawned ones tear down).
    A failed rank always ends at once, so that the launcher stops its peers instead of leaving them
    waiting in their next collective until the watchdog fires."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if exit_process or code != 0:
        os._exit(code)
    return code


def _worker(cfg_dict: dict[str, Any], run_dir: str, exit_process: bool, source: TokenSource | None = None) -> int:
    cfg = config_from_dict(cfg_dict)
    code = 0
    try:
        # Data before the process group: a slow file scan must not count against a peer's collective.
        source = source or preflight(cfg, check_ids=False)
        mesh = init_mesh(cfg.parallel, resolve_device(cfg).type)
        train(cfg, mesh, source, Path(run_dir))
    except CollectiveMismatch as exc:
        if dist.get_rank() == 0:  # every rank sees the same mismatch
            report(f"error: {exc}")
        code = 3
    except Exception:  # a programmer error: show where, on this rank
        import traceback

        traceback.print_exc()
        code = 1
    return finish(code, exit_process)
