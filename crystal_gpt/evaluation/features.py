"""Per-crystal features for the evaluation: validity, symmetry, CDVAE fingerprints (CrystalNN
structure, magpie composition), lattice and density, computed in worker processes."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from pymatgen.core import Structure
from tqdm.auto import tqdm

from crystal_gpt.data.datasets import (
    RawRow,
    parse_row,
)
from crystal_gpt.evaluation.metrics import (
    is_constructed,
    smact_validity,
    structure_validity,
)
from crystal_gpt.utils import JobFailure, atomic_path, supervised_map

FEATURE_VERSION = 1
TIME_LIMIT = 300.0  # s per crystal for its features (CrystalNN: ~0.5 s for 10 atoms, one core)
SYMPREC = 0.1  # spglib tolerance for the symmetry statistics (the usual choice for generated sets)
STRUCT_FP_DIM = 61  # CrystalNNFingerprint "ops" preset
COMP_FP_DIM = 132  # magpie ElementProperty


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


def failed_row(name: str, structure: Structure, reason: str) -> dict:
    """The row of a crystal whose features could not be computed: invalid, no fingerprint."""
    try:
        formula = structure.composition.reduced_formula
        n_elements = len(structure.composition.elements)
    except Exception:  # disordered or dummy species
        formula, n_elements = str(structure.composition), 0
    return dict(
        id=name, num_atoms=len(structure), fp_error=reason, formula=formula, n_elements=n_elements,
        constructed=is_constructed(structure), struct_valid=False, comp_valid=False, fp_ok=False,
        density=math.nan, spacegroup=0, lattice=[math.nan] * 6,
        struct_fp=[math.nan] * STRUCT_FP_DIM, comp_fp=[math.nan] * COMP_FP_DIM,
    )  # fmt: skip


def featurize(
    structures: Sequence[Structure],
    names: Sequence[str] | None = None,
    *,
    fingerprints: bool = True,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "fingerprints",
    time_limit: float | None = TIME_LIMIT,
) -> FeatureTable:
    """:func:`crystal_features` of many crystals in watched worker processes, with a progress
    bar. A crystal whose worker dies or runs past ``time_limit`` seconds gets a
    :func:`failed_row` (counted invalid, the reason in ``fp_error``); the others go on."""
    names = list(names) if names is not None else [str(i) for i in range(len(structures))]
    jobs = [(n, s, fingerprints) for n, s in zip(names, structures, strict=True)]
    if fingerprints:
        _featurizers()  # built before the workers fork, not once in each of them
    rows: list = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="crystal", disable=not progress, file=sys.stderr)
    for i, row in supervised_map(_features_job, jobs, workers or os.cpu_count() or 1, time_limit):
        if isinstance(row, JobFailure):
            row = failed_row(names[i], structures[i], f"feature worker: {row.reason}")
        rows[i] = row
        bar.update()
    bar.close()
    return FeatureTable.from_rows(rows)
