import numpy as np
import pytest
import spglib

from crystal_gpt.data.symmetry import (
    LATTICE_FREE_PARAMS,
    build_tables,
    crystal_system_of,
    get_tables,
    wrap01,
)

T = get_tables()
ALL_POSITIONS = [(g, w) for g in range(1, 231) for w in range(T.num_letters[g])]


def test_table_facts():
    assert T.num_letters[1:].min() == 1 and T.num_letters[47] == 27  # Pmmm: a..z then A
    assert T.letters[47, 26] == "A"
    assert T.letters[225, :12].tolist() == list("abcdefghijkl")
    assert T.multiplicity[225, 0] == 4 and T.multiplicity[225, 11] == 192
    assert T.symbol[62] == "Pnma" and T.symbol[227] == "Fd-3m"
    # Fd-3m in origin choice 2: 8a at (1/8, 1/8, 1/8)
    assert np.allclose(T.proj_trans[227, 0], 1 / 8) and T.dof[227, 0] == 0
    assert T.hall_number[227] == 526 and T.hall_number[14] == 81 and T.hall_number[166] == 458


@pytest.mark.parametrize("g", range(1, 231))
def test_positions_ordered_and_general_last(g):
    n = T.num_letters[g]
    mult = T.multiplicity[g, :n]
    assert (np.diff(mult) >= 0).all(), "letters 'a'... go from high to low site symmetry"
    assert T.dof[g, n - 1] == 3 and T.free_mask[g, n - 1].all()
    assert T.letters[g, n:].tolist() == [""] * (T.max_letters - n)
    # the general position's orbit operations are the group (in its Hall setting)
    sym = spglib.get_symmetry_from_database(int(T.hall_number[g]))
    assert mult[-1] == len(sym["rotations"])
    assert spglib.get_spacegroup_type(int(T.hall_number[g])).number == g


def test_orbits_are_closed_and_projection_is_exact():
    rng = np.random.default_rng(0)
    for g, w in ALL_POSITIONS:
        rep = T.project(g, w, rng.random(3))
        assert np.allclose(T.project(g, w, rep), rep), "projection is idempotent"
        orbit = T.orbit(g, w, rep)
        m = T.multiplicity[g, w]
        assert orbit.shape == (m, 3) and ((orbit >= 0) & (orbit < 1)).all()
        assert len(np.unique(np.round(orbit, 6) % 1, axis=0)) == m, f"{g}{T.letters[g, w]}"
        # every group operation maps the orbit onto itself
        n = T.num_letters[g]
        rot, trans = T.orbit_ops(g, n - 1)
        images = np.einsum("kij,mj->kmi", rot, orbit) + trans[:, None, :]
        diff = images[:, :, None, :] - orbit[None, None, :, :]
        diff -= np.rint(diff)
        assert (np.abs(diff).max(axis=-1).min(axis=-1) < 1e-8).all(), f"{g}{T.letters[g, w]}"


def test_fixed_coordinates_exact():
    g = 194  # P6_3/mmc, 2c = (1/3, 2/3, 1/4)
    w = T.letter_index(g, "c")
    assert T.project(g, w, np.array([0.3, 0.7, 0.2])).tolist() == [1 / 3, 2 / 3, 1 / 4]
    with pytest.raises(ValueError, match="no Wyckoff position 'z'"):
        T.letter_index(g, "z")


def test_wrap01():
    assert wrap01(np.array([-0.0, 1.0, -1e-13, 0.25, 1.25])).tolist() == [0, 0, 0, 0.25, 0.25]
    assert not np.signbit(wrap01(np.array([-0.0]))).any()


def test_crystal_systems():
    assert [crystal_system_of(g) for g in (1, 2, 3, 16, 75, 143, 168, 195, 230)] == [
        "triclinic",
        "triclinic",
        "monoclinic",
        "orthorhombic",
        "tetragonal",
        "trigonal",
        "hexagonal",
        "cubic",
        "cubic",
    ]
    assert len(LATTICE_FREE_PARAMS["monoclinic"]) == 4
    with pytest.raises(ValueError, match=r"1\.\.230"):
        crystal_system_of(231)


@pytest.mark.slow  # benchmarks/slow_tests.sh: the tables change only with their builder
def test_shipped_tables_equal_a_fresh_build():
    fresh = build_tables()
    for key in T.__dataclass_fields__:
        assert np.array_equal(getattr(fresh, key), getattr(T, key)), key
