"""The exact Wyckoff representation of a crystal, and the codec to and from pymatgen.

A crystal becomes (space group, ordered sites, lattice). Each site is a Wyckoff letter, an
element and the canonical representative of its orbit; only the coordinates the position leaves
free carry information, the fixed ones (0, 1/2, 1/3, ...) are exact by construction. The lattice
keeps only the free parameters of the crystal system of the conventional (ITA) cell.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

# spglib's C core prints to stderr when a tolerance fails; the codec handles that itself.
os.environ.setdefault("SPGLIB_WARNING", "OFF")
import spglib
from pymatgen.core import Element, Lattice, Structure

from crystal_gpt.symmetry import (
    CRYSTAL_SYSTEMS,
    LATTICE_FREE_PARAMS,
    check_spacegroup,
    get_tables,
    wrap01,
)

DEFAULT_SYMPREC = 0.01
# Tried in turn when symmetry analysis fails or gives an inconsistent cell; P1 is the last resort.
FALLBACK_SYMPRECS = (1e-3, 1e-5)
_TIE_TOL = 1e-4  # fractional; coordinates closer than this count as equal when ordering


class EncodingError(ValueError):
    """A structure that cannot be represented (disorder, bad lattice, failed symmetry analysis)."""


@dataclass(frozen=True, eq=False)
class WyckoffCrystal:
    """A crystal as the model sees it.

    ``wyckoff`` holds letter indices (0 = 'a'), ``species`` atomic numbers, ``coords`` the full
    fractional coordinates of each site's representative (in [0, 1), fixed ones exact) and
    ``lattice`` the crystal system's free lattice parameters (lengths in Angstrom, angles in
    degrees; see ``symmetry.LATTICE_FREE_PARAMS``). ``symprec`` records the tolerance that gave
    this encoding (``None`` for an explicit P1 encoding).
    """

    spacegroup: int
    wyckoff: np.ndarray
    species: np.ndarray
    coords: np.ndarray
    lattice: np.ndarray
    symprec: float | None = DEFAULT_SYMPREC
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_spacegroup(self.spacegroup)
        n = len(self.wyckoff)
        if len(self.species) != n or np.shape(self.coords) != (n, 3):
            raise ValueError("wyckoff, species and coords must describe the same number of sites")
        expected = len(LATTICE_FREE_PARAMS[self.crystal_system])
        if len(self.lattice) != expected:
            raise ValueError(
                f"a {self.crystal_system} lattice has {expected} free parameters, "
                f"got {len(self.lattice)}"
            )

    @property
    def crystal_system(self) -> str:
        return CRYSTAL_SYSTEMS[int(get_tables().crystal_system[self.spacegroup])]

    @property
    def num_sites(self) -> int:
        return len(self.wyckoff)

    @property
    def letters(self) -> list[str]:
        return get_tables().letters[self.spacegroup, self.wyckoff].tolist()

    @property
    def multiplicities(self) -> np.ndarray:
        return get_tables().multiplicity[self.spacegroup, self.wyckoff].astype(int)

    @property
    def num_atoms(self) -> int:
        return int(self.multiplicities.sum())

    @property
    def free_coords(self) -> list[np.ndarray]:
        """The coordinates the model predicts: only the free ones of each site."""
        mask = get_tables().free_mask[self.spacegroup, self.wyckoff]
        return [c[m] for c, m in zip(self.coords, mask, strict=True)]

    @property
    def lattice_parameters(self) -> np.ndarray:
        """(a, b, c, alpha, beta, gamma) of the conventional cell."""
        return full_lattice_parameters(self.crystal_system, self.lattice)

    @property
    def sites(self) -> list[tuple[str, str, tuple[float, ...]]]:
        """(Wyckoff letter, element symbol, free coordinates) per site, in sequence order."""
        return [
            (letter, Element.from_Z(int(z)).symbol, tuple(float(v) for v in free))
            for letter, z, free in zip(self.letters, self.species, self.free_coords, strict=True)
        ]

    def __repr__(self) -> str:
        tables = get_tables()
        sites = " ".join(
            f"{m}{letter}:{el}"
            for (letter, el, _), m in zip(self.sites, self.multiplicities, strict=True)
        )
        lat = ", ".join(f"{v:.3f}" for v in self.lattice)
        return (
            f"WyckoffCrystal({tables.symbol[self.spacegroup]} (#{self.spacegroup}), "
            f"{sites}, lattice=({lat}))"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WyckoffCrystal):
            return NotImplemented
        return (
            self.spacegroup == other.spacegroup
            and np.array_equal(self.wyckoff, other.wyckoff)
            and np.array_equal(self.species, other.species)
            and np.allclose(self.coords, other.coords)
            and np.allclose(self.lattice, other.lattice)
        )


def reduce_lattice_parameters(crystal_system: str, params: np.ndarray) -> np.ndarray:
    """Keep the free parameters of a conventional cell: (a, b, c, alpha, beta, gamma) -> (k,)."""
    idx = {"a": 0, "b": 1, "c": 2, "alpha": 3, "beta": 4, "gamma": 5}
    return np.array([params[idx[name]] for name in LATTICE_FREE_PARAMS[crystal_system]], float)


def full_lattice_parameters(crystal_system: str, free: np.ndarray) -> np.ndarray:
    """Inverse of ``reduce_lattice_parameters``: fill in what the crystal system fixes."""
    f = [float(v) for v in free]
    if crystal_system == "triclinic":
        return np.array(f)
    if crystal_system == "monoclinic":
        return np.array([f[0], f[1], f[2], 90.0, f[3], 90.0])
    if crystal_system == "orthorhombic":
        return np.array([f[0], f[1], f[2], 90.0, 90.0, 90.0])
    if crystal_system == "tetragonal":
        return np.array([f[0], f[0], f[1], 90.0, 90.0, 90.0])
    if crystal_system in ("trigonal", "hexagonal"):
        return np.array([f[0], f[0], f[1], 90.0, 90.0, 120.0])
    if crystal_system == "cubic":
        return np.array([f[0]] * 3 + [90.0] * 3)
    raise ValueError(f"unknown crystal system {crystal_system!r}")


def _lattice_parameters(matrix: np.ndarray) -> np.ndarray:
    lat = Lattice(matrix)
    return np.array([*lat.abc, *lat.angles], dtype=float)


def _cell_of(structure: Structure) -> tuple[np.ndarray, np.ndarray, list[int]]:
    if not isinstance(structure, Structure):
        raise TypeError(f"expected a pymatgen Structure, got {type(structure).__name__}")
    if len(structure) == 0:
        raise EncodingError("the structure has no atoms")
    if not structure.is_ordered:
        raise EncodingError(
            "disordered structures (partial occupancies) are not supported: "
            f"{structure.composition.formula}"
        )
    matrix = np.asarray(structure.lattice.matrix, dtype=float)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise EncodingError("the lattice is degenerate (zero volume) or not finite")
    frac = np.asarray(structure.frac_coords, dtype=float)
    if not np.all(np.isfinite(frac)):
        raise EncodingError("atomic coordinates are not finite")
    numbers = [int(sp.Z) for sp in structure.species]
    return matrix, frac, numbers


def encode(
    structure: Structure,
    symprec: float = DEFAULT_SYMPREC,
    *,
    mode: str = "wyckoff",
    fallback: bool = True,
) -> WyckoffCrystal:
    """Structure -> WyckoffCrystal.

    ``symprec`` (Angstrom) is spglib's tolerance. When analysis fails or gives an inconsistent
    cell, smaller tolerances are tried, then (``fallback=True``) P1, which always round-trips;
    ``meta['fallback']`` says which happened. ``mode='p1'`` encodes every atom of the Niggli cell
    as the general position of P1, the symmetry-free baseline.
    """
    if mode == "p1":
        return encode_p1(structure)
    if mode != "wyckoff":
        raise ValueError(f"mode must be 'wyckoff' or 'p1', got {mode!r}")
    if not symprec > 0:
        raise ValueError(f"symprec must be positive, got {symprec!r}")
    cell = _cell_of(structure)
    reasons = []
    for tol in (symprec, *(t for t in FALLBACK_SYMPRECS if t < symprec)):
        try:
            wc = _encode_cell(cell, tol)
        except EncodingError as err:
            reasons.append(f"symprec={tol:g}: {err}")
            continue
        if reasons:
            wc.meta["fallback"] = "; ".join(reasons)
        return wc
    if not fallback:
        raise EncodingError("symmetry analysis failed: " + "; ".join(reasons))
    wc = encode_p1(structure)
    wc.meta["fallback"] = "; ".join([*reasons, "encoded as P1"])
    return wc


def encode_p1(structure: Structure) -> WyckoffCrystal:
    """Every atom of the Niggli-reduced cell as a general position ('a') of P1."""
    _cell_of(structure)
    reduced = structure.get_reduced_structure("niggli")
    frac = wrap01(reduced.frac_coords)
    species = np.array([sp.Z for sp in reduced.species], dtype=np.int16)
    order = _site_order(np.zeros(len(species), dtype=int), species, frac)
    return WyckoffCrystal(
        spacegroup=1,
        wyckoff=np.zeros(len(order), dtype=np.int16),
        species=species[order],
        coords=frac[order],
        lattice=_lattice_parameters(reduced.lattice.matrix),
        symprec=None,
    )


def _spglib_dataset(cell: tuple, symprec: float):
    """spglib's dataset in the Hall setting of our tables (None/raise styles both handled)."""
    tables = get_tables()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = spglib.get_symmetry_dataset(cell, symprec=symprec)
            if ds is None:
                raise EncodingError("spglib could not determine the symmetry")
            hall = int(tables.hall_number[ds.number])
            if ds.hall_number != hall:
                ds = spglib.get_symmetry_dataset(cell, symprec=symprec, hall_number=hall)
                if ds is None or ds.hall_number != hall:
                    raise EncodingError(f"spglib could not standardise to Hall setting {hall}")
        except spglib.error.SpglibError as err:
            raise EncodingError(f"spglib failed: {err}") from err
    return ds


def _encode_cell(cell: tuple, symprec: float) -> WyckoffCrystal:
    tables = get_tables()
    ds = _spglib_dataset(cell, symprec)
    g = int(ds.number)
    std_lattice = np.asarray(ds.std_lattice, dtype=float)
    std_pos = np.asarray(ds.std_positions, dtype=float)
    std_types = np.asarray(ds.std_types, dtype=int)
    # Orbits and letters of the standardised atoms, through the primitive cell both map to.
    prim_to_input = {int(p): i for i, p in enumerate(ds.mapping_to_primitive)}
    input_of_std = np.array([prim_to_input[int(p)] for p in ds.std_mapping_to_primitive])
    orbit_id = np.asarray(ds.crystallographic_orbits)[input_of_std]
    spg_letter = np.asarray(ds.wyckoffs)[input_of_std]

    metric = std_lattice @ std_lattice.T
    n_letters = int(tables.num_letters[g])
    wyckoff, species, coords = [], [], []
    for orbit in np.unique(orbit_id):
        members = np.nonzero(orbit_id == orbit)[0]
        mult = len(members)
        if len(set(std_types[members].tolist())) != 1:
            raise EncodingError("an orbit mixes elements")
        # spglib's letter first, then any other position with this multiplicity.
        candidates = [tables.letter_index(g, str(spg_letter[members[0]]))]
        candidates += [
            w for w in range(n_letters) if tables.multiplicity[g, w] == mult and w != candidates[0]
        ]
        rep = None
        for w in candidates:
            if tables.multiplicity[g, w] != mult:
                continue
            rep = _canonical_representative(tables, g, w, std_pos[members], metric, symprec)
            if rep is not None:
                break
        if rep is None:
            raise EncodingError(
                f"orbit of {mult} atoms fits no Wyckoff position of space group {g}"
            )
        wyckoff.append(w)
        species.append(int(std_types[members[0]]))
        coords.append(rep)
    wyckoff_arr = np.array(wyckoff, dtype=np.int16)
    species_arr = np.array(species, dtype=np.int16)
    coords_arr = np.array(coords, dtype=float)
    order = _site_order(wyckoff_arr, species_arr, coords_arr)
    system = CRYSTAL_SYSTEMS[int(tables.crystal_system[g])]
    return WyckoffCrystal(
        spacegroup=g,
        wyckoff=wyckoff_arr[order],
        species=species_arr[order],
        coords=coords_arr[order],
        lattice=reduce_lattice_parameters(system, _lattice_parameters(std_lattice)),
        symprec=symprec,
    )


def _canonical_representative(
    tables, g: int, w: int, points: np.ndarray, metric: np.ndarray, symprec: float
) -> np.ndarray | None:
    """The orbit member that lies on position w's first operation with the smallest free coords.

    Returns the projected (exact) representative, or None when no member lies on the position.
    """
    projected = tables.project(g, w, points)
    delta = projected - points
    delta -= np.rint(delta)
    dist = np.sqrt(np.einsum("ni,ij,nj->n", delta, metric, delta))
    on_position = np.nonzero(dist < symprec)[0]
    if on_position.size == 0:
        return None
    cands = projected[on_position]
    free = tables.free_mask[g, w]
    rep = cands[_lexmin(cands[:, free])]
    # The orbit of the representative must reproduce, one to one, the atoms it stands for.
    diff = tables.orbit(g, w, rep)[:, None, :] - points[None, :, :]
    diff -= np.rint(diff)
    close = np.einsum("abi,ij,abj->ab", diff, metric, diff) < symprec**2
    if not (close.any(axis=0).all() and close.any(axis=1).all()):
        return None
    return rep


def _lexmin(keys: np.ndarray, tol: float = _TIE_TOL) -> int:
    """Row with the lexicographically smallest key, values within tol counted as equal.

    The tolerance keeps the choice stable against spglib's symmetrisation noise (1e-7 level).
    """
    alive = np.arange(len(keys))
    for col in keys.T:
        vals = col[alive]
        alive = alive[vals <= vals.min() + tol]
        if len(alive) == 1:
            break
    return int(alive[0])


def _site_order(wyckoff: np.ndarray, species: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Letter first ('a' first), then atomic number, then coordinates (with a tolerance)."""

    def compare(i: int, j: int) -> int:
        for a, b in ((wyckoff[i], wyckoff[j]), (species[i], species[j])):
            if a != b:
                return -1 if a < b else 1
        for a, b in zip(coords[i], coords[j], strict=True):
            if abs(a - b) > _TIE_TOL:
                return -1 if a < b else 1
        return 0

    return np.array(sorted(range(len(wyckoff)), key=functools.cmp_to_key(compare)), dtype=int)


def decode(crystal: WyckoffCrystal) -> Structure:
    """WyckoffCrystal -> conventional-cell Structure, every site expanded to its full orbit."""
    tables = get_tables()
    g = crystal.spacegroup
    n_letters = int(tables.num_letters[g])
    if np.any(crystal.wyckoff < 0) or np.any(crystal.wyckoff >= n_letters):
        raise ValueError(f"Wyckoff index out of range for space group {g} ({n_letters} positions)")
    params = crystal.lattice_parameters
    if not np.all(np.isfinite(params)) or np.any(params[:3] <= 0):
        raise ValueError(f"invalid lattice parameters {params.tolist()}")
    lattice = Lattice.from_parameters(*params)
    if not lattice.volume > 0 or not np.isfinite(lattice.volume):
        raise ValueError(f"lattice parameters {params.tolist()} give no valid cell")
    species: list[int] = []
    frac: list[np.ndarray] = []
    for w, z, rep in zip(crystal.wyckoff, crystal.species, crystal.coords, strict=True):
        if not 1 <= int(z) <= 118:
            raise ValueError(f"invalid atomic number {int(z)}")
        orbit = tables.orbit(g, int(w), tables.project(g, int(w), rep))
        species.extend([int(z)] * len(orbit))
        frac.append(orbit)
    return Structure(lattice, species, np.concatenate(frac), coords_are_cartesian=False)
