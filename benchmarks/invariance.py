"""Invariance of the canonical encoding: every test crystal, moved to another description.

Each crystal is re-described by a random unimodular change of basis, a random translation, a
random atom order and, for every second crystal, inversion through the origin (the mirror
image: an equivalent description under the Euclidean normaliser; not for the 22 groups of
enantiomorphic pairs, where the mirror image is another crystal in the partner group). The
encoding of the copy must equal the original's (same group, letters, elements; coordinates
and lattice within 1e-6) and the model's log p must agree within 1e-4 nats. Exceptions are
listed with their reason.

    python benchmarks/invariance.py --datasets mp_20 perov_5 carbon_24 mpts_52 --workers 2
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MODELS = {"mp_20": "mp_20", "perov_5": "perov_5", "carbon_24": "carbon_24", "mpts_52": "mp_20"}


@functools.cache
def _records(name: str):
    from crystal_gpt import load_dataset

    return load_dataset(name, "test")  # parsed once per worker, not once per chunk


def check(args):
    name, start, stop = args
    import warnings

    warnings.filterwarnings("ignore")
    from crystal_gpt.data.codec import encode
    from crystal_gpt.data.symmetry import ENANTIOMORPHIC_GROUPS
    from crystal_gpt.testing import redescribed

    records = _records(name)
    out = []
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        s = records[i].structure
        a = encode(s)
        b = encode(
            redescribed(s, rng, invert=bool(i % 2) and a.spacegroup not in ENANTIOMORPHIC_GROUPS)
        )
        if a.spacegroup != b.spacegroup:
            why = f"spglib finds group {a.spacegroup} for the original, {b.spacegroup} for the copy"
        elif not (np.array_equal(a.wyckoff, b.wyckoff) and np.array_equal(a.species, b.species)):
            why = f"different sites: {a} vs {b}"
        elif np.abs(a.coords - b.coords).max(initial=0) > 1e-6:
            why = f"coordinates differ by {np.abs(a.coords - b.coords).max():.2g}"
        elif np.abs(a.lattice - b.lattice).max() > 1e-6:
            why = f"lattice differs by {np.abs(a.lattice - b.lattice).max():.2g}"
        else:
            why = None
        out.append((i, records[i].id, why, a, b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(MODELS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    import torch

    from crystal_gpt import load_dataset
    from crystal_gpt.data.batching import PaddedCrystals
    from crystal_gpt.data.cache import EncodedDataset
    from crystal_gpt.model.checkpoints import load_model

    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        t0 = time.perf_counter()
        n = len(load_dataset(name, "test"))
        n = min(n, args.limit) if args.limit else n
        chunks = [(name, k, min(k + 200, n)) for k in range(0, n, 200)]
        with ProcessPoolExecutor(args.workers) as pool:
            rows = [r for part in pool.map(check, chunks) for r in part]
        model = load_model(MODELS[name])
        lp = []
        for which in (3, 4):
            data = PaddedCrystals(EncodedDataset.from_crystals([r[which] for r in rows]), 64)
            vals = np.zeros(len(rows))
            with torch.no_grad():
                for k in range(0, len(rows), 512):
                    idx = np.arange(k, min(k + 512, len(rows)))
                    vals[idx] = model(data.batch(idx))["total"].double().numpy()
            lp.append(vals)
        dlp = np.abs(lp[0] - lp[1])
        bad = [
            {"id": r[1], "reason": r[2] or f"log p differs by {d:.3g}", "dlogp": float(d)}
            for r, d in zip(rows, dlp, strict=True)
            if r[2] is not None or d > 1e-4
        ]
        ok = 100 * (1 - len(bad) / len(rows))
        dt = time.perf_counter() - t0
        print(
            f"{name} test: {len(rows)} crystals, identical encoding and log p within 1e-4: "
            f"{ok:.2f}% ({len(bad)} exceptions), {dt:.0f} s"
        )
        for b in bad:
            print(f"  {b['id']}: {b['reason']} (|d log p| = {b['dlogp']:.3g})")
        (Path(args.out) / f"invariance-{name}.json").write_text(json.dumps(bad, indent=1))


if __name__ == "__main__":
    main()
