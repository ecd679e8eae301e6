"""Evaluate generated crystals the way the field does: CDVAE metrics, uniqueness, novelty,
symmetry statistics, and a report.

>>> ev = evaluate(structures, dataset="mp_20")          # doctest: +SKIP
>>> ev.metrics["validity"]["comp_valid"], ev.metrics["coverage"]["cov_recall"]  # doctest: +SKIP
>>> ev.write_report("eval_out")                          # doctest: +SKIP

Per-crystal features (validity, CrystalNN and magpie fingerprints, density, space group at
symprec 0.1, ...) are computed in worker processes. Those of a reference split (the test split,
for coverage and distribution distances) are computed once and cached under
``cache_dir()/eval/<dataset>_<split>_<digest>.npz`` (mp_20's ship in ``references/``); the
digest covers the source files' bytes, the row selection, ``limit`` and
:data:`FEATURE_VERSION`. Novelty is checked against the training crystals the local protocol
actually uses (``load_dataset(name, "train")``), whose reduced formulas are cached the same way
so only same-formula CIFs are parsed.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from pymatgen.core import Structure
from tqdm.auto import tqdm

from crystal_gpt.data.cache import cache_dir
from crystal_gpt.data.datasets import (
    DATASETS,
    DatasetError,
    RawRow,
    file_digest,
    iter_split_rows,
    parse_row,
    split_sources,
)
from crystal_gpt.evaluation.metrics import (
    COV_CUTOFFS,
    coverage,
    default_matcher,
    is_constructed,
    novel_mask,
    property_subset,
    smact_validity,
    structure_validity,
    symmetry_statistics,
    unique_mask,
    wasserstein,
)
from crystal_gpt.utils import atomic_path, parallel_map

FEATURE_VERSION = 1
SYMPREC = 0.1  # spglib tolerance for the symmetry statistics (the usual choice for generated sets)
STRUCT_FP_DIM = 61  # CrystalNNFingerprint "ops" preset
COMP_FP_DIM = 132  # magpie ElementProperty

PROTOCOL_TEXT = {
    "struct": "CDVAE: all periodic interatomic distances >= 0.5 A and V >= 0.1 A^3; "
    "share of all crystals",
    "comp": "CDVAE SMACT rule: charge neutral with smact Element.oxidation_states "
    "(neutral_ratios) and pauling_test; share of all crystals",
    "coverage": "CDVAE: CrystalNN 'ops' site-mean vs magpie (fixed CDVAE scaler) fingerprints, "
    "all generated vs the reference split; COV-P divides by all generated",
    "property": "CDVAE: scipy Wasserstein distance, up to 1,000 valid crystals drawn at random "
    "(seeded) vs the whole reference split",
    "uniqueness": "pymatgen StructureMatcher defaults (ltol 0.2, stol 0.3, angle_tol 5), "
    "compared within the same reduced formula; over all crystals",
    "symmetry": f"spglib (pymatgen SpacegroupAnalyzer) at symprec {SYMPREC}, angle 5 deg",
}


# ---------------------------------------------------------------------------------------------
# per-crystal features


@dataclass
class FeatureTable:
    """Per-crystal features as arrays (one row per crystal); what the metrics and the cache use."""

    ids: np.ndarray  # (N,) str
    formula: np.ndarray  # (N,) str, reduced formula
    num_atoms: np.ndarray  # (N,) int
    constructed: np.ndarray  # (N,) bool
    struct_valid: np.ndarray  # (N,) bool
    comp_valid: np.ndarray  # (N,) bool
    fp_ok: np.ndarray  # (N,) bool: both fingerprints computed
    struct_fp: np.ndarray  # (N, 61), NaN where it failed
    comp_fp: np.ndarray  # (N, 132) raw magpie, NaN where it failed
    density: np.ndarray  # (N,) g/cm^3
    n_elements: np.ndarray  # (N,) int
    spacegroup: np.ndarray  # (N,) int, 0: symmetry analysis failed
    lattice: np.ndarray  # (N, 6) conventional standard cell at SYMPREC (NaN where it failed)
    fp_error: np.ndarray  # (N,) str, why a fingerprint failed ("" if it did not)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def valid(self) -> np.ndarray:
        """CDVAE's ``valid``: structurally and compositionally valid, fingerprints computed."""
        return self.struct_valid & self.comp_valid & self.fp_ok

    def select(self, idx: np.ndarray) -> FeatureTable:
        return FeatureTable(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def save(self, path: Path) -> None:
        with atomic_path(path, ".npz") as tmp:  # a killed build never leaves a half-written cache
            np.savez_compressed(tmp, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> FeatureTable:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})

    @classmethod
    def from_rows(cls, rows: list[dict]) -> FeatureTable:
        def col(key, dtype, shape=()):
            if not rows:
                return np.zeros((0, *shape), dtype=dtype)
            return np.array([r[key] for r in rows], dtype=dtype)

        return cls(
            ids=col("id", str),
            formula=col("formula", str),
            num_atoms=col("num_atoms", np.int64),
            constructed=col("constructed", bool),
            struct_valid=col("struct_valid", bool),
            comp_valid=col("comp_valid", bool),
            fp_ok=col("fp_ok", bool),
            struct_fp=col("struct_fp", float, (STRUCT_FP_DIM,)),
            comp_fp=col("comp_fp", float, (COMP_FP_DIM,)),
            density=col("density", float),
            n_elements=col("n_elements", np.int64),
            spacegroup=col("spacegroup", np.int64),
            lattice=col("lattice", float, (6,)),
            fp_error=col("fp_error", str),
        )


_FEATURIZERS: tuple | None = None


def _featurizers():
    """matminer featurizers, built once per process (they load tables)."""
    global _FEATURIZERS
    if _FEATURIZERS is None:
        from matminer.featurizers.composition.composite import ElementProperty
        from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

        _FEATURIZERS = (
            CrystalNNFingerprint.from_preset("ops"),
            ElementProperty.from_preset("magpie"),
        )
    return _FEATURIZERS


def crystal_features(structure: Structure, name: str = "", fingerprints: bool = True) -> dict:
    """Everything the metrics need from one crystal (one row of a :class:`FeatureTable`).

    The fingerprints follow CDVAE: the CrystalNN "ops" fingerprint averaged over all sites of the
    cell as given, and the magpie composition vector; if either raises, the crystal keeps
    ``fp_ok=False`` (CDVAE then counts it as invalid and leaves it out of coverage).
    """
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    nan6 = [math.nan] * 6
    row = dict(id=name, num_atoms=len(structure), fp_error="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        constructed = is_constructed(structure)
        row["constructed"] = constructed
        row["struct_valid"] = structure_validity(structure)
        try:
            row["formula"] = structure.composition.reduced_formula
            row["comp_valid"] = smact_validity(structure.composition)
            row["n_elements"] = len(structure.composition.elements)
        except Exception:  # disordered or dummy species
            row.update(formula=str(structure.composition), comp_valid=False, n_elements=0)
        row["density"] = float(structure.density) if constructed else math.nan
        row["spacegroup"], row["lattice"] = 0, nan6
        if constructed:
            try:
                sga = SpacegroupAnalyzer(structure, symprec=SYMPREC)
                row["spacegroup"] = int(sga.get_space_group_number())
                row["lattice"] = list(sga.get_conventional_standard_structure().lattice.parameters)
            except Exception:
                pass
        row["struct_fp"] = [math.nan] * STRUCT_FP_DIM
        row["comp_fp"] = [math.nan] * COMP_FP_DIM
        row["fp_ok"] = False
        if not fingerprints:
            row["fp_error"] = "not computed"
            return row
        if not constructed:
            row["fp_error"] = "not constructed"
            return row
        site_fp, comp_fp = _featurizers()
        try:
            comp = comp_fp.featurize(structure.composition.element_composition)
            sites = np.array([site_fp.featurize(structure, i) for i in range(len(structure))])
            row["struct_fp"] = sites.mean(axis=0).tolist()
            row["comp_fp"] = [float(v) for v in comp]
            row["fp_ok"] = True
        except Exception as err:  # CrystalNN fails on e.g. overlapping atoms
            row["fp_error"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
    return row


def _features_job(job: tuple[str, Structure, bool]) -> dict:
    name, structure, fps = job
    return crystal_features(structure, name, fps)


def _row_features_job(job: tuple[RawRow, bool]) -> dict | None:
    row, fps = job
    rec = parse_row(row)
    if not hasattr(rec, "structure"):
        return None
    return crystal_features(rec.structure, rec.id, fps)


def featurize(
    structures: Sequence[Structure],
    names: Sequence[str] | None = None,
    *,
    fingerprints: bool = True,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "fingerprints",
) -> FeatureTable:
    """:func:`crystal_features` of many crystals in worker processes, with a progress bar."""
    names = list(names) if names is not None else [str(i) for i in range(len(structures))]
    jobs = ((n, s, fingerprints) for n, s in zip(names, structures, strict=True))
    if fingerprints:
        _featurizers()  # built before the workers fork, not once in each of them
    rows = parallel_map(_features_job, jobs, workers, len(structures), desc, progress, chunksize=4)
    return FeatureTable.from_rows(rows)


# ---------------------------------------------------------------------------------------------
# reference splits (cached)


def _split_key(dataset: str, split: str, limit: int | None, data_dir, kind: str) -> str:
    h = hashlib.sha256(f"{kind} v{FEATURE_VERSION} symprec={SYMPREC} limit={limit}".encode())
    if dataset in DATASETS:
        for path, rows in split_sources(dataset, split, data_dir):
            h.update(file_digest(path).encode())
            h.update(b"all" if rows is None else np.asarray(rows, np.int64).tobytes())
    else:
        path = Path(dataset)
        if not path.is_file():
            raise DatasetError(f"unknown dataset {dataset!r}: not one of {DATASETS}, nor a CSV")
        h.update(file_digest(path).encode())
    return h.hexdigest()[:16]


def _bundled(path: Path) -> Path:
    """The cache file if present, else the same file shipped in ``crystal_gpt/references``
    (the mp_20 test fingerprints and training formulas: 41 min of CrystalNN on 2 cores). The
    name carries the digest of the source files and settings, so a shipped file is only used
    when it was made from exactly the same data."""
    shipped = Path(__file__).parent / "references" / path.name
    return path if path.exists() or not shipped.exists() else shipped


def _cache_path(dataset: str, split: str, limit, data_dir, kind: str) -> Path:
    label = Path(dataset).stem if dataset not in DATASETS else dataset
    key = _split_key(dataset, split, limit, data_dir, kind)
    suffix = "" if kind == "features" else f"_{kind}"
    return cache_dir() / "eval" / f"{label}_{split}{suffix}_{key}.npz"


def _split_rows(dataset: str, split: str, limit: int | None, data_dir) -> list[RawRow]:
    rows = []
    for k, row in enumerate(iter_split_rows(dataset, split, data_dir)):
        if limit is not None and k >= limit:
            break
        rows.append(row)
    return rows


def reference_features(
    dataset: str = "mp_20",
    split: str = "test",
    *,
    limit: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
    data_dir: str | os.PathLike | None = None,
) -> FeatureTable:
    """Features (fingerprints included) of a dataset split, computed once and cached.

    ``limit`` takes the first N crystals of the split: for quick checks only, the numbers are
    then not the protocol's. Unreadable rows are skipped (the dataset loader reports them).
    """
    path = _cache_path(dataset, split, limit, data_dir, "features")
    if use_cache and _bundled(path).exists():
        return FeatureTable.load(_bundled(path))
    rows = _split_rows(dataset, split, limit, data_dir)
    desc = f"reference fingerprints {dataset}/{split}"
    _featurizers()
    out = parallel_map(
        _row_features_job,
        ((r, True) for r in rows),
        workers,
        len(rows),
        desc,
        progress,
        chunksize=4,
    )
    table = FeatureTable.from_rows([r for r in out if r is not None])
    if use_cache:
        table.save(path)
    return table


def _row_formula_job(row: RawRow) -> str | None:
    rec = parse_row(row)
    return rec.structure.composition.reduced_formula if hasattr(rec, "structure") else None


class TrainingSet:
    """The training crystals for novelty, parsed lazily: reduced formulas are cached per split,
    and only the CIFs whose formula occurs among the evaluated crystals are parsed."""

    def __init__(
        self,
        dataset: str = "mp_20",
        split: str = "train",
        *,
        limit: int | None = None,
        workers: int | None = None,
        progress: bool = True,
        use_cache: bool = True,
        data_dir: str | os.PathLike | None = None,
    ) -> None:
        self.dataset, self.split, self.limit, self.data_dir = dataset, split, limit, data_dir
        path = _cache_path(dataset, split, limit, data_dir, "formulas")
        if use_cache and _bundled(path).exists():
            with np.load(_bundled(path), allow_pickle=False) as z:
                self.formula, self.position = z["formula"], z["position"]
            return
        rows = _split_rows(dataset, split, limit, data_dir)
        desc = f"training formulas {dataset}/{split}"
        got = parallel_map(_row_formula_job, rows, workers, len(rows), desc, progress, 64)
        keep = [k for k, f in enumerate(got) if f is not None]
        self.formula = np.array([got[k] for k in keep], dtype=str)
        self.position = np.array(keep, dtype=np.int64)
        if use_cache:
            with atomic_path(path, ".npz") as tmp:
                np.savez_compressed(tmp, formula=self.formula, position=self.position)

    def __len__(self) -> int:
        return len(self.formula)

    def structures_for(self, formulas: set[str]) -> dict[str, list[Structure]]:
        """Training structures grouped by reduced formula, for the given formulas only."""
        wanted = set(self.position[np.isin(self.formula, list(formulas))].tolist())
        out: dict[str, list[Structure]] = defaultdict(list)
        if not wanted:
            return out
        for k, row in enumerate(iter_split_rows(self.dataset, self.split, self.data_dir)):
            if k > max(wanted):
                break
            if k in wanted:
                rec = parse_row(row)
                if hasattr(rec, "structure"):
                    out[rec.structure.composition.reduced_formula].append(rec.structure)
        return out


def build_reference(
    dataset: str = "mp_20",
    split: str = "test",
    *,
    train_split: str | None = "train",
    limit: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Fill the cache for a dataset: reference fingerprints of ``split`` and the training
    formulas of ``train_split``. Returns the cache files."""
    reference_features(
        dataset, split, limit=limit, workers=workers, progress=progress, data_dir=data_dir
    )
    out = {"reference": _cache_path(dataset, split, limit, data_dir, "features")}
    if train_split:
        TrainingSet(
            dataset, train_split, limit=limit, workers=workers, progress=progress, data_dir=data_dir
        )
        out["train"] = _cache_path(dataset, train_split, limit, data_dir, "formulas")
    return out


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
    """Crystals from a ``crystal-gpt sample`` folder, a folder of CIFs, an extxyz file, a
    summary.csv, a CDVAE-format CSV or one CIF. Unreadable files are skipped and listed in
    ``.errors`` (file and reason); a missing path or a folder without crystals raises."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / "summary.csv").exists():
            return _read_summary(path / "summary.csv", progress)
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
    if suffix == ".cif":
        out = _read_cif_files([path], [path.name], progress)
        if not out.structures:
            raise ValueError(f"{path}: {out.errors[0][1]}")
        out.source = str(path)
        return out
    raise ValueError(
        f"{path}: unknown input type {suffix!r} (want a folder, .cif, .extxyz, or .csv)"
    )


# ---------------------------------------------------------------------------------------------
# the evaluation


@dataclass
class Evaluation:
    """Result of :func:`evaluate`: JSON-able ``metrics``, per-crystal features and flags."""

    metrics: dict
    samples: FeatureTable
    reference: FeatureTable
    unique: np.ndarray | None
    novel: np.ndarray | None
    property_index: np.ndarray
    structures: list[Structure] = field(repr=False, default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def write_report(
        self, out_dir: str | os.PathLike, stability: dict | None = None, html: bool = True
    ) -> Path:
        """report.md (+ report.html), metrics.json, crystals.csv and the plots; see
        :func:`crystal_gpt.evaluation.report.write_report`."""
        from crystal_gpt.evaluation.report import write_report

        return write_report(self, out_dir, stability=stability, html=html)

    def crystal_table(self) -> list[dict]:
        """One row per evaluated crystal: the flags behind each metric."""
        s = self.samples
        in_prop = np.zeros(len(s), dtype=bool)
        in_prop[self.property_index] = True
        rows = []
        for i in range(len(s)):
            rows.append(
                dict(
                    name=str(s.ids[i]),
                    formula=str(s.formula[i]),
                    num_atoms=int(s.num_atoms[i]),
                    spacegroup=int(s.spacegroup[i]),
                    density=round(float(s.density[i]), 4),
                    n_elements=int(s.n_elements[i]),
                    struct_valid=bool(s.struct_valid[i]),
                    comp_valid=bool(s.comp_valid[i]),
                    fingerprint=bool(s.fp_ok[i]),
                    unique="" if self.unique is None else bool(self.unique[i]),
                    novel="" if self.novel is None else bool(self.novel[i]),
                    in_property_set=bool(in_prop[i]),
                )
            )
        return rows


def _pct(x: float) -> float:
    return round(100.0 * float(x), 4)


def evaluate(
    structures: Sequence[Structure] | str | os.PathLike,
    dataset: str = "mp_20",
    *,
    reference_split: str = "test",
    train_split: str | None = "train",
    reference_limit: int | None = None,
    n_property: int = 1000,
    seed: int = 0,
    cutoffs: tuple[float, float] | None = None,
    names: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
    data_dir: str | os.PathLike | None = None,
) -> Evaluation:
    """CDVAE metrics, uniqueness, novelty and symmetry statistics of generated crystals.

    ``structures``: pymatgen Structures, or a path :func:`load_structures` reads. Validity and
    coverage use all crystals; Wasserstein distances ``n_property`` valid crystals drawn at random
    with ``seed`` (all valid ones if fewer); the reference is ``reference_split`` of ``dataset``
    (its fingerprints cached). Novelty is against ``train_split`` (None: skip uniqueness and
    novelty). ``reference_limit`` uses only the first N crystals of both splits: quick checks,
    not comparable numbers. ``cutoffs``: (structure, composition) COV cutoffs, default by dataset.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    errors: list[tuple[str, str]] = []
    source = "structures"
    if isinstance(structures, str | os.PathLike):
        loaded = load_structures(structures, progress)
        structures, names, errors, source = (
            loaded.structures,
            loaded.names,
            loaded.errors,
            loaded.source,
        )
        timings["read"] = time.perf_counter() - t0
    structures = list(structures)
    if not structures:
        raise ValueError(
            "no crystals to evaluate" + (f" ({len(errors)} unreadable)" if errors else "")
        )
    if cutoffs is not None:
        cutoff_source = "given"
    elif dataset in COV_CUTOFFS:
        cutoffs, cutoff_source = COV_CUTOFFS[dataset], f"CDVAE's for {dataset}"
    else:
        cutoffs = COV_CUTOFFS["mp_20"]
        cutoff_source = f"mp_20's (CDVAE publishes none for {dataset})"
    kw = dict(workers=workers, progress=progress, use_cache=use_cache, data_dir=data_dir)

    t = time.perf_counter()
    ref = reference_features(dataset, reference_split, limit=reference_limit, **kw)
    ref_ok = ref.select(np.nonzero(ref.fp_ok)[0])
    if len(ref_ok) == 0:
        raise ValueError(f"no usable reference crystals in {dataset}/{reference_split}")
    timings["reference"] = time.perf_counter() - t

    t = time.perf_counter()
    gen = featurize(structures, names, workers=workers, progress=progress)
    timings["fingerprints"] = time.perf_counter() - t

    t = time.perf_counter()
    n = len(gen)
    validity = dict(
        constructed=_pct(gen.constructed.mean()),
        struct_valid=_pct(gen.struct_valid.mean()),
        comp_valid=_pct(gen.comp_valid.mean()),
        valid=_pct(gen.valid.mean()),
        fingerprint_failures=int((~gen.fp_ok).sum()),
    )
    if errors:  # CDVAE counts a crystal that cannot be built as invalid: show that view too
        validity["struct_valid_counting_unreadable"] = _pct(
            gen.struct_valid.sum() / (n + len(errors))
        )
        validity["comp_valid_counting_unreadable"] = _pct(gen.comp_valid.sum() / (n + len(errors)))
    ok = np.nonzero(gen.fp_ok)[0]
    cov = coverage(
        gen.struct_fp[ok],
        gen.comp_fp[ok],
        ref_ok.struct_fp,
        ref_ok.comp_fp,
        cutoffs[0],
        cutoffs[1],
        num_generated=n,
    )
    cov_pct = dict(
        cov_recall=_pct(cov["cov_recall"]),
        cov_precision=_pct(cov["cov_precision"]),
        **{k: round(v, 5) for k, v in cov.items() if k.startswith("am")},
        struct_cutoff=cutoffs[0],
        comp_cutoff=cutoffs[1],
        cutoffs=cutoff_source,
    )
    prop_idx = property_subset(gen.valid, n_property, seed)
    prop = dict(
        n_used=len(prop_idx),
        n_valid=int(gen.valid.sum()),
        seed=seed,
        wdist_density=round(wasserstein(gen.density[prop_idx], ref.density), 5),
        wdist_num_elements=round(wasserstein(gen.n_elements[prop_idx], ref.n_elements), 5),
        mean_density=round(float(np.nanmean(gen.density[prop_idx])), 4) if len(prop_idx) else None,
        mean_density_reference=round(float(np.nanmean(ref.density)), 4),
        mean_num_elements=round(float(gen.n_elements[prop_idx].mean()), 4)
        if len(prop_idx)
        else None,
        mean_num_elements_reference=round(float(ref.n_elements.mean()), 4),
    )
    symmetry = symmetry_statistics(gen.spacegroup, ref.spacegroup)
    symmetry = {
        k: (_pct(v) if k.startswith("p1") or k.endswith("tvd") else v) for k, v in symmetry.items()
    }
    timings["metrics"] = time.perf_counter() - t

    unique = novel = None
    un = None
    if train_split:
        t = time.perf_counter()
        matcher = default_matcher()
        unique = unique_mask(structures, matcher)
        train = TrainingSet(dataset, train_split, limit=reference_limit, **kw)
        formulas = {s.composition.reduced_formula for s in structures}
        novel = novel_mask(structures, train.structures_for(formulas), matcher)
        un = dict(
            unique=_pct(unique.mean()),
            novel=_pct(novel.mean()),
            unique_and_novel=_pct((unique & novel).mean()),
            valid_unique_novel=_pct((unique & novel & gen.valid).mean()),
            novel_p1_share=_pct((gen.spacegroup[novel] == 1).mean()) if novel.any() else None,
            train_crystals=len(train),
            train_split=train_split,
        )
        timings["uniqueness_novelty"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    metrics = dict(
        dataset=dataset,
        source=source,
        crystals=n,
        unreadable=len(errors),
        reference_split=reference_split,
        reference_crystals=len(ref),
        reference_limit=reference_limit,
        comparable=reference_limit is None and n_property == 1000,
        validity=validity,
        coverage=cov_pct,
        property=prop,
        uniqueness_novelty=un,
        symmetry=symmetry,
        reference_self=dict(
            struct_valid=_pct(ref.struct_valid.mean()),
            comp_valid=_pct(ref.comp_valid.mean()),
            fingerprint_failures=int((~ref.fp_ok).sum()),
        ),
        protocol=PROTOCOL_TEXT,
        timings_s={k: round(v, 2) for k, v in timings.items()},
    )
    return Evaluation(metrics, gen, ref, unique, novel, prop_idx, structures, errors)
