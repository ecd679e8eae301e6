"""Random symmetric crystals of any space group (pyxtal), for tests and benchmarks of the codec."""

from __future__ import annotations

import warnings

import numpy as np
from pymatgen.core import Structure

from crystal_gpt.data.symmetry import check_spacegroup, get_tables


def random_crystal(
    spacegroup: int, seed: int, species: tuple[str, ...] = ("Si", "O"), tries: int = 30
) -> Structure:
    """A random crystal of the given space group: the first element on the general position (so
    the symmetry is exactly the group's), the others on random, often special, positions.

    Raises RuntimeError if pyxtal cannot place the atoms in ``tries`` attempts.
    """
    from pyxtal import pyxtal

    g = check_spacegroup(spacegroup)
    tables = get_tables()
    rng = np.random.default_rng(seed)
    n = int(tables.num_letters[g])
    labels = [f"{tables.multiplicity[g, w]}{tables.letters[g, w]}" for w in range(n)]
    for attempt in range(tries):
        # the general position first; the others random, often special, unless they keep failing
        chosen = [n - 1] + [
            int(rng.integers(n)) if attempt < tries // 2 else n - 1 for _ in species[1:]
        ]
        crystal = pyxtal()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                crystal.from_random(
                    3,
                    g,
                    list(species),
                    [int(tables.multiplicity[g, w]) for w in chosen],
                    factor=1.2,
                    sites=[[labels[w]] for w in chosen],
                    random_state=int(rng.integers(2**31)),
                )
        except Exception:
            continue
        if crystal.valid:
            return crystal.to_pymatgen()
    raise RuntimeError(f"pyxtal could not build a random crystal in space group {g}")


def redescribed(structure: Structure, rng: np.random.Generator, invert: bool = False) -> Structure:
    """The same crystal described otherwise: a random unimodular change of basis, a random
    translation, a random atom order and, with ``invert``, its mirror image through the origin
    (equivalent under the Euclidean normaliser). The canonical encoding must not change."""
    from pymatgen.core import Lattice

    while True:
        m = rng.integers(-1, 2, size=(3, 3)) + np.eye(3, dtype=int)
        if round(abs(np.linalg.det(m))) == 1:
            break
    cart = structure.cart_coords + rng.random(3) @ structure.lattice.matrix
    if invert:
        cart = -cart
    order = rng.permutation(len(structure))
    return Structure(
        Lattice(m @ structure.lattice.matrix),
        [structure.species[i] for i in order],
        cart[order],
        coords_are_cartesian=True,
        to_unit_cell=True,
    )
