"""Generated crystals from files: a sample folder (summary.csv), parquet shards, CIF files,
extxyz, CSV of CIFs."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pymatgen.core import Structure
from tqdm.auto import tqdm

from crystal_gpt.data.datasets import (
    parse_row,
)

# ---------------------------------------------------------------------------------------------
# reading generated crystals


@dataclass
class LoadedStructures:
    structures: list[Structure]
    names: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file or entry, reason)
    source: str = ""


def _short(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _read_cif(path: Path) -> list[Structure]:
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = CifParser(path).parse_structures(primitive=False)
    if not structures:
        raise ValueError("no structure in the file")
    return structures


def _read_extxyz(path: Path) -> list[Structure]:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = read(path, index=":")
    return [AseAtomsAdaptor.get_structure(a) for a in frames]


def _read_cif_files(
    paths: Sequence[Path], names: Sequence[str], progress: bool
) -> LoadedStructures:
    out = LoadedStructures([], [])
    for p, name in tqdm(
        list(zip(paths, names, strict=True)),
        desc="reading CIFs",
        disable=not progress or len(paths) < 200,
        unit="file",
    ):
        try:
            structures = _read_cif(p)
        except Exception as err:  # pymatgen raises many types for bad CIFs
            out.errors.append((str(p), "cannot read CIF: " + _short(err)))
            continue
        for k, s in enumerate(structures):
            out.structures.append(s)
            out.names.append(name if len(structures) == 1 else f"{name}#{k}")
    return out


def _read_summary(path: Path, progress: bool) -> LoadedStructures:
    """A ``crystal-gpt sample`` folder's summary.csv: its extxyz when consistent (the exact
    decoded atoms; a CIF reader rejects or merges coinciding atoms), else the listed CIFs."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    if "cif" not in rows[0]:
        raise ValueError(f"{path}: no 'cif' column (columns: {list(rows[0])})")
    first = rows[0]["cif"]
    if "\n" in first or first.lstrip().startswith(("data_", "#")):  # CDVAE CSV: CIF text
        return _read_csv_cifs(path, progress)
    folder = path.parent
    names = [r["cif"] for r in rows]
    xyz = folder / "samples.extxyz"
    if xyz.exists():
        try:
            structures = _read_extxyz(xyz)
            formulas = [s.composition.reduced_formula for s in structures]
            if len(structures) == len(rows) and all(
                f == r.get("formula", f) for f, r in zip(formulas, rows, strict=True)
            ):
                return LoadedStructures(structures, names, source=f"{xyz} (with {path.name})")
        except Exception:
            pass  # fall back to the CIFs
    out = _read_cif_files([folder / n for n in names], names, progress)
    out.source = f"{path} (CIFs)"
    return out


def _read_parquet(paths: list[Path], source: str) -> LoadedStructures:
    """``crystal-gpt sample --format parquet`` shards (the exact atoms, not the CIF column)."""
    from crystal_gpt.sampling.shards import read_shard_structures

    out = LoadedStructures([], [], source=source)
    for path in paths:
        try:
            names, structures = read_shard_structures(path)
        except Exception as err:  # not parquet, or not our columns
            out.errors.append((str(path), "cannot read as crystal-gpt parquet: " + _short(err)))
            continue
        out.names += names
        out.structures += structures
    if not out.structures and out.errors:
        raise ValueError(f"{source}: {out.errors[0][1]}")
    return out


def _read_csv_cifs(path: Path, progress: bool) -> LoadedStructures:
    from crystal_gpt.data.datasets import read_rows

    out = LoadedStructures([], [], source=str(path))
    for row in tqdm(read_rows(path), desc="reading CSV", disable=not progress, unit="row"):
        rec = parse_row(row)
        if hasattr(rec, "structure"):
            out.structures.append(rec.structure)
            out.names.append(rec.id)
        else:
            out.errors.append((f"{path.name} row {row.row} ({row.id})", rec.reason))
    return out


def load_structures(path: str | os.PathLike, progress: bool = True) -> LoadedStructures:
    """Crystals from a ``crystal-gpt sample`` folder (CIFs or parquet shards), a folder of CIFs,
    a parquet file, an extxyz file, a summary.csv, a CDVAE-format CSV or one CIF. Unreadable
    files are skipped and listed in ``.errors`` (file and reason); a missing path or a folder
    without crystals raises."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / "summary.csv").exists():
            return _read_summary(path / "summary.csv", progress)
        shards = sorted(path.glob("*.parquet"))
        if shards:
            return _read_parquet(shards, f"{path} ({len(shards)} parquet shards)")
        cifs = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".cif" and p.is_file())
        if cifs:
            out = _read_cif_files(cifs, [str(p.relative_to(path)) for p in cifs], progress)
            out.source = f"{path} ({len(cifs)} CIF files)"
            return out
        xyz = sorted(path.glob("*.extxyz"))
        if len(xyz) == 1:
            return load_structures(xyz[0], progress)
        raise ValueError(f"{path}: no summary.csv, CIF files or single .extxyz file in the folder")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix in (".csv", ".csv.gz"):
        if suffix == ".csv.gz":
            return _read_csv_cifs(path, progress)
        return _read_summary(path, progress)
    if suffix in (".extxyz", ".xyz"):
        try:
            structures = _read_extxyz(path)
        except Exception as err:
            raise ValueError(f"{path}: cannot read as extxyz: {_short(err)}") from err
        return LoadedStructures(
            structures, [f"{path.name}#{i}" for i in range(len(structures))], source=str(path)
        )
    if suffix == ".parquet":
        return _read_parquet([path], str(path))
    if suffix == ".cif":
        out = _read_cif_files([path], [path.name], progress)
        if not out.structures:
            raise ValueError(f"{path}: {out.errors[0][1]}")
        out.source = str(path)
        return out
    raise ValueError(
        f"{path}: unknown input type {suffix!r} (want a folder, .cif, .extxyz, .parquet or .csv)"
    )
