"""Reference data for the evaluation, computed once and cached: the fingerprints of a dataset
split, and the training set (its formulas, and its structures by formula) for novelty."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from importlib import resources
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystal_gpt.data.cache import cache_dir
from crystal_gpt.data.datasets import (
    DATASETS,
    DatasetError,
    RawRow,
    file_digest,
    iter_split_rows,
    parse_row,
    selects_ids,
    split_sources,
)
from crystal_gpt.evaluation.features import (
    FEATURE_VERSION,
    SYMPREC,
    FeatureTable,
    _featurizers,
    _row_features_job,
)
from crystal_gpt.utils import atomic_path, parallel_map

# ---------------------------------------------------------------------------------------------
# reference splits (cached)


def _split_key(dataset: str, split: str, limit: int | None, data_dir, kind: str) -> str:
    h = hashlib.sha256(f"{kind} v{FEATURE_VERSION} symprec={SYMPREC} limit={limit}".encode())
    if dataset in DATASETS:
        for path, rows in split_sources(dataset, split, data_dir):
            h.update(file_digest(path).encode())
            if rows is None:
                h.update(b"all")
            elif selects_ids(rows):  # a split by material ids (alex_pressure)
                h.update("\n".join(rows.tolist()).encode())
            else:
                h.update(np.asarray(rows, np.int64).tobytes())
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
    shipped = Path(str(resources.files("crystal_gpt") / "references" / path.name))
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
        got = parallel_map(_row_formula_job, rows, workers, len(rows), desc, progress)
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
