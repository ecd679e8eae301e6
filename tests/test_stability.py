"""CHGNet relaxation and reference hull, on a tiny Al-Ni system (relaxations are slow on CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pymatgen.analysis.phase_diagram import PDEntry
from pymatgen.core import Lattice, Structure

pytest.importorskip("chgnet", reason="needs the eval extra: pip install 'crystal-gpt[eval]'")

from crystal_gpt.evaluation import stability
from crystal_gpt.evaluation.stability import (
    ReferenceHull,
    displacement_rmsd,
    evaluate_stability,
    parse_systems,
    relax_structures,
    relaxation,
)


def b2_alni(a: float = 2.88) -> Structure:
    """AlNi in the CsCl (B2) structure: the stable phase of the Al-Ni system."""
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(a), ["Al", "Ni"], [[0] * 3, [0.5] * 3])


def l12_alni3(a: float = 3.57) -> Structure:
    """AlNi3 in the Cu3Au (L1_2) structure: Ni3Al, also on the hull."""
    return Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(a), ["Al", "Ni"], [[0] * 3, [0.5, 0.5, 0]]
    )


def expanded(s: Structure, factor: float) -> Structure:
    out = s.copy()
    out.scale_lattice(s.volume * factor**3)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shared resume cache: the elemental references are relaxed once per session."""
    return tmp_path_factory.mktemp("hull_work")


@pytest.fixture(scope="module")
def hull(work) -> ReferenceHull:
    """Al-Ni hull: B2 AlNi and L1_2 AlNi3 single points + relaxed ase fcc Al and fcc Ni."""
    stability.load_potential()
    return ReferenceHull.from_structures(
        [b2_alni(), l12_alni3()], ids=["AlNi", "AlNi3"], cache=work, progress=False
    )


def test_displacement_rmsd_ignores_periodic_images_and_rigid_shifts() -> None:
    s = b2_alni()
    moved = s.copy()
    moved.translate_sites([0, 1], [0.25, 1.0, -1.0], frac_coords=True)  # rigid shift + images
    assert displacement_rmsd(s, moved) == pytest.approx(0.0, abs=1e-9)
    moved = s.copy()
    moved.translate_sites([1], [0.1, 0, 0], frac_coords=True)  # Ni by 0.288 A
    # mean removed: each atom moves 0.144 A relative to the centre
    assert displacement_rmsd(s, moved) == pytest.approx(0.144, abs=1e-6)


def test_hull_elements_and_known_phases(hull: ReferenceHull) -> None:
    assert hull.elements == {"Al", "Ni"}
    assert hull.meta["elements_from_ase"] == ["Al", "Ni"]
    assert hull.meta["elements_without_reference"] == []
    e = dict(zip(hull.ids, hull.energy_per_atom, strict=True))
    pairs = [
        ("Al", e["ase-bulk-Al"]),  # the elemental reference itself
        (b2_alni(), e["AlNi"]),  # a hull phase
        ("Ni3Al", e["AlNi3"]),  # formula strings work too
    ]
    assert np.allclose(hull.e_above_hull(pairs), 0.0, atol=1e-6)
    # an entry object gives the same as a (composition, energy/atom) pair
    entry = PDEntry(b2_alni().composition, e["AlNi"] * 2 + 0.1)
    assert hull.e_above_hull([entry])[0] == pytest.approx(0.05, abs=1e-6)


def test_known_stable_binary_lands_near_a_hull_without_it(hull, work) -> None:
    """B2 AlNi, left out of the reference, sits on or below the Al-AlNi3-Ni hull."""
    small = ReferenceHull.from_structures([l12_alni3()], cache=work, progress=False)
    e_b2 = stability.single_point_energies([b2_alni()], progress=False)[0][0]
    e_hull = small.e_above_hull([(b2_alni(), e_b2)])[0]
    assert e_hull < 0.1
    assert e_hull < 0.0  # B2 AlNi is strongly stable: a new hull vertex for this reference


def test_strained_and_unreferenced_crystals(hull: ReferenceHull) -> None:
    strained = [expanded(b2_alni(), 1.25), expanded(l12_alni3(), 0.85)]
    energies, errors = stability.single_point_energies(strained, progress=False)
    assert errors == [None, None]
    above = hull.e_above_hull(list(zip(strained, energies, strict=True)))
    assert (above > 0.1).all()
    with pytest.warns(UserWarning, match="Cu"):
        out = hull.e_above_hull([("AlCu", -4.0), ("Al", math.nan), ("AlNi", -5.0)])
    assert math.isnan(out[0]) and math.isnan(out[1]) and math.isfinite(out[2])
    assert hull.last_missing == {"Cu": 1}


def test_save_and_load_roundtrip(hull: ReferenceHull, tmp_path) -> None:
    path = hull.save(tmp_path / "h.json")
    back = ReferenceHull.load("mp_20", path=path)
    pairs = [(expanded(b2_alni(), 1.1), -5.2), ("AlNi3", -5.6)]
    assert np.allclose(back.e_above_hull(pairs), hull.e_above_hull(pairs), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="crystal-gpt hull build --dataset perov_5"):
        ReferenceHull.load("perov_5")  # the test cache is empty and only mp_20's hull ships
    shipped = ReferenceHull.load("mp_20")  # from crystal_gpt/references when the cache has none
    assert len(shipped) > 19000 and len(shipped.elements) == 88


def test_relax_resume_and_failures(tmp_path, monkeypatch) -> None:
    stability.load_potential()
    lonely = Structure(Lattice.cubic(15.0), ["Ni"], [[0, 0, 0]])  # no neighbour: not a crystal
    crystals = [expanded(b2_alni(), 1.05), l12_alni3(3.5), lonely, expanded(b2_alni(), 1.05)]
    cache = tmp_path / "relax.jsonl"
    first = relax_structures(crystals, steps=40, cache=cache, progress=False)
    assert len(first) == 4
    ok = first[0]
    assert ok.ok and ok.structure is not None and ok.converged
    assert ok.energy_per_atom < ok.initial_energy_per_atom
    assert ok.structure.volume < crystals[0].volume  # the expanded cell shrinks back
    assert ok.rmsd < 0.05  # B2 atoms sit on fixed positions: only the cell relaxes
    assert first[1].ok
    assert not first[2].ok and first[2].error and math.isnan(first[2].energy_per_atom)
    assert first[3].energy_per_atom == ok.energy_per_atom  # duplicate relaxed once
    assert len(cache.read_text().splitlines()) == 3

    def boom(job):
        raise AssertionError("cached crystals must not be relaxed again")

    monkeypatch.setattr(relaxation, "_relax_job", boom)
    again = relax_structures(crystals, steps=40, cache=cache, progress=False)
    for a, b in zip(first, again, strict=True):
        assert a.error == b.error and a.converged == b.converged
        assert (a.energy_per_atom == b.energy_per_atom) or math.isnan(a.energy_per_atom)
        if a.structure is not None:
            assert a.structure == b.structure and a.rmsd == b.rmsd
    # a line cut short by a kill is ignored
    with open(cache, "a") as f:
        f.write('{"key": "trunc')
    assert len(stability.read_relax_cache(cache)) == 3
    json.loads(cache.read_text().splitlines()[0])


def test_a_killed_or_slow_relaxation_costs_that_crystal_only(tmp_path, monkeypatch) -> None:
    import os
    import signal
    import time

    stability.load_potential()
    relax = relaxation._relax

    def flaky(structure, steps, fmax, pressure=0.0):  # runs in the forked workers
        if structure.composition.reduced_formula == "AlNi3":
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        if len(structure) == 1:
            time.sleep(120)
        return relax(structure, steps, fmax, pressure)

    monkeypatch.setattr(relaxation, "_relax", flaky)
    crystals = [
        expanded(b2_alni(), 1.02),
        l12_alni3(),
        Structure(Lattice.cubic(2.5), ["Ni"], [[0] * 3]),
    ]
    cache = tmp_path / "relax.jsonl"
    t0 = time.perf_counter()
    res = relax_structures(crystals, steps=10, workers=2, cache=cache, progress=False, time_limit=6)
    assert time.perf_counter() - t0 < 60
    assert res[0].ok
    assert "worker died" in res[1].error and "time limit of 6 s" in res[2].error
    assert len(stability.read_relax_cache(cache)) == 3  # recorded: a resume does not retry them


def test_relax_in_worker_processes() -> None:
    crystals = [expanded(b2_alni(), 1.02), expanded(l12_alni3(), 1.02)]
    par = relax_structures(crystals, steps=20, workers=2, progress=False)
    seq = relax_structures(crystals, steps=20, workers=1, progress=False)
    for a, b in zip(par, seq, strict=True):
        assert a.ok and b.ok
        assert a.energy_per_atom == pytest.approx(b.energy_per_atom, abs=1e-4)


def test_evaluate_stability(hull: ReferenceHull) -> None:
    crystals = [expanded(b2_alni(), 1.04), Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])]
    out = evaluate_stability(
        crystals,
        hull=hull,
        steps=40,
        novel_mask=[True, True],
        unique_mask=[False, True],
        progress=False,
    )
    assert abs(out["e_above_hull"][0]) < 0.02  # relaxes back onto the hull
    assert math.isnan(out["e_above_hull"][1])  # Cu has no reference
    assert out["stable_0.1"] == 0.5 and out["stable_0.0"] + out["metastable"] == 0.5
    assert out["sun_rate"] == 0.0 and out["stable_novel_rate"] == 0.5
    assert out["n_failed"] == 0 and out["n_no_reference"] == 1
    assert out["missing_elements"] == {"Cu": 1}
    assert "CHGNet" in out["protocol"] and "fmax=0.1" in out["protocol"]
    with pytest.raises(ValueError, match="novel_mask"):
        evaluate_stability(crystals, hull=hull, novel_mask=[True])


def test_formation_energy_against_the_elemental_references(hull: ReferenceHull) -> None:
    e = dict(zip(hull.ids, hull.energy_per_atom, strict=True))
    mu_al, mu_ni = e["ase-bulk-Al"], e["ase-bulk-Ni"]
    out = hull.formation_energy(
        [("Al", mu_al), (b2_alni(), e["AlNi"]), ("Ni3Al", -5.0), ("AlCu", -4.0)]
    )
    assert out[0] == pytest.approx(0.0, abs=1e-9)
    assert out[1] == pytest.approx(e["AlNi"] - 0.5 * (mu_al + mu_ni), abs=1e-9)
    assert out[1] < -0.3  # B2 AlNi forms strongly
    assert out[2] == pytest.approx(-5.0 - 0.25 * mu_al - 0.75 * mu_ni, abs=1e-9)
    assert math.isnan(out[3])  # no copper reference


def test_relaxation_and_hull_under_pressure(work) -> None:
    """Under 50 GPa the cell shrinks, energies are enthalpies (E + PV) / N, the cache keys
    differ from 0 GPa's, and a hull built at that pressure puts B2 AlNi on it."""
    from crystal_gpt.evaluation.stability.relaxation import GPA_TO_EV_PER_A3, structure_key

    s = b2_alni()
    at0, at50 = (relax_structures([s], steps=60, progress=False, pressure=p)[0] for p in (0, 50))
    assert at0.ok and at50.ok
    assert at50.structure.volume < 0.9 * at0.structure.volume
    e50 = stability.single_point_energies([at50.structure], progress=False)[0][0]
    v50 = at50.structure.volume / len(at50.structure)
    assert at50.energy_per_atom == pytest.approx(e50 + 50 * GPA_TO_EV_PER_A3 * v50, abs=2e-3)
    assert structure_key(s, 60, 0.1) != structure_key(s, 60, 0.1, 50.0)
    assert structure_key(s, 60, 0.1) == structure_key(s, 60, 0.1, 0.0)  # old caches still hit
    hull = ReferenceHull.from_structures(
        [at50.structure], ids=["AlNi@50"], cache=work / "p50", progress=False, pressure=50.0
    )
    assert hull.meta["pressure_gpa"] == 50.0
    e = dict(zip(hull.ids, hull.energy_per_atom, strict=True))
    assert e["AlNi@50"] == pytest.approx(at50.energy_per_atom, abs=2e-3)
    assert hull.e_above_hull([(at50.structure, at50.energy_per_atom)])[0] <= 1e-6


def test_parse_systems_drops_contained_ones_and_names_bad_elements() -> None:
    assert parse_systems(["Ni-Al", "Al", {"Ni", "Al"}, "O-Fe", "Fe"]) == [
        frozenset({"Al", "Ni"}),
        frozenset({"Fe", "O"}),
    ]
    with pytest.raises(ValueError, match="Xx"):
        parse_systems(["Fe-Xx"])


def test_a_hull_built_for_some_systems_answers_exactly_there_and_refuses_others(
    hull: ReferenceHull, work, tmp_path
) -> None:
    """Restricted to Al-Ni, an Al-Cu crystal among the references is left out (and no Cu
    reference relaxed); Al-Ni energies above hull equal the full hull's; Al-Cu gets NaN, not a
    hull missing its competing phases; the restriction survives a save and load."""
    alcu = Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(2.95), ["Al", "Cu"], [[0] * 3, [0.5] * 3]
    )
    part = ReferenceHull.from_structures(
        [b2_alni(), l12_alni3(), alcu],
        ids=["AlNi", "AlNi3", "AlCu"],
        cache=work,
        progress=False,
        systems=["Al-Ni"],
    )
    assert "AlCu" not in part.ids and part.meta["n_crystals"] == 2
    assert part.meta["systems"] == ["Al-Ni"] and part.elements == {"Al", "Ni"}
    pairs = [(b2_alni(), -5.0), ("AlNi3", -5.5), ("Ni", -5.0)]
    assert np.allclose(part.e_above_hull(pairs), hull.e_above_hull(pairs), atol=1e-9)
    with pytest.warns(UserWarning, match="outside the chemical systems"):
        out = part.e_above_hull([("AlCu", -4.0), ("AlNi", -5.0)])
    assert math.isnan(out[0]) and math.isfinite(out[1]) and part.last_uncovered == 1
    with pytest.raises(ValueError, match="Al-Cu"):
        part.phase_diagram(["Al", "Cu"])
    back = ReferenceHull.load("mp_20", path=part.save(tmp_path / "part.json"))
    assert back.systems == [frozenset({"Al", "Ni"})] and not back.covers({"Cu"})
    assert "in 1 chemical systems" in back.describe()


def test_hull_build_takes_its_systems_from_named_ones_and_structure_files(tmp_path) -> None:
    from crystal_gpt.cli import _hull_systems, main

    b2_alni().to(filename=str(tmp_path / "a.cif"))
    Structure(Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
        filename=str(tmp_path / "b.cif")
    )
    assert _hull_systems(None, None) is None
    assert _hull_systems("Ni,Fe-O", [str(tmp_path)]) == [
        frozenset({"Al", "Ni"}),
        frozenset({"Fe", "O"}),
        frozenset({"Mg", "O"}),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["hull", "build", "--systems-from", str(empty), "--limit", "1"]) == 2


def test_pressure_stability_relaxes_the_hull_in_the_samples_systems(tmp_path) -> None:
    """The consistent treatment: a training crystal, relaxed like a sample, sits exactly on the
    hull built from the relaxed training materials of its chemical system (Mg-Y: two of them),
    and the hull answers for Mg-Y only."""
    from crystal_gpt.data.datasets import load_dataset
    from crystal_gpt.evaluation.pressure import _stability_at

    known = next(
        r.structure
        for r in load_dataset("alex_pressure", "train", pressures=[0])
        if {el.symbol for el in r.structure.composition.elements} == {"Mg", "Y"}
    )
    row = _stability_at([None, known], 0.0, 1, 1, tmp_path, False, hull_relax_steps=100)
    assert row["stability_n"] == 1 and row["relax_failed"] == 0
    assert abs(row["enthalpy_above_hull_median"]) < 1e-4
    assert row["stable_0.0"] == 1.0
    assert "in 1 chemical systems" in row["hull"] and "relaxed, steps<=100" in row["hull"]
    hull = ReferenceHull.load(path=tmp_path / "hull_0GPa.json")
    assert hull.meta["systems"] == ["Mg-Y"] and not hull.covers({"Mg", "O"})


def test_relax_and_rank_orders_by_e_hull_and_writes_relaxed_cifs(hull, tmp_path) -> None:
    """``crystal-gpt relax``: every crystal gets a row, ranked by E_hull (no reference last),
    relaxed CIFs that read back as the relaxed cells, and the CLI gives the same ranking."""
    import csv

    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.evaluation.stability.ranking import COLUMNS, relax_and_rank, write_ranked

    crystals = [
        Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]]),  # no copper reference: last
        expanded(l12_alni3(), 1.06),
        expanded(b2_alni(), 1.04),
    ]
    names = ["cu.cif", "alni3.cif", "alni.cif"]
    rows, relaxed = relax_and_rank(crystals, names, hull, steps=40, progress=False)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert {r["name"] for r in rows[:2]} == {"alni.cif", "alni3.cif"}
    assert rows[0]["e_above_hull"] <= rows[1]["e_above_hull"]
    assert rows[2]["name"] == "cu.cif" and rows[2]["e_above_hull"] == ""
    assert rows[2]["stable"] == 0 and rows[2]["formation_energy_per_atom"] == ""
    for r in rows[:2]:  # both relax back onto the hull, shrinking, keeping their group
        assert abs(r["e_above_hull"]) < 0.02 and r["stable"] == 1
        assert r["volume_change"] < 0
        assert r["spacegroup_before"] == r["spacegroup_after"] == 221
    b2 = next(r for r in rows if r["name"] == "alni.cif")
    assert b2["formation_energy_per_atom"] < -0.3  # B2 AlNi forms strongly
    csv_path = write_ranked(rows, relaxed, tmp_path / "r")
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and len(table) == 3
    back = Structure.from_file(tmp_path / "r" / table[0]["cif"])
    assert back.volume == pytest.approx(relaxed[0].volume, rel=1e-4)
    # the command: a folder of CIFs in, the same ranking out (the hull given as a file)
    src = tmp_path / "in"
    src.mkdir()
    for s, name in zip(crystals, names, strict=True):
        s.to(filename=str(src / name))
    hull_file = hull.save(tmp_path / "hull.json")
    out = tmp_path / "cli"
    args = ["relax", str(src), "--hull", str(hull_file), "--steps", "40", "--workers", "1"]
    assert cli_main([*args, "--out", str(out), "--quiet"]) == 0
    with open(out / "relaxed.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["name"] for r in table[:2]} == {"alni.cif", "alni3.cif"}
    assert table[2]["name"] == "cu.cif" and table[2]["e_above_hull"] == ""
    assert len(list((out / "cif").glob("*.cif"))) == 3
    assert cli_main([*args, "--out", str(tmp_path / "x"), "--steps", "0"]) == 2
