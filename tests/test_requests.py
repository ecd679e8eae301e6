"""Samples are what was asked for: symmetry, cells, elements and sizes within what was seen."""

import copy

import numpy as np
import pytest
import spglib
import torch

import crystal_gpt.sampling.sampler as sampler
from crystal_gpt import decode
from crystal_gpt.data.symmetry import lattice_points
from crystal_gpt.sampling.constraints import ConstraintError
from crystal_gpt.sampling.sampler import sample_crystals


def spglib_group(crystal) -> int:
    s = decode(crystal)
    ds = spglib.get_symmetry_dataset(
        (s.lattice.matrix, s.frac_coords, [sp.Z for sp in s.species]), symprec=0.01
    )
    return int(ds.number)


def test_written_symmetry_is_the_sampled_group(model):
    crystals = sample_crystals(model, 60, spacegroup=225, elements=["Na", "Cl"], seed=0)
    assert all(spglib_group(c) == 225 for c in crystals)
    # the untrained model often puts one element on 4a + 4b (simple cubic, Pm-3m): redrawn
    assert sum(c.meta["redraws"] for c in crystals) > 0
    # without the check, such crystals do come out
    raw = sample_crystals(model, 60, spacegroup=225, elements=["Na", "Cl"], seed=0, symprec=None)
    assert any(spglib_group(c) != 225 for c in raw)


def test_impossible_cells_are_redrawn_not_fatal(model, monkeypatch):
    real = sampler._sample_lattice
    calls = []

    def broken_first(*args):
        lat = real(*args)
        if not calls:
            lat[0] = torch.tensor([3.0, 3.0, 3.0, 170.0, 170.0, 170.0])  # no such cell
        calls.append(1)
        return lat

    monkeypatch.setattr(sampler, "_sample_lattice", broken_first)
    crystals = sample_crystals(model, 20, spacegroup=[1, 2], seed=0)
    assert len(crystals) == 20 and crystals[0].meta["redraws"] >= 1
    for c in crystals:
        decode(c)


@pytest.fixture
def narrow(model):
    m = copy.deepcopy(model)
    m.seen_elements.zero_()
    m.seen_elements[[3, 8, 26]] = True  # Li, O, Fe
    m.atoms_range.copy_(torch.tensor([2, 6]))
    return m


def per_cell(c) -> float:
    return c.num_atoms / lattice_points(c.spacegroup)


def test_training_range_by_default(narrow):
    crystals = sample_crystals(narrow, 40, seed=0)
    assert {int(z) for c in crystals for z in c.species} <= {3, 8, 26}
    assert all(2 <= per_cell(c) <= 6 for c in crystals)
    free = sample_crystals(narrow, 40, seed=0, allow_unseen=True, symprec=None)
    assert {int(z) for c in free for z in c.species} - {3, 8, 26}
    assert any(per_cell(c) > 6 or per_cell(c) < 2 for c in free)


def test_explicit_requests_outside_the_range_warn(narrow):
    with pytest.warns(UserWarning, match="not in this model's training data: Na"):
        crystals = sample_crystals(narrow, 10, seed=0, elements=["Na", "O"])
    assert any(11 in c.species for c in crystals)
    with pytest.warns(UserWarning, match="outside this model's training range 2-6"):
        sample_crystals(narrow, 5, seed=0, num_atoms="8-10")
    # far outside (more than 3x the largest training cell): refused up front, unless asked for
    with pytest.raises(ConstraintError, match="19 atoms per primitive cell: this model was"):
        sample_crystals(narrow, 1, seed=0, num_atoms="19-30")
    with pytest.raises(ConstraintError, match="20 atoms per primitive cell"):
        sample_crystals(narrow, 1, seed=0, composition="Li10O10")


def test_chemsys_gives_exactly_those_elements(model):
    crystals = sample_crystals(model, 40, chemsys="Li-Fe-O", seed=0)
    for c in crystals:
        assert sorted({int(z) for z in c.species}) == [3, 8, 26]
    # elements= keeps its meaning: allowed, not required
    loose = sample_crystals(model, 40, elements=["Li", "Fe", "O"], seed=0)
    assert any(len(set(c.species.tolist())) < 3 for c in loose)
    with pytest.raises(ConstraintError, match="unknown element 'Xx'"):
        sample_crystals(model, 1, chemsys="Li-Xx")
    with pytest.raises(ConstraintError, match="excluded"):
        sample_crystals(model, 1, chemsys="Li-O", exclude_elements=["O"])
    assert np.isfinite([per_cell(c) for c in crystals]).all()


def test_contains_puts_those_elements_in_every_crystal_and_leaves_the_others_free(model):
    crystals = sample_crystals(model, 40, contains="O", seed=0)
    assert all(8 in {int(z) for z in c.species} for c in crystals)
    assert len({int(z) for c in crystals for z in c.species}) > 5  # the others stay free
    assert sum(c.meta["redraws"] for c in crystals) > 40  # O is rare for an untrained model
    # exact conditioning: the sites of crystals drawn to contain O are distributed as those of
    # unconstrained draws that happen to contain it (a mask on the end would add sites)
    from scipy.stats import mannwhitneyu

    kw = dict(elements="Li,Fe,P,O", min_distance=0, symprec=None)
    asked = sample_crystals(model, 300, contains="O", seed=3, **kw)
    drawn = sample_crystals(model, 600, seed=4, **kw)
    free = [c for c in drawn if 8 in set(c.species.tolist())]
    assert len(free) > 150

    def sites(crystals):
        return [len(c.species) for c in crystals]

    assert mannwhitneyu(sites(asked), sites(free)).pvalue > 1e-3
    assert mannwhitneyu(sites(asked), sites(drawn)).pvalue < 1e-3  # the test can tell
    # combined with a chemical system
    crystals = sample_crystals(model, 20, contains=["O"], chemsys="Li-O", seed=1)
    assert all(sorted({int(z) for z in c.species}) == [3, 8] for c in crystals)
    # within an element list, every crystal holds both, the list's others only sometimes
    crystals = sample_crystals(model, 30, contains="Li,O", elements="Li,Fe,P,O", seed=2)
    assert all({3, 8} <= {int(z) for z in c.species} <= {3, 8, 15, 26} for c in crystals)
    with pytest.raises(ConstraintError, match="unknown element 'Xx'"):
        sample_crystals(model, 1, contains="Xx")
    with pytest.raises(ConstraintError, match="excluded"):
        sample_crystals(model, 1, contains="O", exclude_elements=["O"])
    with pytest.raises(ConstraintError, match="excluded"):
        sample_crystals(model, 1, contains="O", elements="Li,Fe")
    with pytest.raises(ConstraintError, match="does not contain"):
        sample_crystals(model, 1, contains="O", composition="LiFe")
    with pytest.raises(ConstraintError, match="3 must be contained"):
        sample_crystals(model, 1, contains="Li,Fe,O", num_elements=2)
    with pytest.raises(ConstraintError, match="the template has 1"):
        sample_crystals(model, 1, contains="Li,O", spacegroup=225, wyckoff_template="4a")


def test_cli_symmetry_check_can_be_skipped(tmp_path):
    import csv

    from crystal_gpt.cli import main

    redraws = {}
    for flag in ([], ["--skip-symmetry-check"]):
        out = tmp_path / ("skip" if flag else "check")
        # without the distance rule, whose dead ends are redrawn whether or not symmetry is,
        # and with the model's own numbers of elements (the default's rejection redraws too)
        args = ["sample", "-n", "300", "--seed", "0", "--min-distance", "0",
                "--num-elements", "model", "--out", str(out)]  # fmt: skip
        assert main([*args, *flag]) == 0
        with open(out / "summary.csv") as f:
            redraws[bool(flag)] = sum(int(r["redraws"]) for r in csv.DictReader(f))
    assert redraws[False] > 0 and redraws[True] == 0


def test_the_symmetry_check_agrees_with_spglib(model, monkeypatch):
    """The sampler's check (moyopy where installed) gives spglib's space group on sampled
    crystals, unchecked ones included (where higher symmetries occur), and uses spglib alone
    when moyopy is missing."""
    from crystal_gpt.data.codec import expand
    from crystal_gpt.data.symmetry import space_group_number

    raw = sample_crystals(model, 80, seed=3, symprec=None)
    raw += sample_crystals(model, 40, spacegroup=225, elements=["Na", "Cl"], seed=0, symprec=None)
    found = [space_group_number(expand(c), 0.01) for c in raw]

    def by_spglib(c):  # None where spglib finds nothing (atoms on top of each other)
        ds = spglib.get_symmetry_dataset(expand(c), symprec=0.01)
        return None if ds is None else int(ds.number)

    def overlapping(c):  # two atoms within symprec: the check refuses, spglib may merge them
        matrix, frac, _ = expand(c)
        d = frac[:, None] - frac[None]
        d -= np.rint(d)
        dist = np.linalg.norm(d @ matrix, axis=-1) + np.eye(len(frac))
        return dist.min() < 0.01

    close = [overlapping(c) for c in raw]
    assert all(f is None for f, o in zip(found, close, strict=True) if o)
    assert [f for f, o in zip(found, close, strict=True) if not o] == [
        by_spglib(c) for c, o in zip(raw, close, strict=True) if not o
    ]
    # the test has power: higher symmetries, and atoms on top of each other (no group)
    assert any(f not in (None, c.spacegroup) for f, c in zip(found, raw, strict=True))
    assert None in found
    import crystal_gpt.data.symmetry as symmetry

    monkeypatch.setattr(symmetry, "_moyopy", lambda: None)  # not installed: spglib
    assert [space_group_number(expand(c), 0.01) for c in raw[:20]] == found[:20]
