"""Small helpers every stage uses: atomic file writes, number formatting, a process pool."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends
    without an error (os.replace is atomic), so a killed run never leaves a half-written file.
    ``suffix`` is kept at the end of the temporary name for writers that add one (np.savez)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_output_folder(out_dir: str | os.PathLike, stale: Iterable[str] = ()) -> Path:
    """Check before any work that ``out_dir`` is (or can become) a writable folder, and remove
    the files matching the ``stale`` patterns that an earlier run left there, so the folder
    ends up holding only this run's outputs; the errors name the path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    for pattern in stale:
        for old in out.glob(pattern):
            if old.is_file():
                old.unlink()
    return out


def fmt(x, digits: int | str = 2, missing: str = "-") -> str:
    """A value for a table or log: floats with ``digits`` decimals (or a format spec such as
    ".6g"), None and NaN as ``missing``, booleans as yes/no, anything else as ``str``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, digits if isinstance(digits, str) else f".{digits}f")
    return str(x)


def rate(count: float, seconds: float, unit: str = "/s") -> str:
    """A speed for a message: whole numbers from 10 up, two significant digits below (never
    "0/s" for a slow run)."""
    r = count / seconds if seconds > 0 else math.inf
    return f"{r:.0f}{unit}" if r >= 10 or not math.isfinite(r) else f"{r:.2g}{unit}"


def _start_method() -> str:
    """fork where the OS has it (no ``if __name__ == "__main__"`` guard needed in user
    scripts, workers share the imported modules), else spawn."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def process_pool(workers: int):
    """A worker pool that plain user scripts can use (see :func:`_start_method`)."""
    return mp.get_context(_start_method()).Pool(workers)


_EXECUTOR: dict[str, Any] = {"kind": "process", "address": None}
EXECUTORS = ("process", "ray")


@contextmanager
def use_executor(kind: str = "process", address: str | None = None) -> Iterator[None]:
    """Where the heavy stages' jobs run inside the block: ``process`` (this machine's worker
    processes) or ``ray`` (a local Ray started on demand, or the cluster at ``address``, e.g.
    ``ray://head:10001`` or ``auto``). :func:`parallel_map` and :func:`supervised_map` follow
    it, so every stage built on them (relaxations, fingerprints, CSP matching, dataset
    encoding) runs on either with the same results, time limits and failure records; so do
    parquet sample shards (``sampling.shards``)."""
    if kind not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if address is not None and kind != "ray":
        raise ValueError("--ray-address needs --executor ray")
    before = dict(_EXECUTOR)
    _EXECUTOR.update(kind=kind, address=address)
    try:
        yield
    finally:
        _EXECUTOR.update(before)


def executor_kind() -> str:
    return str(_EXECUTOR["kind"])


def parallel_map(
    fn: Callable, jobs: Iterable, workers: int | None, total: int | None, desc: str, progress: bool
) -> list:
    """``[fn(job) for job in jobs]`` over worker processes (in order), with a progress bar:
    tqdm's ``process_map`` in the start method of :func:`process_pool`, one job per task (with
    larger chunks its bar counts chunks, not jobs)."""
    from tqdm.contrib.concurrent import process_map

    workers = workers or os.cpu_count() or 1
    bar = dict(total=total, desc=desc, unit="crystal", disable=not progress, file=sys.stderr)
    if executor_kind() == "ray":
        jobs = list(jobs)
        results: list = [None] * len(jobs)
        with tqdm(**{**bar, "total": len(jobs)}) as pbar:
            for i, out in ray_map(fn, jobs, workers):
                if isinstance(out, JobFailure):
                    raise RuntimeError(f"{desc}: job {i} failed on Ray: {out.reason}")
                results[i] = out
                pbar.update()
        return results
    if workers > 1:
        context = mp.get_context(_start_method())
        return process_map(fn, jobs, max_workers=workers, mp_context=context, **bar)
    return [fn(job) for job in tqdm(jobs, **bar)]


@dataclass
class JobFailure:
    """A job of :func:`supervised_map` that gave no result, and why (its worker died, it ran
    past the time limit, or it raised)."""

    reason: str


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so that the workers a killed
    worker had started itself (an evaluation inside a job) do not live on as orphans."""
    if sys.platform.startswith("linux"):
        import ctypes

        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _one_torch_thread() -> None:
    """One torch thread per worker: the workers are the parallelism, and an OpenMP pool that
    a parent had started does not survive a fork (its first parallel region would hang)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _run_job(fn: Callable, job: Any) -> tuple[bool, Any]:
    """(True, fn(job)), or (False, the error as text): what a worker sends back."""
    try:
        return True, fn(job)
    except Exception as err:
        return False, f"{type(err).__name__}: {err}"[:500]


def _serve(conn, fn: Callable, fresh: bool = False) -> None:
    """Worker loop: one job at a time from the pipe, its result (or error) back. ``fresh``:
    a spawned worker, whose torch (imported now) would otherwise take every core."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if fresh:
        import torch  # noqa: F401 - for _one_torch_thread
    _one_torch_thread()
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        conn.send(_run_job(fn, item))


def supervised_map(
    fn: Callable,
    jobs: Iterable,
    workers: int,
    time_limit: float | None = None,
    start_method: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(index, fn(job))`` as jobs finish, from watched worker processes, one job each at a time.

    A worker that dies (killed, out of memory, a crash in C code) or spends more than
    ``time_limit`` seconds on a job is replaced, and that job alone yields a :class:`JobFailure`
    (so does a job that raises); the others go on. ``multiprocessing.Pool`` would instead wait
    forever for the lost job and has no per-job limit. ``start_method``: 'spawn' for workers
    that must start fresh (CUDA), else fork where the OS has it.
    """
    if executor_kind() == "ray":
        yield from ray_map(fn, jobs, workers, time_limit)
        return
    method = start_method or _start_method()
    ctx = mp.get_context(method)
    pending = deque(enumerate(jobs))
    slots: dict = {}  # pipe -> [process, (index, start time) or None]

    def start() -> None:
        parent, child = ctx.Pipe()
        # not daemonic: jobs may fork
        proc = ctx.Process(target=_serve, args=(child, fn, method != "fork"))
        proc.start()
        child.close()
        slots[parent] = [proc, None]

    def retire(conn) -> None:
        proc = slots.pop(conn)[0]
        proc.kill()
        proc.join()
        conn.close()

    for _ in range(max(1, min(workers, len(pending)))):
        start()
    try:
        while True:
            for conn, slot in slots.items():
                if slot[1] is None and pending:
                    i, job = pending.popleft()
                    slot[1] = (i, time.monotonic())
                    with suppress(OSError):  # a dead worker shows up below, with this job
                        conn.send(job)
            busy = {conn: slot for conn, slot in slots.items() if slot[1] is not None}
            if not busy:
                return
            timeout = None
            if time_limit is not None:
                first = min(slot[1][1] for slot in busy.values())
                timeout = max(0.0, first + time_limit - time.monotonic())
            ready = set(wait([*busy, *(slot[0].sentinel for slot in busy.values())], timeout))
            now = time.monotonic()
            for conn, (proc, (i, t0)) in busy.items():
                failure = None
                if conn in ready:
                    try:
                        ok, result = conn.recv()
                    except (EOFError, OSError):
                        proc.join()
                        failure = f"worker died (exit code {proc.exitcode})"
                    else:
                        slots[conn][1] = None
                        yield i, result if ok else JobFailure(result)
                        continue
                elif proc.sentinel in ready:
                    proc.join()
                    failure = f"worker died (exit code {proc.exitcode})"
                elif time_limit is not None and now - t0 >= time_limit:
                    failure = f"time limit of {time_limit:g} s exceeded"
                else:
                    continue
                retire(conn)
                start()
                yield i, JobFailure(failure)
    finally:
        for conn in list(slots):
            with suppress(OSError):
                conn.send(None)
        for conn, (proc, _) in list(slots.items()):
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install 'ray>=2.9'") from None
    return ray


def _ray_session(workers: int):
    """The Ray this process talks to: the one already initialised, the cluster at the
    executor's address, or a local one started now with ``workers`` CPUs (it lives until this
    process ends, so later stages reuse it)."""
    ray = _ray()
    if not ray.is_initialized():
        address = _EXECUTOR["address"]
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:  # a new one even where `ray start` left a cluster running
            address, kwargs["num_cpus"] = "local", max(1, workers)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = "a local Ray" if address == "local" else address
            raise ValueError(f"cannot start or reach {where}: {str(err).splitlines()[0]}") from None
    return ray


def _ray_task(fn: Callable, job: Any) -> tuple[bool, Any]:
    """One job on a Ray worker (one core per task, as Ray schedules it), as :func:`_serve`."""
    _one_torch_thread()
    return _run_job(fn, job)


def ray_map(
    fn: Callable, jobs: Iterable, workers: int, time_limit: float | None = None
) -> Iterator[tuple[int, Any]]:
    """:func:`supervised_map` on Ray: ``(index, result or JobFailure)`` as jobs finish. Only as
    many tasks are in flight as the cluster has CPUs, so a task starts when it is submitted
    and its time limit counts its run; a task past the limit is cancelled (its worker killed),
    a task whose worker died fails alone, neither is retried."""
    pending = deque(enumerate(jobs))
    if not pending:
        return  # no Ray started for nothing
    ray = _ray_session(workers)
    task = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
    capacity = max(1, int(ray.cluster_resources().get("CPU", workers)))
    running: dict = {}  # object ref -> (index, submit time)
    try:
        while pending or running:
            while pending and len(running) < capacity:
                i, job = pending.popleft()
                running[task.remote(fn, job)] = (i, time.monotonic())
            timeout = None
            if time_limit is not None:
                first = min(t0 for _, t0 in running.values())
                timeout = max(0.0, first + time_limit - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
            for ref in ready:
                i, _ = running.pop(ref)
                try:
                    ok, result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    # the last line names the cause (a traceback's error, a dead worker)
                    lines = [line for line in str(err).splitlines() if line.strip()] or ["?"]
                    yield i, JobFailure(f"Ray task failed: {lines[-1].strip()[:300]}")
                    continue
                yield i, result if ok else JobFailure(result)
            if time_limit is not None:
                now = time.monotonic()
                for ref, (i, t0) in list(running.items()):
                    if now - t0 >= time_limit:
                        ray.cancel(ref, force=True)
                        del running[ref]
                        yield i, JobFailure(f"time limit of {time_limit:g} s exceeded")
    finally:
        for ref in running:
            with suppress(Exception):
                ray.cancel(ref, force=True)


def shard_seed(seed: int, shard: int) -> int:
    """The seed of part ``shard`` of a run seeded ``seed`` (independent streams per part: parquet
    shards, sample chunks, CSP chunks)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(shard)]).generate_state(1)[0])
