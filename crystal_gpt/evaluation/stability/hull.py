"""The CHGNet reference convex hull of a dataset, and energies above it."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element, Lattice, Structure

from crystal_gpt.data.cache import cache_dir
from crystal_gpt.evaluation.stability.potential import potential_tag
from crystal_gpt.evaluation.stability.relaxation import (
    DEFAULT_FMAX,
    DEFAULT_STEPS,
    enthalpy_per_atom,
    relax_structures,
    single_point_energies,
)
from crystal_gpt.utils import atomic_path

ELEMENT_FMAX = 0.05  # elemental references are tiny cells: relax them tighter
HULL_SPLITS = ("train", "holdout", "test")
HULL_FORMAT = 1


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


def hull_path(dataset: str, pressure: float | None = None, relaxed: bool = False) -> Path:
    """Where ``crystal-gpt hull build`` stores a dataset's CHGNet reference hull (of
    enthalpies, at a pressure in GPa; ``relaxed``: reference crystals relaxed, not single
    points, kept apart because the two answer different questions)."""
    at = "" if pressure is None else f"_{pressure:g}GPa"
    kind = "_relaxed" if relaxed else ""
    name = Path(dataset).name.removesuffix(".gz")
    return cache_dir() / "hull" / f"{name}{at}{kind}_chgnet.json"


def chemical_system(what: Any) -> frozenset[str]:
    """The element symbols of a structure, composition or formula."""
    comp = what.composition if hasattr(what, "composition") else Composition(what)
    return frozenset(el.symbol for el in comp.element_composition.elements)


def system_name(system: Iterable[str]) -> str:
    """``Fe-O``-style name of a chemical system (alphabetical, as pymatgen's ``chemsys``)."""
    return "-".join(sorted(system))


def parse_systems(systems: Iterable[str | Iterable[str]]) -> list[frozenset[str]]:
    """Chemical systems from ``"Fe-O"`` names or element collections, checked; the ones
    contained in a larger given system are dropped (its hull holds theirs)."""
    out: set[frozenset[str]] = set()
    for item in systems:
        symbols = item.replace(" ", "").split("-") if isinstance(item, str) else list(item)
        bad = [sym for sym in symbols if not Element.is_valid_symbol(sym)]
        if bad or not symbols:
            raise ValueError(f"not a chemical system: {item!r} (unknown element {bad or '-'})")
        out.add(frozenset(symbols))
    return sorted(
        (s for s in out if not any(s < t for t in out)), key=lambda s: (len(s), system_name(s))
    )


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
    last_uncovered: int = field(default=0, init=False)
    systems: list[frozenset[str]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.energy_per_atom = np.asarray(self.energy_per_atom, dtype=float)
        listed = self.meta.get("systems")
        # a hull built for some chemical systems only must not answer for others: its phase
        # diagram there would lack the competing phases and call anything stable
        self.systems = None if listed is None else [frozenset(x.split("-")) for x in listed]
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
        pressure: float = 0.0,
        systems: Iterable[str | Iterable[str]] | None = None,
    ) -> ReferenceHull:
        """A hull from known (already relaxed) crystals plus relaxed ``ase`` elemental references
        for ``elements`` (default: every element of the crystals).

        ``relax_steps`` = 0 takes CHGNet single points at the given geometries; > 0 relaxes them
        (resumable through ``cache``, a folder). ``pressure`` (GPa): a hull of enthalpies per
        atom, E/N + P V/N, the crystals given at that pressure and the elemental references
        relaxed under it. ``systems`` (``"Fe-O"`` names): only the crystals inside one of these
        chemical systems (and elemental references for their elements) -- exact for E_hull of
        crystals in them, at a fraction of the relaxations; the hull refuses other systems.
        """
        t0 = time.perf_counter()
        structures = list(structures)
        ids = list(ids) if ids is not None else [f"ref-{i}" for i in range(len(structures))]
        sources = list(sources) if sources is not None else ["data"] * len(structures)
        wanted_systems = None if systems is None else parse_systems(systems)
        if wanted_systems is not None:
            inside = [
                i
                for i, s in enumerate(structures)
                if any(chemical_system(s) <= sys for sys in wanted_systems)
            ]
            structures = [structures[i] for i in inside]
            ids = [ids[i] for i in inside]
            sources = [sources[i] for i in inside]
            if elements is None:
                elements = {sym for sys in wanted_systems for sym in sys}
        cache_folder = Path(cache) if cache is not None else None
        if relax_steps > 0:
            res = relax_structures(
                structures,
                steps=relax_steps,
                workers=workers,
                progress=progress,
                cache=None if cache_folder is None else cache_folder / f"relax{relax_steps}.jsonl",
                pressure=pressure,
            )
            energies = np.array([r.energy_per_atom for r in res])
            errors = [r.error for r in res]
        else:
            energies, errors = single_point_energies(structures, workers=workers, progress=progress)
            volumes = np.array([s.volume / len(s) for s in structures])
            energies = enthalpy_per_atom(np.asarray(energies), volumes, pressure)
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
            pressure=pressure,
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
        if pressure:
            meta["pressure_gpa"] = pressure
            meta["reference_energies"] += "; enthalpies per atom E/N + PV/N at that pressure"
        if wanted_systems is not None:
            meta["systems"] = [system_name(sys) for sys in wanted_systems]
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
        pressure: float | None = None,
        systems: Iterable[str | Iterable[str]] | None = None,
        cache: str | os.PathLike | None = None,
    ) -> ReferenceHull:
        """Build and save the reference hull of a dataset: all crystals of ``splits`` (default
        train + holdout + test: the largest reference available, as MatterGen prefers a large
        hull), ``limit`` crystals per split at most. What ``crystal-gpt hull build`` runs.
        ``pressure`` (alex_pressure): the crystals at that pressure, a hull of enthalpies.
        ``systems``: only these chemical systems (see ``from_structures``). ``cache``: the
        resume folder (default beside the default hull file, so every build of a dataset at a
        pressure and treatment shares its relaxations)."""
        from crystal_gpt.data.datasets import load_dataset

        t0 = time.perf_counter()
        structures, ids, sources = [], [], []
        for split in splits:
            at = None if pressure is None else [pressure]
            ds = load_dataset(dataset, split, limit=limit, pressures=at)
            for r in ds:
                structures.append(r.structure)
                ids.append(str(r.id))
                sources.append(split)
        default = hull_path(dataset, pressure, relaxed=relax_steps > 0)
        out = Path(path) if path is not None else default
        hull = cls.from_structures(
            structures,
            ids,
            sources,
            relax_steps=relax_steps,
            workers=workers,
            cache=Path(cache) if cache is not None else default.parent / f"{default.stem}_work",
            progress=progress,
            pressure=pressure or 0.0,
            systems=systems,
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
        with atomic_path(p) as tmp:  # never a half-written hull
            tmp.write_text(json.dumps(payload), encoding="utf-8")
        return p

    @classmethod
    def load(
        cls,
        dataset: str = "mp_20",
        path: str | os.PathLike | None = None,
        pressure: float | None = None,
        relaxed: bool = False,
    ) -> ReferenceHull:
        """The saved hull of a dataset (or a file); says how to build it when it is missing."""
        p = Path(path) if path is not None else hull_path(dataset, pressure, relaxed)
        shipped = Path(str(resources.files("crystal_gpt") / "references")) / (
            hull_path(dataset).name + ".gz"
        )
        if path is None and not p.exists() and shipped.exists():
            p = shipped  # the mp_20 hull ships with the package (built as below)
        if not p.exists():
            raise FileNotFoundError(
                f"no CHGNet reference hull for {dataset!r}"
                f"{'' if pressure is None else f' at {pressure:g} GPa'} at {p}; build it once "
                f"with `crystal-gpt hull build --dataset {dataset}"
                f"{'' if pressure is None else f' --pressure {pressure:g} --splits train'}"
                f"{' --relax-steps 500' if relaxed else ''}` "
                "(mp_20: about 10 min on one core; needs the eval extra)"
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
        if m.get("systems"):
            what += f" in {len(m['systems'])} chemical systems"
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
            if not self.covers(system):
                raise ValueError(
                    f"this hull was built for {len(self.systems or ())} chemical systems, not "
                    f"{system_name(system)}: rebuild it with that system (hull build --systems)"
                )
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

    def covers(self, system: Iterable[str]) -> bool:
        """Whether this hull holds every reference crystal of that chemical system."""
        system = frozenset(system)
        return self.systems is None or any(system <= s for s in self.systems)

    def e_above_hull(self, items: Sequence[Any]) -> np.ndarray:
        """Energy above the hull (eV/atom) of each item: a pymatgen entry (``PDEntry``,
        ``ComputedEntry``: total energy) or a ``(structure | composition | formula,
        energy_per_atom)`` pair. Negative: below the reference hull (a new stable phase).
        NaN where the energy is NaN or an element has no reference; the missing elements are
        warned about and kept in ``last_missing`` (element -> crystals); NaN too for a crystal
        outside the chemical systems a restricted hull was built for (``last_uncovered``)."""
        out = np.full(len(items), np.nan)
        missing: Counter[str] = Counter()
        uncovered = 0
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
            if not self.covers(system):
                uncovered += 1
                continue
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
        self.last_uncovered = uncovered
        if uncovered:
            warnings.warn(
                f"E_hull is NaN for {uncovered} crystals outside the chemical systems this hull "
                "was built for",
                stacklevel=2,
            )
        if missing:
            warnings.warn(
                "E_hull is NaN for crystals with elements that have no reference in this hull: "
                + ", ".join(f"{el} ({n})" for el, n in sorted(missing.items())),
                stacklevel=2,
            )
        return out

    def formation_energy(self, items: Sequence[tuple[Any, float]]) -> np.ndarray:
        """Formation energy (eV/atom) of ``(structure | composition | formula,
        energy_per_atom)`` pairs against this hull's elemental references (the lowest energy
        per atom of each element's entries: the same potential); NaN without a reference."""
        mu = {
            next(iter(system)): min(e.energy_per_atom for e in entries)
            for system, entries in self._by_system.items()
            if len(system) == 1
        }
        out = np.full(len(items), np.nan)
        for i, (what, e_atom) in enumerate(items):
            comp = what.composition if isinstance(what, Structure) else Composition(what)
            comp = comp.element_composition
            if not math.isfinite(float(e_atom)) or comp.num_atoms == 0:
                continue
            if any(el.symbol not in mu for el in comp.elements):
                continue
            ref = sum(mu[el.symbol] * comp.get_atomic_fraction(el) for el in comp.elements)
            out[i] = float(e_atom) - ref
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
