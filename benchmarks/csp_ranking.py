"""The CSP ranking's structure comparisons: ``candidate_clusters`` against the plain greedy loop
over ``StructureMatcher.fit`` (what it replaced), and a target's whole matching job (clusters,
then the k predictions' RMS to the target on reductions shared with the clustering) against
the same with plain ``fit`` and ``get_rms_dist`` calls, on real draws of the bundled
composition model.

    python benchmarks/csp_ranking.py [--targets 25] [--candidates 40] [-k 20] [--temperature 1.3]

For the first N mp_20 test targets, draws the candidates as ``evaluate-csp --candidates`` does
(seed = target index), clusters and matches them both ways, and prints the seconds of each and
how many targets got the same clusters and the same RMS values (they must all).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from pymatgen.analysis.structure_matcher import StructureMatcher

from crystal_gpt.data.codec import decode
from crystal_gpt.data.datasets import load_dataset
from crystal_gpt.evaluation.csp import (
    MATCHER,
    _match_job,
    _ranked_order,
    candidate_clusters,
    greedy_clusters,
    primitive_composition,
    ranked_clusters,
)
from crystal_gpt.model.checkpoints import load_model
from crystal_gpt.sampling.sampler import sample_crystals


def plain_clusters(structures, groups, mass) -> list[list[int]]:
    """The same greedy clustering with a plain ``fit`` per comparison (no pre-reduction)."""
    matcher = StructureMatcher(**MATCHER)
    drawn = [i for i, s in enumerate(structures) if s is not None]
    fit = lambda i, j: matcher.fit(structures[i], structures[j])  # noqa: E731
    return ranked_clusters(greedy_clusters(drawn, groups, fit), mass)


def plain_rms(target, structures, groups, mass, k: int) -> np.ndarray:
    """The k predictions' RMS to the target, each comparison a plain ``get_rms_dist``."""
    matcher = StructureMatcher(**MATCHER)
    clusters = plain_clusters(structures, groups, mass)
    picked = _ranked_order(clusters)[:k]
    out = np.full(k, np.nan)
    for j, i in enumerate(picked):
        try:
            rms = matcher.get_rms_dist(structures[i], target)
        except Exception:  # as the evaluation does: a degenerate cell is a miss
            rms = None
        out[j] = np.nan if rms is None else rms[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=25)
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=1.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model("mp_20_csp")
    records = list(load_dataset("mp_20", "test", limit=args.targets))
    t_new = t_plain = m_new = m_plain = 0.0
    same = same_rms = 0
    for j, rec in enumerate(records):
        crystals = sample_crystals(
            model, args.candidates, seed=j, composition=primitive_composition(rec.structure),
            temperature=args.temperature, progress=False, check_workers=0, give_up=True,
        )  # fmt: skip
        structures = [None if c is None else decode(c) for c in crystals]
        groups = [0 if c is None else c.spacegroup for c in crystals]
        mass = list(np.random.default_rng(j).normal(size=len(crystals)))  # any fixed ranking
        t = time.perf_counter()
        a = plain_clusters(structures, groups, mass)
        t_plain += time.perf_counter() - t
        t = time.perf_counter()
        b = candidate_clusters(structures, groups, mass)
        t_new += time.perf_counter() - t
        same += a == b
        t = time.perf_counter()
        want = plain_rms(rec.structure, structures, groups, mass, args.k)
        m_plain += time.perf_counter() - t
        t = time.perf_counter()
        got = np.array(_match_job((rec.structure, structures, (groups, mass, mass, args.k)))[0])
        m_new += time.perf_counter() - t
        same_rms += bool(np.array_equal(np.isnan(want), np.isnan(got))) and bool(
            np.allclose(want[~np.isnan(want)], got[~np.isnan(got)], rtol=1e-6, atol=1e-9)
        )
    print(f"{platform.machine()}, torch {torch.__version__}, one thread")
    print(
        f"{args.targets} mp_20 test targets x {args.candidates} draws: plain fit {t_plain:.1f} s, "
        f"candidate_clusters {t_new:.1f} s; identical clusters for {same} of {len(records)}"
    )
    print(
        f"matching jobs (clusters, then {args.k} predictions' RMS to the target): plain fit and "
        f"get_rms_dist {m_plain:.1f} s, shared reductions {m_new:.1f} s; the same RMS for "
        f"{same_rms} of {len(records)}"
    )


if __name__ == "__main__":
    main()
