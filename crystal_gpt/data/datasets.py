"""Benchmark datasets (CDVAE-format CSVs) loaded by name, with the splits of their protocols.

The four benchmark datasets ship gzipped inside the package (``crystal_gpt/datasets``). A
directory with the complete published files can be given instead (``data_dir=`` or the
``CRYSTAL_GPT_DATA`` environment variable, laid out as ``<dir>/<name>/<split>.csv[.gz]``).

Splits, per dataset:
- ``train`` / ``holdout`` / ``test``: the protocol. With the full ``train`` file present this is
  the standard train / val / test. Without it (the vendored mp_20, carbon_24, mpts_52) it is the
  local protocol: the available training-like files are pooled and a fixed, seeded 5% is held
  out for early stopping; ``test`` stays the published test split.
- any file name (``val``, ``train_first1000``, ...): that file as it is.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

DATASETS = ("perov_5", "carbon_24", "mp_20", "mpts_52", "alex_pressure")
# alex_pressure: pymatgen ComputedStructureEntry JSON files, one per pressure, as published
# (their README gives provenance); a split is a set of materials (every pressure of each)
PRESSURE_DATASET = "alex_pressure"
PRESSURES = (0, 25, 50, 75, 100, 125, 150)  # GPa
PRESSURE_SHA256 = {
    "P000": "10ded841c7c0b206a2eabc768b06f605d3ce22f27363c779dbbcbc3012457950",
    "P025": "7ad7aa6eb1698ee41cb3c1f092c1aa8fcd0277fc9b92218d34e731950747e828",
    "P050": "b3b988b3ee9f5510f4ebd4b7e74119c30bf12534b3983be7cc666c0d40347a61",
    "P075": "731fff716c08631c51313567c16614e4ce2a732aca499f7d5dce1508551bb921",
    "P100": "18082661ce0b645fc631c97e2896938d704b430130290421836b0b5526b0b480",
    "P125": "78353bec8bf4c293966f9e023627da4b117929275a556b0e356f1da3b3aa7a5d",
    "P150": "f9cc4a611dac2b632e18752bc5d2b0cfe4b20a60917ab36c01b2cdbcf85328ca",
    "splits": "96c5ffe5a75e45fa218639971ff58c8d766cee02addbb2dbb355a40d281f0999",
}
# the material-level split's names -> this project's protocol split names
PRESSURE_SPLITS = {"train": "train", "holdout": "val", "val": "val", "test": "test"}
PROTOCOL_SPLITS = ("train", "holdout", "test")
HOLDOUT_FRACTION = 0.05
HOLDOUT_SEED = 20240101
# Files pooled for training when the full train file is absent (local protocol).
LOCAL_TRAIN_FILES = {
    "mp_20": ("train_first1000", "val"),
    "carbon_24": ("val",),
    "mpts_52": ("val",),
    "perov_5": ("train",),
}


class DatasetError(ValueError):
    """An unknown dataset or split, or an unreadable file."""


@dataclass(frozen=True)
class RowError:
    """A row that could not be turned into a crystal, with the reason."""

    source: str
    row: int
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source} row {self.row} (id {self.id}): {self.reason}"


@dataclass(frozen=True)
class RawRow:
    """One CSV row before parsing: what travels to worker processes."""

    source: str
    row: int
    id: str
    cif: str
    properties: dict
    error: str | None = None
    structure: dict | None = None  # a pymatgen Structure dict instead of CIF text


@dataclass
class CrystalRecord:
    id: str
    structure: Structure
    properties: dict = field(default_factory=dict)


@dataclass
class CrystalDataset(Sequence[CrystalRecord]):
    """Parsed crystals of one split, plus the rows that failed (never silently dropped)."""

    name: str
    split: str
    records: list[CrystalRecord]
    errors: list[RowError]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # type: ignore[override]
        return self.records[i]

    def __iter__(self) -> Iterator[CrystalRecord]:
        return iter(self.records)

    @property
    def structures(self) -> list[Structure]:
        return [r.structure for r in self.records]


def _bundled_dir() -> Path:
    return Path(str(resources.files("crystal_gpt") / "datasets"))


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where datasets are looked up, first match wins: the argument, $CRYSTAL_GPT_DATA, bundled."""
    dirs = []
    for d in (data_dir, os.environ.get("CRYSTAL_GPT_DATA")):
        if d:
            dirs.append(Path(d))
    dirs.append(_bundled_dir())
    return dirs


def available_files(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """File splits of a dataset: split name -> path (the first directory that has it wins)."""
    if name not in DATASETS:
        raise DatasetError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or a CSV path)"
        )
    found: dict[str, Path] = {}
    for d in reversed(data_dirs(data_dir)):
        folder = d / name
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            for suffix in (".csv.gz", ".csv", ".json.bz2"):
                if path.name.endswith(suffix):
                    found[path.name[: -len(suffix)]] = path
    if not found:
        raise DatasetError(
            f"no files for dataset {name!r} in {[str(d) for d in data_dirs(data_dir)]}"
        )
    return found


def protocol(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, object]:
    """How the protocol splits of a dataset are made from its files (for reports and logs)."""
    files = available_files(name, data_dir)
    if name == PRESSURE_DATASET:
        return {"kind": "material", "splits": "splits.csv.gz", "holdout": "val"}
    if "train" in files and "val" in files:
        return {"kind": "standard", "train": ["train"], "holdout": ["val"], "test": ["test"]}
    pool = [f for f in LOCAL_TRAIN_FILES[name] if f in files]
    return {
        "kind": "local",
        "train": pool,
        "holdout": pool,
        "holdout_fraction": HOLDOUT_FRACTION,
        "holdout_seed": HOLDOUT_SEED,
        "test": ["test"],
    }


def holdout_mask(
    n: int, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> np.ndarray:
    """Boolean mask of the fixed, seeded hold-out rows of a pool of n rows."""
    n_hold = round(fraction * n)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_hold]] = True
    return mask


def verified(path: Path) -> Path:
    """An alex_pressure file whose sha256 is the published one, or an error saying it is not."""
    key = path.name.split(".")[0]
    want = PRESSURE_SHA256.get(key)
    if want is not None and file_digest(path) != want:
        raise DatasetError(
            f"{path}: sha256 differs from the published file's ({want[:12]}...): a damaged "
            "or changed copy"
        )
    return path


def material_split(split: str, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """alex_pressure: the material ids of a split (``train``, ``holdout`` = ``val``, ``test``)."""
    if split not in PRESSURE_SPLITS:
        raise DatasetError(
            f"dataset {PRESSURE_DATASET!r} has no split {split!r}; known: train, holdout "
            "(= val), test"
        )
    path = verified(available_files(PRESSURE_DATASET, data_dir)["splits"])
    with _open_text(path) as f:
        rows = list(csv.DictReader(f))
    return np.array(sorted(r["mat_id"] for r in rows if r["split"] == PRESSURE_SPLITS[split]))


def pressure_files(
    pressures: Iterable[float] | None = None, data_dir: str | os.PathLike | None = None
) -> list[Path]:
    """alex_pressure's files for these pressures (GPa; None: all seven), checked."""
    files = available_files(PRESSURE_DATASET, data_dir)
    asked = PRESSURES if pressures is None else list(pressures)
    out = []
    for p in asked:
        if p not in PRESSURES:
            raise DatasetError(
                f"alex_pressure has no pressure {p!r} GPa; its pressures: "
                f"{', '.join(map(str, PRESSURES))} (a conditioned model samples any)"
            )
        out.append(verified(files[f"P{int(p):03d}"]))
    return out


def split_sources(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    pressures: Iterable[float] | None = None,
) -> list[tuple[Path, np.ndarray | None]]:
    """The files behind a split, each with the row selection it uses (None: all rows): row
    numbers, or for alex_pressure the material ids (``keep_rows`` applies either)."""
    if name == PRESSURE_DATASET:
        ids = material_split(split, data_dir)
        return [(path, ids) for path in pressure_files(pressures, data_dir)]
    if pressures is not None:
        raise DatasetError(f"pressures= is an alex_pressure option; {name!r} has none")
    files = available_files(name, data_dir)
    if split in files and split not in PROTOCOL_SPLITS:
        return [(files[split], None)]
    if split not in PROTOCOL_SPLITS:
        known = sorted({*PROTOCOL_SPLITS, *files})
        raise DatasetError(f"dataset {name!r} has no split {split!r}; known: {', '.join(known)}")
    proto = protocol(name, data_dir)
    if split == "test" or proto["kind"] == "standard":
        return [(files[f], None) for f in proto[split]]  # type: ignore[union-attr]
    paths = [files[f] for f in proto["train"]]  # type: ignore[union-attr]
    sizes = [count_rows(p) for p in paths]
    mask = holdout_mask(sum(sizes))
    if split == "train":
        mask = ~mask
    out, start = [], 0
    for p, n in zip(paths, sizes, strict=True):
        out.append((p, np.nonzero(mask[start : start + n])[0]))
        start += n
    return out


def selects_ids(selection: np.ndarray) -> bool:
    """A split selection is row numbers, or (as text) ids: alex_pressure's material ids."""
    return selection.dtype.kind in "US"


def keep_rows(rows: np.ndarray, ids: np.ndarray, selection: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows a split selection takes."""
    return np.isin(np.asarray(ids) if selects_ids(selection) else np.asarray(rows), selection)


def file_split_rows(path: Path, split: str) -> np.ndarray | None:
    """Rows of a user's CSV file that a split takes: ``train`` / ``holdout`` split it with the
    local protocol's seeded 5% hold-out (so early stopping never sees training rows); any
    other split name is the whole file (None)."""
    if split not in ("train", "holdout"):
        return None
    hold = holdout_mask(count_rows(path))
    return np.nonzero(hold if split == "holdout" else ~hold)[0]


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_rows(path: Path) -> int:
    return sum(1 for _ in read_rows(path))


_NOT_PROPERTIES = {"", "cif", "material_id"}


def _coerce(value: str):
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value in ("True", "False"):
        return value == "True"
    return value


def pressure_of(path: Path) -> float:
    """GPa of an alex_pressure file, from its name (P050.json.bz2 -> 50)."""
    return float(int(Path(path).name[1:4]))


def read_entries(path: Path) -> Iterator[RawRow]:
    """Rows of an alex_pressure file: ComputedStructureEntry dicts read as data (JSON), the
    structure kept as a dict, the properties flattened; ``energy`` is the enthalpy per cell."""
    try:
        with bz2.open(path, "rt", encoding="utf-8") as f:
            entries = json.load(f)["entries"]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: cannot read as a bz2 JSON entries file: {err}") from err
    pressure = pressure_of(path)
    for i, e in enumerate(entries):
        data = e.get("data", {}) if isinstance(e, dict) else {}
        row_id = str(data.get("mat_id", i))
        structure = e.get("structure") if isinstance(e, dict) else None
        if not isinstance(structure, dict):
            yield RawRow(path.name, i, row_id, "", {}, error="entry without a structure")
            continue
        n = len(structure.get("sites", ())) or 1
        stress = np.asarray(data.get("stress", np.full((3, 3), np.nan)), dtype=float)
        props = {
            "pressure": pressure,
            "enthalpy_per_atom": float(e.get("energy", np.nan)) / n,
            "e_form": data.get("e_form"),
            "e_above_hull": data.get("e_above_hull"),
            "band_gap": data.get("band_gap_ind"),
            "band_gap_dir": data.get("band_gap_dir"),
            "spg": data.get("spg"),
            # the DFT cell's pressure from its stress (kbar -> GPa), near the nominal one
            "stress_pressure": float(np.trace(stress)) / 30.0 if stress.shape == (3, 3) else None,
            "formula": data.get("formula"),
        }
        yield RawRow(path.name, i, row_id, "", props, structure=structure)


def read_rows(path: Path) -> Iterator[RawRow]:
    """Rows of a CDVAE-format CSV (the CIF is a quoted multi-line field, so a real CSV parser),
    or of an alex_pressure entries file (``.json.bz2``)."""
    path = Path(path)
    if path.name.endswith(".json.bz2"):
        yield from read_entries(path)
        return
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise DatasetError(f"{path}: empty file") from None
            if "cif" not in header:
                raise DatasetError(f"{path}: no 'cif' column (columns: {header})")
            cif_col = header.index("cif")
            id_col = header.index("material_id") if "material_id" in header else None
            for i, values in enumerate(reader):
                row_id = values[id_col] if id_col is not None and id_col < len(values) else str(i)
                if len(values) != len(header):
                    reason = f"expected {len(header)} columns, found {len(values)}"
                    yield RawRow(path.name, i, row_id, "", {}, error=reason)
                    continue
                props = {
                    k: _coerce(v)
                    for k, v in zip(header, values, strict=True)
                    if k not in _NOT_PROPERTIES
                }
                yield RawRow(path.name, i, row_id, values[cif_col], props)
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: cannot read as a CSV file: {err}") from err


def parse_row(row: RawRow) -> CrystalRecord | RowError:
    """CIF text -> Structure, or the reason it failed (kept with the row's id)."""
    if row.error is not None:
        return RowError(row.source, row.row, row.id, row.error)
    if row.structure is not None:
        try:
            structure = Structure.from_dict(row.structure)
        except Exception as err:  # pymatgen raises many types for a bad dict
            return RowError(row.source, row.row, row.id, f"malformed structure: {err}")
        return CrystalRecord(row.id, structure, row.properties)
    if not row.cif.strip():
        return RowError(row.source, row.row, row.id, "empty CIF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(row.cif, fmt="cif")
    except Exception as err:  # pymatgen raises many types for bad CIFs
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return RowError(row.source, row.row, row.id, f"malformed CIF: {msg}")
    if len(structure) == 0:
        return RowError(row.source, row.row, row.id, "CIF has no atoms")
    return CrystalRecord(row.id, structure, row.properties)


def iter_split_rows(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    pressures: Iterable[float] | None = None,
) -> Iterator[RawRow]:
    """Raw rows of a named split, or of a CSV path given as ``name``."""
    sources = (
        [(Path(name), file_split_rows(Path(name), split))]
        if _is_path(name)
        else split_sources(name, split, data_dir, pressures)
    )
    for path, rows in sources:
        if rows is None:
            yield from read_rows(path)
            continue
        keep = set(rows.tolist())
        by_id = selects_ids(rows)
        yield from (r for r in read_rows(path) if (r.id if by_id else r.row) in keep)


def _is_path(name: str) -> bool:
    return name not in DATASETS and (
        name.endswith((".csv", ".csv.gz")) or os.sep in name or Path(name).exists()
    )


def load_dataset(
    name: str,
    split: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    strict: bool = False,
    pressures: Iterable[float] | None = None,
) -> CrystalDataset:
    """Crystals of a named dataset split (or a CSV file path) as pymatgen Structures.

    ``alex_pressure``: each record is one material at one pressure, with ``pressure`` (GPa),
    ``enthalpy_per_atom``, ``e_form``, ``e_above_hull``, ``band_gap`` ... in its properties;
    ``pressures`` picks some of 0, 25, ..., 150 GPa (default all); the split is by material.

    ``split`` defaults to ``train`` for a named dataset and to the whole file for a path; a
    path with ``train`` / ``holdout`` is split by the seeded 5% hold-out (``file_split_rows``).
    Rows that fail to parse are listed in ``.errors`` with their row number and id (and a
    warning is issued); ``strict=True`` raises on the first one instead.
    """
    split = split or ("file" if _is_path(name) else "train")
    if not _is_path(name) and name not in DATASETS:
        raise DatasetError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or a CSV path)"
        )
    if _is_path(name) and not Path(name).exists():
        raise DatasetError(f"no such file: {name}")
    records: list[CrystalRecord] = []
    errors: list[RowError] = []
    for k, row in enumerate(iter_split_rows(name, split, data_dir, pressures)):
        if limit is not None and k >= limit:
            break
        out = parse_row(row)
        if isinstance(out, RowError):
            if strict:
                raise DatasetError(str(out))
            errors.append(out)
        else:
            records.append(out)
    label = Path(name).name if _is_path(name) else f"{name}/{split}"
    if errors:
        warnings.warn(
            f"{len(errors)} row(s) of {label} could not be read; first: {errors[0]}", stacklevel=2
        )
    if _is_path(name):
        return CrystalDataset(Path(name).name, "file", records, errors)
    return CrystalDataset(name, split, records, errors)
