"""Pool the per-crystal files of several `crystal-gpt evaluate-conditions` runs of one property
(the same targets drawn in parts, with different seeds) into one table and one plot: per
(target, guidance), the mean achieved value over the structurally valid crystals and over the
valid ones (structure and SMACT), with standard errors, and how much closer to the target than
the unconditional rows each mean is.

    python benchmarks/pool_conditioning.py runs/cond/form_relaxed runs/cond/form_relaxed_350 \
        --plot benchmarks/figures/formation_energy_500.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition

from crystal_gpt.evaluation.metrics import smact_validity


def load(folders: list[str]) -> tuple[pd.DataFrame, str]:
    parts, props = [], set()
    for folder in folders:
        path = Path(folder)
        d = pd.read_csv(path / "conditioning.csv")
        if "smact_valid" not in d:  # files written before the column existed
            d["smact_valid"] = [int(smact_validity(Composition(f))) for f in d.formula]
        d["run"] = path.name
        parts.append(d)
        meta = path / "conditioning.json"
        if meta.exists():
            props.add(pd.read_json(meta, typ="series")["property"])
    if len(props) > 1:
        raise SystemExit(f"the runs measure different properties: {sorted(props)}")
    return pd.concat(parts, ignore_index=True), (props.pop() if props else "property")


def mean_se(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="evaluate-conditions output folders")
    ap.add_argument("--plot", help="target vs achieved plot (PNG)")
    args = ap.parse_args()
    d, prop = load(args.runs)
    d["target"] = pd.to_numeric(d.target, errors="coerce")  # empty: unconditional
    d["achieved"] = pd.to_numeric(d.achieved, errors="coerce")
    rows = []
    for (target, guidance), part in d.groupby([d.target.fillna(np.inf), "guidance"], sort=True):
        a = part.achieved.to_numpy(float)
        v = part.achieved[part.smact_valid.astype(bool)].to_numpy(float)
        m, se = mean_se(a)
        mv, sev = mean_se(v)
        rows.append(
            dict(
                target=None if np.isinf(target) else float(target),
                guidance=float(guidance),
                runs=",".join(sorted(part.run.unique())),
                n=int(np.isfinite(a).sum()),
                mean=m,
                se=se,
                median=float(np.nanmedian(a)),
                n_valid=int(np.isfinite(v).sum()),
                mean_valid=mv,
                se_valid=sev,
            )
        )
    base = next((r for r in rows if r["target"] is None), None)
    print(f"{prop}, pooled from {', '.join(args.runs)}")
    print(
        "| target | guidance | crystals | mean (s.e.) | median | valid crystals | "
        "valid mean (s.e.) | closer than unconditional: all / valid |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        closer = ""
        if base is not None and r["target"] is not None:
            t = r["target"]
            f_all = abs(base["mean"] - t) / abs(r["mean"] - t)
            f_val = abs(base["mean_valid"] - t) / abs(r["mean_valid"] - t)
            closer = f"{f_all:.2f}x / {f_val:.2f}x"
        label = "unconditional" if r["target"] is None else f"{r['target']:g}"
        print(
            f"| {label} | {r['guidance']:g} | {r['n']} | {r['mean']:.3f} ({r['se']:.3f}) | "
            f"{r['median']:.3f} | {r['n_valid']} | {r['mean_valid']:.3f} ({r['se_valid']:.3f}) "
            f"| {closer} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.2))
        cond = [r for r in rows if r["target"] is not None]
        for g in sorted({r["guidance"] for r in cond}):
            sel = [r for r in cond if r["guidance"] == g]
            t = np.array([r["target"] for r in sel])
            for key, err, mark, what in (
                ("mean", "se", "o-", "structurally valid"),
                ("mean_valid", "se_valid", "s--", "valid (structure + SMACT)"),
            ):
                ax.errorbar(
                    t, [r[key] for r in sel], yerr=[2 * r[err] for r in sel], fmt=mark,
                    capsize=3, label=f"guidance {g:g}, {what} (mean +- 2 s.e.)",
                )  # fmt: skip
        if cond:
            lo, hi = min(r["target"] for r in cond), max(r["target"] for r in cond)
            ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="achieved = target")
        if base is not None:
            ax.axhline(base["mean"], color="C3", lw=1, label="unconditional mean")
        ax.set_xlabel(f"target {prop}")
        ax.set_ylabel(f"achieved {prop} (mean)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"-> {args.plot}")


if __name__ == "__main__":
    main()
