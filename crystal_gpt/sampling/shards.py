"""Large sample runs as parquet shards that dataframe tools read (pandas, polars, DuckDB, Spark).

Each shard is drawn with its own seed, derived from the run's seed and the shard's number, so a
shard's crystals do not depend on the others: a run is reproducible shard by shard, and an
interrupted run resumes at the first missing shard (each shard file appears only when complete).
``_run.json`` records the settings; resuming with other settings is refused.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crystal_gpt.data.codec import WyckoffCrystal
from crystal_gpt.sampling.output import Cell, summary_row, wyckoff_cif
from crystal_gpt.utils import (
    JobFailure,
    atomic_path,
    executor_kind,
    prepare_output_folder,
    rate,
    shard_seed,
    supervised_map,
)

SHARD_NAME = "part-{:05d}.parquet"
SHARD_GLOB = "part-*.parquet"
RUN_FILE = "_run.json"  # a leading _ : parquet readers skip it when reading the folder


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("parquet output needs pyarrow: pip install pyarrow") from None
    return pa, pq


def shard_sizes(n: int, shard_size: int) -> list[int]:
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    full, rest = divmod(n, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


def crystal_records(
    crystals: list[WyckoffCrystal], loglik: dict[str, list[float]], start: int
) -> list[dict[str, Any]]:
    """One row per crystal: the summary's columns, the lattice, the exact atoms (lattice matrix,
    species, fractional coordinates: what a reader rebuilds the Structure from, since a CIF
    reader merges coinciding atoms) and the CIF text."""
    rows = []
    for k, wc in enumerate(crystals):
        cell = Cell.of(wc)
        row = summary_row(start + k, wc, cell, {key: v[k] for key, v in loglik.items()})
        del row["cif"]
        a, b, c, alpha, beta, gamma = (float(v) for v in wc.lattice_parameters)
        row.update(a=a, b=b, c=c, alpha=alpha, beta=beta, gamma=gamma)
        row["lattice_matrix"] = cell.matrix.ravel().tolist()
        row["species"] = cell.symbols
        row["frac_coords"] = cell.frac.ravel().tolist()
        row["cif"] = wyckoff_cif(wc, f"{start + k:08d}_{row['formula']}")
        rows.append(row)
    return rows


_LOADED: dict[tuple, Any] = {}  # per process: models and predictors a SampleDraw loaded


@dataclass
class SampleDraw:
    """``draw(n, seed)`` -> (crystals, log-likelihood parts) of a ``crystal-gpt sample`` run,
    as data: it pickles without the model, so processes started fresh (a model on a GPU cannot
    cross a fork) load the model themselves, once each. ``steer`` = (predictor name or path,
    target) draws by importance resampling (``sampling.steering``)."""

    model: str
    device: str
    options: dict[str, Any]
    steer: tuple[str, float] | None = None
    steer_width: float = 0.5
    oversample: int = 8

    def keep(self, model, predictor=None) -> None:
        """Use these, already loaded in this process, instead of loading them again."""
        _LOADED[("model", self.model, self.device)] = model
        if predictor is not None and self.steer is not None:
            _LOADED[("predictor", self.steer[0], self.device)] = predictor

    def loaded(self, kind: str, ref: str):
        key = (kind, ref, self.device)
        if key not in _LOADED:
            if kind == "model":
                from crystal_gpt.model.checkpoints import load_model

                _LOADED[key] = load_model(ref, self.device)
            else:
                from crystal_gpt.model.predictor import load_predictor

                _LOADED[key] = load_predictor(ref).to(self.device)
        return _LOADED[key]

    def __call__(
        self, n: int, seed: int | None, progress: bool = True, check_workers: int | None = None
    ) -> tuple[list[WyckoffCrystal], dict[str, list[float]]]:
        from crystal_gpt.sampling.sampler import sample_crystals

        model = self.loaded("model", self.model)
        if self.steer is not None:
            from crystal_gpt.sampling.steering import steer

            predictor = self.loaded("predictor", self.steer[0])
            crystals, record = steer(
                model, predictor, n, self.steer[1], width=self.steer_width,
                oversample=self.oversample, seed=seed, progress=progress,
                check_workers=check_workers, **self.options,
            )  # fmt: skip
            print(
                f"steered toward {record['property']} = {self.steer[1]:g} (width "
                f"{self.steer_width:g}): {record['pool']} drawn, effective sample size "
                f"{record['effective_sample_size']:.0f}; mean prediction "
                f"{record['pool_mean_prediction']:.3f} -> {record['kept_mean_prediction']:.3f}",
                file=sys.stderr,
            )
        else:
            crystals = sample_crystals(
                model, n, seed=seed, progress=progress, check_workers=check_workers,
                **self.options,
            )  # fmt: skip
        lp = model.crystal_log_prob(crystals, conditions=self.options.get("conditions"))
        return crystals, {k: lp[k].tolist() for k in ("total", "g", "W", "A", "X", "L")}


def draw_in_chunks(
    draw: Callable[..., tuple[list[WyckoffCrystal], dict[str, list[float]]]],
    n: int,
    seed: int,
    chunk: int,
    workers: int,
    log: Callable[[str], None] = print,
    finish: Callable[[list[WyckoffCrystal], dict[str, list[float]], int], Any] | None = None,
) -> Iterator[tuple[int, Any]]:
    """``n`` crystals drawn as chunks of ``chunk``, several at once (one worker process per
    core, one torch thread each). Chunk k is seeded by ``shard_seed(seed, k)`` like a parquet
    shard, so the crystals depend on (seed, n, chunk) and not on the number of workers.
    ``draw(count, seed, progress=, check_workers=)`` as :class:`SampleDraw`. Yields (k, chunk
    k's ``finish(crystals, loglik, index of its first crystal)``, run in the worker, e.g.
    rendering the output; by default its (crystals, loglik)) as chunks finish. A chunk whose
    worker failed is drawn once more (the same seed: the same crystals), then it is an error."""
    sizes = shard_sizes(n, chunk)
    jobs = [(size, shard_seed(seed, k), k * chunk) for k, size in enumerate(sizes)]
    job = functools.partial(_draw_chunk, draw, finish)
    t0 = time.perf_counter()
    done = 0
    todo = list(range(len(jobs)))
    for attempt in (1, 2):
        failed = []
        for i, result in supervised_map(job, [jobs[k] for k in todo], workers):
            k = todo[i]
            if isinstance(result, JobFailure):
                if attempt == 2:
                    raise ValueError(f"chunk {k + 1} of {len(jobs)} failed: {result.reason}")
                log(f"chunk {k + 1} of {len(jobs)} failed ({result.reason}); drawing it again")
                failed.append(k)
                continue
            done += jobs[k][0]
            log(f"sampled {done}/{n} ({rate(done, time.perf_counter() - t0, ' crystals/s')})")
            yield k, result
        if not failed:
            return
        todo = failed


def _draw_chunk(draw: Callable, finish: Callable | None, job: tuple[int, int, int]):
    size, seed, start = job
    crystals, loglik = draw(size, seed, progress=False, check_workers=0)
    return (crystals, loglik) if finish is None else finish(crystals, loglik, start)


def render_chunk(crystals: list[WyckoffCrystal], loglik: dict[str, list[float]], start: int):
    """A chunk's rendered sample-folder text (``finish`` for the CIF output)."""
    from crystal_gpt.sampling.output import render_samples

    return render_samples(crystals, loglik, start)


def _differing_settings(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def write_shards(
    draw: Callable[[int, int], tuple[list[WyckoffCrystal], dict[str, list[float]]]],
    n: int,
    out_dir: str | Path,
    *,
    shard_size: int,
    seed: int,
    settings: dict[str, Any],
    resume: bool = False,
    workers: int | None = None,
    record_workers: int = 0,
    start_method: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Draw ``n`` crystals into ``out_dir/part-00000.parquet`` ...; ``draw(count, seed)`` gives a
    shard's crystals and their log-likelihood parts. With ``resume``, shards already written by
    a run with the same settings are kept. Several shards are drawn at once, one per worker
    (``workers``: default all cores; 0: all in this process, e.g. for a model on a GPU, which
    cannot cross a fork) of the executor (``utils.use_executor``): ``draw`` should then keep to
    one core. With ``workers=0`` and ``record_workers`` > 0, each drawn shard's rows (structures,
    CIF text) are made and written by that many worker processes while this process draws the
    next: a GPU draws faster than one core writes. ``start_method='spawn'`` starts the
    workers fresh (``draw`` must then pickle, like :class:`SampleDraw`): several processes
    drawing on one GPU. Returns counts and times."""
    _pyarrow()  # missing: say so before any drawing
    sizes = shard_sizes(n, shard_size)
    run = {"n": n, "shard_size": shard_size, "seed": seed, **settings}
    out = Path(out_dir)
    run_file = out / RUN_FILE
    if resume and run_file.is_file():
        old = json.loads(run_file.read_text())
        differ = _differing_settings(old, run)
        if differ:
            raise ValueError(
                f"--resume: {out} holds a run with other settings ({', '.join(differ)}); "
                "use another --out or leave out --resume to start over"
            )
    else:
        prepare_output_folder(out, (SHARD_GLOB, RUN_FILE))
        with atomic_path(run_file) as tmp:
            tmp.write_text(json.dumps(run, indent=1, sort_keys=True))
    t0 = time.perf_counter()
    todo = []
    skipped = 0
    for k, size in enumerate(sizes):
        if (out / SHARD_NAME.format(k)).is_file():
            skipped += size
        else:
            todo.append((k, size, shard_seed(seed, k), k * shard_size))
    done = 0
    job = functools.partial(_shard_rows, draw)
    if workers == 0 and record_workers > 0 and len(todo) > 1:
        finished = _drawn_here_written_there(draw, todo, out, record_workers)
    elif workers != 0 and (len(sizes) > 1 or executor_kind() == "ray"):
        # a shard per worker (one core each), written here as they come back; a run of one
        # shard is drawn here, where the sampler's own check pool uses the cores. Decided by
        # the run, not by the shards left: a resumed shard is drawn as the others were (one
        # torch thread; more threads round differently)
        count = min(workers or os.cpu_count() or 1, len(todo))
        finished = supervised_map(job, todo, count, start_method=start_method)
    else:
        finished = ((i, job(item)) for i, item in enumerate(todo))
    failed = []
    for i, rows in finished:
        k, size = todo[i][:2]
        if isinstance(rows, JobFailure):
            failed.append(f"shard {k}: {rows.reason}")
            log(f"shard {k + 1}/{len(sizes)} failed: {rows.reason}")
            continue
        path = out / SHARD_NAME.format(k)
        if rows is not None:  # None: a record worker wrote it
            _write_table(rows, path)
        done += size
        dt = time.perf_counter() - t0
        log(
            f"shard {k + 1}/{len(sizes)}: {path.name} ({size} crystals); "
            f"{done + skipped}/{n} written, {rate(done, dt, ' crystals/s')}"
        )
    if failed:  # the others are written: a run with --resume draws only these again
        raise ValueError(
            f"{len(failed)} of {len(sizes)} shards failed ({'; '.join(failed[:3])}); "
            "run the same command with --resume to draw them again"
        )
    dt = time.perf_counter() - t0
    return {"shards": len(sizes), "written": done, "kept": skipped, "seconds": dt}


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    pa, pq = _pyarrow()
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")


def _write_records(
    crystals: list[WyckoffCrystal], loglik: dict[str, list[float]], start: int, path: Path
) -> None:
    _write_table(crystal_records(crystals, loglik, start), path)


def _drawn_here_written_there(
    draw: Callable, todo: list[tuple[int, int, int, int]], out: Path, workers: int
):
    """Yield (job number, None) as shards are written: drawn in this process one after the
    other, their rows made and written by ``workers`` processes meanwhile (at most two shards
    per worker wait, so memory stays bounded). A failed write is yielded as a JobFailure."""
    from crystal_gpt.utils import process_pool

    pool = process_pool(workers)
    pending: list[tuple[int, Any]] = []

    def settle(entry: tuple[int, Any]):
        i, handle = entry
        try:
            handle.get()
        except Exception as err:  # recorded; the run goes on with the others
            return i, JobFailure(f"{type(err).__name__}: {err}")
        return i, None

    try:
        for i, (k, size, seed, start) in enumerate(todo):
            crystals, loglik = draw(size, seed)
            path = out / SHARD_NAME.format(k)
            pending.append((i, pool.apply_async(_write_records, (crystals, loglik, start, path))))
            while len(pending) > 2 * workers or (pending and pending[0][1].ready()):
                yield settle(pending.pop(0))
        while pending:
            yield settle(pending.pop(0))
    finally:
        pool.close()
        pool.join()


def _shard_rows(draw: Callable, job: tuple[int, int, int, int]) -> list[dict[str, Any]]:
    """One shard's rows: ``draw(count, seed)``, then its records numbered from ``start``."""
    _, size, seed, start = job
    crystals, loglik = draw(size, seed)
    return crystal_records(crystals, loglik, start)


def read_shard_structures(path: Path) -> tuple[list[str], list]:
    """(names, Structures) of one parquet shard, rebuilt exactly from the stored atoms."""
    from pymatgen.core import Lattice, Structure

    _, pq = _pyarrow()
    cols = ["index", "formula", "lattice_matrix", "species", "frac_coords"]
    table = pq.read_table(path, columns=cols).to_pydict()
    names, structures = [], []
    for i, formula, m, species, frac in zip(*(table[c] for c in cols), strict=True):
        lattice = Lattice(np.asarray(m, dtype=float).reshape(3, 3))
        structures.append(Structure(lattice, species, np.asarray(frac).reshape(-1, 3)))
        names.append(f"{path.name}#{i}_{formula}")
    return names, structures
