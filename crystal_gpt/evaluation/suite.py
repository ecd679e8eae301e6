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

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystal_gpt.evaluation.features import SYMPREC, TIME_LIMIT, FeatureTable, featurize
from crystal_gpt.evaluation.metrics import (
    COV_CUTOFFS,
    DEFAULT_OXIDATION_TABLE,
    OXIDATION_TABLES,
    coverage,
    coverage_from_distances,
    default_matcher,
    formula_validity,
    nearest_distances,
    novel_mask,
    property_subset,
    symmetry_statistics,
    unique_mask,
    wasserstein,
)
from crystal_gpt.evaluation.readers import load_structures
from crystal_gpt.evaluation.references import TrainingSet, reference_features

COMP_PROTOCOL = {
    "smact14": "CDVAE SMACT rule as CDVAE ran it (SMACT 2.2.1: 2014 oxidation-state table, "
    "neutral_ratios and pauling_test, a missing electronegativity counted valid); "
    "share of all crystals",
    "icsd24": "CDVAE SMACT rule with SMACT's ICSD-2024 oxidation-state table and the installed "
    "SMACT's pauling_test (a missing electronegativity counted invalid); share of all crystals; "
    "not the rule behind the published tables",
}
PROTOCOL_TEXT = {
    "struct": "CDVAE: all periodic interatomic distances >= 0.5 A and V >= 0.1 A^3; "
    "share of all crystals",
    "comp": COMP_PROTOCOL[DEFAULT_OXIDATION_TABLE],
    "coverage": "CDVAE: CrystalNN 'ops' site-mean vs magpie (fixed CDVAE scaler) fingerprints, "
    "all generated vs the reference split; COV-P divides by all generated",
    "property": "CDVAE: scipy Wasserstein distance, up to 1,000 valid crystals drawn at random "
    "(seeded) vs the whole reference split",
    "uniqueness": "pymatgen StructureMatcher defaults (ltol 0.2, stol 0.3, angle_tol 5), "
    "compared within the same reduced formula; over all crystals",
    "symmetry": f"spglib (pymatgen SpacegroupAnalyzer) at symprec {SYMPREC}, angle 5 deg",
}


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
    # per crystal: fingerprint distances to the nearest reference crystal (nan: no fingerprint)
    nearest_struct: np.ndarray | None = None
    nearest_comp: np.ndarray | None = None
    cutoffs: tuple[float, float] | None = None

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
        near_s = np.full(len(s), np.nan) if self.nearest_struct is None else self.nearest_struct
        near_c = np.full(len(s), np.nan) if self.nearest_comp is None else self.nearest_comp
        covered = np.zeros(len(s), dtype=bool)
        if self.cutoffs is not None:  # what COV-P counts: close in structure and composition
            with np.errstate(invalid="ignore"):
                covered = (near_s <= self.cutoffs[0]) & (near_c <= self.cutoffs[1])
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
                    nearest_struct="" if np.isnan(near_s[i]) else round(float(near_s[i]), 4),
                    nearest_comp="" if np.isnan(near_c[i]) else round(float(near_c[i]), 4),
                    covered=bool(covered[i]),
                    unique="" if self.unique is None else bool(self.unique[i]),
                    novel="" if self.novel is None else bool(self.novel[i]),
                    in_property_set=bool(in_prop[i]),
                )
            )
        return rows


def _pct(x: float) -> float:
    return round(100.0 * float(x), 4)


PROTOCOL_CRYSTALS = 10_000
PROTOCOL_PROPERTY = 1_000


def protocol_departures(
    *,
    dataset: str,
    generated: int,
    n_property_used: int,
    reference_split: str,
    reference_limit: int | None,
    cutoffs_given: bool,
    oxidation_table: str,
) -> list[str]:
    """Every way a run departs from the CDVAE protocol behind the published tables (empty: the
    numbers are comparable with them)."""
    out = []
    if dataset not in COV_CUTOFFS:
        out.append(f"dataset {dataset!r} has no published table")
    if generated != PROTOCOL_CRYSTALS:
        out.append(f"{generated} generated crystals (protocol: {PROTOCOL_CRYSTALS:,})")
    if n_property_used != PROTOCOL_PROPERTY:
        out.append(
            f"property statistics on {n_property_used} valid crystals "
            f"(protocol: {PROTOCOL_PROPERTY:,})"
        )
    if reference_split != "test":
        out.append(f"reference split {reference_split!r} (protocol: test)")
    if reference_limit is not None:
        out.append(f"reference limited to the first {reference_limit} crystals")
    if cutoffs_given:
        out.append("coverage cutoffs given, not the dataset's")
    if oxidation_table != DEFAULT_OXIDATION_TABLE:
        out.append(
            f"oxidation-state table {oxidation_table!r} (protocol: {DEFAULT_OXIDATION_TABLE!r}, "
            "SMACT 2.2.1 as CDVAE pins it)"
        )
    return out


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
    oxidation_table: str = DEFAULT_OXIDATION_TABLE,
    time_limit: float | None = TIME_LIMIT,
) -> Evaluation:
    """CDVAE metrics, uniqueness, novelty and symmetry statistics of generated crystals.

    ``structures``: pymatgen Structures, or a path :func:`load_structures` reads. Validity and
    coverage use all crystals; Wasserstein distances ``n_property`` valid crystals drawn at random
    with ``seed`` (all valid ones if fewer); the reference is ``reference_split`` of ``dataset``
    (its fingerprints cached). Novelty is against ``train_split`` (None: skip uniqueness and
    novelty). ``reference_limit`` uses only the first N crystals of both splits: quick checks,
    not comparable numbers. ``cutoffs``: (structure, composition) COV cutoffs, default by dataset.
    ``time_limit``: seconds per crystal for its features; a crystal past it, or whose worker
    dies, counts as invalid (``fp_error`` says why). ``oxidation_table``: the SMACT rule's
    table (:data:`OXIDATION_TABLES`); the default is the one the published tables used.
    ``metrics["comparable"]`` is true only when every condition of the protocol holds;
    ``metrics["departures"]`` lists those that do not.
    """
    if oxidation_table not in OXIDATION_TABLES:
        raise ValueError(
            f"unknown oxidation-state table {oxidation_table!r}; choose from {OXIDATION_TABLES}"
        )
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
    gen = featurize(structures, names, workers=workers, progress=progress, time_limit=time_limit)
    timings["fingerprints"] = time.perf_counter() - t
    # Compositional validity depends on the reduced formula only: decided here with the chosen
    # table, for the samples and the (cached) reference alike.
    for table in (gen, ref):
        table.comp_valid = formula_validity(table.formula, oxidation_table) & (table.n_elements > 0)

    t = time.perf_counter()
    n = len(gen)
    # CDVAE counts a crystal that cannot be built as not constructed, hence invalid: an
    # unreadable file is one of the generated crystals in every share (the view over the
    # readable ones only is kept beside it)
    total = n + len(errors)
    validity = dict(
        constructed=_pct(gen.constructed.sum() / total),
        struct_valid=_pct(gen.struct_valid.sum() / total),
        comp_valid=_pct(gen.comp_valid.sum() / total),
        valid=_pct(gen.valid.sum() / total),
        fingerprint_failures=int((~gen.fp_ok).sum()),
    )
    if errors:
        validity["struct_valid_readable_only"] = _pct(gen.struct_valid.mean())
        validity["comp_valid_readable_only"] = _pct(gen.comp_valid.mean())
    ok = np.nonzero(gen.fp_ok)[0]
    # per crystal: how far its fingerprints are from the nearest reference (nan: none computed)
    nearest_struct = np.full(n, np.nan)
    nearest_comp = np.full(n, np.nan)
    if len(ok):
        nearest = nearest_distances(
            gen.struct_fp[ok], gen.comp_fp[ok], ref_ok.struct_fp, ref_ok.comp_fp
        )
        nearest_struct[ok], nearest_comp[ok] = nearest[0], nearest[1]
        cov = coverage_from_distances(nearest, cutoffs[0], cutoffs[1], total)
    else:
        cov = coverage(
            gen.struct_fp[ok], gen.comp_fp[ok], ref_ok.struct_fp, ref_ok.comp_fp, *cutoffs, total
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
        cores = workers or os.cpu_count() or 1
        unique = unique_mask(structures, matcher, cores, progress)
        train = TrainingSet(dataset, train_split, limit=reference_limit, **kw)
        formulas = {s.composition.reduced_formula for s in structures}
        references = train.structures_for(formulas)
        novel = novel_mask(structures, references, matcher, cores, progress)
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
    departures = protocol_departures(
        dataset=dataset,
        generated=n + len(errors),
        n_property_used=len(prop_idx),
        reference_split=reference_split,
        reference_limit=reference_limit,
        cutoffs_given=cutoff_source == "given" and tuple(cutoffs) != COV_CUTOFFS.get(dataset),
        oxidation_table=oxidation_table,
    )

    metrics = dict(
        dataset=dataset,
        source=source,
        crystals=n,
        unreadable=len(errors),
        reference_split=reference_split,
        reference_crystals=len(ref),
        reference_limit=reference_limit,
        comparable=not departures,
        departures=departures,
        oxidation_table=oxidation_table,
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
        protocol=dict(PROTOCOL_TEXT, comp=COMP_PROTOCOL[oxidation_table]),
        timings_s={k: round(v, 2) for k, v in timings.items()},
    )
    return Evaluation(
        metrics,
        gen,
        ref,
        unique,
        novel,
        prop_idx,
        structures,
        errors,
        nearest_struct=nearest_struct,
        nearest_comp=nearest_comp,
        cutoffs=(float(cutoffs[0]), float(cutoffs[1])),
    )
