"""How far the CHGNet enthalpy hull at a pressure agrees with DFT, on the test materials.

A check of the stability measure itself, not of a model: N alex_pressure test crystals at
pressure P are put against the CHGNet hull of the training materials at P in two treatments,
and their CHGNet E_hull compared with the dataset's DFT ``e_above_hull`` at P.

- ``single``: test crystals and hull references as CHGNet single points at their DFT cells
  (the prebuilt ``crystal-gpt hull build --pressure P`` hull, elemental references relaxed);
- ``relaxed``: test crystals and hull references both relaxed with CHGNet under P (<= 500
  FIRE steps), the hull restricted to the test crystals' chemical systems -- the treatment
  ``evaluate-pressure --stability`` gives samples.

    python benchmarks/pressure_hull_check.py --pressure 100 -n 300 --workers 2 --out runs/hullcheck

Relaxations are cached (resumable): the hull's under the shared hull cache, the test crystals'
in ``--out``. Prints the share within 0.1 eV/atom and on the hull by DFT and by each treatment,
the median, and the mean absolute difference and correlation against DFT.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from crystal_gpt.data.datasets import PRESSURE_DATASET, load_dataset
from crystal_gpt.evaluation.stability import (
    ReferenceHull,
    chemical_system,
    relax_structures,
    single_point_energies,
)
from crystal_gpt.evaluation.stability.relaxation import enthalpy_per_atom


def figures(name: str, e: np.ndarray, dft: np.ndarray) -> dict:
    ok = np.isfinite(e)
    d = e[ok] - dft[ok]
    return {
        "treatment": name,
        "n_referenced": int(ok.sum()),
        "within_0.1": float(np.mean(e[ok] <= 0.1)),
        "on_or_below_hull": float(np.mean(e[ok] <= 1e-3)),
        "median": float(np.median(e[ok])),
        "dft_within_0.1": float(np.mean(dft[ok] <= 0.1)),
        "dft_on_hull": float(np.mean(dft[ok] <= 1e-3)),
        "dft_median": float(np.median(dft[ok])),
        "mean_abs_diff": float(np.mean(np.abs(d))),
        "median_diff": float(np.median(d)),
        "correlation": float(np.corrcoef(e[ok], dft[ok])[0, 1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pressure", type=float, default=100.0, help="GPa (a grid pressure)")
    ap.add_argument("-n", type=int, default=300, help="test crystals (random, seed 0)")
    ap.add_argument("--relax-steps", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-single", action="store_true", help="no single-point treatment")
    ap.add_argument("--out", default="runs/hullcheck")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = args.pressure
    t0 = time.perf_counter()

    test = list(load_dataset(PRESSURE_DATASET, "test", pressures=[p]))
    rng = np.random.default_rng(0)
    pick = [test[i] for i in rng.choice(len(test), size=min(args.n, len(test)), replace=False)]
    structures = [r.structure for r in pick]
    dft = np.array([r.properties["e_above_hull"] for r in pick], dtype=float)
    rows = []

    if not args.skip_single:
        hull = ReferenceHull.load(PRESSURE_DATASET, pressure=p)
        e, _ = single_point_energies(structures, workers=args.workers, progress=True)
        vpa = np.array([s.volume / len(s) for s in structures])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eh = hull.e_above_hull(
                list(zip(structures, enthalpy_per_atom(np.asarray(e), vpa, p), strict=True))
            )
        rows.append(figures("single points", eh, dft))

    hull = ReferenceHull.build(
        PRESSURE_DATASET,
        splits=["train"],
        workers=args.workers,
        relax_steps=args.relax_steps,
        path=out / f"hull_{p:g}GPa_relaxed.json",
        pressure=p,
        systems={chemical_system(s) for s in structures},
    )
    res = relax_structures(
        structures,
        steps=args.relax_steps,
        workers=args.workers,
        cache=out / f"test_relax_{p:g}GPa.jsonl",
        pressure=p,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eh = hull.e_above_hull(
            [(r.structure or s, r.energy_per_atom) for r, s in zip(res, structures, strict=True)]
        )
    rows.append(figures("relaxed", eh, dft))
    rows[-1]["hull_crystals"] = hull.meta["n_crystals"]
    rows[-1]["hull_systems"] = len(hull.meta["systems"])

    took = time.perf_counter() - t0
    print(f"alex_pressure test, {len(pick)} crystals at {p:g} GPa ({took:.0f} s)")
    print(
        "| treatment | referenced | <= 0.1 (DFT) | on hull (DFT) | median (DFT) | "
        "mean abs diff | median diff | corr |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['treatment']} | {r['n_referenced']} | {r['within_0.1']:.1%} "
            f"({r['dft_within_0.1']:.1%}) | {r['on_or_below_hull']:.1%} ({r['dft_on_hull']:.1%}) "
            f"| {r['median']:.3f} ({r['dft_median']:.3f}) | {r['mean_abs_diff']:.3f} | "
            f"{r['median_diff']:+.3f} | {r['correlation']:.2f} |"
        )
    (out / f"check_{p:g}GPa.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
