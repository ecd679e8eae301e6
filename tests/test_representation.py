import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from crystal_gpt import EncodingError, WyckoffCrystal, decode, encode, load_dataset
from crystal_gpt.data.roundtrip import check_roundtrips, summarize
from crystal_gpt.data.symmetry import get_tables, lowest_next_element, lowest_next_letter
from crystal_gpt.testing import random_crystal

T = get_tables()


def rocksalt() -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def wurtzite() -> Structure:
    return Structure.from_spacegroup(
        "P6_3mc",
        Lattice.hexagonal(3.25, 5.21),
        ["Zn", "O"],
        [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]],
    )


def same(a: WyckoffCrystal, b: WyckoffCrystal, atol: float = 1e-3) -> bool:
    return (
        a.spacegroup == b.spacegroup
        and np.array_equal(a.wyckoff, b.wyckoff)
        and np.array_equal(a.species, b.species)
        and np.allclose(a.coords, b.coords, atol=atol)
        and np.allclose(a.lattice, b.lattice, atol=atol)
    )


def check_sequence_rules(wc: WyckoffCrystal) -> None:
    """The ordering rules the model's masks rely on."""
    g, w = wc.spacegroup, wc.wyckoff
    assert ((w >= 0) & (w < T.num_letters[g])).all()
    dof = T.dof[g, w]
    for i in range(1, len(w)):
        assert w[i] >= lowest_next_letter(w[i - 1], dof[i - 1]), "letters in canonical order"
        assert wc.species[i] >= lowest_next_element(w[i], w[i - 1], wc.species[i - 1])
    assert ((wc.coords >= 0) & (wc.coords < 1)).all()
    # fixed coordinates are exactly the table's values (free ones are whatever the crystal has)
    for k in range(len(w)):
        assert np.array_equal(T.project(g, w[k], wc.coords[k]), wc.coords[k])


def test_rocksalt_special_positions_are_exact():
    wc = encode(rocksalt())
    assert wc.spacegroup == 225 and wc.letters == ["a", "b"]
    assert [z for z in wc.species] == [11, 17]
    assert wc.coords.tolist() == [[0, 0, 0], [0.5, 0.5, 0.5]]
    assert wc.lattice.tolist() == pytest.approx([5.64]) and wc.num_atoms == 8
    assert wc.sites == [("a", "Na", ()), ("b", "Cl", ())]
    s = decode(wc)
    assert len(s) == 8 and s.composition.reduced_formula == "NaCl"


def test_wurtzite_thirds_exact_and_free_z_kept():
    noisy = wurtzite()
    noisy.perturb(0.002, min_distance=0.001)  # a real-world, slightly off structure
    wc = encode(noisy)
    assert wc.spacegroup == 186 and wc.letters == ["b", "b"]
    for c in wc.coords:
        assert c[0] == 1 / 3 and c[1] == 2 / 3  # exact, not 0.33331
    assert len(wc.free_coords[0]) == 1
    assert StructureMatcher().fit(decode(wc), wurtzite())
    assert wc.crystal_system == "hexagonal" and wc.lattice_parameters[5] == 120.0


def test_p1_mode():
    s = wurtzite()
    wc = encode(s, mode="p1")
    assert wc.spacegroup == 1 and wc.num_sites == len(s) and wc.symprec is None
    assert len(wc.lattice) == 6 and wc.letters == ["a"] * 4
    assert StructureMatcher().fit(decode(wc), s)
    check_sequence_rules(wc)


def _sample(name: str, split: str, n: int):
    return load_dataset(name, split, limit=n).structures


@pytest.mark.parametrize(
    ("name", "split", "n"),
    [
        ("mp_20", "test", 150),
        ("perov_5", "test", 50),
        ("carbon_24", "test", 80),
        ("mpts_52", "test", 30),
    ],
)
def test_roundtrip_real_crystals(name, split, n):
    structures = _sample(name, split, n)
    results = check_roundtrips(structures)
    summary = summarize(results)
    failures = [(i, r.status, r.reason) for i, r in enumerate(results) if not r.ok]
    assert summary["rate"] == 1.0, failures
    assert summary["rate_strict"] >= 0.97
    for s in structures[:40]:
        check_sequence_rules(encode(s))


def test_every_spacegroup_roundtrips():
    """A random crystal in each of the 230 groups comes back, in the same group."""
    matcher = StructureMatcher()
    bad = []
    for g in range(1, 231):
        s = random_crystal(g, seed=g)
        wc = encode(s)
        check_sequence_rules(wc)
        if wc.spacegroup != g or not matcher.fit(s, decode(wc)):
            bad.append((g, wc.spacegroup))
    assert not bad


def test_encoding_is_independent_of_atom_order_and_orientation():
    rng = np.random.default_rng(1)
    for s in _sample("mp_20", "val", 30):
        ref = encode(s)
        shuffled = Structure.from_sites([s[i] for i in rng.permutation(len(s))])
        rotated = s.copy()
        rotated.apply_operation(SymmOp.from_axis_angle_and_translation(rng.normal(size=3), 37.0))
        assert same(encode(shuffled), ref)
        assert same(encode(rotated), ref)
        # a supercell may come back with another, equivalent origin (spglib's choice)
        sup = encode(s * (1, 2, 1))
        assert sup.spacegroup == ref.spacegroup and sup.num_atoms == ref.num_atoms
        assert sorted(sup.species.tolist()) == sorted(ref.species.tolist())


def test_decode_projects_and_validates():
    wc = encode(rocksalt())
    off = WyckoffCrystal(225, wc.wyckoff, wc.species, wc.coords + 0.01, wc.lattice)
    assert decode(off).frac_coords.min() == 0.0  # 'a' and 'b' have no freedom: projected back
    with pytest.raises(ValueError, match="Wyckoff index out of range"):
        decode(WyckoffCrystal(225, np.array([40]), np.array([11]), np.zeros((1, 3)), wc.lattice))
    with pytest.raises(ValueError, match="invalid lattice"):
        decode(WyckoffCrystal(225, wc.wyckoff, wc.species, wc.coords, np.array([-1.0])))
    with pytest.raises(ValueError, match="cubic lattice has 1 free parameters"):
        WyckoffCrystal(225, wc.wyckoff, wc.species, wc.coords, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"1\.\.230"):
        WyckoffCrystal(231, wc.wyckoff, wc.species, wc.coords, wc.lattice)


def test_bad_input_gets_clear_errors():
    disordered = Structure(Lattice.cubic(4), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    with pytest.raises(EncodingError, match="disordered"):
        encode(disordered)
    with pytest.raises(TypeError, match="pymatgen Structure"):
        encode("NaCl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        encode(rocksalt(), mode="p2")
    with pytest.raises(ValueError, match="symprec"):
        encode(rocksalt(), symprec=0)


def test_fallback_is_reported(monkeypatch):
    # atoms 4e-4 A apart: spglib gives up at 0.01 and 0.001, a smaller tolerance still works
    s = Structure(Lattice.cubic(4), ["Na", "Na"], [[0, 0, 0], [0, 0, 1e-4]])
    wc = encode(s)
    assert "spglib could not determine" in wc.meta["fallback"] and wc.symprec == 1e-5
    assert StructureMatcher().fit(decode(wc), s)

    import crystal_gpt.data.codec as rep

    def broken(cell, symprec):
        raise EncodingError("simulated failure")

    monkeypatch.setattr(rep, "_encode_cell", broken)
    wc = encode(wurtzite())
    assert wc.spacegroup == 1 and "encoded as P1" in wc.meta["fallback"]
    assert StructureMatcher().fit(decode(wc), wurtzite())
    with pytest.raises(EncodingError, match="symmetry analysis failed"):
        encode(wurtzite(), fallback=False)


def test_impossible_angles_are_refused_not_clipped():
    """Angles no cell has (alpha + beta < gamma) are refused; pymatgen's from_parameters
    would clip them to a flat cell with other angles. expand gives decode's arrays."""
    import dataclasses

    from crystal_gpt.data.codec import cell_problem, crystal_problem, decode, encode, expand

    assert cell_problem(np.array([5, 5, 5, 100, 100, 170.0])) is not None
    assert cell_problem(np.array([5, 6, 7, 80, 95, 110.0])) is None
    assert "invalid lattice" in cell_problem(np.array([5, -1, 7, 90, 90, 90.0]))
    s = Structure(
        Lattice.from_parameters(5, 6, 7, 80, 95, 110), ["Na", "Cl"], [[0, 0, 0], [0.3, 0.6, 0.2]]
    )
    wc = encode(s)
    matrix, frac, numbers = expand(wc)
    back = decode(wc)
    assert np.allclose(back.lattice.matrix, matrix) and np.allclose(back.frac_coords, frac)
    assert [sp.Z for sp in back.species] == numbers.tolist()
    assert crystal_problem(wc) is None
    assert len(wc.lattice) == 6  # triclinic: every parameter free
    wc = dataclasses.replace(wc, lattice=np.array([5, 5, 5, 100, 100, 170.0]))
    assert "no valid cell" in crystal_problem(wc)
    with pytest.raises(ValueError, match="no valid cell"):
        decode(wc)
