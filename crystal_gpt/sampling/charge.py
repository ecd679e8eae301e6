"""Charge balance as a sampling constraint (``--charge-balanced``), with look-ahead.

A crystal is balanced as SMACT's neutrality test counts it: one element, or only metals, or
some choice of one oxidation state per element (``data.chemistry.oxidation_table``) whose
charges sum to zero. The end of the sequence is offered only to balanced crystals, and a
letter or an element only if a balanced completion remains possible within the atom budget:
the charges that future sites can add are precomputed (an unbounded knapsack over the
multiplicities of the letters still reachable and the oxidation states of the allowed elements,
for every atom budget). The look-ahead is exact about charges and budgets; it relaxes only in
letting a later site give an element already present another oxidation state, so a crystal can
still reach a dead end, which the sampler redraws (counted like any redraw).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from crystal_gpt.data.chemistry import is_balanced, oxidation_table
from crystal_gpt.data.symmetry import get_tables, lattice_points


@functools.cache
def _future_charges(mults: tuple[int, ...], states: tuple[int, ...], budget: int) -> np.ndarray:
    """(budget + 1, 2 * span + 1) bool: charges that sites of these multiplicities and states
    can add with at most b atoms (row b); column c is charge c - span."""
    span = budget * max(1, max(abs(s) for s in states))
    width = 2 * span + 1
    exact = np.zeros((budget + 1, width), dtype=bool)
    exact[0, span] = True
    for b in range(1, budget + 1):
        for m in mults:
            if m > b:
                continue
            prev = exact[b - m]
            for s in states:
                shift = m * s
                if shift >= 0:
                    exact[b, shift:] |= prev[: width - shift]
                else:
                    exact[b, :shift] |= prev[-shift:]
    return np.logical_or.accumulate(exact, axis=0)


class ChargeBalance:
    """Per-row state (element counts, atoms placed) and masks for one sampling batch."""

    def __init__(self, g: Tensor, allowed: Tensor | None, max_atoms: int | None) -> None:
        self.table, self.real, self.metal = oxidation_table()
        self.tables = get_tables()
        self.g = g.cpu().tolist()
        per_prim = max_atoms if max_atoms is not None else 64
        self.budget = [per_prim * lattice_points(gi) for gi in self.g]
        ok = np.ones(119, dtype=bool) if allowed is None else allowed.cpu().numpy().copy()
        ok[0] = False
        ok &= self.real.any(1) | self.metal  # an element without oxidation states is no ion
        self.allowed = ok
        self.union = tuple(sorted(set(self.table[ok][self.real[ok]].tolist()) | {0}))
        self.counts: list[dict[int, int]] = [{} for _ in self.g]
        self.placed = [0] * len(self.g)
        self.min_letter = [0] * len(self.g)

    def keep(self, keep: list[bool]) -> None:
        pick = [i for i, k in enumerate(keep) if k]
        for name in ("g", "budget", "counts", "placed", "min_letter"):
            setattr(self, name, [getattr(self, name)[i] for i in pick])

    def advance(self, w: Tensor, a: Tensor) -> None:
        for i, (wi, ai) in enumerate(zip(w.tolist(), a.tolist(), strict=True)):
            m = int(self.tables.multiplicity[self.g[i], wi])
            self.counts[i][ai] = self.counts[i].get(ai, 0) + m
            self.placed[i] += m
            self.min_letter[i] = wi

    # ------------------------------------------------------------------ feasibility
    def _charges(self, counts: dict[int, int], skip: int = 0) -> np.ndarray:
        """Distinct total charges over the oxidation-state choices of the present elements."""
        total = np.zeros(1, dtype=np.int64)
        for z, n in counts.items():
            if z != skip:
                total = np.unique(np.add.outer(total, self.table[z][self.real[z]] * n).ravel())
        return total

    def _exempt(self, elements) -> bool:
        return len(elements) == 1 or all(self.metal[z] for z in elements)

    def _future(self, i: int, w_min: int, left: int) -> tuple[np.ndarray, int]:
        g = self.g[i]
        k = int(self.tables.num_letters[g])
        mults = tuple(sorted(set(self.tables.multiplicity[g, w_min:k].tolist())))
        budget = self.budget[i]
        reach = _future_charges(mults, self.union, budget)
        span = (reach.shape[1] - 1) // 2
        return reach[max(left, 0)], span

    def _can_cancel(self, charges: np.ndarray, reach: np.ndarray, span: int) -> np.ndarray:
        """Whether each charge can be cancelled by charges the future can add (any shape)."""
        idx = span - charges
        inside = (idx >= 0) & (idx < len(reach))
        return inside & reach[np.clip(idx, 0, len(reach) - 1)]

    def can_end(self) -> list[bool]:
        return [is_balanced(c) for c in self.counts]

    def letters(self, w_legal: Tensor) -> Tensor:
        """(n, L+1) letters from which a balanced completion remains possible; the end only
        for balanced crystals."""
        legal = w_legal.cpu().numpy()
        out = np.zeros_like(legal)
        L = legal.shape[1] - 1
        metals_left = bool((self.allowed & self.metal).any())
        for i, c in enumerate(self.counts):
            charges = self._charges(c)
            for w in np.nonzero(legal[i, :L])[0]:
                m = int(self.tables.multiplicity[self.g[i], w])
                left = self.budget[i] - self.placed[i] - m
                if left < 0:
                    continue
                if len(c) <= 1 or (metals_left and all(self.metal[z] for z in c)):
                    out[i, w] = True  # one element, or metals only, stays balanced
                    continue
                reach, span = self._future(i, int(w), left)
                added = np.add.outer(charges, m * np.asarray(self.union)).ravel()
                out[i, w] = bool(self._can_cancel(added, reach, span).any())
        out[:, L] = legal[:, L] & np.array(self.can_end(), dtype=bool)
        return torch.as_tensor(out, device=w_legal.device)

    def elements(self, w: Tensor) -> Tensor:
        """(n, 119) elements a site on letter w may take with a balanced completion left."""
        out = np.zeros((len(self.g), 119), dtype=bool)
        for i, (c, wi) in enumerate(zip(self.counts, w.tolist(), strict=True)):
            m = int(self.tables.multiplicity[self.g[i], wi])
            left = self.budget[i] - self.placed[i] - m
            if left < 0:
                continue
            reach, span = self._future(i, wi, left)
            # elements not present yet: every choice of their state
            charges = self._charges(c)
            added = charges[:, None, None] + m * self.table[None, :, :]
            ok = (self._can_cancel(added, reach, span) & self.real[None]).any((0, 2))
            # elements present: their state is shared with the sites they already hold
            for z, n in c.items():
                rest = self._charges(c, skip=z)
                states = self.table[z][self.real[z]]
                tot = rest[:, None] + (n + m) * states[None, :]
                ok[z] = bool(self._can_cancel(tot, reach, span).any())
            # exemptions: one element, or only metals, can end balanced
            if all(self.metal[z] for z in c):
                ok |= self.metal
            if len(c) == 1:
                ok[next(iter(c))] = True
            if not c:
                ok[:] = True  # a first element alone is balanced
            out[i] = ok & self.allowed
        return torch.as_tensor(out, device=w.device)
