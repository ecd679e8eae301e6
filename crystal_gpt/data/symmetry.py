"""Wyckoff tables for the 230 space groups, as flat arrays the model and the codec index.

The tables are derived from pyxtal (Wyckoff positions, in the ITA standard setting pyxtal uses)
and spglib (the Hall number of that same setting, so spglib's standardised cells line up with
pyxtal's coordinates). Deriving them takes ~10 s, so the result ships as a compressed ``.npz``
(`crystal_gpt/tables/wyckoff.npz`), rebuilt with ``python -m crystal_gpt.data.symmetry``.

Letter index 0 is Wyckoff letter 'a' (highest site symmetry); the last index of a group is its
general position. Group 47 (Pmmm) has 27 positions, the last one lettered 'A' as in the ITA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

NUM_SPACEGROUPS = 230
TABLE_VERSION = 2

CRYSTAL_SYSTEMS = (
    "triclinic",
    "monoclinic",
    "orthorhombic",
    "tetragonal",
    "trigonal",
    "hexagonal",
    "cubic",
)
# Names of the free lattice parameters of each crystal system (conventional cell, ITA setting:
# monoclinic unique axis b, trigonal and rhombohedral groups on hexagonal axes).
LATTICE_FREE_PARAMS: dict[str, tuple[str, ...]] = {
    "triclinic": ("a", "b", "c", "alpha", "beta", "gamma"),
    "monoclinic": ("a", "b", "c", "beta"),
    "orthorhombic": ("a", "b", "c"),
    "tetragonal": ("a", "c"),
    "trigonal": ("a", "c"),
    "hexagonal": ("a", "c"),
    "cubic": ("a",),
}
LATTICE_PARAMS = ("a", "b", "c", "alpha", "beta", "gamma")


def _tie(system: str, name: str) -> str | float | None:
    if name in LATTICE_FREE_PARAMS[system]:
        return None
    if name in ("b", "c"):
        return "a"
    return 120.0 if name == "gamma" and system in ("trigonal", "hexagonal") else 90.0


# What each parameter of (a, b, c, alpha, beta, gamma) is when the system does not leave it free:
# "a" (a tied length equals a) or a fixed angle in degrees; None where it is free. The codec
# (numpy) and the model's lattice distribution (torch) both fill in cells from this one table.
LATTICE_TIES: dict[str, tuple[str | float | None, ...]] = {
    system: tuple(_tie(system, name) for name in LATTICE_PARAMS) for system in CRYSTAL_SYSTEMS
}


# The 11 enantiomorphic pairs of space groups (ITA): the mirror image of a crystal in one of
# them lies in the partner group, so it is another crystal, not another description.
ENANTIOMORPHIC_GROUPS = frozenset(
    (
        76,
        78,
        91,
        95,
        92,
        96,
        144,
        145,
        151,
        153,
        152,
        154,
        169,
        170,
        171,
        172,
        178,
        179,
        180,
        181,
        212,
        213,
    )
)


def crystal_system_of(spacegroup: int) -> str:
    """Crystal system of a space-group number (ITA ranges)."""
    check_spacegroup(spacegroup)
    for upper, name in ((2, 0), (15, 1), (74, 2), (142, 3), (167, 4), (194, 5), (230, 6)):
        if spacegroup <= upper:
            return CRYSTAL_SYSTEMS[name]
    raise AssertionError("unreachable")


def check_spacegroup(spacegroup: int) -> int:
    if not isinstance(spacegroup, int | np.integer) or not 1 <= int(spacegroup) <= 230:
        raise ValueError(f"space group must be an integer in 1..230, got {spacegroup!r}")
    return int(spacegroup)


@dataclass(frozen=True)
class WyckoffTables:
    """All Wyckoff positions of all space groups, indexed ``[group, letter_index]``.

    Arrays have a leading axis of 231 (index 0 unused) and a letter axis of ``max_letters``.
    The orbit operations of position (g, w) are rows ``ops_start[g, w] : + multiplicity[g, w]``
    of ``ops_rot`` / ``ops_trans``; applying them to the representative gives the whole orbit
    in the conventional cell (centring translations included).
    """

    num_letters: np.ndarray  # (231,) int: Wyckoff positions per group
    letters: np.ndarray  # (231, L) <U1: letter of each position ('' past the end)
    multiplicity: np.ndarray  # (231, L) int: atoms per conventional cell (0 past the end)
    dof: np.ndarray  # (231, L) int: number of free coordinates
    free_mask: np.ndarray  # (231, L, 3) bool: which of x, y, z are free parameters
    proj_rot: np.ndarray  # (231, L, 3, 3): first operation, maps free params to the representative
    proj_trans: np.ndarray  # (231, L, 3)
    ops_start: np.ndarray  # (231, L) int: first row of the orbit operations
    ops_rot: np.ndarray  # (N, 3, 3)
    ops_trans: np.ndarray  # (N, 3)
    hall_number: np.ndarray  # (231,) int: spglib Hall number of the setting used
    symbol: np.ndarray  # (231,) <U12: Hermann-Mauguin symbol
    crystal_system: np.ndarray  # (231,) int: index into CRYSTAL_SYSTEMS
    # Euclidean normaliser: coset representatives (R, t) of the group in its normaliser for the
    # generic metric of its crystal system (rows norm_start[g] : norm_start[g] + norm_count[g]),
    # translations along polar directions left out: those are continuous (``polar``).
    norm_start: np.ndarray  # (231,) int
    norm_count: np.ndarray  # (231,) int
    norm_rot: np.ndarray  # (M, 3, 3) int8
    norm_trans: np.ndarray  # (M, 3)
    polar: np.ndarray  # (231, 3) bool: axes along which any origin shift keeps the group

    @property
    def max_letters(self) -> int:
        return int(self.letters.shape[1])

    def letter_index(self, spacegroup: int, letter: str) -> int:
        g = check_spacegroup(spacegroup)
        row = self.letters[g, : self.num_letters[g]]
        hits = np.nonzero(row == letter)[0]
        if hits.size == 0:
            legal = "".join(row.tolist())
            raise ValueError(
                f"space group {g} has no Wyckoff position {letter!r} (legal letters: {legal})"
            )
        return int(hits[0])

    def orbit_ops(self, spacegroup: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.ops_start[spacegroup, w]
        stop = start + self.multiplicity[spacegroup, w]
        return self.ops_rot[start:stop], self.ops_trans[start:stop]

    def project(self, spacegroup: int, w: int, points: np.ndarray) -> np.ndarray:
        """Map points onto Wyckoff position w through its first operation, wrapped to [0, 1).

        Fixed coordinates come out exact (0.5 stays 0.5); free ones are copied, so a point already
        on the position is returned unchanged. Works on (3,) or (n, 3) arrays.
        """
        p = np.asarray(points, dtype=float)
        return wrap01(
            onto_position(self.proj_rot[spacegroup, w], self.proj_trans[spacegroup, w], p)
        )

    def normaliser(self, spacegroup: int) -> tuple[np.ndarray, np.ndarray]:
        """(R, t) of the origin/orientation changes that keep the group and the lattice: the
        equivalent descriptions of one crystal between which the canonical form chooses."""
        start = self.norm_start[spacegroup]
        stop = start + self.norm_count[spacegroup]
        return self.norm_rot[start:stop].astype(float), self.norm_trans[start:stop]

    def orbit(self, spacegroup: int, w: int, representative: np.ndarray) -> np.ndarray:
        """All ``multiplicity`` images of a representative in the conventional cell, in [0, 1)."""
        rot, trans = self.orbit_ops(spacegroup, w)
        return wrap01(np.einsum("kij,j->ki", rot, representative) + trans)


@functools.cache
def _moyopy():
    """The moyopy module, or None where it is not installed (looked up once)."""
    try:
        import moyopy
    except ImportError:
        return None
    return moyopy


def space_group_number(
    cell: tuple[np.ndarray, np.ndarray, np.ndarray], symprec: float
) -> int | None:
    """The space group of (lattice matrix, fractional coordinates, atomic numbers) at
    ``symprec`` (Angstrom), or None when none is found. moyopy (the moyo library, from spglib's
    authors) where installed: it gave spglib's number on every one of 4,000 sampled crystals
    and runs ~10x faster (an F-centred cubic cell: ~1.6 vs ~23 ms); spglib otherwise, and
    where moyopy fails. Two atoms within ``symprec`` of each other give None, as they mostly do
    in spglib (which merges a few such pairs of different elements; moyo would merge all)."""
    import warnings

    moyopy = _moyopy()
    matrix, frac, numbers = cell
    if moyopy is not None:
        # spglib finds nothing when two atoms are within symprec; moyo would merge them
        diff = np.asarray(frac)[:, None, :] - np.asarray(frac)[None, :, :]
        diff -= np.rint(diff)  # the nearest image, exact for the tiny distances that matter
        dist2 = np.einsum("abi,ij,abj->ab", diff, matrix @ np.asarray(matrix).T, diff)
        np.fill_diagonal(dist2, np.inf)
        if len(numbers) > 1 and dist2.min() < symprec**2:
            return None
        try:
            moyo_cell = moyopy.Cell(
                np.asarray(matrix).tolist(), np.asarray(frac).tolist(), np.asarray(numbers).tolist()
            )
            return int(moyopy.MoyoDataset(moyo_cell, symprec=symprec).number)
        except Exception:  # moyo's errors (no symmetry at this tolerance) fall to spglib
            pass
    import spglib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = spglib.get_symmetry_dataset(cell, symprec=symprec)
        except spglib.error.SpglibError:
            found = None
    return None if found is None else int(found.number)


@functools.cache
def lattice_points(spacegroup: int) -> int:
    """Lattice points per conventional cell (1 P, 2 A/C/I, 3 R on hexagonal axes, 4 F): pure
    translations among the general position's operations."""
    t = get_tables()
    g = check_spacegroup(spacegroup)
    w = int(t.num_letters[g]) - 1
    start = int(t.ops_start[g, w])
    rot = t.ops_rot[start : start + int(t.multiplicity[g, w])]
    return int(np.all(np.abs(rot - np.eye(3)) < 1e-9, axis=(1, 2)).sum())


# ---------------------------------------------------------------- the canonical order's rules
# Stated once, for ints, numpy arrays and torch tensors alike: the codec's site order obeys them
# (``codec.site_order``), and the model's masks and the constraint planner enforce them.


def onto_position(rot, trans, x):
    """The projection of coordinates x (..., 3) onto a Wyckoff position, before wrapping: the
    position's first operation (rot, trans), which copies the free coordinates and computes
    the fixed and tied ones. One statement for numpy (the codec, float64) and torch (the model,
    batched over sites with rot (..., 3, 3))."""
    return (rot @ x[..., None])[..., 0] + trans


def lowest_next_letter(prev_w, prev_dof):
    """The smallest letter the next site may take after one on letter ``prev_w`` (whose
    position has ``prev_dof`` free coordinates): letters never decrease, and a position without
    free coordinates holds one orbit, so it is not repeated."""
    return prev_w + (prev_dof == 0)


def lowest_next_element(w, prev_w, prev_a):
    """The smallest atomic number a site on letter ``w`` may take after a site (prev_w, prev_a):
    sites repeating a letter come in non-decreasing atomic number; a new letter starts over."""
    return prev_a * (w == prev_w)


def wrap01(x: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Fractional coordinates in [0, 1), with -0.0 and 1 - tiny mapped to exactly 0."""
    y = np.asarray(x, dtype=float) % 1.0
    y = np.where(y > 1.0 - eps, 0.0, y)
    return y + 0.0


TABLE_FILE = "wyckoff.npz"


def _table_path() -> Path:
    return Path(str(resources.files("crystal_gpt") / "tables" / TABLE_FILE))


@functools.cache
def get_tables() -> WyckoffTables:
    """The shipped tables (loaded once per process, ~20 ms)."""
    path = _table_path()
    if not path.exists():
        raise FileNotFoundError(
            f"Wyckoff tables missing at {path}; rebuild with `python -m crystal_gpt.data.symmetry`"
        )
    with np.load(path) as z:
        if int(z["version"]) != TABLE_VERSION:
            raise RuntimeError(
                f"{path} has table version {int(z['version'])}, need {TABLE_VERSION}"
            )
        return WyckoffTables(**{k: z[k] for k in WyckoffTables.__dataclass_fields__})


def _spglib_hall_numbers_by_group() -> dict[int, list[int]]:
    import spglib

    out: dict[int, list[int]] = {}
    for hall in range(1, 531):
        out.setdefault(spglib.get_spacegroup_type(hall).number, []).append(hall)
    return out


def _op_key(rot: np.ndarray, trans: np.ndarray) -> tuple:
    t = np.round(np.asarray(trans, dtype=float) % 1.0, 6) % 1.0
    return (tuple(np.rint(rot).astype(int).ravel()), tuple(t))


def _matching_hall(group_ops: list, candidates: list[int]) -> int:
    """The Hall setting whose symmetry operations are exactly pyxtal's general position."""
    import spglib

    target = {_op_key(op.rotation_matrix, op.translation_vector) for op in group_ops}
    for hall in candidates:
        sym = spglib.get_symmetry_from_database(hall)
        keys = {_op_key(r, t) for r, t in zip(sym["rotations"], sym["translations"], strict=True)}
        if keys == target:
            return hall
    raise RuntimeError(
        f"no spglib Hall setting matches pyxtal's operations (candidates {candidates})"
    )


# A group of each crystal family whose rotations are the lattice's full point group (holohedry)
# in the conventional basis of our settings: the isometries available for a generic metric.
_HOLOHEDRY_GROUP = {0: 2, 1: 10, 2: 47, 3: 123, 4: 191, 5: 191, 6: 221}
_GRID = 24  # normaliser translations are multiples of 1/2, 1/3, 1/4, 1/6 or 1/8


def _polar_axes(rots: np.ndarray) -> np.ndarray:
    """Axes fixed by every rotation of the group: origin shifts along them are free."""
    return np.all(np.abs(rots - np.eye(3)).sum(axis=1) < 1e-9, axis=0)


def _normaliser_cosets(rots: np.ndarray, trans: np.ndarray, holohedry: np.ndarray) -> tuple:
    """Coset representatives of the group (rots, trans) in its Euclidean normaliser.

    Brute force: for each lattice isometry R that maps the group's rotations onto themselves,
    every translation on a 1/24 grid for which (R, t) conjugates each operation into the group.
    Polar components of t are dropped (continuous), and elements differing by a group operation
    (or a polar shift) are merged."""
    polar = _polar_axes(rots)
    rot_keys = {tuple(np.rint(r).astype(int).ravel()) for r in rots}
    by_rot: dict[tuple, list[np.ndarray]] = {}
    for r, t in zip(rots, trans, strict=True):
        by_rot.setdefault(tuple(np.rint(r).astype(int).ravel()), []).append(t % 1.0)
    grid = np.stack(np.meshgrid(*[np.arange(_GRID) / _GRID] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.all(grid[:, polar] == 0, axis=1)]
    found = []
    for R in holohedry:
        Rinv = np.rint(np.linalg.inv(R))
        conj = [np.rint(R @ W @ Rinv) for W in rots]
        if any(tuple(c.astype(int).ravel()) not in rot_keys for c in conj):
            continue
        cand = grid
        for w, Wc in zip(trans, conj, strict=True):
            img = (R @ w)[None, :] + cand @ (np.eye(3) - Wc).T  # translation of n g n^-1
            targets = np.array(by_rot[tuple(Wc.astype(int).ravel())])
            d = img[:, None, :] - targets[None, :, :]
            d -= np.rint(d)
            cand = cand[np.any(np.all(np.abs(d) < 1e-6, axis=-1), axis=1)]
            if len(cand) == 0:
                break
        found.extend((R, t) for t in cand)

    def in_group(R: np.ndarray, t: np.ndarray) -> bool:
        key = tuple(np.rint(R).astype(int).ravel())
        for w in by_rot.get(key, []):
            d = (t - w) % 1.0
            d = np.minimum(d, 1 - d)
            if np.all(d[~polar] < 1e-6):
                return True
        return False

    reps: list[tuple[np.ndarray, np.ndarray]] = []
    for R, t in found:  # n ~ m iff m^-1 n is in the group (up to a polar shift)
        if not any(
            in_group(np.linalg.inv(Rm) @ R, np.linalg.inv(Rm) @ (t - tm)) for Rm, tm in reps
        ):
            reps.append((R, t))
    # the group's own coset as the identity, first: the encoder's first candidate is spglib's cell
    reps = [(np.eye(3), np.zeros(3)) if in_group(R, t) else (R, t) for R, t in reps]
    reps.sort(key=lambda n: (not np.allclose(n[0], np.eye(3)), tuple(n[1])))
    return polar, reps


def build_tables() -> WyckoffTables:
    """Derive the tables from pyxtal and spglib (the shipped .npz is this function's output)."""
    from pyxtal.symmetry import Group

    halls = _spglib_hall_numbers_by_group()
    groups = [Group(g) for g in range(1, NUM_SPACEGROUPS + 1)]
    max_letters = max(len(gr.Wyckoff_positions) for gr in groups)
    shape = (NUM_SPACEGROUPS + 1, max_letters)
    num_letters = np.zeros(NUM_SPACEGROUPS + 1, dtype=np.int16)
    letters = np.full(shape, "", dtype="<U1")
    multiplicity = np.zeros(shape, dtype=np.int16)
    dof = np.zeros(shape, dtype=np.int8)
    free_mask = np.zeros((*shape, 3), dtype=bool)
    proj_rot = np.zeros((*shape, 3, 3))
    proj_trans = np.zeros((*shape, 3))
    ops_start = np.zeros(shape, dtype=np.int32)
    hall_number = np.zeros(NUM_SPACEGROUPS + 1, dtype=np.int16)
    symbol = np.full(NUM_SPACEGROUPS + 1, "", dtype="<U12")
    crystal_system = np.full(NUM_SPACEGROUPS + 1, -1, dtype=np.int8)
    rots: list[np.ndarray] = []
    transl: list[np.ndarray] = []
    for gr in groups:
        g = gr.number
        wps = list(reversed(gr.Wyckoff_positions))  # pyxtal lists the general position first
        num_letters[g] = len(wps)
        hall_number[g] = _matching_hall(wps[-1].ops, halls[g])
        symbol[g] = gr.symbol
        crystal_system[g] = CRYSTAL_SYSTEMS.index(crystal_system_of(g))
        for w, wp in enumerate(wps):
            op0 = wp.ops[0]
            rot = np.asarray(op0.rotation_matrix, dtype=float)
            free = np.abs(rot).sum(axis=0) > 0
            # The codec reads free parameters straight off the representative: that needs each
            # free column to carry its own axis with coefficient 1 and the map to be idempotent.
            if not np.allclose(np.diag(rot)[free], 1.0) or not np.allclose(rot @ rot, rot):
                raise RuntimeError(f"unexpected Wyckoff form {op0.as_xyz_str()} in group {g}")
            letters[g, w] = wp.letter
            multiplicity[g, w] = wp.multiplicity
            dof[g, w] = int(wp.get_dof())
            if int(free.sum()) != dof[g, w] or len(wp.ops) != wp.multiplicity:
                raise RuntimeError(f"inconsistent Wyckoff position {g}{wp.letter}")
            free_mask[g, w] = free
            proj_rot[g, w] = rot
            proj_trans[g, w] = np.asarray(op0.translation_vector, dtype=float)
            ops_start[g, w] = len(rots)
            for op in wp.ops:
                rots.append(np.asarray(op.rotation_matrix, dtype=float))
                transl.append(np.asarray(op.translation_vector, dtype=float))
    return WyckoffTables(
        num_letters=num_letters,
        letters=letters,
        multiplicity=multiplicity,
        dof=dof,
        free_mask=free_mask,
        proj_rot=proj_rot,
        proj_trans=proj_trans,
        ops_start=ops_start,
        ops_rot=np.stack(rots).astype(np.int8),
        ops_trans=np.stack(transl),
        hall_number=hall_number,
        symbol=symbol,
        crystal_system=crystal_system,
        **_normaliser_tables(rots, transl, ops_start, multiplicity, num_letters, crystal_system),
    )


def _normaliser_tables(rots, transl, ops_start, multiplicity, num_letters, crystal_system):
    rots_a, trans_a = np.stack(rots), np.stack(transl)

    def general(g: int) -> tuple[np.ndarray, np.ndarray]:
        w = int(num_letters[g]) - 1
        s, m = int(ops_start[g, w]), int(multiplicity[g, w])
        return rots_a[s : s + m], trans_a[s : s + m]

    holo = {}
    for fam, hg in _HOLOHEDRY_GROUP.items():
        holo[fam] = np.unique(np.rint(general(hg)[0]).astype(int), axis=0).astype(float)
    starts = np.zeros(NUM_SPACEGROUPS + 1, dtype=np.int32)
    counts = np.zeros(NUM_SPACEGROUPS + 1, dtype=np.int32)
    polar = np.zeros((NUM_SPACEGROUPS + 1, 3), dtype=bool)
    n_rot: list[np.ndarray] = []
    n_trans: list[np.ndarray] = []
    for g in range(1, NUM_SPACEGROUPS + 1):
        r, t = general(g)
        polar[g], reps = _normaliser_cosets(r, t, holo[int(crystal_system[g])])
        starts[g], counts[g] = len(n_rot), len(reps)
        n_rot.extend(R for R, _ in reps)
        n_trans.extend(tt for _, tt in reps)
    return {
        "norm_start": starts,
        "norm_count": counts,
        "norm_rot": np.rint(np.stack(n_rot)).astype(np.int8),
        "norm_trans": np.stack(n_trans),
        "polar": polar,
    }


def save_tables(tables: WyckoffTables, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(tables, k) for k in WyckoffTables.__dataclass_fields__}
    np.savez_compressed(path, version=np.array(TABLE_VERSION), **arrays)


def main() -> None:
    path = _table_path()
    tables = build_tables()
    save_tables(tables, path)
    print(
        f"wrote {path}: {int(tables.num_letters.sum())} Wyckoff positions, "
        f"{len(tables.ops_rot)} orbit operations, {path.stat().st_size / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
