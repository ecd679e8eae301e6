"""Oxidation states and metals: the one table behind the SMACT validity metric and the
sampler's charge-balance option (SMACT's ``Element.oxidation_states`` and ``smact.metals``)."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def smact_element(symbol: str) -> tuple[tuple[int, ...], float | None]:
    """(oxidation states, Pauling electronegativity) of an element; () / None if SMACT has none."""
    import smact

    try:
        el = smact.Element(symbol)
    except (NameError, KeyError, ValueError):  # not in SMACT's tables
        return (), None
    return tuple(el.oxidation_states or ()), el.pauling_eneg


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
