"""Generation at pressure: what a pressure-conditioned model samples at each pressure, set
against the alex_pressure test split at that pressure.

Per pressure: volume per atom and density of the samples (median, 10th-90th percentile) and
their Wasserstein distance to the test crystals at that pressure (between grid pressures the
nearest data pressures are shown instead); the space-group mix (total variation distance to
the test split's); structural and SMACT validity; uniqueness; novelty against the training
materials at every pressure (``StructureMatcher`` scales volumes, so a training crystal
squeezed to another pressure still counts as known).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystal_gpt.data.datasets import PRESSURE_DATASET, PRESSURES
from crystal_gpt.data.statistics import AMU_PER_A3_TO_G_PER_CM3, cell_volumes, crystal_masses
from crystal_gpt.evaluation.metrics import (
    novel_mask,
    smact_validity,
    spacegroup_histogram,
    structure_validity,
    unique_mask,
    wasserstein,
)


@dataclass
class PressureReference:
    """The data side at each grid pressure: per-crystal volume per atom, density, group."""

    vpa: dict[float, np.ndarray]
    density: dict[float, np.ndarray]
    groups: dict[float, np.ndarray]

    @classmethod
    def from_split(cls, split: str = "test", progress: bool = False) -> PressureReference:
        from crystal_gpt.data.cache import encode_dataset

        ds = encode_dataset(PRESSURE_DATASET, split, progress=progress)
        volume = cell_volumes(ds.lattice)
        vpa = volume / ds.num_atoms
        density = crystal_masses(ds) / volume * AMU_PER_A3_TO_G_PER_CM3
        p = ds.properties["pressure"]
        levels = sorted(set(p.tolist()))
        return cls(
            {q: vpa[p == q] for q in levels},
            {q: density[p == q] for q in levels},
            {q: ds.spacegroup[p == q].astype(int) for q in levels},
        )

    def bracket(self, p: float) -> tuple[float, float]:
        """The data pressures at or around p (equal when p is on the grid)."""
        grid = sorted(self.vpa)
        lo = max((q for q in grid if q <= p), default=grid[0])
        hi = min((q for q in grid if q >= p), default=grid[-1])
        return lo, hi


def _spread(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"median": float("nan"), "p10": float("nan"), "p90": float("nan")}
    q10, q50, q90 = np.percentile(x, [10, 50, 90])
    return {"median": float(q50), "p10": float(q10), "p90": float(q90)}


def pressure_metrics(
    structures: list[Structure | None],
    groups: list[int],
    p: float,
    ref: PressureReference,
    training: dict[str, list[Structure]] | None = None,
    workers: int = 1,
) -> dict:
    """The metrics of samples drawn at pressure p (None: a failed sample)."""
    ok = [s for s in structures if s is not None]
    vpa = np.array([s.volume / len(s) for s in ok])
    density = np.array([float(s.density) for s in ok])
    lo, hi = ref.bracket(p)
    out: dict = {
        "pressure": p,
        "samples": len(structures),
        "failed": len(structures) - len(ok),
        "volume_per_atom": _spread(vpa),
        "density": _spread(density),
        "data_pressures": [lo, hi],
        "data_volume_per_atom": [_spread(ref.vpa[lo]), _spread(ref.vpa[hi])],
        "data_density": [_spread(ref.density[lo]), _spread(ref.density[hi])],
        "structure_valid": float(np.mean([structure_validity(s) for s in ok])) if ok else 0.0,
        "smact_valid": float(np.mean([smact_validity(s.composition) for s in ok])) if ok else 0.0,
    }
    if lo == hi:  # a grid pressure: distances to the data there
        out["wdist_volume_per_atom"] = wasserstein(vpa, ref.vpa[p])
        out["wdist_density"] = wasserstein(density, ref.density[p])
        med = out["data_volume_per_atom"][0]["median"]
        out["median_vpa_rel_diff"] = out["volume_per_atom"]["median"] / med - 1
        h_gen = spacegroup_histogram([g for g, s in zip(groups, structures, strict=True) if s])
        h_ref = spacegroup_histogram(ref.groups[p])
        tvd = np.abs(h_gen / max(h_gen.sum(), 1) - h_ref / max(h_ref.sum(), 1)).sum() / 2
        out["spacegroup_tvd"] = float(tvd)
    top = np.bincount(np.asarray(groups, dtype=int), minlength=231).argsort()[::-1][:5]
    out["top_spacegroups"] = {int(g): int(np.sum(np.asarray(groups) == g)) for g in top if g}
    if ok:
        uniq = unique_mask(ok, workers=workers)
        out["unique"] = float(uniq.mean())
        if training is not None:
            out["novel"] = float(novel_mask(ok, training, workers=workers).mean())
    return out


@dataclass
class PressureResult:
    rows: list[dict]
    per_crystal: list[dict] = field(default_factory=list)
    description: str = ""
    seconds: float = 0.0

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pressure.json").write_text(
            json.dumps({"description": self.description, "rows": self.rows}, indent=1)
        )
        if self.per_crystal:
            import csv

            with open(out / "pressure.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(self.per_crystal[0]))
                w.writeheader()
                w.writerows(self.per_crystal)
        (out / "pressure.md").write_text(self.markdown())
        self.plot(out / "volume_vs_pressure.png")
        return out

    def markdown(self) -> str:
        head = (
            "| GPa | samples | V/atom median (p10-p90) | data V/atom median | median diff | "
            "W1 V/atom | density median | data density | W1 density | group TVD | struct % "
            "| SMACT % | unique % | novel % |"
        )
        lines = [self.description, "", head, "|" + "---|" * 14]
        for r in self.rows:
            v, dv = r["volume_per_atom"], r["data_volume_per_atom"]
            lo, hi = r["data_pressures"]
            data_v = (
                f"{dv[0]['median']:.2f}"
                if lo == hi
                else f"{dv[0]['median']:.2f} ({lo:g}) / {dv[1]['median']:.2f} ({hi:g})"
            )
            dd = r["data_density"]
            data_d = (
                f"{dd[0]['median']:.2f}"
                if lo == hi
                else f"{dd[0]['median']:.2f} / {dd[1]['median']:.2f}"
            )

            def opt(key: str, fmt: str, scale: float = 1.0, r: dict = r) -> str:
                return format(r[key] * scale, fmt) if key in r else "-"

            lines.append(
                f"| {r['pressure']:g} | {r['samples']} | {v['median']:.2f} ({v['p10']:.2f}-"
                f"{v['p90']:.2f}) | {data_v} | {opt('median_vpa_rel_diff', '+.1%')} | "
                f"{opt('wdist_volume_per_atom', '.3f')} | {r['density']['median']:.2f} | "
                f"{data_d} | {opt('wdist_density', '.3f')} | {opt('spacegroup_tvd', '.3f')} | "
                f"{100 * r['structure_valid']:.1f} | {100 * r['smact_valid']:.1f} | "
                f"{opt('unique', '.1f', 100)} | {opt('novel', '.1f', 100)} |"
            )
        stab = [r for r in self.rows if "stability_n" in r]
        if stab:
            lines += [
                "",
                "CHGNet enthalpy stability (relaxed under the pressure; hull of the training "
                "materials' enthalpies at that pressure):",
                "",
                *(f"- {r['pressure']:g} GPa: {r['hull']}" for r in stab),
                "",
                "| GPa | relaxed | H - H_hull <= 0.1 eV/atom | <= 0 | median H - H_hull | "
                "converged | failed |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in stab:
                lines.append(
                    f"| {r['pressure']:g} | {r['stability_n']} | {100 * r['stable_0.1']:.1f}% | "
                    f"{100 * r['stable_0.0']:.1f}% | {r['enthalpy_above_hull_median']:.3f} | "
                    f"{100 * r['relax_converged']:.0f}% | {r['relax_failed']} |"
                )
        return "\n".join(lines) + "\n"

    def plot(self, path: Path, ref: PressureReference | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        data: dict[float, dict] = {}
        for r in self.rows:
            for q, s in zip(r["data_pressures"], r["data_volume_per_atom"], strict=True):
                data[q] = s
        qs = sorted(data)
        ax.fill_between(
            qs, [data[q]["p10"] for q in qs], [data[q]["p90"] for q in qs], alpha=0.2,
            color="C0", label="test split p10-p90",
        )  # fmt: skip
        ax.plot(qs, [data[q]["median"] for q in qs], "o-", color="C0", label="test split median")
        ps = [r["pressure"] for r in self.rows]
        med = [r["volume_per_atom"]["median"] for r in self.rows]
        err = [
            [m - r["volume_per_atom"]["p10"] for m, r in zip(med, self.rows, strict=True)],
            [r["volume_per_atom"]["p90"] - m for m, r in zip(med, self.rows, strict=True)],
        ]
        ax.errorbar(ps, med, yerr=err, fmt="s", color="C3", capsize=3, label="samples (p10-p90)")
        ax.set_xlabel("pressure (GPa)")
        ax.set_ylabel("volume per atom (A^3)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _stability_at(
    structures, p: float, k: int, workers: int, out_dir, progress, hull_relax_steps: int
) -> dict:
    """CHGNet enthalpy stability of the first k samples at pressure p (failed ones count).

    ``hull_relax_steps`` > 0: the hull is built here from the training materials in the
    samples' chemical systems, relaxed under p like the samples (the consistent comparison: at
    100 GPa single points at DFT cells sit ~1.6 eV/atom above a hull whose elements CHGNet
    relaxed); their relaxations are cached and shared by every evaluation at p. 0: the prebuilt
    single-point hull (``crystal-gpt hull build --pressure P``)."""
    from crystal_gpt.evaluation.stability import (
        ReferenceHull,
        chemical_system,
        evaluate_stability,
    )

    chosen = [s for s in structures if s is not None][:k]
    if hull_relax_steps > 0:
        hull = ReferenceHull.build(
            PRESSURE_DATASET,
            splits=["train"],
            workers=workers,
            relax_steps=hull_relax_steps,
            path=None if out_dir is None else Path(out_dir) / f"hull_{p:g}GPa.json",
            progress=progress,
            pressure=p,
            systems={chemical_system(s) for s in chosen},
        )
    else:
        hull = ReferenceHull.load(PRESSURE_DATASET, pressure=p)
    cache = None if out_dir is None else Path(out_dir) / f"relax_{p:g}GPa.jsonl"
    st = evaluate_stability(
        chosen, hull=hull, workers=workers, cache=cache, progress=progress, pressure=p
    )
    return {
        "stability_n": st["n"],
        "stable_0.1": st["stable_0.1"],
        "stable_0.0": st["stable_0.0"],
        "enthalpy_above_hull_median": st["e_above_hull_median"],
        "relax_converged": st["converged"],
        "relax_failed": st["n_failed"],
        "hull": hull.describe(),
    }


def training_structures(formulas: set[str], progress: bool = False) -> dict[str, list]:
    """The training materials at every pressure with these reduced formulas (novelty)."""
    from crystal_gpt.evaluation.references import TrainingSet

    return TrainingSet(PRESSURE_DATASET, "train", progress=progress).structures_for(formulas)


def evaluate_pressures(
    model,
    pressures: list[float],
    n: int,
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    novelty: bool = True,
    workers: int = 1,
    progress: bool = True,
    description: str = "",
    stability: int = 0,
    stability_pressures: list[float] | None = None,
    hull_relax_steps: int = 500,
    **sample_options,
) -> PressureResult:
    """Sample n crystals at each pressure (seed + index of the pressure) and measure them
    (``sample_options``: the sampler's, e.g. ``min_distance``, ``guidance``). With
    ``out_dir`` each pressure's samples are written as a sample folder (``samples_<P>GPa``).

    ``stability`` > 0: the first that many samples at each of ``stability_pressures`` (default
    all) are relaxed with CHGNet under that pressure and their enthalpy set against the CHGNet
    enthalpy hull of the training materials at that pressure: those in the samples' chemical
    systems relaxed under it too (``hull_relax_steps`` > 0, default), or single points at their
    DFT cells (0: ``crystal-gpt hull build --dataset alex_pressure --pressure P --splits
    train``, built once)."""
    from crystal_gpt.data.codec import decode
    from crystal_gpt.sampling.output import write_samples
    from crystal_gpt.sampling.sampler import sample_crystals

    if "pressure" not in model.config.conditions:
        known = ", ".join(model.config.conditions) or "none"
        raise ValueError(f"the model is not conditioned on pressure (its conditions: {known})")
    t0 = time.perf_counter()
    ref = PressureReference.from_split("test", progress=progress)
    drawn = []
    for j, p in enumerate(pressures):
        crystals = sample_crystals(
            model,
            n,
            seed=seed + j,
            conditions={"pressure": float(p)},
            progress=progress,
            give_up=True,
            **sample_options,
        )
        structures: list[Structure | None] = []
        for c in crystals:
            try:
                structures.append(None if c is None else decode(c))
            except Exception:  # an undecodable lattice counts as a failed sample
                structures.append(None)
        drawn.append((p, crystals, structures))
    training = None
    if novelty:  # one pass over the training files for every pressure's formulas
        formulas = {s.composition.reduced_formula for *_, ss in drawn for s in ss if s is not None}
        training = training_structures(formulas, progress)
    rows, per_crystal = [], []
    for p, crystals, structures in drawn:
        groups = [0 if c is None else c.spacegroup for c in crystals]
        rows.append(pressure_metrics(structures, groups, float(p), ref, training, workers))
        if stability and (stability_pressures is None or p in stability_pressures):
            rows[-1].update(
                _stability_at(
                    structures, float(p), stability, workers, out_dir, progress, hull_relax_steps
                )
            )
        for i, (c, s) in enumerate(zip(crystals, structures, strict=True)):
            if s is not None:
                per_crystal.append(
                    {
                        "pressure": p,
                        "index": i,
                        "formula": s.composition.reduced_formula,
                        "spacegroup": c.spacegroup,
                        "num_atoms": len(s),
                        "volume_per_atom": round(s.volume / len(s), 4),
                        "density": round(float(s.density), 4),
                    }
                )
        if out_dir is not None:
            kept = [c for c, s in zip(crystals, structures, strict=True) if s is not None]
            write_samples(kept, Path(out_dir) / f"samples_{p:g}GPa")
    result = PressureResult(rows, per_crystal, description, time.perf_counter() - t0)
    if out_dir is not None:
        result.write(out_dir)
    return result


__all__ = ["PRESSURES", "PressureReference", "PressureResult", "evaluate_pressures"]
