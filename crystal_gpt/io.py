"""Writing generated crystals: one CIF each (with its symmetry), one extxyz, a CSV summary."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

from crystal_gpt.representation import WyckoffCrystal
from crystal_gpt.symmetry import get_tables

SUMMARY_FIELDS = (
    "index",
    "formula",
    "spacegroup",
    "symbol",
    "wyckoff",
    "num_atoms",
    "num_sites",
    "volume",
    "density",
    "cif",
)


def write_samples(
    crystals: list[WyckoffCrystal],
    structures: list[Structure],
    out_dir: str | Path,
    loglik: dict[str, list[float]] | None = None,
    symprec: float = 0.01,
) -> Path:
    """Write ``crystal_00000.cif`` ... (CIFs carry the space group and symmetry-distinct sites),
    ``samples.extxyz`` and ``summary.csv``; returns the folder."""
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor

    out = Path(out_dir)
    (out / "cif").mkdir(parents=True, exist_ok=True)
    tables = get_tables()
    rows = []
    atoms = []
    for i, (wc, s) in enumerate(zip(crystals, structures, strict=True)):
        name = f"crystal_{i:05d}.cif"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                CifWriter(s, symprec=symprec).write_file(out / "cif" / name)
            except Exception:  # symmetry finding can fail on odd samples: write them in P1
                CifWriter(s).write_file(out / "cif" / name)
        row = {
            "index": i,
            "formula": s.composition.reduced_formula,
            "spacegroup": wc.spacegroup,
            "symbol": str(tables.symbol[wc.spacegroup]),
            "wyckoff": " ".join(
                f"{m}{site[0]}:{site[1]}"
                for site, m in zip(wc.sites, wc.multiplicities, strict=True)
            ),
            "num_atoms": len(s),
            "num_sites": wc.num_sites,
            "volume": round(s.volume, 4),
            "density": round(float(s.density), 4),
            "cif": f"cif/{name}",
        }
        for key, values in (loglik or {}).items():
            row[f"loglik_{key}"] = round(float(values[i]), 4)
        rows.append(row)
        at = AseAtomsAdaptor.get_atoms(s)
        at.info.update(spacegroup=wc.spacegroup, formula=row["formula"])
        atoms.append(at)
    ase_write(out / "samples.extxyz", atoms, format="extxyz")
    fields = list(SUMMARY_FIELDS) + [f"loglik_{k}" for k in (loglik or {})]
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return out
