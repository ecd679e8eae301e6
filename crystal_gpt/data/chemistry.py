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
