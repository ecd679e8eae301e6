"""Speed of the Wyckoff codec on this machine.

    python benchmarks/encode_speed.py [--workers 2] [--stages 500] [--dataset mp_20] [--no-cold]

1. Cold encoding of all mp_20 val + test crystals (18,093; CSV parsing + CIF parsing + symmetry
   analysis + encoding, parallel processes, fresh empty cache) and the warm (cached) reload.
2. Per-stage cost on one core for the first --stages crystals of the --dataset's test split:
   CIF -> Structure, encode, decode.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from crystal_gpt import decode, encode, encode_dataset, load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--stages", type=int, default=500)
    ap.add_argument("--dataset", default="mp_20", help="for the per-stage figures")
    ap.add_argument("--no-cold", action="store_true", help="per-stage figures only")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )

    if not args.no_cold:
        cold_and_warm(args.workers)
    t0 = time.perf_counter()
    structures = load_dataset(args.dataset, "test", limit=args.stages).structures
    t_parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoded = [encode(s) for s in structures]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for w in encoded:
        decode(w)
    t_dec = time.perf_counter() - t0
    k = len(structures)
    print(
        f"one core, {k} {args.dataset}/test crystals: CIF parse {1e3 * t_parse / k:.2f} ms, "
        f"encode {1e3 * t_enc / k:.2f} ms, decode {1e3 * t_dec / k:.2f} ms per crystal"
    )


def cold_and_warm(workers: int) -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CRYSTAL_GPT_CACHE"] = cache
        t0 = time.perf_counter()
        n = 0
        for split in ("val", "test"):
            n += len(encode_dataset("mp_20", split, workers=workers, progress=False))
        cold = time.perf_counter() - t0
        print(
            f"cold encode mp_20 val+test: {n} crystals in {cold:.1f} s "
            f"= {n / cold:.0f} crystals/s ({workers} processes)"
        )
        t0 = time.perf_counter()
        for split in ("val", "test"):
            encode_dataset("mp_20", split, progress=False)
        print(f"warm reload from cache: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
