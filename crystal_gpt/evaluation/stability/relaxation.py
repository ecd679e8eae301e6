"""CHGNet relaxations (FIRE + cell filter, resumable cache) and single-point energies."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure
from tqdm.auto import tqdm

from crystal_gpt.evaluation.stability.potential import (
    _calculator,
    _prepare_worker,
    _single_threaded,
    load_potential,
    potential_tag,
)
from crystal_gpt.utils import JobFailure, executor_kind, process_pool, supervised_map

DEFAULT_STEPS = 500
DEFAULT_FMAX = 0.1  # eV/A, MatterGen / CHGNet default
DEFAULT_TIME_LIMIT = 600.0  # s per crystal: a 20-atom cell takes 5-60 s for 500 FIRE steps
RELAX_FORMAT = 1  # bump when the relaxation protocol changes: invalidates resume caches


# --------------------------------------------------------------------------- relaxation


@dataclass
class RelaxResult:
    """One CHGNet relaxation. ``energy_per_atom`` is NaN and ``error`` says why on failure."""

    energy_per_atom: float
    structure: Structure | None
    rmsd: float  # A, see displacement_rmsd
    converged: bool
    error: str | None = None
    n_steps: int = 0
    initial_energy_per_atom: float = math.nan
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.energy_per_atom)

    def to_json(self) -> dict:
        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "energy_per_atom": num(self.energy_per_atom),
            "structure": None if self.structure is None else self.structure.as_dict(),
            "rmsd": num(self.rmsd),
            "converged": self.converged,
            "error": self.error,
            "n_steps": self.n_steps,
            "initial_energy_per_atom": num(self.initial_energy_per_atom),
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_json(cls, d: dict) -> RelaxResult:
        def num(x: float | None) -> float:
            return math.nan if x is None else float(x)

        return cls(
            energy_per_atom=num(d["energy_per_atom"]),
            structure=None if d["structure"] is None else Structure.from_dict(d["structure"]),
            rmsd=num(d["rmsd"]),
            converged=bool(d["converged"]),
            error=d["error"],
            n_steps=int(d.get("n_steps", 0)),
            initial_energy_per_atom=num(d.get("initial_energy_per_atom")),
            seconds=float(d.get("seconds", 0.0)),
        )


def displacement_rmsd(initial: Structure, relaxed: Structure) -> float:
    """RMS displacement (A) of the atoms between two versions of one crystal.

    Atoms keep their order through a relaxation, so the per-site displacement is well defined:
    fractional differences are wrapped to the nearest periodic image, the rigid shift (mean
    displacement) is removed, and the rest is expressed in the relaxed cell. Homogeneous cell
    strain therefore does not count (compare volumes for that). ``StructureMatcher.get_rms_dist``
    is not used because it is normalised by (V/n)^(1/3), not in A, and returns nothing when a
    strongly relaxed crystal no longer matches its start.
    """
    if len(initial) != len(relaxed):
        raise ValueError("the two structures have different numbers of sites")
    d = relaxed.frac_coords - initial.frac_coords
    d -= np.round(d)
    d -= d.mean(axis=0)
    d -= np.round(d)
    cart = d @ relaxed.lattice.matrix
    return float(np.sqrt((cart**2).sum(axis=1).mean()))


GPA_TO_EV_PER_A3 = 1 / 160.21766208  # 1 GPa in eV/A^3


def enthalpy_per_atom(energy_per_atom: float, volume_per_atom: float, pressure: float) -> float:
    """H / N = E / N + P V / N, with the pressure in GPa (eV per atom)."""
    return energy_per_atom + pressure * GPA_TO_EV_PER_A3 * volume_per_atom


def structure_key(structure: Structure, steps: int, fmax: float, pressure: float = 0.0) -> str:
    """Content hash of a crystal plus the relaxation settings (resume-cache key)."""
    settings = [steps, fmax] + ([] if pressure == 0 else [f"{pressure:g} GPa"])
    payload = json.dumps(
        [
            (np.round(structure.lattice.matrix, 6) + 0.0).tolist(),
            [site.species_string for site in structure],
            (np.round(structure.frac_coords, 6) + 0.0).tolist(),
            *settings,
            RELAX_FORMAT,
            potential_tag(),
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _usable_workers(workers: int) -> int:
    """Workers are forked CPU processes, and CUDA cannot cross a fork: with a GPU, the main
    process does the work (0: in this process)."""
    import torch

    if torch.cuda.is_available():
        if workers > 1:
            warnings.warn("a GPU is present: running in one process on it", stacklevel=3)
        return 0
    return workers


def _relax(structure: Structure, steps: int, fmax: float, pressure: float = 0.0) -> RelaxResult:
    """Relax positions and cell; under a pressure (GPa) the cell filter minimises the enthalpy
    and the energies returned are enthalpies per atom (E + PV) / N."""
    from ase import Atoms
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    if not structure.is_ordered:
        raise ValueError("disordered structure (partial occupancies) cannot be relaxed")
    atoms = Atoms(
        symbols=[site.specie.symbol for site in structure],
        cell=structure.lattice.matrix,
        scaled_positions=structure.frac_coords,
        pbc=True,
    )
    atoms.calc = _calculator()
    n = len(atoms)

    def per_atom() -> float:
        return enthalpy_per_atom(
            float(atoms.get_potential_energy()) / n, atoms.get_volume() / n, pressure
        )

    e0 = per_atom()
    n_steps = 0
    if steps > 0:
        cell_filter = FrechetCellFilter(atoms, scalar_pressure=pressure * GPA_TO_EV_PER_A3)
        opt = FIRE(cell_filter, logfile=None)
        converged = bool(opt.run(fmax=fmax, steps=steps))
        n_steps = int(opt.nsteps)
    else:
        converged = bool(np.linalg.norm(atoms.get_forces(), axis=1).max() <= fmax)
    energy = per_atom()
    if not math.isfinite(energy):
        raise FloatingPointError("CHGNet energy is not finite")
    relaxed = Structure(
        Lattice(np.array(atoms.cell)), structure.species, atoms.get_scaled_positions(wrap=False)
    )
    return RelaxResult(
        energy_per_atom=energy,
        structure=relaxed,
        rmsd=displacement_rmsd(structure, relaxed),
        converged=converged,
        n_steps=n_steps,
        initial_energy_per_atom=e0,
    )


def _relax_job(job: tuple[str, Structure, int, float, float]) -> tuple[str, dict]:
    """Worker: one relaxation; any failure becomes an error record, never a crashed batch."""
    key, structure, steps, fmax, pressure = job
    _prepare_worker()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CHGNet's requires_grad notices, ASE's FIRE notes
            res = _relax(structure, steps, fmax, pressure)
    except Exception as err:
        msg = f"{type(err).__name__}: {err}".strip()
        res = RelaxResult(math.nan, None, math.nan, False, error=msg[:500])
    res.seconds = time.perf_counter() - t0
    return key, res.to_json()


def read_relax_cache(path: str | os.PathLike) -> dict[str, dict]:
    """Finished records of a resume cache (a line cut short by a kill is skipped)."""
    done: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return done
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec["result"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def relax_structures(
    structures: Iterable[Structure],
    steps: int = DEFAULT_STEPS,
    fmax: float = DEFAULT_FMAX,
    workers: int = 1,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    pressure: float = 0.0,
) -> list[RelaxResult]:
    """Relax crystals (positions and cell) with CHGNet, in input order; under ``pressure``
    (GPa) to the lowest enthalpy, ``energy_per_atom`` then being the enthalpy per atom.

    ``workers`` processes with one torch thread each, watched: a relaxation that runs past
    ``time_limit`` seconds, or whose process dies, is recorded as failed and the rest go on
    (on a GPU, or with one worker and no limit, the work runs in this process). With ``cache``
    (a ``.jsonl`` path) every finished relaxation is appended at once, so a killed run resumes
    where it stopped; the key is the crystal's content plus steps, fmax and potential version.
    Identical crystals are relaxed once.
    """
    structures = list(structures)
    keys = [structure_key(s, steps, fmax, pressure) for s in structures]
    done = read_relax_cache(cache) if cache is not None else {}
    todo: dict[str, Structure] = {}
    for k, s in zip(keys, structures, strict=True):
        if k not in done and k not in todo:
            todo[k] = s
    if todo:
        workers = _usable_workers(workers)
        load_potential()  # fail fast, and forked workers inherit the loaded model
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
        jobs = [(k, s, steps, fmax, pressure) for k, s in todo.items()]
        bar = tqdm(
            total=len(jobs),
            desc="CHGNet relax",
            unit="crystal",
            disable=not progress,
            file=sys.stderr,
        )
        handle = open(cache, "a", encoding="utf-8") if cache is not None else None  # noqa: SIM115
        try:

            def store(key: str, rec: dict) -> None:
                done[key] = rec
                if handle is not None:
                    handle.write(json.dumps({"key": key, "result": rec}) + "\n")
                    handle.flush()
                bar.update()

            local = executor_kind() == "process"
            if local and (workers == 0 or (workers == 1 and time_limit is None)):
                with _single_threaded():
                    for job in jobs:
                        store(*_relax_job(job))
            else:
                for i, out in supervised_map(_relax_job, jobs, workers, time_limit):
                    if isinstance(out, JobFailure):
                        failed = RelaxResult(math.nan, None, math.nan, False, error=out.reason)
                        out = (jobs[i][0], failed.to_json())
                    store(*out)
        finally:
            bar.close()
            if handle is not None:
                handle.close()
    return [RelaxResult.from_json(done[k]) for k in keys]


# --------------------------------------------------------------------------- single points


def _single_point_chunk(args: tuple[list[Structure], int]) -> list[tuple[float, str | None]]:
    structures, batch_size = args
    _prepare_worker()
    model = load_potential()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CHGNet's requires_grad notice
        return _predict_energies(model, structures, batch_size)


def _predict_energies(
    model: Any, structures: list[Structure], batch_size: int
) -> list[tuple[float, str | None]]:
    try:
        preds = model.predict_structure(structures, task="e", batch_size=batch_size)
        if isinstance(preds, dict):
            preds = [preds]
        energies = [float(p["e"]) for p in preds]
        return [(e, None if math.isfinite(e) else "non-finite CHGNet energy") for e in energies]
    except Exception:  # one bad crystal spoils its batch: redo this chunk one by one
        out: list[tuple[float, str | None]] = []
        for s in structures:
            try:
                out.append((float(model.predict_structure(s, task="e")["e"]), None))
            except Exception as err:
                out.append((math.nan, f"{type(err).__name__}: {err}"[:300]))
        return out


def single_point_energies(
    structures: Sequence[Structure],
    workers: int = 1,
    batch_size: int = 16,
    chunk: int = 128,
    progress: bool = True,
) -> tuple[np.ndarray, list[str | None]]:
    """CHGNet energies (eV/atom) of crystals as given, batched: ~10-15 ms per mp_20 crystal
    on one core (one torch thread per process, as for relaxations). NaN and an error message
    for crystals CHGNet cannot take."""
    workers = _usable_workers(workers)
    load_potential()
    jobs = [(list(structures[i : i + chunk]), batch_size) for i in range(0, len(structures), chunk)]
    bar = tqdm(
        total=len(structures),
        desc="CHGNet energies",
        unit="crystal",
        disable=not progress,
        file=sys.stderr,
    )
    results: list[tuple[float, str | None]] = []
    try:
        if workers > 1 and len(jobs) > 1:
            with process_pool(min(workers, len(jobs))) as pool:
                for part in pool.imap(_single_point_chunk, jobs):
                    results.extend(part)
                    bar.update(len(part))
        else:
            with _single_threaded():
                for job in jobs:
                    part = _single_point_chunk(job)
                    results.extend(part)
                    bar.update(len(part))
    finally:
        bar.close()
    return np.array([e for e, _ in results], dtype=float), [err for _, err in results]
