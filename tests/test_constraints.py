import csv
import functools
import random
import time

import numpy as np
import pytest
import spglib

from crystal_gpt import decode
from crystal_gpt.data.symmetry import get_tables, lattice_points
from crystal_gpt.sampling.constraints import (
    ConstraintError,
    Planner,
    make_request,
    parse_atom_range,
    parse_composition,
    parse_template,
)
from crystal_gpt.sampling.sampler import sample_crystals

T = get_tables()


def test_parsing():
    assert parse_composition("Li4Fe4P4O16") == {3: 4, 8: 16, 15: 4, 26: 4}
    assert parse_composition("LiFePO4", formula_units=4) == parse_composition("Li4Fe4P4O16")
    assert parse_composition({"Na": 1, "Cl": 1}) == {11: 1, 17: 1}
    for bad, match in [
        ("Xx2O", "unknown element 'Xx'"),
        ("Fe0.5O", "whole numbers"),
        ("", "empty"),
    ]:
        with pytest.raises(ConstraintError, match=match):
            parse_composition(bad)
    with pytest.raises(ConstraintError, match="formula_units"):
        parse_composition("NaCl", formula_units=0)
    assert parse_atom_range("4-12") == (4, 12) and parse_atom_range(8) == (8, 8)
    for bad in ("12-4", "0", "a-b"):
        with pytest.raises(ConstraintError):
            parse_atom_range(bad)
    assert parse_template(225, "8c 4a") == (0, 2)
    with pytest.raises(ConstraintError, match="multiplicity 8, not 4"):
        parse_template(225, "4c")
    with pytest.raises(ConstraintError, match="holds one site only"):
        parse_template(225, "4a 4a")
    with pytest.raises(ConstraintError, match="no Wyckoff position 'z'"):
        parse_template(225, "z")


def test_lattice_points():
    assert [lattice_points(g) for g in (221, 225, 229, 166, 38, 12, 1)] == [1, 4, 2, 3, 2, 2, 1]


def _brute_force(g: int, counts: tuple[int, ...], max_sites: int) -> bool:
    """Does a canonical site sequence of group g use exactly ``counts`` (conventional cell)?"""
    n = int(T.num_letters[g])
    mult, dof = T.multiplicity[g, :n], T.dof[g, :n]

    @functools.cache
    def search(left: tuple[int, ...], low_w: int, low_e: int, sites: int) -> bool:
        if not any(left):
            return True
        if sites == max_sites:
            return False
        for w in range(low_w, n):
            for e in range(low_e if w == low_w else 0, len(left)):
                if left[e] >= mult[w]:
                    rest = (*left[:e], left[e] - mult[w], *left[e + 1 :])
                    nxt = (w + 1, 0) if dof[w] == 0 else (w, e)
                    if search(rest, *nxt, sites + 1):
                        return True
        return False

    return search(counts, 0, 0, 0)


def test_planner_feasibility_matches_brute_force():
    rng = random.Random(0)
    groups = [1, 2, 10, 25, 47, 62, 123, 139, 166, 191, 194, 221, 225, 227, 229]
    checked = feasible = 0
    for _ in range(150):
        k = rng.randint(1, 3)
        counts = {z: rng.randint(1, 4) for z in rng.sample([3, 8, 11, 17, 26], k)}
        g = rng.choice(groups)
        max_sites = rng.choice([3, 6, 64])
        planner = Planner(make_request(composition=counts), max_sites)
        target = planner.target(g)
        expected = _brute_force(g, target, max_sites) if sum(target) <= 24 else None
        if expected is None:
            continue
        checked += 1
        feasible += expected
        assert planner.feasible_group(g) == expected, (g, counts, max_sites)
    assert checked > 100 and 10 < feasible < checked  # both verdicts exercised


def _random_walk(planner: Planner, g: int, rng: random.Random) -> list[tuple[int, int]]:
    """Follow random allowed moves; the planner promises the walk always completes."""
    mult = T.multiplicity[g]
    state, sites = planner.initial_state(g), []
    while True:
        can_end, allowed = planner.moves(g, state)
        options = [(w, z) for w, zs in allowed.items() for z in (zs or (6,))]
        if can_end and (not options or rng.random() < 0.3):
            return sites
        assert options, "dead end"
        w, z = rng.choice(options)
        sites.append((w, z))
        if planner.request.composition is not None:
            e = planner.element_index(z)
            rem = list(state[0])
            rem[e] -= int(mult[w])
            state = planner.next_state(g, state, w, e, tuple(rem))
        else:
            state = planner.next_state(g, state, w, 0, state[0] + int(mult[w]))


def test_random_walks_never_dead_end_and_meet_the_request():
    rng = random.Random(1)
    for comp in ("SrTiO3", "Li4Fe4P4O16", "NaCl", "Fe2O3", "Mg2SiO4", "C8"):
        planner = Planner(make_request(composition=comp), 20)
        groups = [g for g in range(1, 231) if planner.feasible_group(g)]
        assert groups
        target = dict(make_request(composition=comp).composition)
        for g in rng.sample(groups, min(len(groups), 12)):
            for _ in range(5):
                sites = _random_walk(planner, g, rng)
                got: dict[int, int] = {}
                for w, z in sites:
                    got[z] = got.get(z, 0) + int(T.multiplicity[g, w])
                assert got == {z: c * lattice_points(g) for z, c in target.items()}
    planner = Planner(make_request(num_atoms="5-7"), 10)
    assert not planner.feasible_group(62)  # Pnma's multiplicities are 4 and 8
    for g in (1, 47, 139, 166, 225):
        assert planner.feasible_group(g)
        for _ in range(10):
            total = sum(int(T.multiplicity[g, w]) for w, _ in _random_walk(planner, g, rng))
            assert 5 * lattice_points(g) <= total <= 7 * lattice_points(g)


def _has_group_ops(structure, g: int) -> bool:
    """spglib's operations of the written crystal include every operation of group g (in the
    tables' setting, which the CIF keeps), i.e. the crystal has at least that symmetry."""
    cell = (structure.lattice.matrix, structure.frac_coords, structure.atomic_numbers)
    found = spglib.get_symmetry(cell, symprec=1e-3)
    have = {
        (r.tobytes(), tuple(np.round(np.mod(t + 1e-6, 1.0), 4)))
        for r, t in zip(found["rotations"], found["translations"], strict=True)
    }
    w = int(T.num_letters[g]) - 1
    start = int(T.ops_start[g, w])
    for r, t in zip(
        T.ops_rot[start : start + int(T.multiplicity[g, w])],
        T.ops_trans[start : start + int(T.multiplicity[g, w])],
        strict=True,
    ):
        key = (r.astype(found["rotations"].dtype).tobytes(), tuple(np.round(np.mod(t, 1.0), 4)))
        if key not in have:
            return False
    return True


def test_composition_sampling_is_exact(model):
    crystals = sample_crystals(model, 30, composition="Mg2SiO4", seed=0)
    groups = set()
    for c in crystals:
        k = lattice_points(c.spacegroup)
        s = decode(c)
        assert s.composition.as_dict() == {"Mg": 2.0 * k, "Si": 1.0 * k, "O": 4.0 * k}
        groups.add(c.spacegroup)
    assert len(groups) > 3  # the group is the model's choice
    crystals = sample_crystals(model, 10, composition="NaCl", formula_units=1, spacegroup=225)
    assert all(decode(c).composition.as_dict() == {"Na": 4.0, "Cl": 4.0} for c in crystals)
    with pytest.raises(ConstraintError, match="Na4Cl4"):  # 16 + 16 atoms: no letters add up
        sample_crystals(model, 1, composition="NaCl", formula_units=4, spacegroup=225)


def test_constraint_cli_writes_cifs_with_the_requested_symmetry(tmp_path, capsys):
    import csv

    from pymatgen.core import Structure

    from crystal_gpt.cli import main as cli_main

    out = tmp_path / "csp"
    args = ["sample", "-n", "16", "--seed", "0", "--out", str(out)]
    assert cli_main([*args, "--composition", "Li4Fe4P4O16", "--spacegroup", "62,14"]) == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        g = int(row["spacegroup"])
        assert g in (62, 14)
        s = Structure.from_file(out / row["cif"])
        assert s.composition.as_dict() == {"Li": 4.0, "Fe": 4.0, "P": 4.0, "O": 16.0}
        assert _has_group_ops(s, g)
    out = tmp_path / "tpl"
    assert cli_main(["sample", "-n", "8", "--seed", "1", "--out", str(out), "--spacegroup",
                     "Fm-3m", "--wyckoff-template", "4a 4b 8c"]) == 0  # fmt: skip
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert [site.split(":")[0] for site in row["wyckoff"].split()] == ["4a", "4b", "8c"]
        s = Structure.from_file(out / row["cif"])
        assert len(s) == 16 and _has_group_ops(s, 225)
    out = tmp_path / "range"
    assert cli_main([*args[:-2], "--out", str(out), "--num-atoms", "6-8"]) == 0
    with open(out / "summary.csv") as f:
        for row in csv.DictReader(f):
            k = lattice_points(int(row["spacegroup"]))
            assert 6 * k <= int(row["num_atoms"]) <= 8 * k


def test_impossible_requests_fail_fast_with_a_clear_message(model, capsys):
    from crystal_gpt.cli import main as cli_main

    cases = [
        (dict(composition="NaCl", spacegroup=230), "no crystal with composition Na1Cl1"),
        (dict(num_atoms="1-7", spacegroup=[230]), "1-7 atoms per primitive cell"),
        (dict(composition="NaCl", exclude_elements=["Na"]), r"\['Na'\] are excluded"),
        (dict(composition="NaCl", elements=["Na", "O"]), "not in the allowed elements"),
        (dict(composition="NaCl", num_atoms="3-4"), "outside the requested range"),
        (dict(wyckoff_template="4a", spacegroup=[1, 2]), "exactly one space group"),
        (dict(wyckoff_template="4a 4b", spacegroup=225, composition="NaCl2"), "template"),
        (dict(formula_units=2), "needs a composition"),
    ]
    for kwargs, match in cases:
        t0 = time.perf_counter()
        with pytest.raises(ConstraintError, match=match):
            sample_crystals(model, 5, **kwargs)
        assert time.perf_counter() - t0 < 2.0
    assert cli_main(["sample", "--composition", "NaCl", "--spacegroup", "230", "--out", "x"]) == 2
    assert "Ia-3d" in capsys.readouterr().err


def test_template_and_composition_together(model):
    crystals = sample_crystals(
        model, 12, spacegroup=221, wyckoff_template="1a 1b 3c", composition="SrTiO3", seed=4
    )
    for c in crystals:
        assert [T.letters[221, w] for w in c.wyckoff] == ["a", "b", "c"]
        assert int(c.species[2]) == 8 and sorted(c.species[:2].tolist()) == [22, 38]


def test_one_composition_per_crystal(model):
    comps = ["NaCl", "SrTiO3", "NaCl", "Fe2O3", {"Si": 2}]
    crystals = sample_crystals(model, 5, composition=comps, seed=2, batch_size=2)
    got = [decode(c).composition.reduced_formula for c in crystals]
    assert got == ["NaCl", "SrTiO3", "NaCl", "Fe2O3", "Si"]
    with pytest.raises(ValueError, match="2 compositions given for 3 crystals"):
        sample_crystals(model, 3, composition=["NaCl", "KCl"])


def test_element_count_masks_end_and_new_elements():
    import torch

    from crystal_gpt.sampling.constraints import ElementCount, parse_element_count

    assert parse_element_count("3") == (3, 3) and parse_element_count("2-4") == (2, 4)
    with pytest.raises(ConstraintError, match="'N' or 'LOW-HIGH'"):
        parse_element_count("three")
    present = torch.zeros(3, 119, dtype=torch.bool)
    present[:, 8] = True  # every row holds O
    present[1, 3] = True  # row 1 also Li
    count = ElementCount(torch.tensor([[2, 2], [2, 2], [1, 3]]), max_sites=4)
    assert count.may_end(present).tolist() == [False, True, True]
    allowed = count.elements(present, site=1)
    assert allowed[0].all()  # one element of two: anything
    assert allowed[1].tolist() == present[1].tolist()  # two of two: only those again
    assert allowed[2].all()
    # row 0 at the last site must add its second element: only new ones
    assert count.elements(present, site=3)[0].tolist() == (~present[0]).tolist()


def test_num_elements_is_met_and_auto_leaves_constrained_requests_alone(model):
    from crystal_gpt.sampling.sampler import element_bounds

    for spec, ok in ((2, {2}), ("1-2", {1, 2})):
        crystals = sample_crystals(model, 40, seed=3, num_elements=spec, min_distance=0)
        assert {len(set(c.species.tolist())) for c in crystals} <= ok
    # the tiny model records no training counts: 'auto' is the model's own choice, 'prior' fails
    assert not model.element_counts.any()
    assert element_bounds(model, "auto", 5, 0, True, None) is None
    with pytest.raises(ConstraintError, match="does not record"):
        sample_crystals(model, 2, num_elements="prior")
    with pytest.raises(ConstraintError, match="only 2 are allowed"):
        sample_crystals(model, 2, elements="C,O", num_elements=3)
    with pytest.raises(ConstraintError, match="composition fixes the number of elements"):
        sample_crystals(model, 2, composition="C4", num_elements=1)
    with pytest.raises(ConstraintError, match="at most 2 per cell"):
        sample_crystals(model, 2, num_atoms="1-2", num_elements=3)
    for bad in ("-3", 2.5, (1, 2, 3), "x"):
        with pytest.raises(ConstraintError, match="'N' or 'LOW-HIGH'"):
            sample_crystals(model, 2, num_elements=bad)


def test_count_resampler_reaches_the_training_distribution_and_skips_unreached_counts():
    from crystal_gpt.sampling.sampler import _CountResampler

    class Drawn:  # a checked crystal with k distinct elements
        def __init__(self, k: int) -> None:
            self.species = np.arange(1, k + 1)

    rng = np.random.default_rng(0)
    train = np.array([0, 10, 60, 20, 10], float)  # 4 elements: drawn never below
    own = np.array([0, 0.3, 0.6, 0.1, 0.0])
    resampler = _CountResampler(train, seed=0)
    kept = []
    for _ in range(40):
        batch = [Drawn(int(k)) for k in rng.choice(5, 500, p=own)]
        keep = resampler.keep(batch, [True] * 500)
        kept += [len(c.species) for c, k in zip(batch, keep, strict=True) if k]
    share = np.bincount(kept, minlength=5)[1:4] / len(kept)
    # the training distribution restricted to the counts the model reaches (4 never is)
    assert np.allclose(share, train[1:4] / train[1:4].sum(), atol=0.02)
    assert len(kept) > 0.1 * 40 * 500  # not starved by the unreached count


def test_prior_number_of_elements_follows_the_training_data(tmp_path):
    """The bundled mp_20 model draws too many binaries and too few quaternaries; 'auto' (the
    default for unconstrained sampling) gives the training data's distribution of the count,
    and a constrained request is left to the model."""
    from collections import Counter

    from pymatgen.core import Composition

    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.model.checkpoints import load_model

    m = load_model("mp_20")
    train = (m.element_counts / m.element_counts.sum()).numpy()

    def tvd(crystals) -> float:
        c = Counter(len(set(x.species.tolist())) for x in crystals)
        p = np.array([c.get(k, 0) for k in range(len(train))]) / len(crystals)
        return 0.5 * float(np.abs(p - train).sum())

    prior = sample_crystals(m, 1000, seed=0, symprec=None)
    own = sample_crystals(m, 1000, seed=0, symprec=None, num_elements="model")
    assert tvd(prior) < 0.04 < 0.08 < tvd(own)
    assert sum(c.meta["redraws"] for c in prior) > sum(c.meta["redraws"] for c in own)
    assert cli_main(["sample", "-n", "8", "--num-elements", "2", "--seed", "0",
                          "--out", str(tmp_path)]) == 0  # fmt: skip
    with open(tmp_path / "summary.csv") as f:
        formulas = [row["formula"] for row in csv.DictReader(f)]
    assert len(formulas) == 8 and all(len(Composition(f).elements) == 2 for f in formulas)
    with pytest.raises(ConstraintError, match="unconstrained sampling"):
        sample_crystals(m, 2, spacegroup=225, num_elements="prior")
    fixed = sample_crystals(m, 50, seed=1, spacegroup=225, symprec=None)
    same = sample_crystals(m, 50, seed=1, spacegroup=225, symprec=None, num_elements="model")
    assert [c.species.tolist() for c in fixed] == [c.species.tolist() for c in same]
