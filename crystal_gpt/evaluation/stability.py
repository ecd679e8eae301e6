"""Thermodynamic stability of crystals: CHGNet relaxation and energy above a reference hull.

The S.U.N. protocol (MatterGen; WyFormer's MP-20 re-evaluation) relaxes each generated crystal
with a machine-learned potential and measures its energy above the convex hull of a large set of
known crystals. Every energy on both sides must come from the same potential, so the reference
hull is built here with CHGNet too (never mixed with DFT or another model):

- candidates: FIRE + ``FrechetCellFilter`` relaxation of positions and cell (default 500 steps,
  fmax 0.1 eV/A), energy = CHGNet energy of the final structure;
- reference crystals: the dataset's crystals (DFT-relaxed already) as CHGNet *single points* at
  their DFT geometries. Relaxing them again lowers the CHGNet energy by a median 0.4 meV/atom
  (mean 2.4, max 25 meV/atom over 30 mp_20 test crystals) at ~40x the cost (1 s instead of
  26 ms each: 5 h instead of 8 min for mp_20 on one core), so the single point is the sensible
  trade (``relax_steps`` turns the relaxation on where compute is cheap);
- elemental references: ``ase.build.bulk`` structures relaxed with CHGNet for every element ase
  knows (fmax 0.05), plus the dataset's own single-element crystals; the lowest energy wins.

No further energy correction is applied: CHGNet was trained on MP2020-corrected energies.
CHGNet and ASE are imported lazily, so this module imports without the ``eval`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element, Lattice, Structure
from tqdm.auto import tqdm

from crystal_gpt.data.cache import cache_dir, process_pool

DEFAULT_STEPS = 500
DEFAULT_FMAX = 0.1  # eV/A, MatterGen / CHGNet default
ELEMENT_FMAX = 0.05  # elemental references are tiny cells: relax them tighter
STABLE_THRESHOLD = 0.1  # eV/atom (MatterGen); WyFormer uses 0.08
HULL_SPLITS = ("train", "holdout", "test")
HULL_FORMAT = 1
RELAX_FORMAT = 1  # bump when the relaxation protocol changes: invalidates resume caches
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


def structure_key(structure: Structure, steps: int, fmax: float) -> str:
    """Content hash of a crystal plus the relaxation settings (resume-cache key)."""
    payload = json.dumps(
        [
            (np.round(structure.lattice.matrix, 6) + 0.0).tolist(),
            [site.species_string for site in structure],
            (np.round(structure.frac_coords, 6) + 0.0).tolist(),
            steps,
            fmax,
            RELAX_FORMAT,
            potential_tag(),
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _usable_workers(workers: int) -> int:
    """Workers are forked CPU processes, and CUDA cannot cross a fork: with a GPU, the main
    process does the work."""
    if workers > 1:
        import torch

        if torch.cuda.is_available():
            warnings.warn("a GPU is present: running in one process on it", stacklevel=3)
            return 1
    return workers


def _relax(structure: Structure, steps: int, fmax: float) -> RelaxResult:
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
    e0 = float(atoms.get_potential_energy()) / n
    n_steps = 0
    if steps > 0:
        opt = FIRE(FrechetCellFilter(atoms), logfile=None)
        converged = bool(opt.run(fmax=fmax, steps=steps))
        n_steps = int(opt.nsteps)
    else:
        converged = bool(np.linalg.norm(atoms.get_forces(), axis=1).max() <= fmax)
    energy = float(atoms.get_potential_energy()) / n
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


def _relax_job(job: tuple[str, Structure, int, float]) -> tuple[str, dict]:
    """Worker: one relaxation; any failure becomes an error record, never a crashed batch."""
    key, structure, steps, fmax = job
    _prepare_worker()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CHGNet's requires_grad notices, ASE's FIRE notes
            res = _relax(structure, steps, fmax)
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
) -> list[RelaxResult]:
    """Relax crystals (positions and cell) with CHGNet, in input order.

    ``workers`` > 1 runs that many forked processes with one torch thread each. With ``cache``
    (a ``.jsonl`` path) every finished relaxation is appended at once, so a killed run resumes
    where it stopped; the key is the crystal's content plus steps, fmax and potential version.
    Identical crystals are relaxed once.
    """
    structures = list(structures)
    keys = [structure_key(s, steps, fmax) for s in structures]
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
        jobs = [(k, s, steps, fmax) for k, s in todo.items()]
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

            if workers > 1 and len(jobs) > 1:
                with process_pool(min(workers, len(jobs))) as pool:
                    for key, rec in pool.imap_unordered(_relax_job, jobs, chunksize=1):
                        store(key, rec)
            else:
                with _single_threaded():
                    for job in jobs:
                        store(*_relax_job(job))
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


# --------------------------------------------------------------------------- elemental references


def element_structure(symbol: str) -> Structure | None:
    """The ground-state structure ``ase.build.bulk`` knows for an element (None if it has
    none: molecular solids such as O2, N2, halogens, and elements with a multi-atom basis)."""
    from ase.build import bulk
    from ase.data import atomic_numbers, reference_states

    try:
        atoms = bulk(symbol)
    except Exception:
        ref = reference_states[atomic_numbers[symbol]] if symbol in atomic_numbers else None
        # alpha-Pa is body-centred tetragonal, which ase stores as plain "tetragonal"
        if not ref or ref.get("symmetry") != "tetragonal" or "basis" in ref or "c/a" not in ref:
            return None
        try:
            atoms = bulk(symbol, "bct", a=ref["a"], c=ref["a"] * ref["c/a"])
        except Exception:
            return None
    return Structure(
        Lattice(np.array(atoms.cell)), atoms.get_chemical_symbols(), atoms.get_scaled_positions()
    )


# --------------------------------------------------------------------------- the hull


def hull_path(dataset: str) -> Path:
    """Where ``crystal-gpt hull build`` stores a dataset's CHGNet reference hull."""
    return cache_dir() / "hull" / f"{Path(dataset).name.removesuffix('.gz')}_chgnet.json"


@dataclass
class ReferenceHull:
    """Known crystals with CHGNet energies; E_hull of new crystals against their convex hull.

    Per chemical system, a pymatgen ``PhaseDiagram`` is built from the lowest-energy entry of
    every reduced formula whose elements are a subset of the system, and cached.
    """

    ids: list[str]
    formulas: list[str]  # Composition.formula of each reference cell
    energy_per_atom: np.ndarray
    sources: list[str]  # dataset split, "data" or "ase-bulk"
    meta: dict = field(default_factory=dict)
    last_missing: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.energy_per_atom = np.asarray(self.energy_per_atom, dtype=float)
        best: dict[str, tuple[float, int, Composition]] = {}
        with warnings.catch_warnings():  # pymatgen: "no Pauling electronegativity for He"
            warnings.simplefilter("ignore", UserWarning)
            for i, (f, e) in enumerate(zip(self.formulas, self.energy_per_atom, strict=True)):
                if not math.isfinite(e):
                    continue
                comp = Composition(f)
                red = comp.reduced_formula
                if red not in best or e < best[red][0]:
                    best[red] = (float(e), i, comp)
        self._by_system: dict[frozenset[str], list[PDEntry]] = {}
        for e, i, comp in best.values():
            system = frozenset(el.symbol for el in comp.elements)
            entry = PDEntry(comp, e * comp.num_atoms, name=self.ids[i])
            self._by_system.setdefault(system, []).append(entry)
        self.elements = frozenset(next(iter(s)) for s in self._by_system if len(s) == 1)
        self._diagrams: dict[frozenset[str], PhaseDiagram] = {}

    def __len__(self) -> int:
        return len(self.ids)

    # ---- building

    @classmethod
    def from_structures(
        cls,
        structures: Sequence[Structure],
        ids: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        *,
        elements: Iterable[str] | None = None,
        relax_steps: int = 0,
        workers: int = 1,
        cache: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> ReferenceHull:
        """A hull from known (already relaxed) crystals plus relaxed ``ase`` elemental references
        for ``elements`` (default: every element of the crystals).

        ``relax_steps`` = 0 takes CHGNet single points at the given geometries; > 0 relaxes them
        (resumable through ``cache``, a folder).
        """
        t0 = time.perf_counter()
        structures = list(structures)
        ids = list(ids) if ids is not None else [f"ref-{i}" for i in range(len(structures))]
        sources = list(sources) if sources is not None else ["data"] * len(structures)
        cache_folder = Path(cache) if cache is not None else None
        if relax_steps > 0:
            res = relax_structures(
                structures,
                steps=relax_steps,
                workers=workers,
                progress=progress,
                cache=None if cache_folder is None else cache_folder / f"relax{relax_steps}.jsonl",
            )
            energies = np.array([r.energy_per_atom for r in res])
            errors = [r.error for r in res]
        else:
            energies, errors = single_point_energies(structures, workers=workers, progress=progress)
        wanted = sorted(
            set(elements)
            if elements is not None
            else {el.symbol for s in structures for el in s.composition.elements},
            key=lambda sym: Element(sym).Z,
        )
        built = {sym: element_structure(sym) for sym in wanted}
        buildable = [sym for sym in wanted if built[sym] is not None]
        elem_res = relax_structures(
            [built[sym] for sym in buildable],
            steps=DEFAULT_STEPS,
            fmax=ELEMENT_FMAX,
            workers=workers,
            progress=progress,
            cache=None if cache_folder is None else cache_folder / "elements.jsonl",
        )
        all_ids = [*ids, *(f"ase-bulk-{sym}" for sym in buildable)]
        all_formulas = [
            *(s.composition.formula for s in structures),
            *(built[sym].composition.formula for sym in buildable),  # type: ignore[union-attr]
        ]
        all_e = np.concatenate([energies, [r.energy_per_atom for r in elem_res]])
        all_sources = [*sources, *(["ase-bulk"] * len(buildable))]
        failed = [
            {"id": i, "error": err}
            for i, err in zip(all_ids, [*errors, *(r.error for r in elem_res)], strict=True)
            if err is not None
        ]
        keep = np.isfinite(all_e)
        data_elements = {
            next(iter(s.composition.elements)).symbol
            for s, e in zip(structures, energies, strict=True)
            if len(s.composition.elements) == 1 and math.isfinite(e)
        }
        ase_ok = {sym for sym, r in zip(buildable, elem_res, strict=True) if r.ok}
        meta = {
            "format": HULL_FORMAT,
            "potential": potential_tag(),
            "reference_energies": (
                f"relaxed, steps<={relax_steps}, fmax={DEFAULT_FMAX}"
                if relax_steps > 0
                else "single points at the given (DFT-relaxed) geometries"
            ),
            "element_energies": f"ase.build.bulk relaxed, steps<={DEFAULT_STEPS}, "
            f"fmax={ELEMENT_FMAX}; plus single-element crystals of the data",
            "n_crystals": len(structures),
            "n_failed": len(failed),
            "failed": failed[:200],
            "elements_from_ase": sorted(ase_ok, key=lambda s: Element(s).Z),
            "elements_from_data_only": sorted(data_elements - ase_ok, key=lambda s: Element(s).Z),
            "elements_without_reference": [s for s in wanted if s not in ase_ok | data_elements],
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        return cls(
            ids=[i for i, k in zip(all_ids, keep, strict=True) if k],
            formulas=[f for f, k in zip(all_formulas, keep, strict=True) if k],
            energy_per_atom=all_e[keep],
            sources=[s for s, k in zip(all_sources, keep, strict=True) if k],
            meta=meta,
        )

    @classmethod
    def build(
        cls,
        dataset: str = "mp_20",
        splits: Sequence[str] = HULL_SPLITS,
        *,
        workers: int = 1,
        limit: int | None = None,
        relax_steps: int = 0,
        path: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> ReferenceHull:
        """Build and save the reference hull of a dataset: all crystals of ``splits`` (default
        train + holdout + test: the largest reference available, as MatterGen prefers a large
        hull), ``limit`` crystals per split at most. What ``crystal-gpt hull build`` runs."""
        from crystal_gpt.data.datasets import load_dataset

        t0 = time.perf_counter()
        structures, ids, sources = [], [], []
        for split in splits:
            ds = load_dataset(dataset, split, limit=limit)
            for r in ds:
                structures.append(r.structure)
                ids.append(str(r.id))
                sources.append(split)
        out = Path(path) if path is not None else hull_path(dataset)
        hull = cls.from_structures(
            structures,
            ids,
            sources,
            relax_steps=relax_steps,
            workers=workers,
            cache=out.parent / f"{out.stem}_work",
            progress=progress,
        )
        hull.meta.update(
            dataset=dataset,
            splits=list(splits),
            limit=limit,
            build_seconds=round(time.perf_counter() - t0, 1),
        )
        hull.save(out)
        return hull

    # ---- storage

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "meta": self.meta,
            "ids": self.ids,
            "formulas": self.formulas,
            "energy_per_atom": [round(float(e), 6) for e in self.energy_per_atom],
            "sources": self.sources,
        }
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, p)  # atomic: never a half-written hull
        return p

    @classmethod
    def load(cls, dataset: str = "mp_20", path: str | os.PathLike | None = None) -> ReferenceHull:
        """The saved hull of a dataset (or a file); says how to build it when it is missing."""
        p = Path(path) if path is not None else hull_path(dataset)
        shipped = Path(__file__).parent / "references" / (hull_path(dataset).name + ".gz")
        if path is None and not p.exists() and shipped.exists():
            p = shipped  # the mp_20 hull ships with the package (built as below)
        if not p.exists():
            raise FileNotFoundError(
                f"no CHGNet reference hull for {dataset!r} at {p}; build it once with "
                f"`crystal-gpt hull build --dataset {dataset}` (mp_20: about 10 min on one "
                "core; needs the eval extra)"
            )
        if p.suffix == ".gz":
            import gzip

            d = json.loads(gzip.decompress(p.read_bytes()).decode("utf-8"))
        else:
            d = json.loads(p.read_text(encoding="utf-8"))
        if d.get("meta", {}).get("format") != HULL_FORMAT:
            raise ValueError(f"{p} was written by another version: rebuild it")
        return cls(d["ids"], d["formulas"], np.array(d["energy_per_atom"]), d["sources"], d["meta"])

    # ---- queries

    def describe(self) -> str:
        """One line for reports: what the hull is made of."""
        m = self.meta
        what = m.get("dataset", "given crystals")
        if m.get("splits"):
            what += " " + "+".join(m["splits"])
        if m.get("limit"):
            what += f" (first {m['limit']} per split)"
        n_el = len(m.get("elements_from_ase", []))
        return (
            f"{m.get('potential', 'CHGNet')} hull of {what}: {m.get('n_crystals', len(self))} "
            f"crystals ({m.get('reference_energies', '?')}) + {n_el} relaxed ase elemental "
            f"references; {len(self.elements)} elements referenced"
        )

    def phase_diagram(self, elements: Iterable[str]) -> PhaseDiagram:
        """The phase diagram of a chemical system (cached): all reference entries whose
        elements are a subset of it."""
        system = frozenset(elements)
        pd = self._diagrams.get(system)
        if pd is None:
            absent = system - self.elements
            if absent:
                raise ValueError(f"no elemental reference for {', '.join(sorted(absent))}")
            if len(system) <= 12:
                subsystems = (
                    frozenset(c) for k in range(1, len(system) + 1) for c in combinations(system, k)
                )
                entries = [e for sub in subsystems for e in self._by_system.get(sub, ())]
            else:
                entries = [e for sub, es in self._by_system.items() if sub <= system for e in es]
            pd = PhaseDiagram(entries)
            if len(self._diagrams) >= 4096:  # bound the memory of long evaluations
                self._diagrams.clear()
            self._diagrams[system] = pd
        return pd

    def e_above_hull(self, items: Sequence[Any]) -> np.ndarray:
        """Energy above the hull (eV/atom) of each item: a pymatgen entry (``PDEntry``,
        ``ComputedEntry``: total energy) or a ``(structure | composition | formula,
        energy_per_atom)`` pair. Negative: below the reference hull (a new stable phase).
        NaN where the energy is NaN or an element has no reference; the missing elements are
        warned about and kept in ``last_missing`` (element -> crystals)."""
        out = np.full(len(items), np.nan)
        missing: Counter[str] = Counter()
        for i, item in enumerate(items):
            if hasattr(item, "composition") and hasattr(item, "energy"):
                comp = Composition(item.composition)
                e_atom = float(item.energy) / comp.num_atoms
            else:
                what, e_atom = item
                comp = what.composition if isinstance(what, Structure) else Composition(what)
                e_atom = float(e_atom)
            if not math.isfinite(e_atom) or comp.num_atoms == 0:
                continue
            comp = comp.element_composition  # oxidation states (Li+) play no part in a hull
            system = frozenset(el.symbol for el in comp.elements)
            absent = system - self.elements
            if absent:
                missing.update(absent)
                continue
            pd = self.phase_diagram(system)
            entry = PDEntry(comp, e_atom * comp.num_atoms)
            _, e_hull = pd.get_decomp_and_e_above_hull(
                entry, allow_negative=True, check_stable=False
            )
            out[i] = np.nan if e_hull is None else float(e_hull)
        self.last_missing = dict(missing)
        if missing:
            warnings.warn(
                "E_hull is NaN for crystals with elements that have no reference in this hull: "
                + ", ".join(f"{el} ({n})" for el, n in sorted(missing.items())),
                stacklevel=2,
            )
        return out

    def summary(self) -> str:
        m = self.meta
        lines = [
            self.describe(),
            f"entries {len(self)} ({len(self._by_system)} chemical systems), failed "
            f"{m.get('n_failed', 0)}, built in {m.get('build_seconds', float('nan')):.0f} s",
            f"elemental references from ase: {len(m.get('elements_from_ase', []))}; from the data "
            f"only: {', '.join(m.get('elements_from_data_only', [])) or '-'}; none: "
            f"{', '.join(m.get('elements_without_reference', [])) or '-'}",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation


def stability_protocol(hull: ReferenceHull, steps: int, fmax: float) -> str:
    """The protocol line printed next to every stability number."""
    return (
        f"{hull.meta.get('potential', 'CHGNet')} relaxation (FIRE + FrechetCellFilter, "
        f"steps<={steps}, fmax={fmax} eV/A); E_hull against the {hull.describe()}; "
        f"no extra energy corrections; stable: E_hull <= {STABLE_THRESHOLD} eV/atom; "
        "shares over all given crystals (failures count as not stable)"
    )


def evaluate_stability(
    structures: Sequence[Structure],
    dataset: str = "mp_20",
    hull: ReferenceHull | None = None,
    steps: int = DEFAULT_STEPS,
    fmax: float = DEFAULT_FMAX,
    workers: int = 1,
    cache: str | os.PathLike | None = None,
    novel_mask: Sequence[bool] | None = None,
    unique_mask: Sequence[bool] | None = None,
    progress: bool = True,
) -> dict:
    """Relax crystals with CHGNet and measure stability against the dataset's CHGNet hull.

    Shares are over ALL given crystals (failed relaxations and missing references count as not
    stable): ``stable_0.1`` = E_hull <= 0.1 eV/atom (MatterGen), ``stable_0.08`` (WyFormer),
    ``stable_0.0`` = on or below the hull, ``metastable`` = 0 < E_hull <= 0.1 (so stable_0.1 =
    stable_0.0 + metastable). ``sun_rate`` (stable_0.1 AND unique AND novel) is given only when
    both masks are; ``stable_novel_rate`` when ``novel_mask`` is.
    """
    hull = hull if hull is not None else ReferenceHull.load(dataset)  # fail before relaxing
    structures = list(structures)
    n = len(structures)
    for name, mask in (("novel_mask", novel_mask), ("unique_mask", unique_mask)):
        if mask is not None and len(mask) != n:
            raise ValueError(f"{name} has {len(mask)} entries for {n} structures")
    results = relax_structures(
        structures, steps=steps, fmax=fmax, workers=workers, cache=cache, progress=progress
    )
    pairs = [
        (r.structure or s, r.energy_per_atom) for r, s in zip(results, structures, strict=True)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e_hull = hull.e_above_hull(pairs)
    missing = dict(hull.last_missing)
    ok = np.isfinite(e_hull)
    rmsd = [r.rmsd for r in results if r.ok]

    def share(mask: np.ndarray) -> float:
        return float(mask.sum() / n) if n else math.nan

    stable = ok & (e_hull <= STABLE_THRESHOLD)
    out: dict[str, Any] = {
        "n": n,
        "e_above_hull": [float(x) for x in e_hull],
        "energy_per_atom": [float(r.energy_per_atom) for r in results],
        "stable_mask": stable.tolist(),
        "stable_0.1": share(stable),
        "stable_0.08": share(ok & (e_hull <= 0.08)),
        "stable_0.0": share(ok & (e_hull <= 0.0)),
        "metastable": share(stable & (e_hull > 0.0)),
        "e_above_hull_median": float(np.median(e_hull[ok])) if ok.any() else math.nan,
        "rmsd_mean": float(np.mean(rmsd)) if rmsd else math.nan,
        "converged": share(np.array([r.converged for r in results], dtype=bool)),
        "n_failed": sum(not r.ok for r in results),
        "n_no_reference": int(sum(np.isfinite(r.energy_per_atom) for r in results) - ok.sum()),
        "missing_elements": missing,
        "errors": dict(Counter(r.error.split(":")[0] for r in results if r.error)),
        "protocol": stability_protocol(hull, steps, fmax),
    }
    if novel_mask is not None:
        novel = np.asarray(novel_mask, dtype=bool)
        out["stable_novel_rate"] = share(stable & novel)
        if unique_mask is not None:
            out["sun_rate"] = share(stable & novel & np.asarray(unique_mask, dtype=bool))
    return out
