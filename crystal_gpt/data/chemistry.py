"""Oxidation states, electronegativities and metals: the tables behind the SMACT validity
metric and the sampler's charge-balance option.

Two tables, by name. "smact14": SMACT 2.2.1's numbers (the version CDVAE pins; its 2014
oxidation-state table), shipped in ``tables/smact_2_2_1.json`` because later SMACT releases
changed some of them; the validity metric uses it by default so that our figures mean what the
published ones mean. "icsd24": the installed SMACT's ICSD-2024 table (``Element.oxidation_states``
since SMACT 3), chemically stricter; ``--charge-balanced`` sampling uses it.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files

import numpy as np


@functools.cache
def smact_2_2_1() -> tuple[dict[str, tuple[int, ...]], dict[str, float | None], frozenset[str]]:
    """SMACT 2.2.1's oxidation states (2014 table), Pauling electronegativities (None where it
    has none) and metals, for the elements 2.2.1 could build (Z <= 103)."""
    data = json.loads((files("crystal_gpt") / "tables" / "smact_2_2_1.json").read_text())
    states = {el: tuple(ox) for el, ox in data["oxidation_states"].items()}
    return states, data["pauling_eneg"], frozenset(data["metals"])


@functools.cache
def smact_element(symbol: str) -> tuple[tuple[int, ...], float | None]:
    """ICSD-2024 oxidation states and Pauling electronegativity of an element from the installed
    SMACT; () / None if SMACT has none."""
    import smact

    try:
        el = smact.Element(symbol)
    except (NameError, KeyError, ValueError):  # not in SMACT's tables
        return (), None
    return tuple(el.oxidation_states_icsd24 or ()), el.pauling_eneg


@functools.cache
def oxidation_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """By atomic number (119 rows): oxidation states padded (int, (119, S)), which are real
    ((119, S) bool), and whether SMACT counts the element a metal ((119,) bool)."""
    import smact
    from pymatgen.core.periodic_table import Element

    states = [()] + [smact_element(Element.from_Z(z).symbol)[0] for z in range(1, 119)]
    width = max(len(s) for s in states)
    table = np.zeros((119, width), dtype=np.int64)
    real = np.zeros((119, width), dtype=bool)
    for z, s in enumerate(states):
        table[z, : len(s)] = s
        real[z, : len(s)] = True
    metal = np.array([False] + [Element.from_Z(z).symbol in smact.metals for z in range(1, 119)])
    return table, real, metal


def is_balanced(counts: dict[int, int]) -> bool:
    """SMACT's neutrality test on atom counts by atomic number (``oxidation_table``): one
    element, or only metals, or one oxidation state per element with zero total charge. The
    Pauling electronegativity test is not part of it."""
    return bool(balanced_candidates(tuple(sorted(counts.items())), 0)[0])


@functools.lru_cache(maxsize=1 << 16)
def balanced_candidates(composition: tuple[tuple[int, int], ...], m: int) -> np.ndarray:
    """(119,) bool: whether ``composition`` ((Z, atoms) pairs, Z ascending) with ``m`` atoms of
    element z added would pass :func:`is_balanced`; entry 0 (no element added) says whether it
    passes as it is. Cached: a model scores every candidate of every site with it.

    The achievable total charges are kept as a Python integer used as a bit set (bit c + off for
    charge c), so a Minkowski sum with an element's charges is a few shifts and ors."""
    table, real, metal = oxidation_table()
    out = np.zeros(119, dtype=bool)
    present = [z for z, n in composition if n > 0]
    counts = {z: n for z, n in composition if n > 0}
    atoms = sum(counts.values()) + m
    top = int(np.abs(table).max())
    off = top * atoms
    states = {z: table[z][real[z]].tolist() for z in counts}

    def add(bits: int, n: int, ox: list[int]) -> int:
        out_bits = 0
        for s in ox:
            shift = n * s
            out_bits |= bits << shift if shift >= 0 else bits >> -shift
        return out_bits

    def reach(skip: int) -> int:  # charges of all present elements but ``skip``
        bits = 1 << off
        for z in present:
            if z != skip:
                bits = add(bits, counts[z], states[z])
        return bits

    all_metal = bool(present) and all(metal[z] for z in present)
    full = reach(0)
    # as it is (entry 0): empty is not a crystal; one element or metals only are exempt
    out[0] = bool(present) and (len(present) == 1 or all_metal or bool(full >> off & 1))
    if m <= 0:
        return out
    if not present:  # the first element alone is balanced
        out[1:] = True
        return out
    # a new element z with state s balances iff the others can reach -m s
    flags = np.array([bool(full >> (off - m * s) & 1) for s in range(-top, top + 1)])
    out[1:] = (flags[table + top] & real).any(1)[1:]
    if all_metal:
        out |= metal
    # an element already present keeps one state for its old and new atoms
    for z in present:
        if len(present) == 1 or all_metal:
            out[z] = True
            continue
        rest = reach(z)
        out[z] = any(rest >> (off - (counts[z] + m) * s) & 1 for s in states[z])
    out[0] = False
    return out
