"""How `moemesh train` runs: in this process (dp*ep*tp == 1), as a local mesh of processes that it
starts itself through torch.distributed's elastic launcher (as torchrun does), or as one rank of a
world that torchrun (one or many nodes) started.

Every check of user input runs before any process group exists. Workers end with a barrier, destroy
the process group and leave without interpreter teardown: gloo can abort at exit otherwise (ENV_NOTES).

Faults (README "Failures and signals"): each rank of a local launch writes what happened to it into a
private launch dir (removed afterwards, with torch's own error and log files); the launcher reads those
records and prints ONE line: who failed first and how, and the latest checkpoint. Tracebacks of failed
ranks go to `run_dir/logs/rank{N}.txt`, on stderr too only with `run.debug=true`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from moemesh.config import Config, ParallelConfig, config_from_dict
from moemesh.errors import UserError, report
from moemesh.parallel.comm import Board, CollectiveMismatch, FileBoard, StoreBoard
from moemesh.parallel.mesh import Mesh
from moemesh.train.ckpt_paths import latest_checkpoint
from moemesh.train.data import TokenSource
from moemesh.train.loop import NonFiniteLoss, preflight, resolve_device, train
from moemesh.plan.memory import check_memory, ranks_on_this_host
from moemesh.train.resume import choose_checkpoint, continues_run_dir, restarting
from moemesh.train.stop import Stopped, Stopper, checkpoint_clause, handling_signals, stop_message
from moemesh.train.rundir import prepare_run_dir


WATCHDOG_MARGIN_S = 30
LAUNCH_DIR_ENV = "MOEMESH_LAUNCH_DIR"  # set by launch_local for its workers: where they leave records
LAUNCHER_PID_ENV = "MOEMESH_LAUNCHER_PID"
# After a rank of a local launch has ended, ranks still alive this much later are killed: torch's own
# grace is 30 s, and a rank frozen (SIGSTOP, a GIL-holding call) ignores its SIGTERM. Healthy ranks end
# sooner: a watchdog report ends every rank within ~1 s, a lost peer within one launcher poll.
STOP_GRACE_S = 3.0
# A rank whose collective failed because a peer is gone waits this long for its launcher to stop it,
# so that the launcher's first observed failure is the rank that really failed, not a survivor.
PEER_WAIT_S = 10.0
# How a peer that died shows in the survivors' collectives and store calls (gloo, the c10d store, NCCL).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "failed to recv", "remote process exited", "NCCL communicator was aborted")
_TORCH_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def train_command(cfg: Config) -> int:
    """Run `moemesh train`; the process exit code: 0, 1 (a rank failed), 3 (hang or collective-order
    mismatch, reported by a rank), 128 + signum (stopped by SIGINT / SIGTERM)."""
    if under_torchrun() and restarting():  # torchrun restarted the group: continue, never start afresh
        cfg.train.resume, cfg.run.overwrite = "auto", False
    source = preflight(cfg)
    check_memory(cfg, resolve_device(cfg).type, ranks_on_this_host(cfg))
    resume_from = choose_checkpoint(cfg)
    resume = str(resume_from) if resume_from is not None else None
    world = cfg.parallel.world_size
    if under_torchrun():
        given = int(os.environ["WORLD_SIZE"])
        if given != world:
            raise UserError(f"torchrun started {given} processes but parallel.dp*ep*tp = "
                            f"{cfg.parallel.dp}*{cfg.parallel.ep}*{cfg.parallel.tp} = {world}")
        if int(os.environ["RANK"]) != 0:
            return _worker(cfg.to_dict(), cfg.run.dir, resume, True, source)
        # A restart keeps what the failed attempt wrote (its metrics, whether or not a checkpoint exists).
        run_dir, lock = prepare_run_dir(cfg, resuming=continues_run_dir(cfg, resume_from) or restarting())
        with lock:  # held until this rank exits: _worker ends the process
            return _worker(cfg.to_dict(), str(run_dir), resume, True, source)
    device = resolve_device(cfg)
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise UserError(f"parallel.dp*ep*tp={world} processes need {world} GPUs; {torch.cuda.device_count()} visible")
    # This process holds the run dir's lock for the whole run. Forked workers inherit its descriptor and
    # so share the lock (they never take it themselves); it ends when the last of them exits.
    run_dir, lock = prepare_run_dir(cfg, resuming=continues_run_dir(cfg, resume_from))
    with lock:
        code = _run_local(cfg, source, run_dir, resume_from, world, device)
        if code == 0:  # the ranks have ended: no process group in this process
            from moemesh.plan.draw import save_run_drawing

            save_run_drawing(cfg, run_dir)
        return code


def _run_local(cfg: Config, source: TokenSource, run_dir: Path, resume_from: Path | None, world: int,
               device: torch.device) -> int:
    resume = str(resume_from) if resume_from is not None else None
    if world == 1:
        return _train_single(cfg, source, run_dir, resume_from)
    # Stopped ranks get a step, a checkpoint and a margin; a hung one is ended by its watchdog before.
    failure = launch_local(_worker, (cfg.to_dict(), str(run_dir), resume, False), world, fork=device.type == "cpu",
                           run_dir=run_dir, max_restarts=cfg.run.max_restarts, debug=cfg.run.debug,
                           stop_timeout_s=cfg.parallel.timeout_s + WATCHDOG_MARGIN_S)
    if failure is None:
        return 0
    if failure.message:
        report(failure.message)
    return failure.exit_code


def _train_single(cfg: Config, source: TokenSource, run_dir: Path, resume_from: Path | None) -> int:
    with handling_signals(announce=True):
        try:
            train(cfg, None, source, run_dir, resume_from)
        except NonFiniteLoss as exc:
            report(f"error: {exc}")
            return 1
        except Stopped as exc:
            report(stop_message(exc.signum, exc.step, run_dir))
            return exc.exit_code
    return 0


# --- the launcher side --------------------------------------------------------------------------------

@dataclass
class LaunchFailure:
    exit_code: int  # for the moemesh process: 1, 3 or 128 + signum
    message: str | None  # the one line for the user; None when a rank has already said it
    ranks: list[int]  # the rank(s) the launcher saw fail first

    def __str__(self) -> str:
        return self.message or f"rank(s) {self.ranks} failed with exit code {self.exit_code}; see above"


def launch_local(fn: Callable[..., Any], args: tuple, nprocs: int, fork: bool = True, *,
                 run_dir: Path | None = None, max_restarts: int = 0, debug: bool = False,
                 stop_timeout_s: int | None = None) -> LaunchFailure | None:
    """Run fn(*args) in `nprocs` local ranks through the elastic launcher; None, or what failed.
    `run_dir` is where checkpoints are looked up for the message; `stop_timeout_s`, how long ranks may
    take to stop after SIGINT/SIGTERM before they are killed (torch >= 2.12; 30 s before)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_dir = Path(tempfile.mkdtemp(prefix="moemesh-launch-"))
    optional = {}
    if stop_timeout_s is not None and "shutdown_timeout" in LaunchConfig.__dataclass_fields__:
        optional["shutdown_timeout"] = max(stop_timeout_s, int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 0)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                          max_restarts=max_restarts, monitor_interval=0.1,
                          start_method="fork" if fork else "spawn", local_addr="127.0.0.1",
                          logs_specs=DefaultLogsSpecs(log_dir=str(launch_dir / "elastic")), **optional)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    reaper = _Reaper(launch_dir)
    try:
        with _launch_environment(launch_dir, debug):
            reaper.start()
            try:
                elastic_launch(config, _with_threads)(fn, threads, *args)
                return None
            except ChildFailedError as exc:
                return _describe_failure(exc.failures, launch_dir, run_dir)
            except SignalException as exc:
                # The agent forwarded the signal and waited for the ranks; a second signal cuts that short.
                reaper.kill_all()
                return _describe_stop(exc.sigval, launch_dir, run_dir)
            finally:
                reaper.stop()
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)


@contextlib.contextmanager
def _launch_environment(launch_dir: Path, debug: bool) -> Iterator[None]:
    """Everything launch_local changes in this process for the launch, restored afterwards."""
    env = {LAUNCH_DIR_ENV: str(launch_dir), LAUNCHER_PID_ENV: str(os.getpid()),
           # Forking is only safe while no other thread of this process holds a lock. By default the workers
           # join the agent's own TCPStore, whose server thread here does a reverse DNS lookup (getnameinfo)
           # for each new connection, holding glibc's resolver lock, while this thread forks the next worker:
           # that worker then hangs forever in its first lookup. With this, worker 0 hosts the workers' store.
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    saved_env = {key: os.environ.get(key) for key in env}
    # torch.multiprocessing writes one pytorch-errorfile-*.pickle per rank into tempfile's dir and never
    # removes it: keep them in the launch dir, which is removed.
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(launch_dir)
    # The agent replaces these handlers (to raise SignalException) and never restores them.
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    # The agent logs every shutdown step and failure with a traceback; the launcher's one line replaces that.
    loggers = [logging.getLogger(name) for name in _TORCH_LOGGERS] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(_TORCH_LOGGERS)]
    saved_levels = [(logger, logger.level) for logger in loggers]
    os.environ.update(env)
    if not debug:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in saved_levels:
            logger.setLevel(level)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        tempfile.tempdir = saved_tempdir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Reaper:
    """Kills the ranks of the current attempt that are still alive STOP_GRACE_S after one of them ended
    without success; torch would wait 30 s for them. Ranks name themselves in the launch dir."""

    def __init__(self, launch_dir: Path):
        self.launch_dir = launch_dir
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="moemesh-reaper")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        armed: dict[Path, float] = {}
        while not self._done.wait(0.2):
            attempts = sorted(self.launch_dir.glob("attempt*"), key=lambda p: int(p.name[len("attempt"):]))
            if not attempts:
                continue
            current = attempts[-1]
            pids = _pids(current)
            records = _read_records(current)
            ended = [rank for rank, pid in pids.items() if not _alive_child(pid) and
                     records.get(rank, {}).get("kind") != "done"]
            if ended and current not in armed:
                armed[current] = time.monotonic()
            if current in armed and time.monotonic() - armed[current] > STOP_GRACE_S:
                _kill(pids.values())

    def kill_all(self) -> None:
        """Kill every rank still alive, of every attempt."""
        _kill(pid for attempt in self.launch_dir.glob("attempt*") for pid in _pids(attempt).values())


def _pids(attempt_dir: Path) -> dict[int, int]:
    pids = {}
    for path in attempt_dir.glob("rank*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids[int(path.stem[len("rank"):])] = int(path.read_text())
    return pids


def _alive_child(pid: int) -> bool:
    """pid is a running (not zombie) child of this process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[1]) == os.getpid()


def _kill(pids) -> None:
    for pid in pids:
        if _alive_child(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _read_records(attempt_dir: Path) -> dict[int, dict[str, Any]]:
    records = {}
    for path in attempt_dir.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            records[int(path.stem[len("rank"):])] = json.loads(path.read_text())
    return records


def _last_attempt(launch_dir: Path) -> Path:
    attempts = sorted(launch_dir.glob("attempt*"), key=lambda p: int(p.name[len("attempt"):]))
    return attempts[-1] if attempts else launch_dir / "attempt0"


def _describe_failure(failures: dict, launch_dir: Path, run_dir: Path | None) -> LaunchFailure:
    """The launcher's line for the rank the agent saw end first (survivors of a lost peer wait for the
    launcher, so that this is the rank that failed, not one that lost it)."""
    rank, failure = min(failures.items())
    code = failure.exitcode
    records = _read_records(_last_attempt(launch_dir))
    record = records.get(rank, {})
    kind = record.get("kind")
    steps = [r["step"] for r in records.values() if r.get("step")]
    during = f" during step {max(steps)}" if steps else ""
    clause = checkpoint_clause(run_dir)
    if code == 3 or kind == "mismatch":  # the watchdog or the order check: a rank has said where
        return LaunchFailure(3, None, [rank])
    if kind == "user":  # rank 0 has printed the one-line error
        return LaunchFailure(2, None, [rank])
    if kind == "diverged":  # rank 0 has printed the step and the last good checkpoint
        return LaunchFailure(1, None, [rank])
    if kind == "stopped":  # the signal reached the ranks but not this process
        return LaunchFailure(128 + record["signum"], stop_message(record["signum"], record["step"], run_dir), [rank])
    if kind == "error":
        return LaunchFailure(1, f"rank {rank} failed{during}: {record['summary']} (traceback: {record['log']}); "
                                f"{clause}", [rank])
    how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
    if kind == "peer":  # the agent saw a survivor first after all: name the ranks that left no record
        silent = sorted(set(_pids(_last_attempt(launch_dir))) - set(records)) or [rank]
        return LaunchFailure(1, f"rank(s) {silent} ended without a report{during}; {clause}", silent)
    return LaunchFailure(1, f"rank {rank} {how}{during}; {clause}", [rank])


def _describe_stop(signum: int, launch_dir: Path, run_dir: Path | None) -> LaunchFailure:
    records = _read_records(_last_attempt(launch_dir))
    steps = {r["step"] for r in records.values() if r.get("kind") == "stopped"}
    if len(steps) == 1 and len(records) == len(_pids(_last_attempt(launch_dir))):  # all stopped, as agreed
        return LaunchFailure(128 + signum, stop_message(signum, steps.pop(), run_dir), sorted(records))
    # A second signal, or ranks that did not stop in time: ended at once, mid-step
    message = f"interrupted by {signal.Signals(signum).name} before the ranks finished the step; " \
              f"{checkpoint_clause(run_dir)}"
    return LaunchFailure(128 + signum, message, sorted(records))


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


# --- the worker side ----------------------------------------------------------------------------------

def init_mesh(parallel: ParallelConfig, device_type: str) -> Mesh:
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # The process group's own timeout is a backstop, later than the watchdog's (which polls each second):
    # at the same value gloo could raise first (1 run in 3 here) a bare "Timed out waiting 300000ms for
    # recv" that names no step, layer, collective or group.
    dist.init_process_group(backend, timeout=timedelta(seconds=parallel.timeout_s + WATCHDOG_MARGIN_S))
    mesh = Mesh(parallel.dp, parallel.ep, parallel.tp, device_type, parallel.check_collectives, parallel.timeout_s)
    mesh.trace.start_watchdog(mesh.rank, _watchdog_board())
    return mesh


def _attempt_dir() -> Path | None:
    """This attempt's part of the launch dir of a local launch (None under torchrun): records, positions."""
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if launch_dir is None:
        return None
    path = Path(launch_dir) / f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _watchdog_board() -> Board | None:
    """Where the watchdogs post positions: files under a local launch; under torchrun its agent's store,
    which outlives the workers (not when the workers host their own: then no peers are named)."""
    attempt_dir = _attempt_dir()
    if attempt_dir is not None:
        return FileBoard(attempt_dir)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        with contextlib.suppress(Exception):
            return StoreBoard(dist.distributed_c10d._get_default_store())  # private API, torch 2.x
    return None


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
        # A CUDA graph that captured NCCL collectives and still lives (a trainer left in a reference cycle)
        # would hang the communicators' teardown (train/cuda_graph.py:CapturedStep.close): collect it first.
        gc.collect()
        dist.destroy_process_group()
    if exit_process or code != 0:
        os._exit(code)
    return code


def _worker(cfg_dict: dict[str, Any], run_dir: str, resume_from: str | None, exit_process: bool,
            source: TokenSource | None = None) -> int:
    # Signal handlers first: until then a SIGINT or SIGTERM would end this rank with a traceback.
    with handling_signals() as stopper:
        resume = Path(resume_from) if resume_from else None
        return finish(_run_rank(config_from_dict(cfg_dict), Path(run_dir), resume, source, stopper), exit_process)


def _run_rank(cfg: Config, run_dir: Path, resume_from: Path | None, source: TokenSource | None,
              stopper: Stopper) -> int:
    rank = int(os.environ.get("RANK", "0"))
    notes = _RankNotes(rank, run_dir, cfg.run.debug)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    mesh = None
    try:
        if restart > 0:  # restarted after a failure: continue from the last complete checkpoint, never afresh
            cfg.train.resume, cfg.run.overwrite = "auto", False
            resume_from = choose_checkpoint(cfg)
        # Data before the process group: a slow file scan must not count against a peer's collective.
        source = source or preflight(cfg, check_ids=False)
        mesh = init_mesh(cfg.parallel, resolve_device(cfg).type)
        if restart > 0 and rank == 0:
            report(_restart_line(restart, run_dir))
        train(cfg, mesh, source, run_dir, resume_from)
    except Stopped as exc:
        notes.stopped(exc)
        return exc.exit_code
    except CollectiveMismatch as exc:
        if rank == 0:  # every rank sees the same mismatch
            report(f"error: {exc}")
        notes.write("mismatch", step=mesh.trace.step)
        return 3
    except UserError as exc:  # a config checked again on a rank of torchrun, a checkpoint that cannot be written
        if rank == 0:
            report(f"error: {exc}")
        notes.write("user")
        return 2
    except NonFiniteLoss as exc:  # every rank took the same decision on the same global values
        if rank == 0:
            report(f"error: {exc}")
        notes.write("diverged")
        return 1
    except Exception as exc:
        step = mesh.trace.step if mesh is not None else None
        if _lost_peer(exc):
            notes.lost_peer(exc, step)
            _wait_to_be_stopped(stopper)
        else:
            notes.error(exc, step)
        return 1
    notes.write("done")
    return 0


class _RankNotes:
    """What this rank leaves for its launcher (a local launch) or says itself (torchrun)."""

    def __init__(self, rank: int, run_dir: Path, debug: bool):
        self.rank, self.run_dir, self.debug = rank, run_dir, debug
        self.dir = _attempt_dir()
        if self.dir is not None:
            _die_with_launcher()
            (self.dir / f"rank{rank}.pid").write_text(str(os.getpid()))

    def write(self, kind: str, **fields: Any) -> None:
        if self.dir is not None:
            path = self.dir / f"rank{self.rank}.json"
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps({"kind": kind, "time": time.time(), **fields}))
            partial.rename(path)  # the reaper and the launcher never read half a record

    def stopped(self, exc: Stopped) -> None:
        self.write("stopped", signum=exc.signum, step=exc.step)
        if self.dir is None and self.rank == 0:  # under torchrun nobody else says it
            report(stop_message(exc.signum, exc.step, self.run_dir))

    def lost_peer(self, exc: BaseException, step: int | None) -> None:
        self.write("peer", step=step, summary=_summary(exc))
        if self.debug:
            traceback.print_exc()

    def error(self, exc: BaseException, step: int | None) -> None:
        """A programmer error: the traceback to run_dir/logs/rank{N}.txt (and stderr with run.debug)."""
        text = traceback.format_exc()
        log = self.run_dir / "logs" / f"rank{self.rank}.txt"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(text, encoding="utf-8")
        except OSError:
            self.debug = True  # nowhere to keep it: show it
        self.write("error", step=step, summary=_summary(exc), log=str(log))
        if self.debug:
            sys.stderr.write(text)
        if self.dir is None:
            report(f"error: rank {self.rank} failed: {_summary(exc)} (traceback: {log})")


def _summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _lost_peer(exc: BaseException | None) -> bool:
    """The exception (or one it came from) is a collective or store call failing because a peer is gone."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, getattr(dist, "DistNetworkError", ())) or any(s in str(exc) for s in _PEER_LOST):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _wait_to_be_stopped(stopper: Stopper) -> None:
    """Wait (bounded) until the launcher stops this rank: it must see the rank that failed end first.
    A signal already received is that stop (or the user's): no wait then."""
    deadline = time.monotonic() + PEER_WAIT_S
    while not stopper.received and time.monotonic() < deadline:
        time.sleep(0.05)


def _die_with_launcher() -> None:
    """A killed launcher takes its ranks with it (Linux); they would otherwise train on unseen."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if str(os.getppid()) != os.environ.get(LAUNCHER_PID_ENV):  # it died before prctl took effect
            os._exit(1)


def _restart_line(restart: int, run_dir: Path) -> str:
    """Rank 0's line when the launcher restarted the group: what failed, where training continues."""
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    what = "a rank failed"
    if launch_dir is not None:
        previous = Path(launch_dir) / f"attempt{restart - 1}"
        records = _read_records(previous)
        errors = [f"rank {r} failed ({rec['summary']})" for r, rec in sorted(records.items()) if rec["kind"] == "error"]
        silent = sorted(set(_pids(previous)) - set(records))
        what = errors[0] if errors else (f"rank {silent[0]} died" if silent else what)
    found = latest_checkpoint(run_dir)
    where = f"resuming from {found.name}" if found is not None else "starting over (no checkpoint)"
    limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
    return f"{what}; restart {restart} of {limit}, {where}"
