"""Sampling speed with a bundled model on this machine.

    python benchmarks/sample_speed.py [--model mp_20] [-n 1000]

Prints crystals/s for: sampling alone (key/value cache), sampling with the full prefix re-run
at every step (no cache), building pymatgen Structures, and the whole `crystal-gpt sample`
path (sampling + structures + likelihoods + CIF/extxyz/CSV writing), sampling without the
symmetry/cell check, without the distance rule, with charge balance, with the model's own
numbers of elements instead of the training data's (the default's rejection), and with exactly
3 elements (their costs, with the redraws they cause); then sampling with each
kind of look-ahead constraint (composition, atoms per cell, Wyckoff template).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from crystal_gpt.cli import main as cli_main
from crystal_gpt.data.codec import decode
from crystal_gpt.model.checkpoints import load_model
from crystal_gpt.sampling.sampler import sample_crystals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mp_20")
    ap.add_argument("-n", type=int, default=1000)
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    model = load_model(args.model)
    sample_crystals(model, 20, seed=0)  # warm-up (first-call imports)
    timings = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        crystals = sample_crystals(model, args.n, seed=0, use_cache=use_cache)
        timings[use_cache] = time.perf_counter() - t0
        print(
            f"sampling {'with' if use_cache else 'without'} KV cache: "
            f"{args.n / timings[use_cache]:.0f} crystals/s"
        )
    print(
        f"cache speed-up: {timings[False] / timings[True]:.2f}x "
        f"(mean {sum(c.num_sites for c in crystals) / len(crystals):.1f} sites per crystal; "
        f"{sum(c.meta['redraws'] for c in crystals)} crystals redrawn, "
        f"{sum(c.meta.get('site_redraws', 0) for c in crystals)} site coordinates redrawn)"
    )
    # the cost of the symmetry/cell check and of the distance rule, by turning each off
    for label, kwargs in (
        ("no symmetry/cell check", {"symprec": None}),
        ("no distance rule", {"min_distance": 0}),
        ("neither", {"symprec": None, "min_distance": 0}),
        ("charge balanced", {"charge_balanced": True}),
        ("the model's own numbers of elements", {"num_elements": "model"}),
        ("exactly 3 elements", {"num_elements": 3}),
    ):
        t0 = time.perf_counter()
        out = sample_crystals(model, args.n, seed=0, **kwargs)
        print(
            f"sampling with KV cache, {label}: {args.n / (time.perf_counter() - t0):.0f} "
            f"crystals/s ({sum(c.meta['redraws'] for c in out)} crystals, "
            f"{sum(c.meta.get('site_redraws', 0) for c in out)} site coordinates redrawn)"
        )
    t0 = time.perf_counter()
    for c in crystals:
        decode(c)
    print(f"building Structures: {args.n / (time.perf_counter() - t0):.0f} crystals/s")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cli_main(["sample", "-n", str(args.n), "--model", args.model, "--seed", "0", "--out", tmp])
        print(
            f"end to end (crystal-gpt sample, incl. writing): "
            f"{args.n / (time.perf_counter() - t0):.0f} crystals/s"
        )
    # constraints with look-ahead masks: the planner's Python work per site on top of the model
    for label, kwargs in (
        ("composition Li4Fe4P4O16 (CSP)", {"composition": "Li4Fe4P4O16"}),
        ("composition SrTiO3", {"composition": "SrTiO3"}),
        ("4-12 atoms per cell", {"num_atoms": "4-12"}),
        ("Fm-3m template 4a 4b", {"spacegroup": 225, "wyckoff_template": "4a 4b"}),
    ):
        t0 = time.perf_counter()
        crystals = sample_crystals(model, args.n, seed=0, **kwargs)
        dt = time.perf_counter() - t0
        sites = sum(c.num_sites for c in crystals) / len(crystals)
        print(f"sampling, {label}: {args.n / dt:.0f} crystals/s ({sites:.1f} sites per crystal)")
    # long sequences are where the cache matters: the CSP request again without it
    t0 = time.perf_counter()
    sample_crystals(model, args.n, seed=0, composition="Li4Fe4P4O16", use_cache=False)
    print(
        f"sampling, composition Li4Fe4P4O16 without KV cache: "
        f"{args.n / (time.perf_counter() - t0):.0f} crystals/s"
    )


if __name__ == "__main__":
    main()
