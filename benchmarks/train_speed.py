"""Training throughput of a preset on this machine.

    python benchmarks/train_speed.py [--preset small] [--dataset mp_20] [--threads N]

Times one full epoch over the training split (after 5 warm-up steps), with the preset's batch
size and length bucketing, and prints crystals/s and tokens/s (a token = a site or the end).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from crystal_gpt import encode_dataset
from crystal_gpt.data.batching import PaddedCrystals, bucketed_batches
from crystal_gpt.model.distributions import lattice_statistics
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.training import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dataset", default="mp_20")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides=[f"dataset={args.dataset}"])
    data = PaddedCrystals(encode_dataset(cfg.dataset, cfg.train_split, progress=False))
    torch.manual_seed(0)
    model = CrystalGPT(cfg.model)
    model.lattice.mean[:], model.lattice.std[:] = lattice_statistics(data)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"preset {args.preset}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"batch {cfg.batch_size}, {len(data)} {cfg.dataset} training crystals"
    )
    batches = bucketed_batches(data.n, cfg.batch_size, np.random.default_rng(0), cfg.max_tokens)

    def step(idx):
        loss = -model(data.batch(idx))["total"].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for idx in batches[:5]:
        step(idx)
    t0 = time.perf_counter()
    for idx in batches:
        step(idx)
    dt = time.perf_counter() - t0
    tokens = int(data.n.sum() + len(data))
    print(
        f"one epoch: {dt:.1f} s, {len(data) / dt:.0f} crystals/s, {tokens / dt:.0f} tokens/s, "
        f"{len(batches)} batches (mean padded length "
        f"{np.mean([data.n[b].max() + 1 for b in batches]):.1f}, mean length "
        f"{tokens / len(data):.1f})"
    )


if __name__ == "__main__":
    main()
