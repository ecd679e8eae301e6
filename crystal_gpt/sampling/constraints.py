"""Sampling constraints that need look-ahead: an exact composition, a range of atoms per cell,
and a Wyckoff template.

Masking only the next token is not enough for these: a sampler that places 4 Na atoms on a 4a
site of Fm-3m may find that no remaining letter can hold exactly the 4 Cl atoms left. Every mask
here therefore allows a (letter, element) move only if the rest of the request can still be
completed from the resulting state, within the model's maximum number of sites; so a sample
never reaches a dead end, and a request that no crystal of a group can meet is rejected before
sampling starts.

The state after a site (w, a) is summarised exactly by what the canonical site order leaves
open: letters never decrease, a zero-freedom letter is used once, and a repeated letter takes
non-decreasing atomic numbers. After (w, a) the next site uses letter w with element >= a (only
if w has free coordinates) or any letter > w, each zero-freedom letter above w at most once. So
the look-ahead depends on (group, atoms still needed, lowest letter, lowest element) only and is
memoised on that key.

Counts (composition, atoms per cell) are per primitive cell, the convention of the benchmark
datasets and of crystal structure prediction; a group with a centred lattice holds them times its
number of lattice points in the conventional cell the model generates.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from crystal_gpt.data.symmetry import (
    check_spacegroup,
    get_tables,
    lattice_points,
    lowest_next_element,
    lowest_next_letter,
)

if TYPE_CHECKING:
    from torch import Tensor

INF = 10**9


class ConstraintError(ValueError):
    """A constraint that is malformed or that no crystal can satisfy."""


# ---------------------------------------------------------------- parsing
def parse_composition(
    composition: str | Mapping[str, float] | object, formula_units: int | None = None
) -> dict[int, int]:
    """Atomic number -> count per primitive cell, from a formula ('Li4Fe4P4O16', 'LiFePO4'),
    a mapping or a pymatgen Composition; ``formula_units`` multiplies the reduced formula."""
    from pymatgen.core import Composition
    from pymatgen.core.periodic_table import Element

    if isinstance(composition, str):
        text = composition.strip()
        if not text:
            raise ConstraintError("empty composition")
        for sym in re.findall(r"[A-Z][a-z]?", text):
            if not Element.is_valid_symbol(sym):
                raise ConstraintError(f"unknown element {sym!r} in composition {composition!r}")
        try:
            comp = Composition(text)
        except Exception as exc:  # pymatgen raises several types for bad formulas
            raise ConstraintError(f"cannot read composition {composition!r}: {exc}") from None
    elif isinstance(composition, Mapping):  # symbols or atomic numbers as keys
        items = {}
        for key, amount in composition.items():
            if isinstance(key, int | np.integer) and 1 <= int(key) <= 118:
                key = Element.from_Z(int(key)).symbol
            if not Element.is_valid_symbol(str(key)):
                raise ConstraintError(f"unknown element {key!r} in composition")
            items[str(key)] = amount
        comp = Composition(items)
    elif isinstance(composition, Composition):
        comp = composition
    else:
        raise ConstraintError(f"composition must be a formula or a mapping, got {composition!r}")
    if comp.num_atoms <= 0:
        raise ConstraintError(f"composition {composition!r} has no atoms")
    if formula_units is not None:
        if int(formula_units) != formula_units or formula_units < 1:
            raise ConstraintError(f"formula_units must be a positive integer, got {formula_units}")
        comp = comp.reduced_composition * int(formula_units)
    counts: dict[int, int] = {}
    for el, amount in comp.items():
        if abs(amount - round(amount)) > 1e-6 or round(amount) < 1:
            raise ConstraintError(
                f"composition {comp.formula!r} needs whole numbers of atoms per cell"
                " (give the cell content, e.g. 'Li4Fe4P4O16', or a formula and formula_units)"
            )
        if el.Z >= 119:
            raise ConstraintError(f"element {el} is outside the model's range")
        counts[el.Z] = counts.get(el.Z, 0) + round(amount)
    return dict(sorted(counts.items()))


def parse_atom_range(spec: int | str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'8', '4-12', 8 or (4, 12) -> inclusive (low, high) atoms per primitive cell."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = [p.strip() for p in re.split(r"[-:,]", spec.strip())]
        try:
            nums = [int(p) for p in parts if p]
        except ValueError:
            raise ConstraintError(
                f"atoms per cell must be 'N' or 'LOW-HIGH', got {spec!r}"
            ) from None
        if len(nums) not in (1, 2):
            raise ConstraintError(f"atoms per cell must be 'N' or 'LOW-HIGH', got {spec!r}")
        low, high = nums[0], nums[-1]
    elif isinstance(spec, int | np.integer):
        low = high = int(spec)
    else:
        low, high = (int(v) for v in spec)
    if low < 1 or high < low:
        raise ConstraintError(f"atoms per cell range must satisfy 1 <= low <= high, got {spec!r}")
    return low, high


def parse_template(spacegroup: int, template: str | Iterable[str]) -> tuple[int, ...]:
    """Wyckoff letters ('4a 4b 8c', 'a,b,c' or a list) -> letter indices in canonical order.

    A multiplicity prefix is checked against the table; a zero-freedom letter may appear once."""
    t = get_tables()
    g = check_spacegroup(spacegroup)
    items = re.split(r"[\s,]+", template.strip()) if isinstance(template, str) else list(template)
    items = [str(i).strip() for i in items if str(i).strip()]
    if not items:
        raise ConstraintError("empty Wyckoff template")
    out = []
    for item in items:
        m = re.fullmatch(r"(\d*)([a-zA-Z])", item)
        if m is None:
            raise ConstraintError(f"cannot read Wyckoff site {item!r} (expected e.g. '4a' or 'a')")
        try:
            w = t.letter_index(g, m.group(2))
        except ValueError as exc:
            raise ConstraintError(str(exc)) from None
        if m.group(1) and int(m.group(1)) != int(t.multiplicity[g, w]):
            raise ConstraintError(
                f"Wyckoff position {m.group(2)} of space group {g} ({t.symbol[g]}) has "
                f"multiplicity {t.multiplicity[g, w]}, not {m.group(1)}"
            )
        out.append(w)
    out.sort()
    for a, b in itertools.pairwise(out):
        if a == b and t.dof[g, a] == 0:
            raise ConstraintError(
                f"Wyckoff position {t.letters[g, a]} of space group {g} ({t.symbol[g]}) has no "
                "free coordinate, so it holds one site only"
            )
    return tuple(out)


# ---------------------------------------------------------------- look-ahead
@dataclass(frozen=True)
class Request:
    """What the sampler must honour besides the model's own masks. ``composition`` holds
    (Z, count per primitive cell) pairs sorted by Z; ``template`` letter indices (one group)."""

    composition: tuple[tuple[int, int], ...] | None = None
    atoms: tuple[int, int] | None = None
    template: tuple[int, ...] | None = None
    template_group: int | None = None

    @property
    def active(self) -> bool:
        return self.composition is not None or self.atoms is not None or self.template is not None


@functools.cache
def _group_letters(g: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    t = get_tables()
    n = int(t.num_letters[g])
    return tuple(int(m) for m in t.multiplicity[g, :n]), tuple(int(d) for d in t.dof[g, :n])


@functools.cache
def _min_coins(mults: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """Fewest sites of unlimited multiplicities ``mults`` adding to exactly v, for v <= limit."""
    best = [0] + [INF] * limit
    for v in range(1, limit + 1):
        for m in mults:
            if m <= v and best[v - m] + 1 < best[v]:
                best[v] = best[v - m] + 1
    return tuple(best)


class Planner:
    """Memoised look-ahead for one request; ``max_sites`` is the model's sequence limit."""

    def __init__(self, request: Request, max_sites: int) -> None:
        self.request = request
        self.max_sites = max_sites
        self.elements = tuple(z for z, _ in request.composition or ())
        self._moves: dict = {}
        self._need: dict = {}

    # -- targets in the conventional cell of group g
    def target(self, g: int) -> tuple[int, ...] | None:
        if self.request.composition is None:
            return None
        k = lattice_points(g)
        return tuple(c * k for _, c in self.request.composition)

    def atom_bounds(self, g: int) -> tuple[int, int] | None:
        if self.request.atoms is None:
            return None
        k = lattice_points(g)
        return self.request.atoms[0] * k, self.request.atoms[1] * k

    def initial_state(self, g: int) -> tuple:
        """(remaining counts or atoms so far, lowest letter, lowest element index, site index)."""
        target = self.target(g)
        return (target if target is not None else 0, 0, 0, 0)

    def feasible_group(self, g: int) -> bool:
        if self.request.template is not None and g != self.request.template_group:
            return False
        return self._sites_needed(g, self.initial_state(g)) <= self.max_sites

    # -- the minimum number of further sites that completes the request from a state
    def _sites_needed(self, g: int, state: tuple) -> int:
        key = (g, state if self.request.template is not None else state[:3])
        if key not in self._need:
            if self.request.template is not None:
                value = self._template_need(g, state)
            elif self.request.composition is not None:
                value = self._composition_need(g, *state[:3])
            else:
                value = self._range_need(g, *state[:2])
            self._need[key] = value
        return self._need[key]

    def _template_need(self, g: int, state: tuple) -> int:
        rest = self.request.template[state[3] :]
        if self.request.composition is None:
            if self.request.atoms is not None:
                mult, _ = _group_letters(g)
                low, high = self.atom_bounds(g)
                total = state[0] + sum(mult[w] for w in rest)
                return len(rest) if low <= total <= high else INF
            return len(rest)
        return len(rest) if self._template_fill(g, rest, state[0], state[2]) else INF

    @functools.cache  # noqa: B019 - one planner per request, short-lived
    def _template_fill(self, g: int, rest: tuple[int, ...], remaining: tuple, low_el: int) -> bool:
        """Can the template sites ``rest`` take elements so that exactly ``remaining`` is used?
        ``low_el`` binds the first site when it repeats the previous letter."""
        if not rest:
            return not any(remaining)
        mult, _ = _group_letters(g)
        w = rest[0]
        for e in range(low_el, len(remaining)):
            if remaining[e] >= mult[w]:
                left = list(remaining)
                left[e] -= mult[w]
                nxt_low = e if len(rest) > 1 and rest[1] == w else 0
                if self._template_fill(g, rest[1:], tuple(left), nxt_low):
                    return True
        return False

    def _composition_need(self, g: int, remaining: tuple, low_w: int, low_el: int) -> int:
        mult, dof = _group_letters(g)
        if not any(remaining):
            return 0
        fixed = [w for w in range(low_w, len(mult)) if dof[w] == 0]
        free_above = tuple(sorted({mult[w] for w in range(low_w + 1, len(mult)) if dof[w] > 0}))
        with_low = tuple(sorted(set(free_above) | {mult[low_w]})) if dof[low_w] > 0 else free_above
        limit = max(remaining)
        coins = (_min_coins(free_above, limit), _min_coins(with_low, limit))

        @functools.cache
        def assign(i: int, left: tuple) -> int:
            if i == len(fixed):
                total = 0
                for e, v in enumerate(left):
                    total += coins[e >= low_el][v]
                    if total >= INF:
                        return INF
                return total
            best = assign(i + 1, left)
            m = mult[fixed[i]]
            for e, v in enumerate(left):
                if v >= m:
                    rest = (*left[:e], v - m, *left[e + 1 :])
                    best = min(best, 1 + assign(i + 1, rest))
            return best

        return assign(0, remaining)

    def _range_need(self, g: int, atoms: int, low_w: int) -> int:
        low, high = self.atom_bounds(g)
        if atoms > high:
            return INF
        table = self._range_table(g, low_w, high)
        best = min(table[max(low - atoms, 0) : high - atoms + 1], default=INF)
        return best

    @functools.cache  # noqa: B019 - one planner per request, short-lived
    def _range_table(self, g: int, low_w: int, limit: int) -> tuple[int, ...]:
        """Fewest sites adding exactly v atoms from letters >= low_w (zero-freedom ones once)."""
        mult, dof = _group_letters(g)
        best = list(
            _min_coins(tuple(m for w, m in enumerate(mult) if w >= low_w and dof[w]), limit)
        )
        for w in range(low_w, len(mult)):
            if dof[w] == 0:  # 0/1 knapsack item
                m = mult[w]
                for v in range(limit, m - 1, -1):
                    if best[v - m] + 1 < best[v]:
                        best[v] = best[v - m] + 1
        return tuple(best)

    # -- the moves the masks allow
    def moves(self, g: int, state: tuple) -> tuple[bool, dict[int, tuple[int, ...]]]:
        """(may the sequence end here, {letter: allowed atomic numbers or () for any})."""
        key = (g, state)
        if key in self._moves:
            return self._moves[key]
        remaining, low_w, low_el, k = state
        mult, _ = _group_letters(g)
        left = self.max_sites - k - 1  # sites still free after this one
        can_end = k > 0 and self._sites_needed(g, state) == 0
        allowed: dict[int, tuple[int, ...]] = {}
        if self.request.template is not None:
            letters = self.request.template[k : k + 1]
        else:
            letters = range(low_w, len(mult))
        for w in letters:
            if self.request.composition is not None:
                els = []
                first_el = low_el if w == low_w else 0
                for e in range(first_el, len(self.elements)):
                    if remaining[e] < mult[w]:
                        continue
                    nxt_rem = (*remaining[:e], remaining[e] - mult[w], *remaining[e + 1 :])
                    nxt = self.next_state(g, state, w, e, nxt_rem)
                    if self._sites_needed(g, nxt) <= left:
                        els.append(self.elements[e])
                if els:
                    allowed[w] = tuple(els)
            else:
                nxt = self.next_state(g, state, w, 0, remaining + mult[w])
                if self._sites_needed(g, nxt) <= left:
                    allowed[w] = ()
        self._moves[key] = (can_end, allowed)
        return self._moves[key]

    def next_state(self, g: int, state: tuple, w: int, e: int, remaining) -> tuple:
        _, dof = _group_letters(g)
        if self.request.template is not None:
            k = state[3] + 1
            rest = self.request.template[k:]
            repeat = bool(rest) and rest[0] == w
            return (remaining, w, e if repeat else 0, k)
        low_w = int(lowest_next_letter(w, dof[w]))
        # element indices follow atomic numbers (the composition is sorted by Z)
        low_el = int(lowest_next_element(low_w, w, e)) if self.request.composition else 0
        return (remaining, low_w, low_el, state[3] + 1)

    def element_index(self, z: int) -> int:
        return self.elements.index(z) if self.request.composition is not None else 0


def make_request(
    *,
    composition=None,
    formula_units: int | None = None,
    num_atoms=None,
    wyckoff_template=None,
    spacegroup=None,
    elements: Iterable[str] | None = None,
    exclude_elements: Iterable[str] | None = None,
) -> Request:
    """Validate user constraints together and build a Request (clear errors on conflicts)."""
    comp = parse_composition(composition, formula_units) if composition is not None else None
    if comp is None and formula_units is not None:
        raise ConstraintError("formula_units needs a composition")
    atoms = parse_atom_range(num_atoms)
    template = group = None
    if wyckoff_template is not None:
        groups = (
            [spacegroup] if isinstance(spacegroup, int | np.integer) else list(spacegroup or [])
        )
        if len(groups) != 1:
            raise ConstraintError("a Wyckoff template needs exactly one space group")
        group = check_spacegroup(int(groups[0]))
        template = parse_template(group, wyckoff_template)
    if comp is not None:
        from pymatgen.core.periodic_table import Element

        symbols = {Element.from_Z(z).symbol for z in comp}
        total = sum(comp.values())
        if atoms is not None and not atoms[0] <= total <= atoms[1]:
            raise ConstraintError(
                f"the composition has {total} atoms per cell, outside the requested range "
                f"{atoms[0]}-{atoms[1]}"
            )
        if elements is not None and not symbols <= set(elements):
            raise ConstraintError(
                f"composition elements {sorted(symbols - set(elements))} are not in the allowed "
                "elements"
            )
        if exclude_elements is not None and symbols & set(exclude_elements):
            raise ConstraintError(
                f"composition elements {sorted(symbols & set(exclude_elements))} are excluded"
            )
    return Request(
        composition=tuple(comp.items()) if comp is not None else None,
        atoms=atoms,
        template=template,
        template_group=group,
    )


def describe(request: Request) -> str:
    from pymatgen.core.periodic_table import Element

    parts = []
    if request.composition is not None:
        parts.append(
            "composition "
            + "".join(f"{Element.from_Z(z).symbol}{c}" for z, c in request.composition)
            + " per primitive cell"
        )
    if request.atoms is not None:
        parts.append(f"{request.atoms[0]}-{request.atoms[1]} atoms per primitive cell")
    if request.template is not None:
        t = get_tables()
        g = request.template_group
        sites = " ".join(f"{t.multiplicity[g, w]}{t.letters[g, w]}" for w in request.template)
        parts.append(f"Wyckoff template {sites}")
    return ", ".join(parts)


def feasible_groups(planner: Planner, candidates: Iterable[int]) -> list[int]:
    return [g for g in candidates if planner.feasible_group(int(g))]


def explain_infeasible(request: Request, candidates: list[int], max_sites: int) -> str:
    t = get_tables()
    what = describe(request)
    if len(candidates) <= 3:
        groups = ", ".join(f"{g} ({t.symbol[g]})" for g in candidates)
        where = f"space group {groups}" if len(candidates) == 1 else f"space groups {groups}"
    else:
        where = f"any of the {len(candidates)} allowed space groups"
    hint = (
        " (the Wyckoff multiplicities cannot add up to it; try more formula units or other"
        " space groups)"
    )
    return f"no crystal with {what} exists in {where} within {max_sites} sites{hint}"


def parse_element_count(spec: int | str | tuple[int, int]) -> tuple[int, int]:
    """'3', '2-4', 3 or (2, 4) -> inclusive (low, high) distinct elements per crystal."""
    try:
        if isinstance(spec, bool) or (isinstance(spec, str) and spec.strip().startswith("-")):
            raise ConstraintError("negative")
        if not isinstance(spec, int | np.integer | str | tuple | list):
            raise ConstraintError("not a count")
        low, high = parse_atom_range(spec)  # type: ignore[misc]
    except (ConstraintError, TypeError, ValueError):
        raise ConstraintError(
            f"number of elements must be 'N' or 'LOW-HIGH' (e.g. 3 or 2-4), 'prior', 'model' or "
            f"'auto', got {spec!r}"
        ) from None
    return low, high


class ElementCount:
    """How many distinct elements each crystal of a batch may end with: (low, high) per row.

    The end of the sequence is masked while a row has fewer than ``low`` elements; once it has
    ``high``, only elements already present are offered; and a new element is forced when the
    sites left could not otherwise reach ``low``. Rows whose other constraints leave no way to
    comply end as dead ends (the sampler redraws them, keeping their bounds)."""

    def __init__(self, bounds: Tensor, max_sites: int) -> None:
        self.low, self.high = bounds[:, 0], bounds[:, 1]
        self.max_sites = max_sites

    def keep(self, keep: Tensor) -> None:
        self.low, self.high = self.low[keep], self.high[keep]

    def may_end(self, present: Tensor) -> Tensor:
        """(rows,) bool: the crystal may stop here."""
        return present.sum(-1) >= self.low

    def elements(self, present: Tensor, site: int) -> Tensor:
        """(rows, 119) bool: the elements allowed at site index ``site`` (0-based)."""
        d = present.sum(-1)
        full = d >= self.high  # no new element any more
        must_add = (self.max_sites - site - 1) < (self.low - d)  # too few sites left otherwise
        out = present.new_ones(present.shape)
        out = present.where(full.unsqueeze(-1), out)
        return (~present).where(must_add.unsqueeze(-1), out)
