"""Speed of the evaluation suite: full CDVAE metrics (+ uniqueness, novelty, symmetry, report)
of crystals sampled with the bundled mp_20 model against the whole mp_20 test split.

    python benchmarks/evaluate_speed.py [-n 1000] [--workers 2] [--samples DIR] [--out DIR]

The reference fingerprints ship with the package (or are cached by ``crystal-gpt evaluate
--build-reference --dataset mp_20``, ~40 min on 2 cores); the script refuses to time a cold
build by accident unless ``--allow-build``. Prints seconds per stage and the metrics, and writes
benchmarks/out/evaluate_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

from crystal_gpt.cli import main as cli_main
from crystal_gpt.evaluation.references import _bundled, _cache_path
from crystal_gpt.evaluation.suite import evaluate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=1000, help="crystals to sample (default 1000)")
    ap.add_argument("--samples", help="evaluate this sample folder instead of sampling")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="report folder (default: a temporary one)")
    ap.add_argument("--allow-build", action="store_true", help="time a cold reference build too")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, workers {args.workers}")
    ref_cache = _bundled(_cache_path("mp_20", "test", None, None, "features"))
    if not ref_cache.exists() and not args.allow_build:
        print(
            f"no cached reference ({ref_cache}); run `crystal-gpt evaluate --build-reference "
            "--dataset mp_20` first or pass --allow-build",
            file=sys.stderr,
        )
        return 1
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        samples = args.samples
        if samples is None:
            samples = str(Path(tmp) / "samples")
            t0 = time.perf_counter()
            cli_main(["sample", "-n", str(args.n), "--seed", "0", "--out", samples])
            timings["sampling (not part of evaluation)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate(samples, "mp_20", workers=args.workers)
        timings["evaluate total"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = ev.write_report(args.out or Path(tmp) / "report")
        timings["report (md, html, json, plots)"] = time.perf_counter() - t0
        m = ev.metrics
    stages = {f"  {k}": v for k, v in m["timings_s"].items()}
    all_t = {**timings, **stages}
    evaluation_s = timings["evaluate total"] + timings["report (md, html, json, plots)"]
    print(f"\n{m['crystals']} crystals vs mp_20 test ({m['reference_crystals']} crystals):")
    for k, v in all_t.items():
        print(f"{k:40s} {v:8.1f} s")
    print(f"{'evaluation incl. report':40s} {evaluation_s:8.1f} s  (target < 600 s)")
    v, c, p = m["validity"], m["coverage"], m["property"]
    un, sy = m["uniqueness_novelty"], m["symmetry"]
    print(
        f"\nstruct {v['struct_valid']:.2f}%  comp {v['comp_valid']:.2f}%  COV-R "
        f"{c['cov_recall']:.2f}%  COV-P {c['cov_precision']:.2f}%  wdist density "
        f"{p['wdist_density']:.3f}  wdist #el {p['wdist_num_elements']:.3f}  "
        f"(property stats on {p['n_used']} valid)"
    )
    print(
        f"unique {un['unique']:.2f}%  novel {un['novel']:.2f}%  P1 {sy['p1_share']:.2f}%  "
        f"space-group TVD {sy['spacegroup_tvd']:.2f}%"
    )
    if args.out:
        print(f"report: {out}/report.md")
    res = Path(__file__).parent / "out" / "evaluate_speed.json"
    res.parent.mkdir(exist_ok=True)
    res.write_text(
        json.dumps(
            {"timings_s": {k.strip(): round(t, 2) for k, t in all_t.items()}, "metrics": m},
            indent=1,
        )
        + "\n"
    )
    print(f"-> {res}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
