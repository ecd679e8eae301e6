"""Where a model's samples get their too-heavy chemistry: teacher-forced calibration of the
element head against the model's own samples.

For each model it prints, on a split of the data (teacher forcing, conditions hidden or
given): the atomic mass the element head expects at a crystal's first site and at every site,
against the masses the data has there. Then, for samples drawn by the plain ancestral sampler
(no distance rule, no symmetry check, no element-count bounds, so nothing is redrawn): the
expected and drawn masses on the samples themselves (these must agree: the sampler follows the
model), their first-site mass, number of sites and mass per atom, against the data's.

    python benchmarks/element_calibration.py mp_20 runs/sfv/best.pt --split train -n 3000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from crystal_gpt import encode_dataset
from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.data.cache import EncodedDataset
from crystal_gpt.data.statistics import atomic_masses
from crystal_gpt.model.checkpoints import load_model
from crystal_gpt.sampling.sampler import sample_crystals


def teacher_forced(model, data: PaddedCrystals, limit: int, mass: torch.Tensor) -> dict:
    """Expected (model) and actual (data) mass at first sites and at all sites."""
    n = min(len(data), limit)
    sums = dict.fromkeys(("exp_first", "act_first", "exp_all", "act_all"), 0.0)
    firsts = sites = 0
    with torch.no_grad():
        for s in range(0, n, 256):
            b = data.batch(np.arange(s, min(n, s + 256)))
            out = model(b, distributions=True)
            p = torch.softmax(out["a_logits"], -1)
            crystal = out["site_crystal"]
            first = torch.ones(len(crystal), dtype=torch.bool)
            first[1:] = crystal[1:] != crystal[:-1]
            real = torch.arange(b["w"].shape[1]).unsqueeze(0) < b["n"].unsqueeze(1)
            drawn = mass[b["a"][real]]
            expected = p @ mass
            sums["exp_first"] += float(expected[first].sum())
            sums["act_first"] += float(drawn[first].sum())
            sums["exp_all"] += float(expected.sum())
            sums["act_all"] += float(drawn.sum())
            firsts += int(first.sum())
            sites += len(drawn)
    return {k: v / (firsts if k.endswith("first") else sites) for k, v in sums.items()} | {
        "crystals": n
    }


def crystal_figures(crystals, mass: torch.Tensor) -> dict:
    m = mass.numpy()
    per_atom = [m[np.repeat(c.species, c.multiplicities)].mean() for c in crystals]
    return {
        "first": float(np.mean([m[c.species[0]] for c in crystals])),
        "sites": float(np.mean([c.num_sites for c in crystals])),
        "per_atom": float(np.mean(per_atom)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("models", nargs="+", help="bundled names or checkpoints")
    ap.add_argument("--split", default="train")
    ap.add_argument("-n", type=int, default=3000, help="crystals scored and samples drawn")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mass = torch.as_tensor(atomic_masses(), dtype=torch.float32)
    ds = encode_dataset(args.dataset, args.split, progress=False)
    data_figs = crystal_figures([ds[i] for i in range(len(ds))], mass)
    print(
        f"{args.dataset}/{args.split}: first-site mass {data_figs['first']:.2f}, sites "
        f"{data_figs['sites']:.2f}, mass per atom {data_figs['per_atom']:.2f}"
    )
    print(
        "| model | teacher forced, conditions hidden: first site expected / actual | all sites "
        "expected / actual | given the conditions: first site expected / actual | samples: "
        "expected / drawn per site | samples: first site | sites | mass per atom |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = load_model(name, "cpu")
        known = list(model.config.conditions)
        hidden = teacher_forced(model, PaddedCrystals(ds, model.config.max_sites), args.n, mass)
        given = "-"
        if known:
            cond = teacher_forced(
                model, PaddedCrystals(ds, model.config.max_sites, known), args.n, mass
            )
            given = f"{cond['exp_first']:.2f} / {cond['act_first']:.2f}"
        crystals = sample_crystals(
            model, args.n, seed=args.seed, min_distance=0, symprec=None, num_elements=None
        )
        own = teacher_forced(
            model,
            PaddedCrystals(EncodedDataset.from_crystals(crystals), model.config.max_sites),
            args.n,
            mass,
        )
        figs = crystal_figures(crystals, mass)
        print(
            f"| {name} | {hidden['exp_first']:.2f} / {hidden['act_first']:.2f} | "
            f"{hidden['exp_all']:.2f} / {hidden['act_all']:.2f} | {given} | "
            f"{own['exp_all']:.2f} / {own['act_all']:.2f} | {figs['first']:.2f} | "
            f"{figs['sites']:.2f} | {figs['per_atom']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
