"""Stability and S.U.N. (stable, unique, novel) of generated crystals."""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from pymatgen.core import Structure

from crystal_gpt.evaluation.metrics import sun_rates
from crystal_gpt.evaluation.stability.hull import ReferenceHull
from crystal_gpt.evaluation.stability.relaxation import (
    DEFAULT_FMAX,
    DEFAULT_STEPS,
    DEFAULT_TIME_LIMIT,
    relax_structures,
)

STABLE_THRESHOLD = 0.1  # eV/atom (MatterGen); WyFormer uses 0.08


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
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    pressure: float = 0.0,
) -> dict:
    """Relax crystals with CHGNet and measure stability against the dataset's CHGNet hull
    (``pressure`` in GPa: relaxed under it, enthalpies against a hull of enthalpies).

    Shares are over ALL given crystals (failed relaxations and missing references count as not
    stable): ``stable_0.1`` = E_hull <= 0.1 eV/atom (MatterGen), ``stable_0.08`` (WyFormer),
    ``stable_0.0`` = on or below the hull, ``metastable`` = 0 < E_hull <= 0.1 (so stable_0.1 =
    stable_0.0 + metastable). ``sun_rate`` (stable_0.1 AND unique AND novel) is given only when
    both masks are; ``stable_novel_rate`` when ``novel_mask`` is. A relaxation that runs past
    ``time_limit`` seconds or whose worker dies counts as failed (not stable).
    """
    hull = hull if hull is not None else ReferenceHull.load(dataset)  # fail before relaxing
    structures = list(structures)
    n = len(structures)
    for name, mask in (("novel_mask", novel_mask), ("unique_mask", unique_mask)):
        if mask is not None and len(mask) != n:
            raise ValueError(f"{name} has {len(mask)} entries for {n} structures")
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
            unique = np.asarray(unique_mask, dtype=bool)
            sun = sun_rates(e_hull, unique, novel, thresholds=(STABLE_THRESHOLD,))
            out["sun_rate"] = sun[f"sun_{STABLE_THRESHOLD:g}"] if n else math.nan
    return out
