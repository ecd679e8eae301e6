"""Training throughput of presets on this machine.

    python benchmarks/train_speed.py [--preset small[,large]] [--precision fp32[,bf16]]
        [--dataset mp_20] [--device cpu|cuda] [--threads N] [--batch-size B] [--epochs 1]

Times full epochs over the training split (after 5 warm-up steps), with the preset's batch size
and length bucketing, and prints crystals/s and tokens/s (a token = a site or the end) for each
preset and precision; on a GPU also the peak memory. Epochs after the first show the steady
state (the first includes the allocator's and autotuners' start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from crystal_gpt import encode_dataset
from crystal_gpt.data.batching import PaddedCrystals, bucketed_batches
from crystal_gpt.model.distributions import lattice_statistics
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.training import load_config, pick_device


def time_preset(
    preset: str, precision: str, data: PaddedCrystals, device: torch.device, args
) -> None:
    overrides = [f"dataset={args.dataset}", f"precision={json.dumps(precision)}"]
    if args.batch_size:
        overrides.append(f"batch_size={args.batch_size}")
    cfg = load_config(preset, overrides=overrides)
    torch.manual_seed(0)
    model = CrystalGPT(cfg.model)
    model.lattice.mean[:], model.lattice.std[:] = lattice_statistics(
        data, per_atom=not cfg.model.lattice_first
    )
    model = model.to(device)
    model.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(
        f"preset {preset}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"batch {cfg.batch_size}, {precision}, {len(data)} {cfg.dataset} training crystals"
    )

    def step(idx) -> None:
        loss = -model(data.batch(idx, device))["total"].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tokens = int(data.n.sum() + len(data))
    for epoch in range(args.epochs):
        rng = np.random.default_rng(epoch)
        batches = bucketed_batches(data.n, cfg.batch_size, rng, cfg.max_tokens)
        if epoch == 0:
            for idx in batches[:5]:
                step(idx)
        sync()
        t0 = time.perf_counter()
        for idx in batches:
            step(idx)
        sync()
        dt = time.perf_counter() - t0
        memory = (
            f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            if device.type == "cuda"
            else ""
        )
        print(
            f"  epoch {epoch + 1}: {dt:.2f} s, {len(data) / dt:.0f} crystals/s, "
            f"{tokens / dt:.0f} tokens/s, {len(batches)} batches (mean padded length "
            f"{np.mean([data.n[b].max() + 1 for b in batches]):.1f}, mean length "
            f"{tokens / len(data):.1f}){memory}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small", help="one or several: small,large")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or both: fp32,bf16")
    ap.add_argument("--dataset", default="mp_20")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    ap.add_argument("--batch-size", type=int, help="instead of the preset's")
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per preset")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}{name}"
    )
    cfg = load_config(args.preset.split(",")[0], overrides=[f"dataset={args.dataset}"])
    data = PaddedCrystals(encode_dataset(cfg.dataset, cfg.train_split, progress=False))
    for preset in args.preset.split(","):
        for precision in args.precision.split(","):
            time_preset(preset, precision, data, device, args)


if __name__ == "__main__":
    main()
