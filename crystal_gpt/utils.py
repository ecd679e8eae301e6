"""Small helpers every stage uses: atomic file writes, number formatting, a process pool."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

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


def process_pool(workers: int):
    """A worker pool that plain user scripts can use: fork where the OS has it (no
    ``if __name__ == "__main__"`` guard needed, workers share the imported modules), else spawn.
    (Why not ``tqdm.contrib.concurrent.process_map``: its executor takes the interpreter's
    default start method, which needs that guard where it is not fork.)"""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(workers)


def parallel_map(
    fn: Callable,
    jobs: Iterable,
    workers: int | None,
    total: int | None,
    desc: str,
    progress: bool,
    chunksize: int = 32,
) -> list:
    """``[fn(job) for job in jobs]`` over worker processes (in order), with a progress bar."""
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=total, desc=desc, unit="crystal", disable=not progress, file=sys.stderr)
    results = []
    if workers > 1:
        with process_pool(workers) as pool:
            for res in pool.imap(fn, jobs, chunksize=chunksize):
                results.append(res)
                bar.update()
    else:
        for job in jobs:
            results.append(fn(job))
            bar.update()
    bar.close()
    return results
