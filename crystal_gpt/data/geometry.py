"""Interatomic distances in a periodic cell from the lattice parameters alone.

One statement of the distance rule's geometry, shared by the training statistics (the shortest
distance seen for each element pair) and the sampler's distance-aware placement. Distances use
the metric tensor G (d^2 = df^T G df), so no Cartesian frame is needed, and the minimum over
the 27 neighbouring images of the wrapped fractional difference (exact for cells whose reduced
form is not extremely skewed, which conventional cells of real crystals are not).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from crystal_gpt.data.symmetry import get_tables

_IMAGES = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)), dtype=torch.float64)


def metric_tensor(lattice: Tensor) -> Tensor:
    """(..., 6) lattice parameters (Angstrom, degrees) -> (..., 3, 3) metric tensors."""
    lengths = lattice[..., :3].double()
    cos = torch.cos(torch.deg2rad(lattice[..., 3:].double()))
    ca, cb, cg = cos.unbind(-1)
    one = torch.ones_like(ca)
    # angle between axes (i, j): alpha for (b, c), beta for (a, c), gamma for (a, b)
    c = torch.stack(
        [
            torch.stack([one, cg, cb], -1),
            torch.stack([cg, one, ca], -1),
            torch.stack([cb, ca, one], -1),
        ],
        -2,
    )
    return c * lengths.unsqueeze(-1) * lengths.unsqueeze(-2)


def cell_volume(lattice: Tensor) -> Tensor:
    """(..., 6) lattice parameters (Angstrom, degrees) -> (...) cell volumes (Angstrom^3)."""
    return torch.linalg.det(metric_tensor(lattice)).clamp(min=0).sqrt()


def periodic_distances(metric: Tensor, frac_diff: Tensor) -> Tensor:
    """Shortest periodic distances for fractional differences (B, P, 3) under metrics
    (B, 3, 3): the minimum over the 27 images of the wrapped difference."""
    d = frac_diff.double()
    d = d - torch.round(d)  # (B, P, 3)
    m = metric.double()
    e = _IMAGES.to(d.device)  # (27, 3)
    # |d + e|^2 = d.M.d + 2 d.M.e + e.M.e: one (B, P, 3) x (B, 3, 27) product instead of
    # the metric applied to all 27 shifted copies (twice as fast in the sampler's clash checks)
    me = m @ e.T  # (B, 3, 27)
    sq = ((d @ m) * d).sum(-1, keepdim=True) + 2 * (d @ me) + (e.T * me).sum(-2).unsqueeze(-2)
    return sq.clamp(min=0).min(-1).values.sqrt()


def orbit_tensors(device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The orbit operations of every Wyckoff position as tensors: (rot, trans, start, mult)."""
    t = get_tables()
    mult = torch.zeros(231, t.max_letters + 1, dtype=torch.long)
    mult[:, : t.max_letters] = torch.as_tensor(t.multiplicity.astype("int64"))
    start = torch.zeros(231, t.max_letters + 1, dtype=torch.long)
    start[:, : t.max_letters] = torch.as_tensor(t.ops_start.astype("int64"))
    rot = torch.as_tensor(t.ops_rot, dtype=torch.float64, device=device)
    trans = torch.as_tensor(t.ops_trans, dtype=torch.float64, device=device)
    return rot, trans, start.to(device), mult.to(device)


def expand_orbits(
    ops: tuple[Tensor, Tensor, Tensor, Tensor], g: Tensor, w: Tensor, x: Tensor
) -> tuple[Tensor, Tensor]:
    """Images of representatives x (B, 3) on positions (g, w) (B,): (B, M, 3) coordinates in
    [0, 1) and a (B, M) mask of the real ones (M = the largest multiplicity in the batch)."""
    rot, trans, start, mult = ops
    m = mult[g, w]
    M = max(int(m.max()), 1) if len(m) else 1
    k = torch.arange(M, device=g.device)
    real = k.unsqueeze(0) < m.unsqueeze(1)
    idx = torch.where(real, start[g, w].unsqueeze(1) + k, 0)
    images = torch.einsum("bkij,bj->bki", rot[idx], x.double()) + trans[idx]
    return torch.remainder(images, 1.0), real


def shortest_pair_distances(
    g: np.ndarray, w: np.ndarray, a: np.ndarray, x: np.ndarray, lattice: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """(119, 119) shortest distance seen between each element pair over padded crystals
    (g (N,), w/a (N, T), x (N, T, 3), lattice (N, 6), n sites (N,)); 0 for pairs never seen."""
    ops = orbit_tensors()
    best = np.full((119, 119), np.inf)
    for i in range(len(g)):
        k = int(n[i])
        gi = torch.full((k,), int(g[i]))
        pos, real = expand_orbits(ops, gi, torch.as_tensor(w[i, :k]), torch.as_tensor(x[i, :k]))
        pos = pos[real]
        species = torch.as_tensor(a[i, :k]).unsqueeze(1).expand_as(real)[real].numpy()
        metric = metric_tensor(torch.as_tensor(lattice[i : i + 1]))
        diff = (pos.unsqueeze(0) - pos.unsqueeze(1)).reshape(1, -1, 3)
        dist = periodic_distances(metric, diff).reshape(len(pos), len(pos)).numpy()
        np.fill_diagonal(dist, np.inf)  # an atom with itself (its own periodic images aside)
        for p in range(len(pos)):
            np.minimum.at(best[species[p]], species, dist[p])
    best = np.minimum(best, best.T)
    best[~np.isfinite(best)] = 0.0
    return best


def training_pair_distances(data) -> np.ndarray:
    """``shortest_pair_distances`` of padded crystals (``data.batching.PaddedCrystals``)."""
    return shortest_pair_distances(data.g, data.w, data.a, data.x, data.lattice, data.n)


# The distance rule's default: a pair may come no closer than this fraction of the shortest
# distance seen for it in training (the sum of the atomic radii for a pair never seen). 0.8 allows
# 99.1% of the first 3,000 mp_20 test crystals under the table of the local training split (0.75:
# 99.4%, 0.85: 98.5%) while keeping O-O and F-F out of the 0.75-1.0 A range the model otherwise
# puts them in (benchmarks/RESULTS.md, "Lattice first").
DISTANCE_FRACTION = 0.8


def atomic_radii() -> np.ndarray:
    """(119,) atomic radii in Angstrom (pymatgen; 1.5 where none is tabulated)."""
    from pymatgen.core.periodic_table import Element

    out = np.zeros(119)
    for z in range(1, 119):
        el = Element.from_Z(z)
        out[z] = float(el.atomic_radius or el.average_ionic_radius or 1.5)
    return out


def distance_thresholds(pair_min: np.ndarray, fraction: float = DISTANCE_FRACTION) -> np.ndarray:
    """(119, 119) closest allowed approach of each element pair: ``fraction`` of the shortest
    distance seen in training (``pair_min``, 0 where unseen) or, for an unseen pair, of the sum
    of the atomic radii."""
    r = atomic_radii()
    radius_sum = r[:, None] + r[None, :]
    return fraction * np.where(pair_min > 0, pair_min, radius_sum)


def element_volumes(counts: np.ndarray, volumes: np.ndarray) -> np.ndarray:
    """(119,) volume per atom of each element (Angstrom^3) such that a crystal's cell volume is
    about the sum over its atoms: non-negative least squares on the relative error, over
    crystals ``counts`` (N, 119) atoms of each element in the cell and ``volumes`` (N,). An
    element no crystal holds gets the sphere of its atomic radius, scaled by the median ratio
    of fitted volume to sphere over the elements seen."""
    from scipy.optimize import nnls

    counts = np.asarray(counts, dtype=float)
    volumes = np.asarray(volumes, dtype=float)
    seen = counts.sum(0) > 0
    weight = 1.0 / volumes
    fit, _ = nnls(counts[:, seen] * weight[:, None], volumes * weight)
    out = np.zeros(counts.shape[1])
    out[seen] = fit
    sphere = 4.0 / 3.0 * np.pi * atomic_radii()[: counts.shape[1]] ** 3
    both = seen & (out > 0)
    both[0] = False
    scale = float(np.median(out[both] / sphere[both])) if both.any() else 1.0
    unseen = ~seen
    unseen[0] = False
    out[unseen] = scale * sphere[unseen]
    out[0] = 0.0  # padding
    return out


def training_element_volumes(data) -> np.ndarray:
    """``element_volumes`` of padded crystals (``data.batching.PaddedCrystals``), counted in
    the conventional cell that the lattice parameters describe."""
    mult = get_tables().multiplicity
    counts = np.zeros((len(data.g), 119))
    for i in range(len(data.g)):
        k = int(data.n[i])
        m = mult[int(data.g[i]), data.w[i, :k]]
        np.add.at(counts[i], data.a[i, :k], m)
    volumes = cell_volume(torch.as_tensor(data.lattice, dtype=torch.float64)).numpy()
    return element_volumes(counts, volumes)
