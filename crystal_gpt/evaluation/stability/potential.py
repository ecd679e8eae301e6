"""The CHGNet potential: loaded once per process, BLAS threads kept in check in workers."""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing as mp
import os
import warnings
from typing import Any

INSTALL_HINT = "pip install 'crystal-gpt[eval]'  (or: pip install chgnet)"

_MODEL: Any = None  # CHGNet, loaded once per process (forked workers inherit it)
_CALC: Any = None
_PREPARED_PID = -1


# --------------------------------------------------------------------------- the potential


def _require_chgnet() -> None:
    try:
        import chgnet  # noqa: F401
    except ImportError as err:
        raise ImportError(f"stability evaluation needs CHGNet: {INSTALL_HINT}") from err


@functools.cache
def potential_tag() -> str:
    """Name and version of the potential (part of every cache key and protocol string)."""
    _require_chgnet()
    from importlib.metadata import version

    return f"CHGNet {version('chgnet')}"


def _prepare_worker() -> None:
    """One torch and one BLAS thread per worker process: N workers on N cores beat N x N
    threads (see _single_threaded)."""
    global _PREPARED_PID
    if os.getpid() != _PREPARED_PID and mp.parent_process() is not None:
        import torch

        torch.set_num_threads(1)
        _limit_blas_threads()  # for the life of the worker
    _PREPARED_PID = os.getpid()  # per process: a forked child inherits the parent's value


def _limit_blas_threads() -> Any:
    """Cap OpenBLAS/OpenMP pools at one thread; returns the limiter (None without threadpoolctl).

    ASE's cell filter calls scipy's expm/logm on 3x3 matrices at every step: with two BLAS
    threads on a busy 2-core machine each call spin-waits for milliseconds, and a 4-atom
    relaxation step took 0.3-1 s instead of 0.07 s."""
    import scipy.linalg  # noqa: F401  (OpenBLAS must be loaded for its pool to be capped)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(1)


@contextlib.contextmanager
def _single_threaded() -> Any:
    """Run with one torch thread and one BLAS thread, then restore the caller's settings.

    CHGNet graphs of small cells gain little from intra-op threads, and oversubscribed cores
    make threaded calls collapse (measured under load: 7.7 s instead of 0.07 s per CHGNet call
    with two torch threads). Parallelism comes from ``workers`` instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    limiter = _limit_blas_threads()
    try:
        yield
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        torch.set_num_threads(before)


def load_potential() -> Any:
    """The pretrained CHGNet (weights ship in the wheel: works offline), loaded once."""
    global _MODEL
    if _MODEL is None:
        _require_chgnet()
        from chgnet.model import CHGNet

        # workers are forked: CUDA cannot follow them, so they use the CPU
        device = "cpu" if mp.parent_process() is not None else None
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = CHGNet.load(verbose=False, use_device=device)
        # an atom with no neighbour within the cutoff is not a crystal: fail loudly, not silently
        model.graph_converter.set_isolated_atom_response("error")
        _MODEL = model
    return _MODEL


def _calculator() -> Any:
    global _CALC
    if _CALC is None:
        from chgnet.model.dynamics import CHGNetCalculator

        model = load_potential()
        device = str(next(model.parameters()).device)
        with contextlib.redirect_stdout(io.StringIO()):
            _CALC = CHGNetCalculator(model=model, use_device=device, on_isolated_atoms="error")
    return _CALC
