import json
import math

import numpy as np
from pymatgen.core import Lattice, Structure

from crystal_gpt.evaluation.csp import (
    CSPResult,
    _rms_distances,
    crystal_validity,
    evaluate_csp,
    primitive_composition,
    rank_candidates,
)
from crystal_gpt.model.checkpoints import load_model


def _rocksalt(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3]
    )


def test_primitive_composition_and_matching_calibration():
    conventional = _rocksalt()
    assert len(conventional) == 8 and primitive_composition(conventional) == {"Na": 1, "Cl": 1}
    cscl = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    shaken = conventional.copy()
    shaken.perturb(0.05, min_distance=0.05)
    rms = _rms_distances(
        (conventional.get_primitive_structure(), [conventional, shaken, cscl, None])
    )
    assert rms[0] < 1e-6 and 0 < rms[1] < 0.1  # supercell/primitive and a small shake match
    assert math.isnan(rms[2]) and math.isnan(rms[3])  # another structure type; a failed sample


def test_csp_summary_arithmetic(tmp_path):
    nan = math.nan
    rms = np.array([[0.1, nan, 0.3], [nan, 0.2, 0.05], [nan, nan, nan], [nan, nan, nan]])
    valid = np.ones((4, 3), dtype=bool)
    res = CSPResult(["a", "b", "c", "d"], ["X", "Y", "Z", "W"], rms,
                    np.array([True, True, True, False]), valid, np.ones(4, bool),
                    protocol="p")  # fmt: skip
    s = res.summary()
    assert s["match_rate@1"] == 0.25 and math.isclose(s["rmse@1"], 0.1)
    assert s["match_rate@3"] == 0.5 and math.isclose(s["rmse@3"], (0.1 + 0.05) / 2)
    assert s["ungated"]["match_rate@3"] == s["match_rate@3"]
    assert s["infeasible_compositions"] == 1
    res.write(tmp_path)
    assert json.loads((tmp_path / "csp.json").read_text())["targets"] == 4
    assert "match rate @3" in (tmp_path / "csp.md").read_text()
    assert len((tmp_path / "csp.csv").read_text().splitlines()) == 5


def test_csp_validity_gate():
    nan = math.nan
    rms = np.array([[0.1, nan, 0.3], [0.2, 0.1, 0.05], [0.3, nan, nan]])
    valid = np.array([[False, True, True], [True, True, False], [True, True, True]])
    target_valid = np.array([True, True, False])
    res = CSPResult(["a", "b", "c"], ["X", "Y", "Z"], rms, np.ones(3, bool), valid, target_valid)
    s = res.summary()
    # @1: a's prediction is invalid, c's target is invalid; only b counts (0.2).
    assert math.isclose(s["match_rate@1"], 1 / 3) and math.isclose(s["rmse@1"], 0.2)
    # @3: a keeps 0.3 (valid), b loses 0.05 (invalid) and keeps 0.1, c keeps 0.3.
    assert s["match_rate@3"] == 1.0 and math.isclose(s["rmse@3"], (0.3 + 0.1 + 0.3) / 3)
    assert s["ungated"]["match_rate@1"] == 1.0
    assert math.isclose(s["ungated"]["rmse@3"], (0.1 + 0.05 + 0.3) / 3)
    assert s["invalid_targets"] == 1 and math.isclose(s["valid_predictions"], 7 / 9)
    # CDVAE's Crystal.valid: both rules, and a failed sample is invalid.
    assert crystal_validity(_rocksalt()) and not crystal_validity(None)
    assert not crystal_validity(Structure(Lattice.cubic(5), ["Na", "Cl"], [[0] * 3, [0.05] * 3]))
    assert not crystal_validity(Structure(Lattice.cubic(5), ["Na", "Na", "Cl"],
                                          [[0] * 3, [0.5] * 3, [0.25] * 3]))  # fmt: skip


def test_ranked_candidates_most_often_drawn_first_ties_by_mass():
    """Rock salt drawn three times (supercell, shaken, rescaled), CsCl twice, a failed sample,
    zinc blende twice (told apart from rock salt by its group): rock salt first, represented by
    its most probable geometry (density); CsCl and zinc blende tie on counts, the larger
    discrete mass first; then the other draws of each structure in that order; never the None."""
    shaken = _rocksalt()
    shaken.perturb(0.05, min_distance=0.05)
    cscl = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    zb = Structure.from_spacegroup("F-43m", Lattice.cubic(6.0), ["Na", "Cl"], [[0] * 3, [0.25] * 3])
    draws = [_rocksalt(), cscl, shaken, None, zb, _rocksalt(5.9).get_primitive_structure(),
             cscl.copy(), zb.copy()]  # fmt: skip
    groups = [225, 221, 225, 0, 216, 225, 221, 216]
    mass = [-1.0, -3.0, -1.0, 0.0, -2.0, -1.0, -3.0, -2.0]
    density = [5.0, 1.0, 2.0, 0.0, 3.0, 9.0, 4.0, 1.0]
    assert rank_candidates(draws, groups, mass, density) == [5, 4, 6, 0, 2, 7, 1]
    assert rank_candidates(draws, groups, mass)[:3] == [0, 4, 1]  # ties: the first drawn
    assert rank_candidates([None, None], [0, 0], [0.0, 0.0]) == []


def test_candidate_clusters_match_plain_structure_matcher_decisions():
    """The clustering reduces each sample once and fits without the matcher's reduction: the
    same decisions as ``StructureMatcher.fit`` on the raw structures, here on shaken rock-salt
    cells (conventional and primitive) up to and past the matcher's tolerance."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystal_gpt.evaluation.csp import MATCHER, candidate_clusters

    rng = np.random.default_rng(0)
    draws = []
    for amp in (0.0, 0.2, 0.5, 0.9):
        for cell in (_rocksalt(), _rocksalt(5.9).get_primitive_structure()):
            shaken = cell.cart_coords + rng.normal(0, amp, (len(cell), 3))
            draws.append(Structure(cell.lattice, cell.species, shaken, coords_are_cartesian=True))
    matcher = StructureMatcher(**MATCHER)
    expected: list[list[int]] = []
    for i, s in enumerate(draws):  # the greedy loop on plain fits
        for c in expected:
            if matcher.fit(draws[c[0]], s):
                c.append(i)
                break
        else:
            expected.append([i])
    got = candidate_clusters(draws, [225] * len(draws), [0.0] * len(draws))
    assert sorted(map(sorted, got)) == sorted(map(sorted, expected))
    assert 1 < len(expected) < len(draws)  # the case has power: some merge, some do not


def test_rms_on_shared_reductions_equals_the_plain_matcher():
    """Matching reduces target and candidates once (shared with the clustering) and leaves
    out the matcher's own reduction: the same RMS as ``get_rms_dist`` on the raw structures,
    on real crystals, shaken copies, supercells and another crystal's cell."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystal_gpt.data.datasets import load_dataset
    from crystal_gpt.evaluation.csp import MATCHER

    recs = list(load_dataset("mp_20", "test", limit=6))
    matcher = StructureMatcher(**MATCHER)
    hits = 0
    for r in recs:
        t = r.structure
        shaken = t.copy()
        shaken.perturb(0.15, seed=recs.index(r))
        other = recs[(recs.index(r) + 1) % len(recs)].structure
        cands = [t * (1, 1, 2), shaken, other, None]
        got = _rms_distances((t, cands))
        for c, value in zip(cands, got, strict=True):
            plain = None if c is None else matcher.get_rms_dist(c, t)
            if plain is None:
                assert math.isnan(value)
            else:
                assert math.isclose(value, plain[0], rel_tol=1e-6, abs_tol=1e-9)
                hits += 1
    assert hits >= 2 * len(recs)  # the supercell and the shaken copy of each match


def test_evaluate_csp_end_to_end_with_the_bundled_perovskite_model(tmp_path, capsys):
    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.data.datasets import load_dataset

    model = load_model("perov_5")
    recs = list(load_dataset("perov_5", "test", limit=6))
    res = evaluate_csp(model, [r.structure for r in recs], [r.id for r in recs], k=4,
                       workers=1, progress=False)  # fmt: skip
    s = res.summary()
    assert s["targets"] == 6 and res.feasible.all() and res.rms.shape == (6, 4)
    assert s["match_rate@4"] >= s["match_rate@1"] and s["match_rate@4"] > 0  # easy 5-atom cells
    out = tmp_path / "csp"
    args = ["evaluate-csp", "--model", "perov_5", "--dataset", "perov_5", "--limit", "3"]
    assert cli_main([*args, "-k", "2", "--workers", "1", "--out", str(out)]) == 0
    assert "match rate @1" in capsys.readouterr().out
    assert json.loads((out / "csp.json").read_text())["k"] == 2
    # ranked: 8 draws per target, the 4 most probable distinct ones predicted; the draws are a
    # superset of k=4's only in distribution, but the @1 prediction is now the mode estimate
    ranked = evaluate_csp(model, [r.structure for r in recs], [r.id for r in recs], k=4,
                          candidates=8, workers=1, progress=False)  # fmt: skip
    assert ranked.rms.shape == (6, 4) and "among 8 samples" in ranked.protocol
    assert ranked.summary()["match_rate@4"] > 0
    assert cli_main([*args, "-k", "2", "--candidates", "1", "--out", str(out)]) == 2
    assert "--candidates (1) must be at least -k (2)" in capsys.readouterr().err
    # in chunks, the options left out are evaluate_csp's own defaults, in the protocol too
    from crystal_gpt.evaluation.csp import evaluate_csp_in_chunks

    chunked = evaluate_csp_in_chunks(
        model, [r.structure for r in recs[:2]], [r.id for r in recs[:2]], tmp_path / "chunks",
        chunk_size=1, settings={}, workers=1, progress=False,
    )  # fmt: skip
    assert chunked.rms.shape == (2, 20)
    plain = evaluate_csp(model, [recs[0].structure], [recs[0].id], workers=1, progress=False)
    head = plain.protocol.split("seed ")[0]
    assert chunked.protocol.startswith(head) and "chunks of 1 targets" in chunked.protocol


def test_bundled_csp_model_needs_and_honours_a_composition(tmp_path, capsys):
    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.data.symmetry import lattice_points

    model = load_model("mp_20_csp")
    assert model.config.condition_on_composition
    structures = model.sample(8, composition="Li4Fe4P4O16", seed=0)
    for s in structures:
        k = round(len(s) / 28)
        assert s.composition.as_dict() == {"Li": 4.0 * k, "Fe": 4.0 * k, "P": 4.0 * k,
                                           "O": 16.0 * k}  # fmt: skip
    assert cli_main(["sample", "--model", "mp_20_csp", "-n", "2", "--out", str(tmp_path)]) == 2
    assert "pass composition=" in capsys.readouterr().err
    assert lattice_points(62) == 1


def test_bad_csp_arguments_fail_before_any_work(capsys):
    from crystal_gpt.cli import main as cli_main

    assert cli_main(["evaluate-csp", "-k", "0"]) == 2
    assert "-k must be at least 1" in capsys.readouterr().err
    assert cli_main(["evaluate-csp", "--limit", "0"]) == 2


def test_predict_structures_gives_distinct_ranked_structures_of_the_composition():
    """perov_5 is not composition-conditioned but the exact-composition constraint holds for
    any model: 30 draws of SrTiO3, the distinct structures most often drawn first, no two of
    them the same structure, their draws adding up to at most 30."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    model = load_model("perov_5")
    out = model.predict_structures("SrTiO3", k=4, candidates=30, seed=0)
    assert 1 <= len(out) <= 4
    assert all(s.composition.reduced_formula == "SrTiO3" for s in out)
    draws = [s.properties["draws"] for s in out]
    assert draws == sorted(draws, reverse=True) and sum(draws) <= 30
    assert all(math.isfinite(s.properties["log_prob"]) for s in out)
    sm = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    for i in range(len(out)):
        for j in range(i):
            same_group = out[i].get_space_group_info()[1] == out[j].get_space_group_info()[1]
            assert not (same_group and sm.fit(out[i], out[j]))
    try:
        model.predict_structures("SrTiO3", k=5, candidates=3)
    except ValueError as err:
        assert "k <= candidates" in str(err)
    else:
        raise AssertionError("k > candidates accepted")


def test_csp_in_chunks_resumes_from_saved_chunks_and_refuses_other_settings(tmp_path, capsys):
    from crystal_gpt.cli import main as cli_main

    out = tmp_path / "csp"
    args = ["evaluate-csp", "--model", "perov_5", "--dataset", "perov_5", "--limit", "5",
            "-k", "2", "--workers", "1", "--out", str(out), "--chunk-size", "2"]  # fmt: skip
    assert cli_main(args) == 0
    chunks = sorted(p.name for p in (out / "chunks").glob("chunk-*.npz"))
    assert chunks == ["chunk-00000.npz", "chunk-00001.npz", "chunk-00002.npz"]
    first = (out / "csp.csv").read_text()
    assert len(first.splitlines()) == 6 and "chunks of 2 targets" in (out / "csp.md").read_text()
    # a stopped run: the middle chunk lost; --resume redraws it alone and gets the same result
    (out / "chunks" / "chunk-00001.npz").unlink()
    stamp = (out / "chunks" / "chunk-00000.npz").stat().st_mtime_ns
    assert cli_main([*args, "--resume"]) == 0
    assert (out / "csp.csv").read_text() == first
    assert (out / "chunks" / "chunk-00000.npz").stat().st_mtime_ns == stamp  # read, not redrawn
    assert "chunk 2/3" in capsys.readouterr().err
    # other settings never mix into the saved chunks; --resume needs the chunk size
    assert cli_main([*args[:-2], "--chunk-size", "3", "--resume"]) == 2
    assert "other settings (chunk_size differ)" in capsys.readouterr().err
    assert cli_main([*args[:-2], "--resume"]) == 2
    assert "give its --chunk-size" in capsys.readouterr().err
    # forgetting --resume never throws the finished chunks away
    assert cli_main(args) == 2
    assert "holds 3 finished chunks" in capsys.readouterr().err
    assert len(list((out / "chunks").glob("chunk-*.npz"))) == 3
    # a chunk cut short is drawn again; chunks whose settings are unknown are refused
    (out / "chunks" / "chunk-00002.npz").write_bytes(b"PK\x03\x04 cut")
    assert cli_main([*args, "--resume"]) == 0
    assert (out / "csp.csv").read_text() == first
    assert "unreadable" in capsys.readouterr().err
    (out / "chunks" / "settings.json").unlink()
    assert cli_main([*args, "--resume"]) == 2
    assert "settings are unknown" in capsys.readouterr().err
    # --chunks: two runs share one folder, each its own chunks; the one that finds every chunk
    # done writes the report, the same as one run's
    shared = tmp_path / "shared"
    two = [*args[:-4], "--out", str(shared), "--chunk-size", "2"]
    assert cli_main([*two, "--chunks", "2-3"]) == 0
    assert "2 of 3 chunks done; chunks 1 are left to other runs" in capsys.readouterr().err
    assert not (shared / "csp.csv").exists()
    assert sorted(p.name for p in (shared / "chunks").glob("chunk-*.npz")) == chunks[1:]
    assert cli_main([*two, "--chunks", "1"]) == 0
    assert (shared / "csp.csv").read_text() == first
    assert cli_main([*two, "--chunks", "4"]) == 2
    assert "no chunk 4: this run has 3 chunks" in capsys.readouterr().err
    assert cli_main([*two, "--chunks", "2-x"]) == 2
    assert "expected numbers like 1-5,9" in capsys.readouterr().err
