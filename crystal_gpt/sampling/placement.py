"""Distance-aware placement: the atoms each crystal of a batch has so far, and the rule that a
new site may not come closer than a threshold to any of them or to the other images of its own
orbit.

With the lattice drawn first the sampler checks every site as it is drawn and redraws its
coordinates until the rule holds: rejection sampling, so the accepted coordinates follow the
model's density truncated to the allowed region exactly. With the lattice drawn last the same
check runs once the lattice is known, and a crystal that breaks it is redrawn whole.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from crystal_gpt.data.geometry import (
    distance_thresholds,
    expand_orbits,
    metric_tensor,
    orbit_tensors,
    periodic_distances,
)

_SAME = 1e-4  # Angstrom: an orbit image this close to the representative is the atom itself


def thresholds_for(model, min_distance: float | str | None) -> Tensor | None:
    """The (119, 119) thresholds the sampler applies: ``"auto"`` learnt from the model's
    training data (``pair_min_distance``; none for a model that carries no such table, e.g. an
    untrained one), a number in Angstrom for every pair, 0/None none."""
    if min_distance is None:
        return None
    if isinstance(min_distance, str):
        if min_distance != "auto":
            raise ValueError(f"min_distance must be 'auto' or a number, got {min_distance!r}")
        pair_min = model.pair_min_distance.detach().cpu().double().numpy()
        if not (pair_min > 0).any():
            return None
        return torch.as_tensor(distance_thresholds(pair_min))
    value = float(min_distance)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"min_distance must be a distance >= 0 in Angstrom, got {min_distance}")
    if value == 0:
        return None
    return torch.full((119, 119), value, dtype=torch.float64)


class Placement:
    """Placed atoms per crystal (conventional cell, fractional) under known lattices."""

    def __init__(self, lattice: Tensor, thresholds: Tensor) -> None:
        self.ops = orbit_tensors(lattice.device)
        self.metric = metric_tensor(lattice)
        self.thresholds = thresholds.to(lattice.device)
        B = len(lattice)
        self.pos = torch.zeros(B, 0, 3, dtype=torch.float64, device=lattice.device)
        self.species = torch.zeros(B, 0, dtype=torch.long, device=lattice.device)
        self.real = torch.zeros(B, 0, dtype=torch.bool, device=lattice.device)

    def keep(self, rows: Tensor) -> None:
        """Keep only these rows (a bool mask or indices), as the batch shrinks."""
        self.metric, self.pos = self.metric[rows], self.pos[rows]
        self.species, self.real = self.species[rows], self.real[rows]

    def clashes(self, g: Tensor, w: Tensor, a: Tensor, x: Tensor, rows: Tensor | None = None):
        """Which new sites (g, w, a, x) (n,) break the rule; ``rows`` picks the crystals (all by
        default)."""
        metric = self.metric if rows is None else self.metric[rows]
        images, real = expand_orbits(self.ops, g, w, x)
        rep = x.double().unsqueeze(1)
        d_self = periodic_distances(metric, images - rep)
        own = self.thresholds[a, a].unsqueeze(1)
        bad = ((d_self < own) & (d_self > _SAME) & real).any(1)
        if self.pos.shape[1]:
            pos = self.pos if rows is None else self.pos[rows]
            species = self.species if rows is None else self.species[rows]
            placed = self.real if rows is None else self.real[rows]
            d = periodic_distances(metric, pos - rep)
            limit = self.thresholds[a.unsqueeze(1), species]
            bad = bad | ((d < limit) & placed).any(1)
        return bad

    def add(self, g: Tensor, w: Tensor, a: Tensor, x: Tensor, placed: Tensor | None = None):
        """Record new sites' whole orbits; ``placed`` (n,) bool: only these rows get atoms."""
        images, real = expand_orbits(self.ops, g, w, x)
        if placed is not None:
            real = real & placed.unsqueeze(1)
        self.pos = torch.cat([self.pos, images], 1)
        self.species = torch.cat([self.species, a.unsqueeze(1).expand_as(real)], 1)
        self.real = torch.cat([self.real, real], 1)
        if self.real.shape[1] > 64:  # squeeze out the padding of rows with small orbits
            order = torch.sort(self.real.int(), dim=1, descending=True, stable=True).indices
            width = max(int(self.real.sum(1).max()), 1)
            order = order[:, :width]
            self.pos = self.pos.gather(1, order.unsqueeze(-1).expand(-1, -1, 3))
            self.species = self.species.gather(1, order)
            self.real = self.real.gather(1, order)


def clashing_crystals(
    lattice: Tensor, thresholds: Tensor, g: Tensor, sites: list[tuple[Tensor, Tensor, Tensor]], pad
) -> Tensor:
    """Lattice last: which finished crystals break the rule, checked site by site in order
    (``sites``: per step (w, a, x) over the batch; letter ``pad`` = no site)."""
    placement = Placement(lattice, thresholds)
    bad = torch.zeros(len(g), dtype=torch.bool, device=g.device)
    for w, a, x in sites:
        here = w != pad
        if not bool(here.any()):
            break
        wc = torch.where(here, w, 0)
        bad |= placement.clashes(g, wc, a, x) & here
        placement.add(g, wc, a, x, placed=here)
    return bad
