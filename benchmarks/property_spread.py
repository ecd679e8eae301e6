"""How much the CDVAE property statistics move with the random draw of 1,000 valid crystals, and
with the oxidation-state table that decides which crystals are valid.

    python benchmarks/property_spread.py runs/eval10k --seeds 20

Reads an evaluation folder written by ``crystal-gpt evaluate`` (its crystals.csv: formula,
validity flags, density, number of elements per crystal) and the cached reference of the
dataset, then recomputes the Wasserstein distances for seeds 0..N-1 with both tables, with the
suite's own functions (``property_subset``, ``wasserstein``, ``formula_validity``). Densities
in crystals.csv are rounded to 4 decimals, which moves the distances by < 1e-4.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from crystal_gpt.evaluation.metrics import (
    OXIDATION_TABLES,
    formula_validity,
    property_subset,
    wasserstein,
)
from crystal_gpt.evaluation.references import reference_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a `crystal-gpt evaluate` output folder")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    folder = Path(args.folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "crystals.csv") as f:
        rows = list(csv.DictReader(f))
    formula = [r["formula"] for r in rows]
    struct_ok = np.array([r["struct_valid"] == "True" for r in rows])
    fp_ok = np.array([r["fingerprint"] == "True" for r in rows])
    density = np.array([float(r["density"]) for r in rows])
    n_el = np.array([int(r["n_elements"]) for r in rows])
    ref = reference_features(metrics["dataset"], metrics["reference_split"], progress=False)
    print(f"{len(rows)} crystals of {folder}; reference {len(ref)} crystals")
    print("table    comp valid %  wdist density (seed 0; mean +- sd, min-max over seeds)"
          "   wdist #elements (same)")  # fmt: skip
    for table in OXIDATION_TABLES:
        valid = struct_ok & fp_ok & formula_validity(formula, table) & (n_el > 0)
        rho, nel = [], []
        for seed in range(args.seeds):
            idx = property_subset(valid, 1000, seed)
            rho.append(wasserstein(density[idx], ref.density))
            nel.append(wasserstein(n_el[idx], ref.n_elements))
        rho, nel = np.array(rho), np.array(nel)
        print(
            f"{table:8s} {100 * valid.mean():11.2f}   {rho[0]:.3f} ({rho.mean():.3f} +- "
            f"{rho.std():.3f}, {rho.min():.3f}-{rho.max():.3f})   {nel[0]:.3f} ({nel.mean():.3f} "
            f"+- {nel.std():.3f}, {nel.min():.3f}-{nel.max():.3f})"
        )


if __name__ == "__main__":
    main()
