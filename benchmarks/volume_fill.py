"""How well sampled cells fit their atoms: the ratio of each crystal's cell volume to the sum
of the fitted volumes of its atoms (``data.geometry.element_volumes``, fitted to the training
split), for the training split, the test split and one or more sample folders; and the density
Wasserstein distance to the test split over all samples and over random 1,000-crystal subsets
(the CDVAE protocol takes one seeded subset of 1,000 valid crystals).

    python benchmarks/volume_fill.py runs/s10k/summary.csv [more summary.csv ...] --dataset mp_20
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Composition, Element
from scipy.stats import wasserstein_distance

from crystal_gpt import encode_dataset
from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.data.geometry import cell_volume, training_element_volumes
from crystal_gpt.data.symmetry import get_tables

QUANTILES = (0.001, 0.01, 0.05, 0.5, 0.95, 0.99, 0.999)
AMU_PER_A3 = 1.66053906660  # g/cm^3 for one atomic mass unit per cubic Angstrom


def split_figures(data: PaddedCrystals, volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Volume ratios and densities (g/cm^3) of the crystals of a padded split."""
    mult = get_tables().multiplicity
    mass = np.array([0.0] + [float(Element.from_Z(z).atomic_mass) for z in range(1, 119)])
    cells = cell_volume(torch.as_tensor(data.lattice, dtype=torch.float64)).numpy()
    fitted = np.zeros(len(cells))
    weight = np.zeros(len(cells))
    for i in range(len(cells)):
        k = int(data.n[i])
        m = mult[int(data.g[i]), data.w[i, :k]]
        a = data.a[i, :k]
        fitted[i] = float((m * volumes[a]).sum())
        weight[i] = float((m * mass[a]).sum())
    return cells / fitted, weight / cells * AMU_PER_A3


def sample_ratios(summary: pd.DataFrame, volumes: np.ndarray) -> np.ndarray:
    out = np.empty(len(summary))
    for i, (formula, volume, atoms) in enumerate(
        zip(summary.formula, summary.volume, summary.num_atoms, strict=True)
    ):
        comp = Composition(formula)
        scale = atoms / comp.num_atoms
        out[i] = volume / (scale * sum(volumes[Element(e).Z] * k for e, k in comp.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summaries", nargs="+", help="summary.csv files of sample folders")
    ap.add_argument("--dataset", default="mp_20")
    ap.add_argument("--subsets", type=int, default=20)
    args = ap.parse_args()
    train = PaddedCrystals(encode_dataset(args.dataset, "train", progress=False))
    test = PaddedCrystals(encode_dataset(args.dataset, "test", progress=False))
    volumes = training_element_volumes(train)
    r_train, _ = split_figures(train, volumes)
    r_test, d_test = split_figures(test, volumes)
    print(f"volume ratio (cell / fitted atoms) quantiles {QUANTILES}")
    print(f"  train ({len(r_train)}): {np.round(np.quantile(r_train, QUANTILES), 3).tolist()}")
    print(f"  test ({len(r_test)}): {np.round(np.quantile(r_test, QUANTILES), 3).tolist()}")
    lo, hi = np.quantile(r_train, [0.001, 0.999])
    outside = 100 * np.mean((r_test < lo) | (r_test > hi))
    print(f"  test outside the training 0.1-99.9% range: {outside:.2f}%")
    rng = np.random.default_rng(0)
    for path in args.summaries:
        s = pd.read_csv(path, keep_default_na=False)
        r = sample_ratios(s, volumes)
        d = s.density.to_numpy(float)
        subsets = [
            wasserstein_distance(rng.choice(d, min(1000, len(d)), replace=False), d_test)
            for _ in range(args.subsets)
        ]
        print(f"{path} ({len(s)} crystals)")
        print(f"  volume ratio quantiles: {np.round(np.quantile(r, QUANTILES), 3).tolist()}")
        print(
            f"  outside the training 0.1-99.9% range: {100 * np.mean((r < lo) | (r > hi)):.2f}% "
            f"(below {100 * np.mean(r < lo):.2f}%, above {100 * np.mean(r > hi):.2f}%)"
        )
        print(
            f"  density: mean {d.mean():.3f} (test {d_test.mean():.3f}), above 20 g/cm3 "
            f"{100 * np.mean(d > 20):.2f}% (test {100 * np.mean(d_test > 20):.2f}%)"
        )
        print(
            f"  density W1 to test: all {wasserstein_distance(d, d_test):.3f}; "
            f"{args.subsets} random subsets of 1,000: mean {np.mean(subsets):.3f}, "
            f"range {np.min(subsets):.3f}-{np.max(subsets):.3f}"
        )


if __name__ == "__main__":
    main()
