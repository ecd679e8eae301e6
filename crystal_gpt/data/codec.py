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

from crystal_gpt.data.symmetry import (
    CRYSTAL_SYSTEMS,
    LATTICE_FREE_PARAMS,
    LATTICE_PARAMS,
    LATTICE_TIES,
    check_spacegroup,
    get_tables,
    wrap01,
)

DEFAULT_SYMPREC = 0.01
# Tried in turn when symmetry analysis fails or gives an inconsistent cell; P1 is the last resort.
FALLBACK_SYMPRECS = (1e-3, 1e-5)
# Fractional; coordinates closer than this count as equal when ordering. The codec symmetrises
# coordinates itself, so the same crystal gives the same numbers to ~1e-12 whatever its input
# cell: the tolerance only absorbs floating-point error.
_TIE_TOL = 1e-7


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
    free = LATTICE_FREE_PARAMS[crystal_system]
    return np.array([params[LATTICE_PARAMS.index(name)] for name in free], float)


def full_lattice_parameters(crystal_system: str, free: np.ndarray) -> np.ndarray:
    """Inverse of ``reduce_lattice_parameters``: fill in what the crystal system fixes."""
    if crystal_system not in LATTICE_TIES:
        raise ValueError(f"unknown crystal system {crystal_system!r}")
    values = dict(zip(LATTICE_FREE_PARAMS[crystal_system], (float(v) for v in free), strict=True))
    ties = LATTICE_TIES[crystal_system]
    return np.array(
        [
            values[n] if t is None else values[t] if t == "a" else t
            for n, t in zip(LATTICE_PARAMS, ties, strict=True)
        ]
    )


def _lattice_parameters(matrix: np.ndarray) -> np.ndarray:
    lat = Lattice(matrix)
    return np.array([*lat.abc, *lat.angles], dtype=float)


MAX_ATOMS = 1000  # atoms in the given cell (mp_20: at most 20; spglib slows down far beyond)
MAX_LENGTH = 1000.0  # Angstrom per lattice vector (pymatgen's Niggli search explodes far beyond)


def _cell_of(structure: Structure) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Lattice, fractional coordinates and atomic numbers, once the structure is known to be
    something the encoder can take (otherwise an EncodingError that says why)."""
    if not isinstance(structure, Structure):
        raise TypeError(f"expected a pymatgen Structure, got {type(structure).__name__}")
    if len(structure) == 0:
        raise EncodingError("the structure has no atoms")
    if len(structure) > MAX_ATOMS:
        raise EncodingError(f"{len(structure)} atoms in the cell: the encoder takes {MAX_ATOMS}")
    if not structure.is_ordered:
        raise EncodingError(
            "disordered structures (partial occupancies) are not supported: "
            f"{structure.composition.formula}"
        )
    for sp in structure.species:
        if not isinstance(getattr(sp, "element", sp), Element):
            raise EncodingError(f"{sp} is not a chemical element")
    matrix = np.asarray(structure.lattice.matrix, dtype=float)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise EncodingError("the lattice is degenerate (zero volume) or not finite")
    lengths = np.linalg.norm(matrix, axis=1)
    if lengths.max() > MAX_LENGTH:
        raise EncodingError(
            f"a lattice vector of {lengths.max():.4g} A: the encoder takes up to {MAX_LENGTH:g} A"
        )
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
    _cell_of(structure)
    # spglib's tolerance decisions depend a little on the basis it is given: a Niggli-reduced
    # cell makes them a function of the crystal alone (a translated or re-based copy of a
    # slightly distorted crystal would otherwise land in another group now and then).
    # The atom order matters to spglib's search for the same reason: sort by element, then
    # position in that cell.
    matrix, frac, numbers = _cell_of(structure.get_reduced_structure("niggli"))
    frac = wrap01(np.round(frac, 8))
    order = np.lexsort((frac[:, 2], frac[:, 1], frac[:, 0], numbers))
    cell = (matrix, frac[order], [numbers[i] for i in order])
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
    """Every atom of the Niggli-reduced cell as a general position ('a') of P1, origin on an
    atom of the lightest element (the canonical form of P1)."""
    _cell_of(structure)
    reduced = structure.get_reduced_structure("niggli")
    frac = wrap01(reduced.frac_coords)
    types = np.array([sp.Z for sp in reduced.species], dtype=np.int16)
    matrix = np.asarray(reduced.lattice.matrix, dtype=float)
    wyckoff, species, coords = canonical_sites(
        1,
        frac,
        types,
        [np.array([i]) for i in range(len(types))],
        matrix @ matrix.T,
        DEFAULT_SYMPREC,
    )
    return WyckoffCrystal(
        spacegroup=1,
        wyckoff=wyckoff,
        species=species,
        coords=coords,
        lattice=_lattice_parameters(matrix),
        symprec=None,
    )


def _symmetry_candidates(cell: tuple, symprec: float) -> list:
    """spglib's datasets for the crystal seen from each atom of its rarest element, most
    symmetric first: the list is the same whatever the atom order or origin of the input.

    For a crystal distorted close to the tolerance, spglib's answer depends on which atom it
    starts from (the first of the rarest element). Each atom of the rarest element is tried
    first in turn, moved to the origin with the others in a fixed order relative to it. The
    order: symmetry operations per primitive cell, then operations in the cell (a
    pseudo-translation found), then the group number. Returns (key, dataset, cell, signature)
    tuples; the signature (group and partition of the atoms into orbits) tells answers apart
    that differ in more than the origin."""
    matrix, frac, numbers = cell
    nums = np.asarray(numbers)
    values, counts = np.unique(nums, return_counts=True)
    rarest = np.nonzero(nums == values[np.argmin(counts)])[0]
    found, errors = [], []
    for first in rarest:
        # that atom at the origin, the others by element and position relative to it: the
        # input spglib sees no longer depends on the crystal's translation
        rel = wrap01(np.round(frac - frac[first], 8))
        others = np.delete(np.arange(len(nums)), first)
        others = others[np.lexsort((rel[others, 2], rel[others, 1], rel[others, 0], nums[others]))]
        order = np.concatenate([[first], others])
        trial = (matrix, rel[order], [numbers[i] for i in order])
        try:
            ds = _spglib_dataset(trial, symprec)
        except EncodingError as err:
            errors.append(str(err))
            continue
        n_prim = max(len(set(ds.mapping_to_primitive.tolist())), 1)
        key = (len(ds.rotations) * n_prim / len(nums), len(ds.rotations), int(ds.number))
        orbits: dict[int, list[int]] = {}
        for k, o in enumerate(np.asarray(ds.crystallographic_orbits).tolist()):
            orbits.setdefault(o, []).append(int(order[k]))
        signature = (int(ds.number), tuple(sorted(tuple(sorted(v)) for v in orbits.values())))
        found.append((key, len(found), ds, trial, signature))
    if not found:
        raise EncodingError(errors[0])
    found.sort(key=lambda f: (tuple(-k for k in f[0]), f[1]))
    return [(key, ds, trial, sig) for key, _, ds, trial, sig in found]


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
    """The most symmetric of spglib's answers whose atoms fit the group's Wyckoff positions,
    and among equally symmetric ones the smallest encoding: near the tolerance, starting atoms
    give datasets whose positions do not fit, or that pair the atoms into orbits otherwise,
    and the choice must not depend on which atom the input happens to list first."""
    errors, seen = [], set()
    best, best_key = None, None
    for key, ds, trial, signature in _symmetry_candidates(cell, symprec):
        if best is not None and key != best_key:
            break
        if signature in seen:
            continue
        seen.add(signature)
        try:
            wc = _encode_dataset(ds, trial, symprec)
        except EncodingError as err:
            errors.append(err)
            continue
        seq = (wc.wyckoff, wc.species, wc.coords)
        if best is None or _precedes(seq, (best.wyckoff, best.species, best.coords)):
            best, best_key = wc, key
    if best is None:
        raise errors[0]
    return best


def _encode_dataset(ds, cell: tuple, symprec: float) -> WyckoffCrystal:
    tables = get_tables()
    g = int(ds.number)
    std_lattice = np.asarray(ds.std_lattice, dtype=float)
    std_types = np.asarray(ds.std_types, dtype=int)
    # Orbits of the standardised atoms, through the primitive cell both map to.
    prim_to_input = {int(p): i for i, p in enumerate(ds.mapping_to_primitive)}
    input_of_std = np.array([prim_to_input[int(p)] for p in ds.std_mapping_to_primitive])
    std_pos = _unsymmetrised_positions(g, ds, cell[1])
    orbit_id = np.asarray(ds.crystallographic_orbits)[input_of_std]
    orbits = [np.nonzero(orbit_id == o)[0] for o in np.unique(orbit_id)]
    for members in orbits:
        if len(set(std_types[members].tolist())) != 1:
            raise EncodingError("an orbit mixes elements")
    system = CRYSTAL_SYSTEMS[int(tables.crystal_system[g])]
    # The input basis through spglib's exact transformation, its metric averaged over the
    # lattice's point group: spglib's idealised std_lattice depends on the input cell (~1e-3 A).
    raw = np.linalg.inv(np.asarray(ds.transformation_matrix, dtype=float)).T @ cell[0]
    metric = np.mean([r.T @ raw @ raw.T @ r for r in _holohedry(g)], axis=0)
    lengths = np.sqrt(np.diag(metric))
    cosines = [
        metric[1, 2] / lengths[1] / lengths[2],
        metric[0, 2] / lengths[0] / lengths[2],
        metric[0, 1] / lengths[0] / lengths[1],
    ]
    params = np.concatenate([lengths, np.degrees(np.arccos(np.clip(cosines, -1, 1)))])
    lattice = reduce_lattice_parameters(system, params)
    ideal = Lattice.from_parameters(*full_lattice_parameters(system, lattice)).matrix
    if not np.allclose(
        _lattice_parameters(std_lattice),
        full_lattice_parameters(system, lattice),
        rtol=1e-2,
        atol=0.5,
    ):
        raise EncodingError("spglib's standard cell and its transformation disagree")
    wyckoff, species, coords = canonical_sites(
        g, std_pos, std_types, orbits, ideal @ ideal.T, symprec
    )
    return WyckoffCrystal(
        spacegroup=g,
        wyckoff=wyckoff,
        species=species,
        coords=coords,
        lattice=lattice,
        symprec=symprec,
    )


@functools.cache
def _holohedry(g: int) -> np.ndarray:
    """Rotations of the lattice's point group in group g's conventional basis."""
    from crystal_gpt.data.symmetry import _HOLOHEDRY_GROUP

    tables = get_tables()
    family = (
        166 if tables.symbol[g].startswith("R") else _HOLOHEDRY_GROUP[int(tables.crystal_system[g])]
    )
    rot, _ = tables.orbit_ops(family, int(tables.num_letters[family]) - 1)
    return np.unique(np.rint(rot).astype(int), axis=0).astype(float)


def _unsymmetrised_positions(g: int, ds, frac: np.ndarray) -> np.ndarray:
    """The input atoms in spglib's standard cell by its exact affine map, before any averaging.

    spglib's own ``std_positions`` are symmetrised along a path that depends on the input cell
    (differences up to ~1e-4 for a translated copy of the same CIF); the codec symmetrises
    itself (``_canonical_representative``), the same way whatever the input's basis or origin.
    """
    tables = get_tables()
    rot, trans = tables.orbit_ops(g, int(tables.num_letters[g]) - 1)
    centring = trans[np.all(np.abs(rot - np.eye(3)) < 1e-9, axis=(1, 2))]
    P = np.asarray(ds.transformation_matrix, dtype=float)
    raw = frac @ P.T + np.asarray(ds.origin_shift, dtype=float)
    std = np.asarray(ds.std_positions, dtype=float)
    prim = np.asarray(ds.mapping_to_primitive)
    out = np.empty_like(std)
    for j, p in enumerate(np.asarray(ds.std_mapping_to_primitive)):
        # every input copy of this atom (a pseudo-supercell input has several), aligned to it
        d = std[j][None, None, :] - raw[prim == p][:, None, :] - centring[None, :, :]
        d -= np.rint(d)
        resid = d[np.arange(len(d)), np.argmin(np.abs(d).max(axis=-1), axis=1)]
        out[j] = std[j] - resid.mean(axis=0)
    return wrap01(out)


def canonical_sites(
    g: int,
    positions: np.ndarray,
    types: np.ndarray,
    orbits: list[np.ndarray],
    metric: np.ndarray,
    symprec: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canonical form of a crystal given in the standard setting of group g.

    One crystal has several descriptions in that setting: the origin can move to any coset of
    the group in its Euclidean normaliser (e.g. NaCl with Na at 4a or at 4b of Fm-3m, or the
    inverted structure), and freely along polar axes. The canonical form is the smallest
    sequence (letters, then atomic numbers, then coordinates, compared with a tolerance) over
    all those descriptions; along polar axes the origin sits on an atom of the smallest
    (letter, element) class. Within a description, each site is the orbit member on the
    position's first operation with the smallest free coordinates, in ``site_order``.
    Returns (letters, atomic numbers, coordinates) in sequence order.
    """
    tables = get_tables()
    polar = tables.polar[g]
    best = None
    for R, t in zip(*tables.normaliser(g), strict=True):
        pos = wrap01(positions @ R.T + t)
        found = _orbit_sites(tables, g, pos, orbits, metric, symprec)
        if found is None:
            continue
        letters, reps = found
        if polar.any():
            lowest = min(zip(letters, (int(types[m[0]]) for m in orbits), strict=True))
            anchors = np.concatenate(
                [m for w, m in zip(letters, orbits, strict=True) if (w, int(types[m[0]])) == lowest]
            )
            orbit_of = {int(i): k for k, m in enumerate(orbits) for i in m}
            shifts = []
            for i in anchors:
                p = wrap01(pos - pos[i] * polar)
                # the symmetrised atom, not the raw one, goes to the origin: symmetrising moves
                # it along the polar axis by an amount that differs from atom to atom
                k = orbit_of[int(i)]
                w = letters[k]
                rep = _canonical_representative(tables, g, w, p[orbits[k]], metric, symprec)
                if rep is None:
                    continue
                rot, trans = tables.orbit_ops(g, w)
                images = np.einsum("kij,j->ki", rot, rep) + trans
                d = images - p[i]
                d -= np.rint(d)
                nearest = d[np.argmin(np.einsum("ki,ij,kj->k", d, metric, d))]
                shifts.append(p - nearest * polar)
            candidates = []
            for p in shifts:
                found = _orbit_sites(tables, g, wrap01(p), orbits, metric, symprec, letters)
                if found is not None:
                    candidates.append(_in_site_order(letters, found[1], types, orbits))
        else:
            candidates = [_in_site_order(letters, reps, types, orbits)]
        for cand in candidates:
            if best is None or _precedes(cand, best):
                best = cand
    if best is None:
        raise EncodingError(f"the atoms fit no set of Wyckoff positions of space group {g}")
    return best


def _orbit_sites(tables, g, pos, orbits, metric, symprec, letters=None):
    """Each orbit's Wyckoff position (the one of its multiplicity its atoms lie on, unless
    ``letters`` are known) and canonical representative; None when an orbit fits none."""
    if g == 1:  # every atom its own orbit on the one position: the atom itself, at once (the
        # general path gives the same, one call per atom, and P1 tries every anchor atom)
        return [0] * len(orbits), list(tables.project(1, 0, wrap01(pos[[m[0] for m in orbits]])))
    out_letters, reps = [], []
    for k, members in enumerate(orbits):
        if letters is not None:
            choices = [letters[k]]
        else:
            n = int(tables.num_letters[g])
            choices = [w for w in range(n) if tables.multiplicity[g, w] == len(members)]
        for w in choices:
            rep = _canonical_representative(tables, g, w, pos[members], metric, symprec)
            if rep is not None:
                out_letters.append(w)
                reps.append(rep)
                break
        else:
            return None
    return out_letters, reps


def _in_site_order(letters, reps, types, orbits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wyckoff = np.array(letters, dtype=np.int16)
    species = np.array([types[m[0]] for m in orbits], dtype=np.int16)
    coords = np.array(reps, dtype=float).reshape(-1, 3)
    order = site_order(wyckoff, species, coords)
    return wyckoff[order], species[order], coords[order]


def _precedes(a: tuple, b: tuple) -> bool:
    """Is site sequence a strictly before b (letters, elements, then coordinates within tol)?"""
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        if len(x) != len(y):
            return len(x) < len(y)
        diff = np.nonzero(x != y)[0]
        if diff.size:
            return bool(x[diff[0]] < y[diff[0]])
    ca, cb = a[2].ravel(), b[2].ravel()
    diff = np.nonzero(np.abs(ca - cb) > _TIE_TOL)[0]
    return bool(diff.size) and bool(ca[diff[0]] < cb[diff[0]])


def _canonical_representative(
    tables, g: int, w: int, points: np.ndarray, metric: np.ndarray, symprec: float
) -> np.ndarray | None:
    """The orbit member that lies on position w's first operation with the smallest free coords,
    symmetrised: the free coordinates that best fit all the orbit's atoms (least squares in the
    metric), which also removes a small offset of the origin along non-polar directions.

    Returns None when no member lies on the position or the orbit does not match the atoms.
    """
    projected = tables.project(g, w, points)
    delta = projected - points
    delta -= np.rint(delta)
    dist = np.sqrt(np.einsum("ni,ij,nj->n", delta, metric, delta))
    if dist.min() >= symprec:
        return None
    rep = projected[np.argmin(dist)]
    rot, trans = tables.orbit_ops(g, w)
    free = tables.free_mask[g, w]
    A = tables.proj_rot[g, w][:, free]  # free parameters -> displacement on the position
    J = np.einsum("kij,jf->kif", rot, A)  # their effect on each image
    # Symmetrise before judging: the orbit of the best-fitting representative must reproduce,
    # one to one, the atoms it stands for. Judged on one raw member instead, a crystal
    # distorted close to the tolerance would pass or fail depending on the member.
    images, diff, d2 = _orbit_offsets(rot, trans, rep, points, metric)
    if free.any():
        nearest = diff[np.arange(len(images)), np.argmin(d2, axis=1)]  # atom - image, per op
        lhs = np.einsum("kif,ij,kjh->fh", J, metric, J)
        rhs = np.einsum("kif,ij,kj->f", J, metric, nearest)
        rep = tables.project(g, w, rep + A @ np.linalg.solve(lhs, rhs))
        images, diff, d2 = _orbit_offsets(rot, trans, rep, points, metric)
    close = d2 < symprec**2
    if not (close.any(axis=0).all() and close.any(axis=1).all()):
        return None
    if not free.any():
        return rep
    # the symmetrised orbit's members on the first operation; the smallest free coordinates
    images = wrap01(images)
    on = tables.project(g, w, images) - images
    on -= np.rint(on)
    cands = images[np.all(np.abs(on) < 1e-9, axis=1)]
    return tables.project(g, w, cands[_lexmin(cands[:, free])])


def _orbit_offsets(rot, trans, rep, points, metric):
    """The orbit's images of rep, atom - image offsets (nearest periodic copy) and their
    squared lengths, image by atom."""
    images = np.einsum("kij,j->ki", rot, rep) + trans
    diff = points[None, :, :] - images[:, None, :]
    diff -= np.rint(diff)
    return images, diff, np.einsum("abi,ij,abj->ab", diff, metric, diff)


def _lexmin(keys: np.ndarray, tol: float = _TIE_TOL) -> int:
    """Row with the lexicographically smallest key, values within tol counted as equal.

    The tolerance absorbs floating-point error only (coordinates are symmetrised first).
    """
    alive = np.arange(len(keys))
    for col in keys.T:
        vals = col[alive]
        alive = alive[vals <= vals.min() + tol]
        if len(alive) == 1:
            break
    return int(alive[0])


def site_order(wyckoff: np.ndarray, species: np.ndarray, coords: np.ndarray) -> np.ndarray:
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


def cell_problem(params: np.ndarray) -> str | None:
    """Why lattice parameters (a, b, c, alpha, beta, gamma) make no cell, or None. The angles
    must be realisable: pymatgen's ``Lattice.from_parameters`` clips an impossible triple to a
    cell with other angles instead of refusing it."""
    params = np.asarray(params, dtype=float)
    if not np.all(np.isfinite(params)) or np.any(params[:3] <= 0):
        return f"invalid lattice parameters {params.tolist()}"
    cos = np.cos(np.radians(params[3:]))
    gram = 1.0 - (cos**2).sum() + 2.0 * cos.prod()  # (V / abc)^2
    if np.any(params[3:] <= 0) or np.any(params[3:] >= 180) or not gram > 0:
        return f"lattice parameters {params.tolist()} give no valid cell"
    return None


def crystal_problem(crystal: WyckoffCrystal) -> str | None:
    """Why a WyckoffCrystal describes no structure (a letter its group lacks, an element that
    does not exist, no cell), or None: ``expand``'s checks, without expanding."""
    g = crystal.spacegroup
    n_letters = int(get_tables().num_letters[g])
    if np.any(crystal.wyckoff < 0) or np.any(crystal.wyckoff >= n_letters):
        return f"Wyckoff index out of range for space group {g} ({n_letters} positions)"
    bad = crystal.species[(crystal.species < 1) | (crystal.species > 118)]
    if len(bad):
        return f"invalid atomic number {int(bad[0])}"
    return cell_problem(crystal.lattice_parameters)


def expand(crystal: WyckoffCrystal) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WyckoffCrystal -> (lattice matrix (3, 3), fractional coordinates (N, 3), atomic numbers
    (N,)) of the conventional cell, every site expanded to its full orbit: the arrays that
    ``decode`` and spglib take, without building pymatgen objects. Raises ValueError for a
    crystal that describes no structure."""
    problem = crystal_problem(crystal)
    if problem:
        raise ValueError(problem)
    tables = get_tables()
    g = crystal.spacegroup
    params = crystal.lattice_parameters
    matrix = Lattice.from_parameters(*params).matrix
    if not np.linalg.det(matrix) > 0:
        raise ValueError(f"lattice parameters {params.tolist()} give no valid cell")
    numbers: list[int] = []
    frac: list[np.ndarray] = []
    for w, z, rep in zip(crystal.wyckoff, crystal.species, crystal.coords, strict=True):
        orbit = tables.orbit(g, int(w), tables.project(g, int(w), rep))
        numbers.extend([int(z)] * len(orbit))
        frac.append(orbit)
    return matrix, np.concatenate(frac), np.asarray(numbers, dtype=int)


def decode(crystal: WyckoffCrystal) -> Structure:
    """WyckoffCrystal -> conventional-cell Structure, every site expanded to its full orbit."""
    matrix, frac, numbers = expand(crystal)
    return Structure(Lattice(matrix), numbers.tolist(), frac, coords_are_cartesian=False)
