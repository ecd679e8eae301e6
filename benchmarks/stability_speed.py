"""Cost and outcome of the CHGNet stability protocol on this machine.

    python benchmarks/stability_speed.py [--samples DIR] [-n 10] [--steps 500] [--bias 20]

1. relaxes ``n`` crystals sampled from the bundled model (made with ``crystal-gpt sample -n 20
   --out /tmp/stab_s --seed 1`` when DIR has no CIFs): seconds, steps and displacement per
   relaxation, and the stable shares against the mp_20 CHGNet hull when it has been built
   (``crystal-gpt hull build --dataset mp_20``);
2. batched CHGNet single points on mp_20 test crystals (what the reference hull is made of);
3. ``--bias N``: relaxes N mp_20 test crystals (DFT-relaxed already) and reports how far their
   CHGNet energy drops below the single point: the error of using single points for the hull.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure

from crystal_gpt.cli import main as cli_main
from crystal_gpt.data.datasets import load_dataset
from crystal_gpt.evaluation.stability import (
    ReferenceHull,
    hull_path,
    load_potential,
    potential_tag,
    relax_structures,
    single_point_energies,
)


def load_samples(folder: Path, n: int) -> list[Structure]:
    cifs = sorted((folder / "cif").glob("*.cif"))
    if not cifs:
        cli_main(["sample", "-n", "20", "--out", str(folder), "--seed", "1"])
        cifs = sorted((folder / "cif").glob("*.cif"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_file(p) for p in cifs[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", default="/tmp/stab_s", help="folder with cif/*.cif")
    ap.add_argument("-n", type=int, default=10, help="sampled crystals to relax")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--fmax", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--single-points", type=int, default=500, help="mp_20 test crystals")
    ap.add_argument("--bias", type=int, default=0, help="mp_20 test crystals to relax")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{potential_tag()}, workers {args.workers} (1 torch thread each); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    t0 = time.perf_counter()
    load_potential()
    print(f"CHGNet load: {time.perf_counter() - t0:.1f} s")

    samples = load_samples(Path(args.samples), args.n)
    t0 = time.perf_counter()
    res = relax_structures(
        samples, steps=args.steps, fmax=args.fmax, workers=args.workers, progress=False
    )
    wall = time.perf_counter() - t0
    print(f"\n== relaxation of {len(samples)} sampled crystals (steps<={args.steps}) ==")
    for s, r in zip(samples, res, strict=True):
        print(
            f"{s.composition.reduced_formula:14s} {len(s):3d} atoms  {r.seconds:6.1f} s  "
            f"{r.n_steps:4d} steps  converged {r.converged!s:5s}  rmsd {r.rmsd:.3f} A  "
            f"E {r.energy_per_atom:.3f} eV/atom "
            f"(drop {r.initial_energy_per_atom - r.energy_per_atom:.3f})"
            + (f"  ERROR {r.error}" if r.error else "")
        )
    sec = np.array([r.seconds for r in res])
    print(
        f"wall {wall:.1f} s: {wall / len(samples):.1f} s per crystal; per relaxation median "
        f"{np.median(sec):.1f} s, max {sec.max():.1f} s; "
        f"{np.mean([r.converged for r in res]):.0%} converged, "
        f"{sum(not r.ok for r in res)} failed; "
        f"{np.sum([r.n_steps for r in res]) / max(sec.sum(), 1e-9):.1f} steps/s"
    )

    if hull_path("mp_20").exists():
        t0 = time.perf_counter()
        hull = ReferenceHull.load("mp_20")
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = hull.e_above_hull(
                [(r.structure or s, r.energy_per_atom) for r, s in zip(res, samples, strict=True)]
            )
        t_hull = time.perf_counter() - t0
        ok = np.isfinite(e)
        print(f"\n== stability vs {hull.describe()} ==")
        print(f"hull load {t_load:.1f} s, E_hull of {len(e)} crystals {t_hull:.1f} s")
        print("E_hull (eV/atom): " + ", ".join(f"{x:.3f}" for x in e))
        n = len(e)
        print(
            f"stable (<=0.1) {np.sum(ok & (e <= 0.1))}/{n}, "
            f"(<=0.08) {np.sum(ok & (e <= 0.08))}/{n}, "
            f"on/below hull (<=0) {np.sum(ok & (e <= 0))}/{n}, no reference {np.sum(~ok)}/{n} "
            f"{hull.last_missing or ''}"
        )
    else:
        print(f"\n(no mp_20 hull at {hull_path('mp_20')}: run `crystal-gpt hull build`)")

    if args.single_points or args.bias:
        test = load_dataset("mp_20", "test", limit=max(args.single_points, args.bias))
        structures = [r.structure for r in test]
    if args.single_points:
        sub = structures[: args.single_points]
        t0 = time.perf_counter()
        single_point_energies(sub, progress=False)
        dt = time.perf_counter() - t0
        print(
            f"\n== single points: {len(sub)} mp_20 test crystals in {dt:.1f} s "
            f"({1000 * dt / len(sub):.1f} ms per crystal; 19,093 crystals: "
            f"{19093 * dt / len(sub) / 60:.1f} min) =="
        )
    if args.bias:
        sub = structures[: args.bias]
        sp, _ = single_point_energies(sub, progress=False)
        t0 = time.perf_counter()
        rel = relax_structures(sub, steps=args.steps, fmax=args.fmax, progress=False)
        dt = time.perf_counter() - t0
        drop = 1000 * (sp - np.array([r.energy_per_atom for r in rel]))
        print(
            f"\n== relaxing {len(sub)} DFT-relaxed mp_20 test crystals with CHGNet: {dt:.1f} s "
            f"({dt / len(sub):.2f} s each); energy drop below the single point: median "
            f"{np.nanmedian(drop):.1f}, mean {np.nanmean(drop):.1f}, max {np.nanmax(drop):.1f} "
            f"meV/atom =="
        )


if __name__ == "__main__":
    main()
