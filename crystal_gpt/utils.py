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


def parallel_map(
    fn: Callable, jobs: Iterable, workers: int | None, total: int | None, desc: str, progress: bool
) -> list:
    """``[fn(job) for job in jobs]`` over worker processes (in order), with a progress bar:
    tqdm's ``process_map`` in the start method of :func:`process_pool`, one job per task (with
    larger chunks its bar counts chunks, not jobs)."""
    from tqdm.contrib.concurrent import process_map

    workers = workers or os.cpu_count() or 1
    bar = dict(total=total, desc=desc, unit="crystal", disable=not progress, file=sys.stderr)
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


def _serve(conn, fn: Callable) -> None:
    """Worker loop: one job at a time from the pipe, its result (or error) back."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if "torch" in sys.modules:
        # one thread per worker: the workers are the parallelism, and an OpenMP pool that the
        # parent had started does not survive a fork (its first parallel region would hang)
        sys.modules["torch"].set_num_threads(1)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        try:
            conn.send((True, fn(item)))
        except Exception as err:
            conn.send((False, f"{type(err).__name__}: {err}"[:500]))


def supervised_map(
    fn: Callable, jobs: Iterable, workers: int, time_limit: float | None = None
) -> Iterator[tuple[int, Any]]:
    """``(index, fn(job))`` as jobs finish, from watched worker processes, one job each at a time.

    A worker that dies (killed, out of memory, a crash in C code) or spends more than
    ``time_limit`` seconds on a job is replaced, and that job alone yields a :class:`JobFailure`
    (so does a job that raises); the others go on. ``multiprocessing.Pool`` would instead wait
    forever for the lost job and has no per-job limit.
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending = deque(enumerate(jobs))
    slots: dict = {}  # pipe -> [process, (index, start time) or None]

    def start() -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, fn))  # not daemonic: jobs may fork
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
