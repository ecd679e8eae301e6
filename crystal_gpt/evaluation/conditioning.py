"""Does conditioning work? For a grid of targets of one property: sample, measure the property
the samples achieve, and set it against the target and against unconditional samples.

How the achieved value is measured, by property:
- ``formation_energy_per_atom``: CHGNet energy of the crystal (relaxed with ``relax_steps`` > 0,
  else at the generated geometry) minus the elemental references of the same potential (the
  mp_20 CHGNet hull's, ``ReferenceHull.formation_energy``);
- ``e_above_hull``: CHGNet relaxation, then E_hull against the shipped CHGNet hull;
- anything else, or any property when a predictor is passed: the predictor
  (``model.predictor``), whose test MAE is reported with it.

Per target (and for the unconditional baseline): mean and median achieved value over the
structurally valid samples, the mean over the valid ones (structure and SMACT composition, the
CDVAE sense of "valid"), mean distance to the target, hit rate within ``tolerance``, validity,
uniqueness and novelty. Guidance (``guidance`` != 1) and predictor steering are
separate rows, never mixed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crystal_gpt.evaluation.metrics import (
    novel_mask,
    smact_validity,
    structure_validity,
    unique_mask,
)

CHGNET_PROPERTIES = ("formation_energy_per_atom", "e_above_hull")


@dataclass
class ConditioningResult:
    property: str
    rows: list[dict]
    how: str
    description: str = ""
    per_crystal: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        lines = [
            self.description,
            "",
            f"Achieved {self.property}: {self.how}.",
            "",
            "| target | method | guidance | samples | structure valid % | mean achieved | "
            "mean, valid (structure + SMACT) | median | mean abs(achieved - target) | hit % | "
            "SMACT % | unique % | novel % |",
            "|" + "---|" * 13,
        ]
        for r in self.rows:
            t = "unconditional" if r["target"] is None else f"{r['target']:g}"
            lines.append(
                f"| {t} | {r.get('method', '')} | {r['guidance']:g} | {r['samples']} | "
                f"{100 * r['structure_valid']:.1f} | "
                f"{r['mean']:.3f} | {_fmt(r.get('mean_valid'))} | {r['median']:.3f} | "
                f"{_fmt(r.get('mean_abs_error'))} | "
                f"{_fmt(r.get('hit_rate'), 100, '.1f')} | {100 * r['smact_valid']:.1f} | "
                f"{_fmt(r.get('unique'), 100, '.1f')} | {_fmt(r.get('novel'), 100, '.1f')} |"
            )
        if any("stable_0.1" in r for r in self.rows):
            lines += ["", "| target | method | guidance | E_hull <= 0.1 eV/atom | <= 0 |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for r in self.rows:
                t = "unconditional" if r["target"] is None else f"{r['target']:g}"
                lines.append(
                    f"| {t} | {r.get('method', '')} | {r['guidance']:g} | "
                    f"{100 * r['stable_0.1']:.1f}% | {100 * r['stable_0.0']:.1f}% |"
                )
        base = next((r for r in self.rows if r["target"] is None), None)
        if base is not None:
            lines += [
                "",
                "Distance of the unconditional samples' mean to each target vs the conditioned "
                "samples' (the factor by which conditioning closes it):",
                "",
            ]
            for r in self.rows:
                if r["target"] is not None:
                    for key, over in (("mean", "structurally valid"), ("mean_valid", "valid")):
                        b, m = base.get(key, math.nan), r.get(key, math.nan)
                        if not (math.isfinite(b) and math.isfinite(m)):
                            continue
                        gap, got = abs(b - r["target"]), abs(m - r["target"])
                        factor = gap / got if got > 0 else math.inf
                        lines.append(
                            f"- target {r['target']:g} (guidance {r['guidance']:g}), {over} "
                            f"samples: unconditional {gap:.3f}, conditioned {got:.3f} "
                            f"({factor:.2f}x closer)"
                        )
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"property": self.property, "how": self.how, "description": self.description}
        (out / "conditioning.json").write_text(json.dumps({**record, "rows": self.rows}, indent=1))
        (out / "conditioning.md").write_text(self.markdown())
        if self.per_crystal:
            import csv

            with open(out / "conditioning.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(self.per_crystal[0]))
                w.writeheader()
                w.writerows(self.per_crystal)
        self.plot(out / "target_vs_achieved.png")
        return out

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.2))
        rows = [r for r in self.rows if r["target"] is not None]
        for g in sorted({r["guidance"] for r in rows}):
            sel = [r for r in rows if r["guidance"] == g]
            t = [r["target"] for r in sel]
            ax.errorbar(
                t, [r["mean"] for r in sel], yerr=[r["std"] for r in sel], fmt="o-", capsize=3,
                label=f"conditioned, guidance {g:g} (mean +- sd)",
            )  # fmt: skip
        if rows:
            lo = min(r["target"] for r in rows)
            hi = max(r["target"] for r in rows)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="achieved = target")
        base = next((r for r in self.rows if r["target"] is None), None)
        if base is not None:
            ax.axhline(base["mean"], color="C3", lw=1, label="unconditional mean")
        ax.set_xlabel(f"target {self.property}")
        ax.set_ylabel(f"achieved {self.property}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _fmt(x, scale: float = 1.0, spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x * scale, spec)


def achieved_values(
    prop: str,
    structures: list,
    crystals: list,
    *,
    predictor=None,
    hull=None,
    relax_steps: int = 0,
    workers: int = 1,
    progress: bool = False,
    cache: str | Path | None = None,
) -> np.ndarray:
    """The property each crystal achieves (NaN where it cannot be measured): by the predictor
    when one is given, else by CHGNet for the properties it can measure."""
    if prop in CHGNET_PROPERTIES and predictor is None:
        from crystal_gpt.evaluation.stability.relaxation import (
            relax_structures,
            single_point_energies,
        )

        if prop == "e_above_hull" and relax_steps <= 0:
            raise ValueError("e_above_hull needs relaxed energies: relax_steps > 0")
        if relax_steps > 0:
            results = relax_structures(
                structures, steps=relax_steps, workers=workers, progress=progress, cache=cache
            )
            pairs = [
                (r.structure or s, r.energy_per_atom)
                for r, s in zip(results, structures, strict=True)
            ]
        else:
            energies, _ = single_point_energies(structures, workers=workers, progress=progress)
            pairs = list(zip(structures, energies, strict=True))
        if prop == "e_above_hull":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return hull.e_above_hull(pairs)
        return hull.formation_energy(pairs)
    if predictor is None:
        raise ValueError(f"measuring {prop!r} needs a predictor of it (--predictor)")
    if predictor.config.target != prop:
        raise ValueError(f"the predictor predicts {predictor.config.target!r}, not {prop!r}")
    return predictor.predict_crystals(crystals)


def decode_samples(crystals: list) -> tuple[list, list, np.ndarray]:
    """The drawn crystals that decode, their structures, and which are structurally valid; a
    crystal the sampler gave up on (None) or an undecodable lattice is a failed sample."""
    from crystal_gpt.data.codec import decode

    kept, structures = [], []
    for c in crystals:
        try:
            if c is not None:
                structures.append(decode(c))
                kept.append(c)
        except Exception:  # an undecodable lattice is a failed sample
            pass
    valid = np.array([structure_validity(s) for s in structures], dtype=bool)
    return kept, structures, valid


def evaluate_conditioning(
    model,
    prop: str,
    targets: list[float],
    n: int,
    *,
    guidance: float | list[float] = 1.0,
    baseline: bool = True,
    predictor=None,
    hull_dataset: str = "mp_20",
    relax_steps: int = 0,
    tolerance: float | None = None,
    training_dataset: str | None = "mp_20",
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    description: str = "",
    out_dir: str | Path | None = None,
    steer_with=None,
    steer_width: float = 0.5,
    oversample: int = 8,
    **sample_options,
) -> ConditioningResult:
    """Sample n crystals per (target, guidance) and, with ``baseline``, n unconditional ones;
    measure what they achieve (see the module docstring). ``steer_with`` (a predictor of
    ``prop``): the rows are steered instead (``sampling.steering``, importance resampling of an
    unconditional model; ``guidance`` unused), measured the same way."""
    from crystal_gpt.sampling.sampler import sample_crystals
    from crystal_gpt.sampling.steering import steer

    if steer_with is not None:
        if steer_with.config.target != prop:
            raise ValueError(f"the steering predictor predicts {steer_with.config.target!r}")
        guidance = 1.0
    elif prop not in model.config.conditions:
        known = ", ".join(model.config.conditions) or "none"
        raise ValueError(f"the model is not conditioned on {prop!r} (its conditions: {known})")
    if predictor is not None and relax_steps > 0:
        raise ValueError(
            "relax_steps (--relax-steps) is for CHGNet's measurement; with a predictor "
            f"(--predictor) {prop!r} is predicted, not relaxed: leave one of them out"
        )
    hull = None
    if prop in CHGNET_PROPERTIES and predictor is None:
        from crystal_gpt.evaluation.stability.hull import ReferenceHull

        hull = ReferenceHull.load(hull_dataset)
        geometry = f"relaxed, <= {relax_steps} steps" if relax_steps else "generated geometry"
        how = (
            f"CHGNet energies ({geometry}) "
            + ("minus the elemental references" if prop != "e_above_hull" else "above the hull")
            + f" of the {hull_dataset} CHGNet hull"
        )
    else:
        if predictor is None:
            raise ValueError(f"measuring {prop!r} needs a predictor of it (--predictor)")
        mae = predictor.meta.get("test_mae")
        how = f"predicted by the {predictor.config.target} predictor" + (
            f" (test MAE {mae:.3f})" if mae is not None else ""
        )
    if tolerance is None:
        tolerance = 0.5 if prop != "e_above_hull" else 0.1
    scales = guidance if isinstance(guidance, list | tuple) else [guidance]
    runs: list[tuple[float | None, float]] = [(t, g) for g in scales for t in targets]
    if baseline:
        runs.insert(0, (None, 1.0))
    training = None
    if training_dataset is not None:
        from crystal_gpt.evaluation.references import TrainingSet

        training = TrainingSet(training_dataset, "train", progress=progress)
    t0 = time.perf_counter()
    rows, per_crystal = [], []
    # every row with the model's own numbers of elements: the conditioned rows get them anyway,
    # and the unconditional baseline must be the same model's, not the training data's
    sample_options = {"num_elements": "model", **sample_options}
    for j, (target, g) in enumerate(runs):
        conditions = None if target is None else {prop: target}
        if steer_with is not None and target is not None:
            crystals, _ = steer(
                model, steer_with, n, target, width=steer_width, oversample=oversample,
                seed=seed + j, progress=progress, give_up=True, **sample_options,
            )  # fmt: skip
        else:
            crystals = sample_crystals(
                model, n, seed=seed + j, conditions=conditions, guidance=g if target is not None
                else 1.0, progress=progress, give_up=True, **sample_options,
            )  # fmt: skip
        kept, structures, valid = decode_samples(crystals)
        vs = [s for s, v in zip(structures, valid, strict=True) if v]
        vc = [c for c, v in zip(kept, valid, strict=True) if v]
        cache = None if out_dir is None else Path(out_dir) / "relaxations.jsonl"
        values = achieved_values(
            prop, vs, vc, predictor=predictor, hull=hull, relax_steps=relax_steps,
            workers=workers, progress=progress, cache=cache,
        )  # fmt: skip
        ok = np.isfinite(values)
        balanced = np.array([smact_validity(s.composition) for s in vs], dtype=bool)
        both = ok & balanced
        row = {
            "target": target,
            "method": "steered"
            if steer_with is not None and target is not None
            else ("guided" if target is not None else "unconditional"),
            "guidance": g if target is not None else 1.0,
            "samples": n,
            "structure_valid": float(valid.sum() / n),
            "measured": int(ok.sum()),
            "mean": float(values[ok].mean()) if ok.any() else math.nan,
            "median": float(np.median(values[ok])) if ok.any() else math.nan,
            "std": float(values[ok].std()) if ok.any() else math.nan,
            "measured_valid": int(both.sum()),
            "mean_valid": float(values[both].mean()) if both.any() else math.nan,
            "smact_valid": float(balanced.mean()) if vs else 0.0,
        }
        if prop == "e_above_hull":  # the stability share, over all n (failures not stable)
            row["stable_0.1"] = float((values[ok] <= 0.1).sum() / n)
            row["stable_0.0"] = float((values[ok] <= 0.0).sum() / n)
        if target is not None and ok.any():
            row["mean_abs_error"] = float(np.abs(values[ok] - target).mean())
            row["hit_rate"] = float((np.abs(values[ok] - target) <= tolerance).sum() / n)
            row["tolerance"] = tolerance
        if vs:
            row["unique"] = float(unique_mask(vs, workers=workers).mean())
            if training is not None:
                formulas = {s.composition.reduced_formula for s in vs}
                ref = training.structures_for(formulas)
                row["novel"] = float(novel_mask(vs, ref, workers=workers).mean())
        rows.append(row)
        for s, v, b in zip(vs, values, balanced, strict=True):
            per_crystal.append(
                {
                    "target": "" if target is None else target,
                    "guidance": row["guidance"],
                    "formula": s.composition.reduced_formula,
                    "achieved": round(float(v), 4) if np.isfinite(v) else "",
                    "smact_valid": int(b),
                }
            )
        if progress:
            print(
                f"target {target}: mean achieved {row['mean']:.3f} over {row['measured']}",
                flush=True,
            )
    result = ConditioningResult(prop, rows, how, description, per_crystal)
    result.seconds = time.perf_counter() - t0
    if out_dir is not None:
        result.write(out_dir)
    return result
