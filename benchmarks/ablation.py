"""The design ablation of issue 10: one row per (model, sampler option) on mp_20.

    python benchmarks/ablation.py --out runs/ablation -n 1000 \
        --row "lattice last, no rule=runs/mp20_v3/best.pt:0" \
        --row "lattice first, rule=runs/mp20_lf/best.pt:auto" ...

Each row samples n crystals with `crystal-gpt sample` (seed 0; timed as the command reports it:
sampling, symmetry check, structures, likelihoods, files; not the interpreter's start), counts
crystals with a pair closer than 0.5 / 1.0 Angstrom (periodic images included), runs
`crystal-gpt evaluate` on them (CDVAE metrics, uniqueness, novelty against the local training
split, P1 share) and prints a markdown table.
`--no-eval` only samples, times and counts close pairs (the speed column on an idle machine).
A row's options after the model path: the sampler's --min-distance, then extra sample flags
(e.g. ":auto:--charge-balanced").
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np


def closest_pairs(folder: Path) -> tuple[float, float]:
    from ase.io import read

    below_05 = below_10 = 0
    frames = read(folder / "samples.extxyz", index=":")
    for atoms in frames:
        if len(atoms) < 2:
            continue
        d = atoms.get_all_distances(mic=True) + np.eye(len(atoms)) * 1e9
        m = float(d.min())
        below_05 += m < 0.5
        below_10 += m < 1.0
    return 100 * below_05 / len(frames), 100 * below_10 / len(frames)


def run_row(name: str, spec: str, out: Path, n: int, workers: int, evaluate: bool = True) -> dict:
    model, _, rest = spec.partition(":")
    min_distance, _, extra = rest.partition(":")
    folder = out / "".join(c if c.isalnum() else "_" for c in name)
    cmd = ["crystal-gpt", "sample", "-n", str(n), "--seed", "0", "--model", model]
    cmd += ["--min-distance", min_distance or "auto", "--out", str(folder / "samples")]
    cmd += extra.split() if extra else []
    log = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    last = log.strip().splitlines()[-1]
    print(last, file=sys.stderr)
    # the command's own timing: sampling to written files, without the interpreter's start
    seconds = float(re.search(r"crystals in ([0-9.]+) s", last).group(1))
    p05, p10 = closest_pairs(folder / "samples")
    with open(folder / "samples" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    counts = {
        "row": name,
        "pairs_05": p05,
        "pairs_10": p10,
        "redraws": sum(int(r["redraws"]) for r in rows),
        "site_redraws": sum(int(r.get("site_redraws", 0)) for r in rows),
        "per_s": n / seconds,
    }
    if not evaluate:
        return counts
    subprocess.run(
        [
            "crystal-gpt",
            "evaluate",
            str(folder / "samples"),
            "--dataset",
            "mp_20",
            "--out",
            str(folder / "eval"),
            "--workers",
            str(workers),
            "--quiet",
        ],
        check=True,
    )
    m = json.loads((folder / "eval" / "metrics.json").read_text())
    return {
        "row": name,
        "struct": m["validity"]["struct_valid"],
        "comp": m["validity"]["comp_valid"],
        "cov_r": m["coverage"]["cov_recall"],
        "cov_p": m["coverage"]["cov_precision"],
        "w_density": m["property"]["wdist_density"],
        "w_elements": m["property"]["wdist_num_elements"],
        "unique": m["uniqueness_novelty"]["unique"],
        "novel": m["uniqueness_novelty"]["novel"],
        "p1": m["symmetry"]["p1_share"],
        **{k: v for k, v in counts.items() if k != "row"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--row", action="append", required=True, help="NAME=MODEL:MIN_DISTANCE[:FLAGS]")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true", help="only sample, time and count pairs")
    args = ap.parse_args()
    out = Path(args.out)
    results = []
    for row in args.row:
        name, _, spec = row.partition("=")
        results.append(run_row(name, spec, out, args.n, args.workers, not args.no_eval))
        (out / "ablation.json").write_text(json.dumps(results, indent=1))
    cols = list(results[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = (f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values())
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
