"""Calibration of the evaluation suite: the CDVAE rules on hand-made and real crystals, a split
evaluated against itself, uniqueness/novelty, the report and the CLI (small subsets: fast)."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

pytest.importorskip("smact")
pytest.importorskip("matminer")

from crystal_gpt import load_dataset
from crystal_gpt.evaluation import metrics
from crystal_gpt.evaluation.features import featurize
from crystal_gpt.evaluation.readers import load_structures
from crystal_gpt.evaluation.references import TrainingSet
from crystal_gpt.evaluation.suite import evaluate


def rocksalt(a: float = 5.64, species=("Na", "Cl")) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), list(species), [[0] * 3, [0.5] * 3])


def cscl() -> Structure:
    return Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def mp20_test_subset():
    return load_dataset("mp_20", "test", limit=300)


@pytest.fixture(scope="module")
def mp20_features(mp20_test_subset):
    structures = mp20_test_subset.structures[:30]
    return featurize(structures, workers=2, progress=False)


# --- validity --------------------------------------------------------------------------------


def test_structural_validity_catches_close_atoms_across_the_cell_boundary():
    assert metrics.structure_validity(rocksalt())
    close = Structure(Lattice.cubic(6.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])  # 0.3 A
    assert not metrics.structure_validity(close)
    wrapped = Structure(Lattice.cubic(10.0), ["Na", "Cl"], [[0.01, 0, 0], [0.99, 0, 0]])  # 0.2 A
    assert not metrics.structure_validity(wrapped)
    tiny = Structure(Lattice.cubic(0.4), ["Si"], [[0, 0, 0]])  # 0.064 A^3
    assert not metrics.is_constructed(tiny) and not metrics.structure_validity(tiny)
    assert metrics.structure_validity(Structure(Lattice.cubic(2.5), ["Si"], [[0, 0, 0]]))


# verdicts that follow from the rule's definition (SMACT oxidation states, Pauling test)
HAND_PICKED = {
    "NaCl": True,  # Na+ Cl-
    "Fe2O3": True,  # Fe3+ O2-
    "LiFePO4": True,  # Li+ Fe2+ P5+ O2-
    "BaTiO3": True,  # Ba2+ Ti4+ O2-
    "MgF2": True,
    "Fe3Al": True,  # metals only
    "Cu3Au": True,  # metals only
    "Si": True,  # one element
    "C": True,
    "NaCl2": False,  # 1 + 2x = 0 has no solution in Cl's states
    "Na2Cl": False,  # Na only +1, Cl's only negative state -1
    "KO2": False,  # 1 + 2x = 0: no integer state of O
    "Mg2Cl": False,  # Mg only +2
    "ArF2": False,  # Ar has no SMACT oxidation states
}


def test_smact_rule_on_hand_picked_formulas():
    got = {f: metrics.smact_validity(f) for f in HAND_PICKED}
    assert got == HAND_PICKED
    assert metrics.smact_validity("Na2Cl2") is True  # counts are reduced by their gcd first


def _cdvae_rule(formula) -> bool:
    """The rule with the installed SMACT's ICSD-2024 table, written out literally: every
    oxidation-state combination in turn (the 2014 rule: tests/test_smact_rule.py)."""
    import smact
    from smact.screening import pauling_test

    comp = formula.element_composition
    items = sorted(comp.items(), key=lambda kv: kv[0].Z)
    counts = np.array([round(v) for _, v in items])
    counts = counts // np.gcd.reduce(counts)
    symbols = [e.symbol for e, _ in items]
    if len(symbols) == 1 or all(s in smact.metals for s in symbols):
        return True
    elements = [smact.Element(s) for s in symbols]
    for ox in itertools.product(*[e.oxidation_states_icsd24 or [] for e in elements]):
        neutral = smact.neutral_ratios(
            ox, stoichs=[(int(c),) for c in counts], threshold=max(counts)
        )
        if neutral and pauling_test(ox, [e.pauling_eneg for e in elements]):
            return True
    return False


def test_icsd24_rule_matches_a_literal_reimplementation(mp20_test_subset):
    comps = [r.structure.composition for r in mp20_test_subset][:200]
    ours = [metrics.smact_validity(c, "icsd24") for c in comps]
    assert ours == [_cdvae_rule(c) for c in comps]


def test_mp20_subset_is_valid_like_the_published_ceiling(mp20_test_subset):
    structures = mp20_test_subset.structures
    struct = np.array([metrics.structure_validity(s) for s in structures])
    comp = np.array([metrics.smact_validity(s.composition) for s in structures])
    assert struct.all()
    assert 0.80 <= comp.mean() <= 0.97  # MP-20 itself is ~90% valid by this rule
    # property statistics use valid crystals only, so a split against itself is close, not 0
    idx = metrics.property_subset(struct & comp, 1000, seed=0)
    density = np.array([s.density for s in structures])
    n_el = np.array([len(s.composition.elements) for s in structures])
    assert metrics.wasserstein(density[idx], density) < 0.25
    assert metrics.wasserstein(n_el[idx], n_el) < 0.1


# --- a split against itself --------------------------------------------------------------


def test_split_subset_against_itself(mp20_features):
    f = mp20_features
    assert f.struct_valid.all() and f.fp_ok.all()
    assert f.struct_fp.shape == (30, 61) and f.comp_fp.shape == (30, 132)
    cov = metrics.coverage(
        f.struct_fp, f.comp_fp, f.struct_fp, f.comp_fp, *metrics.COV_CUTOFFS["mp_20"]
    )
    assert cov["cov_recall"] == 1.0 and cov["cov_precision"] == 1.0
    assert cov["amsd_recall"] == pytest.approx(0.0, abs=1e-9)
    assert metrics.wasserstein(f.density, f.density) == 0.0
    sym = metrics.symmetry_statistics(f.spacegroup, f.spacegroup)
    assert sym["spacegroup_tvd"] == 0.0 and sym["symmetry_failures"] == 0


def test_coverage_precision_counts_every_generated_crystal(mp20_features):
    f = mp20_features
    cov = metrics.coverage(f.struct_fp[:10], f.comp_fp[:10], f.struct_fp, f.comp_fp, 0.4, 10.0, 20)
    assert cov["cov_precision"] == 0.5  # 10 close crystals, 10 more whose fingerprints failed
    assert cov["cov_recall"] < 1.0


def test_property_subset_is_seeded_and_valid_only():
    valid = np.arange(3000) % 3 != 0
    a, b = metrics.property_subset(valid, 1000, 7), metrics.property_subset(valid, 1000, 7)
    assert len(a) == 1000 and np.array_equal(a, b) and valid[a].all()
    assert not np.array_equal(a, metrics.property_subset(valid, 1000, 8))


def test_symmetry_statistics():
    sym = metrics.symmetry_statistics([1, 1, 225, 225], [225, 225, 194, 194])
    assert sym["p1_share"] == 0.5 and sym["spacegroup_tvd"] == pytest.approx(0.5)
    assert metrics.symmetry_statistics([2], [3])["spacegroup_tvd"] == 1.0


# --- uniqueness and novelty -----------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_uniqueness_with_duplicates(workers):
    nacl = rocksalt()
    supercell = rocksalt().make_supercell([2, 1, 1])  # the same crystal in a bigger cell
    strained = rocksalt(5.70)  # within the default tolerances
    kcl = rocksalt(6.29, ("K", "Cl"))
    kcl2 = rocksalt(6.30, ("K", "Cl"))
    mask = metrics.unique_mask([nacl, cscl(), supercell, kcl, strained, kcl2], workers=workers)
    assert mask.tolist() == [True, True, False, True, False, False]


def test_uniqueness_when_the_matcher_fails_on_a_crystal():
    """group_structures raises for a whole formula when one cell breaks the matcher: that
    crystal becomes a class of its own and the others are still grouped."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    class Fragile(StructureMatcher):
        def _get_reduced_structure(self, struct, primitive_cell=True, niggli=True):
            if struct.lattice.a > 50:
                raise ValueError("cannot reduce")
            return super()._get_reduced_structure(struct, primitive_cell, niggli)

    crystals = [rocksalt(), rocksalt(60.0), rocksalt(5.70), rocksalt(6.29, ("K", "Cl"))]
    assert metrics.unique_mask(crystals, Fragile()).tolist() == [True, True, False, True]


def test_training_crystals_are_not_novel():
    train = load_dataset("mp_20", "train", limit=40).structures
    ts = TrainingSet("mp_20", "train", limit=40, workers=1, progress=False)
    assert len(ts) == 40
    lookup = ts.structures_for({s.composition.reduced_formula for s in train})
    assert not metrics.novel_mask(train, lookup).any()
    assert not metrics.novel_mask(train, lookup, workers=2).any()
    assert metrics.novel_mask([rocksalt(5.0, ("Li", "I"))], lookup).all()


def test_sun_rates_need_all_three():
    e = [0.0, 0.05, 0.09, math.nan]
    unique = np.array([True, True, True, True])
    novel = np.array([True, False, True, True])
    r = metrics.sun_rates(e, unique, novel)
    assert r == {"sun_0": 0.25, "sun_0.08": 0.25, "sun_0.1": 0.5}


# --- input, report and CLI ------------------------------------------------------------------


def test_load_structures_reports_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_structures(tmp_path / "missing")
    (tmp_path / "good.cif").write_text(rocksalt().to(fmt="cif"))
    (tmp_path / "bad.cif").write_text("data_x\n_cell_length_a 1\nnot a cif\n")
    got = load_structures(tmp_path, progress=False)
    assert len(got.structures) == 1 and got.names == ["good.cif"]
    assert len(got.errors) == 1 and got.errors[0][0].endswith("bad.cif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no summary\.csv, CIF files"):
        load_structures(tmp_path / "empty")


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory, mp20_test_subset):
    """A `crystal-gpt sample`-style folder (summary.csv, cif/, samples.extxyz) of 8 crystals,
    the last one with two atoms 0.3 A apart."""
    from crystal_gpt.data.codec import encode
    from crystal_gpt.sampling.output import write_samples

    crystals = [encode(s) for s in mp20_test_subset.structures[100:107]]
    crystals.append(encode(Structure(Lattice.cubic(6.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])))
    out = tmp_path_factory.mktemp("samples")
    return write_samples(crystals, out)


def test_cli_evaluate_writes_report(sample_folder, tmp_path):
    from crystal_gpt.cli import main

    out = tmp_path / "rep"
    argv = [
        "evaluate", str(sample_folder), "--dataset", "mp_20", "--reference-limit", "20",
        "--out", str(out), "--workers", "2", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["crystals"] == 8 and m["unreadable"] == 0
    assert m["validity"]["struct_valid"] == pytest.approx(100 * 7 / 8, abs=0.01)
    assert m["reference_crystals"] == 20 and m["uniqueness_novelty"]["train_crystals"] == 20
    report = (out / "report.md").read_text()
    assert "COV-R" in report and "CDVAE (published)" in report
    assert "Not comparable with the published tables**: 8 generated" in report
    assert m["comparable"] is False and len(m["departures"]) == 3  # crystals, property, limit
    for name in ("density.png", "num_elements.png", "lattice.png", "spacegroups.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "report.html").exists() and (out / "crystals.csv").exists()
    # per crystal, the distances behind COV-P: its covered rows are the COV-P share
    with open(out / "crystals.csv") as f:
        rows = list(csv.DictReader(f))
    covered = [r["covered"] == "True" for r in rows]
    assert 100 * sum(covered) / 8 == pytest.approx(m["coverage"]["cov_precision"], abs=0.01)
    for r, c in zip(rows, covered, strict=True):
        if r["nearest_struct"] == "":
            assert not c and r["fingerprint"] == "False"
        else:
            assert c == (float(r["nearest_struct"]) <= 0.4 and float(r["nearest_comp"]) <= 10)
    assert main(["evaluate", str(tmp_path / "nope"), "--quiet"]) == 2


def test_cli_evaluate_reports_beside_the_samples(sample_folder, tmp_path, monkeypatch):
    """Without --out the report goes next to what it judges, not into the working folder."""
    import shutil

    from crystal_gpt.cli import default_report_folder, main

    assert default_report_folder(sample_folder) == sample_folder / "evaluation"
    assert default_report_folder(tmp_path / "x.extxyz") == tmp_path / "x_evaluation"
    samples = tmp_path / "mine"
    shutil.copytree(sample_folder, samples)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv = ["evaluate", str(samples), "--reference-limit", "20", "--no-novelty", "--quiet"]
    assert main(argv) == 0
    assert (samples / "evaluation" / "metrics.json").exists()
    assert not (tmp_path / "elsewhere" / "evaluation").exists()
    # evaluating the folder again reads the same crystals: the report is not taken for samples
    assert main(argv) == 0
    m = json.loads((samples / "evaluation" / "metrics.json").read_text())
    assert m["crystals"] == 8


def test_report_takes_stability_results(sample_folder, tmp_path):
    ev = evaluate(sample_folder, "mp_20", reference_limit=20, workers=2, progress=False)
    e = [0.0] * 4 + [0.3] * 3 + [math.nan]
    stability = {"e_above_hull": e, "stable_0.1": 4 / 8, "rmsd_mean": 0.1}
    out = ev.write_report(tmp_path / "rep", stability=stability)
    report = (out / "report.md").read_text()
    assert "## Stability" in report and "stable_0.1 %" in report and "S.U.N." in report
    assert (out / "e_above_hull.png").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert "e_above_hull" not in m["stability"] and m["stability"]["stable_0.1"] == 0.5


def test_comparable_only_when_every_condition_holds():
    from crystal_gpt.evaluation.suite import protocol_departures

    ok = dict(
        dataset="mp_20",
        generated=10_000,
        n_property_used=1000,
        reference_split="test",
        reference_limit=None,
        cutoffs_given=False,
        oxidation_table="smact14",
    )
    assert protocol_departures(**ok) == []
    for key, bad, words in [
        ("generated", 9_999, "9999 generated"),
        ("n_property_used", 640, "640 valid"),
        ("reference_split", "val", "'val'"),
        ("reference_limit", 50, "first 50"),
        ("cutoffs_given", True, "cutoffs given"),
        ("oxidation_table", "icsd24", "'icsd24'"),
        ("dataset", "mine.csv", "no published table"),
    ]:
        got = protocol_departures(**dict(ok, **{key: bad}))
        assert len(got) == 1 and words in got[0], (key, got)


def _square_or_fail(x):
    import os
    import signal
    import time

    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    if x == 5:
        time.sleep(60)
    if x == 7:
        raise ValueError("seven")
    return x * x


def test_supervised_workers_lose_only_the_failing_job():
    from crystal_gpt.utils import JobFailure, supervised_map

    got = dict(supervised_map(_square_or_fail, range(10), workers=2, time_limit=2))
    assert sorted(got) == list(range(10))
    assert [got[i] for i in (0, 1, 2, 4, 6, 8, 9)] == [0, 1, 4, 16, 36, 64, 81]
    assert isinstance(got[3], JobFailure) and "died" in got[3].reason
    assert isinstance(got[5], JobFailure) and "time limit" in got[5].reason
    assert got[7] == JobFailure("ValueError: seven")


def test_featurize_survives_a_dying_worker(monkeypatch, mp20_test_subset):
    import os
    import signal

    from crystal_gpt.evaluation import features

    real = features.crystal_features

    def dies_on_b(structure, name="", fingerprints=True):
        if name == "b":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(structure, name, fingerprints)

    monkeypatch.setattr(features, "crystal_features", dies_on_b)
    structures = mp20_test_subset.structures[:3]
    table = features.featurize(
        structures, ["a", "b", "c"], fingerprints=False, workers=2, progress=False
    )
    assert list(table.ids) == ["a", "b", "c"]
    assert table.struct_valid[0] and table.struct_valid[2] and not table.struct_valid[1]
    assert "worker died" in str(table.fp_error[1]) and table.formula[1] != ""


def test_an_unreadable_cif_counts_as_an_invalid_crystal(tmp_path, mp20_test_subset):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i, s in enumerate(mp20_test_subset.structures[:3]):
        s.to(filename=str(folder / f"c{i}.cif"))
    (folder / "c3.cif").write_text("data_broken\n_cell_length_a 3\nloop_\n_atom_site_label\n")
    ev = evaluate(folder, "mp_20", reference_limit=20, train_split=None, workers=2, progress=False)
    v = ev.metrics["validity"]
    assert ev.metrics["unreadable"] == 1 and ev.metrics["crystals"] == 3
    assert v["struct_valid"] == 75.0 and v["struct_valid_readable_only"] == 100.0
    assert "4 generated crystals" in " ".join(ev.metrics["departures"])
    # test crystals scored against their own split: each one's nearest reference is itself
    assert ev.nearest_struct == pytest.approx([0.0] * 3, abs=1e-9)
    assert ev.nearest_comp == pytest.approx([0.0] * 3, abs=1e-9)
    assert all(r["covered"] for r in ev.crystal_table())


def test_evaluate_checks_out_before_any_work_and_clears_an_old_report(
    sample_folder, tmp_path, capsys
):
    import time

    from crystal_gpt.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for command in (["evaluate", str(sample_folder)], ["evaluate-csp", "-k", "1"]):
        t0 = time.perf_counter()
        assert main([*command, "--out", str(blocker / "below")]) == 2
        assert "cannot write there" in capsys.readouterr().err
        assert main([*command, "--out", str(blocker)]) == 2
        assert "exists and is not a folder" in capsys.readouterr().err
        assert time.perf_counter() - t0 < 5  # refused before loading or featurising anything
    out = tmp_path / "rep"
    out.mkdir()
    (out / "e_above_hull.png").write_bytes(b"old")  # from an earlier --stability run
    (out / "relaxations.jsonl").write_text("")  # the resume cache stays
    argv = ["evaluate", str(sample_folder), "--reference-limit", "20", "--no-novelty",
            "--workers", "2", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert not (out / "e_above_hull.png").exists() and (out / "relaxations.jsonl").exists()
