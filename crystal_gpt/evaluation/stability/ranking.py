"""Relax generated crystals with CHGNet and rank them by energy above the reference hull: the
last step from "sample" to candidates worth a DFT calculation (``crystal-gpt relax``).

Each crystal keeps its name; the relaxed structure, its energy, formation energy and E_hull
(against the dataset's CHGNet hull, the same potential throughout), what the relaxation did
(converged, steps, displacement, volume change) and the space group before and after are one
row. Rows are sorted by E_hull, failures last, never dropped.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystal_gpt.evaluation.stability.hull import ReferenceHull
from crystal_gpt.evaluation.stability.relaxation import (
    DEFAULT_FMAX,
    DEFAULT_STEPS,
    DEFAULT_TIME_LIMIT,
    relax_structures,
)
from crystal_gpt.evaluation.stability.sun import STABLE_THRESHOLD, stability_protocol

SYMPREC = 0.1  # loose: a relaxed cell keeps its group within numerical noise
COLUMNS = (
    "rank",
    "name",
    "formula",
    "num_atoms",
    "e_above_hull",
    "formation_energy_per_atom",
    "energy_per_atom",
    "stable",
    "spacegroup_before",
    "spacegroup_after",
    "converged",
    "steps",
    "rmsd",
    "volume_change",
    "seconds",
    "error",
    "cif",
)


def spacegroup_number(structure: Structure | None, symprec: float = SYMPREC) -> int:
    """spglib's space group at ``symprec`` (0 when it fails or there is no structure)."""
    if structure is None:
        return 0
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        return int(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number())
    except Exception:  # spglib finds no cell: report it, do not stop the ranking
        return 0


def _num(x: float) -> float | str:
    return "" if x is None or not math.isfinite(x) else round(float(x), 5)


def relax_and_rank(
    structures: Sequence[Structure],
    names: Sequence[str],
    hull: ReferenceHull,
    *,
    steps: int = DEFAULT_STEPS,
    fmax: float = DEFAULT_FMAX,
    workers: int = 1,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    pressure: float = 0.0,
) -> tuple[list[dict], list[Structure | None]]:
    """Relax every crystal and rank them by E_hull (ascending; NaN, failures, last).

    Returns the rows (``COLUMNS`` without ``cif``) in rank order and the relaxed structures in
    the same order (None where the relaxation failed). ``pressure`` (GPa): relaxed under it,
    energies are enthalpies against a hull of enthalpies (``hull`` must be that pressure's).
    """
    structures = list(structures)
    if len(names) != len(structures):
        raise ValueError(f"{len(names)} names for {len(structures)} crystals")
    results = relax_structures(
        structures,
        steps=steps,
        fmax=fmax,
        workers=workers,
        cache=cache,
        progress=progress,
        time_limit=time_limit,
        pressure=pressure,
    )
    relaxed = [r.structure if r.ok else None for r in results]
    pairs = [
        (s1 or s0, r.energy_per_atom)
        for s0, s1, r in zip(structures, relaxed, results, strict=True)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing references are NaN in the table, not noise
        e_hull = hull.e_above_hull(pairs)
        e_form = hull.formation_energy(pairs)
    rows = []
    for k, (s0, s1, r) in enumerate(zip(structures, relaxed, results, strict=True)):
        rows.append(
            {
                "name": names[k],
                "formula": s0.composition.reduced_formula,
                "num_atoms": len(s0),
                "e_above_hull": _num(e_hull[k]),
                "formation_energy_per_atom": _num(e_form[k]),
                "energy_per_atom": _num(r.energy_per_atom),
                "stable": int(bool(np.isfinite(e_hull[k]) and e_hull[k] <= STABLE_THRESHOLD)),
                "spacegroup_before": spacegroup_number(s0),
                "spacegroup_after": spacegroup_number(s1),
                "converged": int(r.converged),
                "steps": r.n_steps,
                "rmsd": _num(r.rmsd),
                "volume_change": _num(s1.volume / s0.volume - 1) if s1 is not None else "",
                "seconds": round(r.seconds, 2),
                "error": r.error or "",
            }
        )
    order = sorted(range(len(rows)), key=lambda k: (not np.isfinite(e_hull[k]), e_hull[k], k))
    ranked = []
    for rank, k in enumerate(order, start=1):
        ranked.append({"rank": rank, **rows[k]})
    return ranked, [relaxed[k] for k in order]


def write_ranked(
    rows: list[dict], relaxed: Sequence[Structure | None], out_dir: str | os.PathLike
) -> Path:
    """``relaxed.csv`` (rank order) and one CIF per relaxed crystal in ``cif/``, named by rank
    and input name; returns the CSV's path."""
    from pymatgen.io.cif import CifWriter

    out = Path(out_dir)
    (out / "cif").mkdir(parents=True, exist_ok=True)
    for row, s in zip(rows, relaxed, strict=True):
        row["cif"] = ""
        if s is not None:
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(row["name"]).stem)
            path = Path("cif") / f"{row['rank']:05d}_{stem}.cif"
            CifWriter(s).write_file(out / path)
            row["cif"] = str(path)
    target = out / "relaxed.csv"
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return target


def ranking_summary(rows: list[dict], hull: ReferenceHull, steps: int, fmax: float) -> str:
    """A few lines for the terminal: how many are stable, the best ones, the protocol."""
    n = len(rows)
    e = np.array([r["e_above_hull"] if r["e_above_hull"] != "" else np.nan for r in rows])
    ok = np.isfinite(e)
    failed = sum(bool(r["error"]) for r in rows)
    lines = [
        f"{n} crystals relaxed ({failed} failed, {n - ok.sum()} without E_hull); "
        f"E_hull <= {STABLE_THRESHOLD} eV/atom: {int((e[ok] <= STABLE_THRESHOLD).sum())} "
        f"({100 * (e[ok] <= STABLE_THRESHOLD).sum() / max(n, 1):.1f}%), <= 0: "
        f"{int((e[ok] <= 0).sum())}"
        + (f"; median E_hull {np.median(e[ok]):.3f} eV/atom" if ok.any() else ""),
        stability_protocol(hull, steps, fmax),
    ]
    for r in rows[: min(5, n)]:
        if r["e_above_hull"] == "":
            break
        form = r["formation_energy_per_atom"]
        lines.append(
            f"  {r['rank']:>3}. {r['formula']:<16} E_hull {r['e_above_hull']:+.3f}  "
            f"E_form {'-' if form == '' else f'{form:+.3f}'}  "
            f"group {r['spacegroup_before']} -> {r['spacegroup_after']}  ({r['name']})"
        )
    return "\n".join(lines)
