"""Sampling throughput against batch size, with and without the key/value cache.

    python benchmarks/batch_speed.py [--model mp_20] [--device cuda]
        [--batch-sizes 1000,10000,100000] [--budget 60]

For each batch size B, draws B crystals in one batch (``sample_crystals(n=B, batch_size=B)``)
and prints crystals/s: the model's draws alone (no symmetry check, no distance rule, so the
figure is the network's and the sampler's, not spglib's), with the cache and without it (every
step re-runs the whole prefix); then, at one batch size, the defaults (symmetry check and
distance rule). A run without the cache that would take longer than ``--budget`` seconds
(extrapolated from the smaller batch) is skipped and said so. Times include moving the drawn
crystals to the host (the sampler hands back WyckoffCrystal objects).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from crystal_gpt.model.checkpoints import load_model
from crystal_gpt.sampling.sampler import sample_crystals
from crystal_gpt.training import pick_device


def timed(model, n: int, device: torch.device, **kw) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    crystals = sample_crystals(model, n, batch_size=n, seed=0, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    assert len(crystals) == n
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mp_20")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-sizes", default="100,1000,10000")
    ap.add_argument("--defaults-at", type=int, default=None, help="batch size for the defaults")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per run at most")
    args = ap.parse_args()
    device = pick_device(args.device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}{name}; model {args.model}",
        flush=True,
    )
    model = load_model(args.model, device)
    fast = dict(symprec=None, min_distance=0)
    sample_crystals(model, 50, seed=0, **fast)  # warm-up: first-call imports and kernels
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    last: dict[bool, tuple[int, float]] = {}
    for b in sizes:
        for cache in (True, False):
            if cache in last:  # the time grows at least linearly with the batch
                n0, t0 = last[cache]
                if t0 * b / n0 > args.budget:
                    state = "on " if cache else "off"
                    expected = f"~{t0 * b / n0:.0f} s expected, budget {args.budget:g} s"
                    print(f"batch {b:>7}, cache {state}: skipped ({expected})", flush=True)
                    continue
            dt = timed(model, b, device, use_cache=cache, **fast)
            last[cache] = (b, dt)
            memory = (
                f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                if device.type == "cuda"
                else ""
            )
            print(
                f"batch {b:>7}, cache {'on ' if cache else 'off'}: {dt:7.2f} s, "
                f"{b / dt:8.0f} crystals/s{memory}",
                flush=True,
            )
    b = args.defaults_at or sizes[min(1, len(sizes) - 1)]
    dt = timed(model, b, device)
    print(
        f"batch {b:>7}, defaults (symmetry check, distance rule; redraws included): {dt:.2f} s, "
        f"{b / dt:.0f} crystals/s",
        flush=True,
    )


if __name__ == "__main__":
    main()
