"""Round-trip rate of the Wyckoff codec on every vendored split (and mpts_52 as an OOD check).

    python benchmarks/roundtrip.py [--datasets mp_20 perov_5 ...] [--symprec 0.01] [--workers 2]

Prints, per split, the share of crystals for which StructureMatcher (default tolerances) matches
decode(encode(s)) to s, and writes every failure with its reason to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from crystal_gpt.data.datasets import available_files, load_dataset
from crystal_gpt.data.roundtrip import check_roundtrips, summarize

SPLITS = {
    "perov_5": ["train", "val", "test"],
    "carbon_24": ["val", "test"],
    "mp_20": ["train_first1000", "val", "test"],
    "mpts_52": ["val", "test"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--symprec", type=float, default=0.01)
    ap.add_argument("--mode", default="wyckoff", choices=["wyckoff", "p1"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N crystals of each split")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"symprec={args.symprec} mode={args.mode} workers={args.workers}")
    cols = f"{'n':>6s} {'strict %':>9s} {'with supercell %':>17s} {'fallback':>8s} {'s':>6s}"
    print(f"{'split':28s} {cols}")
    for name in args.datasets:
        for split in SPLITS[name]:
            if split not in available_files(name):
                continue
            t0 = time.perf_counter()
            ds = load_dataset(name, split, limit=args.limit)
            results = check_roundtrips(ds.structures, args.symprec, args.mode, args.workers)
            summary = summarize(results)
            failures = [
                {"id": rec.id, "status": r.status, "spacegroup": r.spacegroup, "reason": r.reason}
                for rec, r in zip(ds.records, results, strict=True)
                if r.status != "match"
            ]
            failures += [
                {"id": e.id, "status": "unreadable", "reason": e.reason} for e in ds.errors
            ]
            path = args.out / f"roundtrip-{name}-{split}-{args.mode}-{args.symprec:g}.json"
            path.write_text(json.dumps({"summary": summary, "failures": failures}, indent=1))
            print(
                f"{name + '/' + split:28s} {summary['n']:6d} {100 * summary['rate_strict']:9.2f} "
                f"{100 * summary['rate']:17.2f} {summary['fallback']:8d} "
                f"{time.perf_counter() - t0:6.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
