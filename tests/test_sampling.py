import numpy as np
import pytest
import spglib
import torch

from crystal_gpt import decode
from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.data.cache import EncodedDataset
from crystal_gpt.data.symmetry import get_tables
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.sampling.sampler import sample_crystals

T = get_tables()


def test_kv_cache_matches_full_forward(model):
    torch.manual_seed(1)
    x = torch.randn(3, 6, model.config.d_model)
    full = model.backbone(x)
    caches = [{} for _ in model.blocks]
    steps = [model.backbone(x[:, :1], caches, 0)]
    steps += [model.backbone(x[:, k : k + 1], caches, k) for k in range(1, 6)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_ragged_cache_advances_rows_of_different_lengths_exactly(model):
    """Rows whose sequences have different lengths, one token each into a ragged cache (the
    sites-first sampler's second phase): each matches its own full forward."""
    torch.manual_seed(2)
    lengths = [2, 5, 3]
    seqs = [torch.randn(1, k + 3, model.config.d_model) for k in lengths]
    caches = [{} for _ in model.blocks]
    padded = torch.zeros(3, max(lengths) + 3, model.config.d_model)
    for i, k in enumerate(lengths):
        padded[i, :k] = seqs[i][0, :k]
    model.backbone(padded[:, : max(lengths)], caches, 0)  # right padding: causal, harmless
    for c in caches:  # room for three more tokens per row
        c["k"], c["v"] = (torch.nn.functional.pad(c[t], (0, 0, 0, 3)) for t in ("k", "v"))
    at = torch.tensor(lengths)
    for step in range(3):
        token = torch.stack([seqs[i][0, k + step] for i, k in enumerate(lengths)]).unsqueeze(1)
        out = model.backbone(token, caches, offset=at + step)[:, -1]
        for i, k in enumerate(lengths):
            full = model.backbone(seqs[i][:, : k + step + 1])[0, -1]
            assert torch.allclose(out[i], full, atol=1e-5)
    with pytest.raises(ValueError, match="one token per row"):
        model.backbone(padded[:, :2], caches, offset=at)


def test_samples_are_symmetric_and_legal(model):
    crystals = sample_crystals(model, 40, seed=0)
    assert len(crystals) == 40
    for c in crystals:
        assert c.num_sites >= 1 and ((c.coords >= 0) & (c.coords < 1)).all()
        assert (np.diff(c.wyckoff) >= 0).all()
        for k in range(c.num_sites):
            assert np.array_equal(T.project(c.spacegroup, c.wyckoff[k], c.coords[k]), c.coords[k])
            if k and c.wyckoff[k] == c.wyckoff[k - 1]:
                assert T.dof[c.spacegroup, c.wyckoff[k]] > 0
        s = decode(c)
        assert len(s) == c.num_atoms and np.isfinite(s.lattice.volume)
    # the model gives every sample a finite likelihood (the masks agree with the sampler)
    data = PaddedCrystals(EncodedDataset.from_crystals(crystals))
    out = model(data.batch(np.arange(len(crystals))))
    assert torch.isfinite(out["total"]).all()


def test_spacegroup_constraint_and_seed(model):
    crystals = sample_crystals(model, 12, spacegroup=[194, 225], seed=3)
    assert {c.spacegroup for c in crystals} <= {194, 225}
    again = sample_crystals(model, 12, spacegroup=[194, 225], seed=3)
    assert all(a == b for a, b in zip(crystals, again, strict=True))
    for c in crystals:  # spglib on the built structure finds the group (or a supergroup)
        s = decode(c)
        ds = spglib.get_symmetry_dataset((s.lattice.matrix, s.frac_coords, s.atomic_numbers), 1e-3)
        assert ds is not None
    with pytest.raises(ValueError, match=r"1\.\.230"):
        sample_crystals(model, 1, spacegroup=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_crystals(model, 1, temperature=0)


def test_bundled_model_cli_sample_writes_readable_symmetric_cifs(tmp_path, capsys):
    import csv

    from pymatgen.core import Structure

    from crystal_gpt.cli import main as cli_main

    assert cli_main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "mp_20" in listing and "mp_20_band_gap predicts band_gap" in listing
    out = tmp_path / "s"
    assert (
        cli_main(["sample", "-n", "12", "--seed", "0", "--spacegroup", "cubic", "--out", str(out)])
        == 0
    )
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and "loglik_total" in rows[0]
    for row in rows:
        g = int(row["spacegroup"])
        assert 195 <= g <= 230
        s = Structure.from_file(out / row["cif"])
        assert len(s) == int(row["num_atoms"])
        ds = spglib.get_symmetry_dataset((s.lattice.matrix, s.frac_coords, s.atomic_numbers), 1e-3)
        assert ds is not None and ds.number >= 195  # the written crystal keeps its cubic symmetry
    assert (out / "samples.extxyz").stat().st_size > 0
    structures = CrystalGPT.from_pretrained("mp_20").sample(3, spacegroup=225, seed=1)
    assert len(structures) == 3 and all(isinstance(s, Structure) for s in structures)
    assert cli_main(["sample", "--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no model 'nope'" in capsys.readouterr().err


def test_element_constraints(model):
    crystals = sample_crystals(model, 20, elements=["Li", "Fe", "P", "O"], seed=2)
    assert {int(z) for c in crystals for z in c.species} <= {3, 26, 15, 8}
    crystals = sample_crystals(model, 20, exclude_elements=["C"], seed=2)
    assert 6 not in {int(z) for c in crystals for z in c.species}  # the tiny model knows carbon
    with pytest.raises(ValueError, match="unknown element 'Xx'"):
        sample_crystals(model, 1, elements=["Xx"])
    with pytest.raises(ValueError, match="no element"):
        sample_crystals(model, 1, elements=["Li"], exclude_elements=["Li"])


def test_cache_and_full_recompute_sample_the_same(model):
    a = sample_crystals(model, 10, seed=5)
    b = sample_crystals(model, 10, seed=5, use_cache=False)
    assert all(x == y for x, y in zip(a, b, strict=True))


def test_check_workers_do_not_change_the_samples(model):
    """The symmetry check in worker processes (small batches: several in flight, redraws
    among them) gives the same crystals as the check in this process."""
    here = sample_crystals(model, 30, seed=4, batch_size=8, check_workers=0)
    pooled = sample_crystals(model, 30, seed=4, batch_size=8, check_workers=2)
    assert sum(c.meta["redraws"] for c in here) > 0
    assert all(x == y and x.meta == y.meta for x, y in zip(here, pooled, strict=True))


def test_top_p_keeps_the_nucleus():
    from crystal_gpt.sampling.sampler import _sample_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    draws = _sample_logits(logits, (1.0, 0.7), gen)
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.7; the tail is cut
    draws = _sample_logits(logits, (1.0, 1.0), gen)
    assert set(draws.tolist()) == {0, 1, 2, 3}
    assert set(_sample_logits(logits, (1.0, 0.1), gen).tolist()) == {0}


def test_give_up_leaves_a_gap_instead_of_failing_the_run(model):
    from crystal_gpt.sampling.constraints import ConstraintError

    with pytest.raises(ConstraintError, match="no acceptable crystal after 2 draws"):
        sample_crystals(model, 3, seed=0, min_distance=50.0, max_redraws=2)
    out = sample_crystals(model, 3, seed=0, min_distance=50.0, max_redraws=2, give_up=True)
    assert out == [None, None, None]


def test_python_api_reads_the_same_text_as_the_cli(model):
    from crystal_gpt.sampling.sampler import parse_spacegroups

    assert parse_spacegroups("Fm-3m") == [225] and parse_spacegroups("P6_3/mmc") == [194]
    assert parse_spacegroups("194, 225") == [194, 225] and parse_spacegroups(["Fm-3m", 1]) == [
        225,
        1,
    ]
    assert len(parse_spacegroups("cubic")) == 36
    with pytest.raises(ValueError, match="unknown space group"):
        parse_spacegroups("Fm3x")
    a = sample_crystals(model, 4, spacegroup="Fm-3m", elements="Na,Cl", seed=1)
    b = sample_crystals(model, 4, spacegroup=[225], elements=["Na", "Cl"], seed=1)
    assert all(x == y for x, y in zip(a, b, strict=True))
    assert {c.spacegroup for c in a} == {225}
    assert {int(z) for c in a for z in c.species} <= {11, 17}
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="temperature"):
            sample_crystals(model, 1, temperature=bad)


def test_sample_checks_out_before_sampling_and_leaves_no_stale_files(tmp_path, capsys):
    from crystal_gpt.cli import main as cli_main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["sample", "-n", "2", "--out", str(blocker)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert cli_main(["sample", "-n", "2", "--out", str(blocker / "below")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    out = tmp_path / "s"
    assert cli_main(["sample", "-n", "3", "--seed", "0", "--out", str(out)]) == 0
    assert cli_main(["sample", "-n", "2", "--seed", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "cif").iterdir()) == [
        "crystal_00000.cif",
        "crystal_00001.cif",
    ]


def test_tail_copies_keep_each_crystal_on_its_own_request():
    """The queue's tail draws a crystal's redraws as copies in one batch: every crystal must
    still be one of its own request (here each its own composition), carry its own redraw
    count, and the copies must not change which requests get through."""
    from pymatgen.core import Composition

    import crystal_gpt.sampling.sampler as sampler
    from crystal_gpt.model.checkpoints import load_model

    csp = load_model("mp_20_csp")
    asked = ["Li2MnO3", "NaCl", "Ba2CuWO6", "K3Sb", "Mg2SiO4", "CsPbBr3"]
    rows = [c for c in asked for _ in range(3)]
    out = sample_crystals(csp, len(rows), composition=rows, seed=1, batch_size=6, give_up=True)
    assert sum(c.meta["redraws"] for c in out if c is not None) > 0  # the tail was reached
    for c, want in zip(out, rows, strict=True):
        assert c is not None
        got = decode(c).composition.reduced_composition
        assert got == Composition(want).reduced_composition
        assert c.meta["redraws"] <= 100
    before = sampler.TAIL_COPIES
    try:
        sampler.TAIL_COPIES = 1  # one draw per crystal per batch: the plain queue
        plain = sample_crystals(csp, len(rows), composition=rows, seed=1, batch_size=6)
    finally:
        sampler.TAIL_COPIES = before
    for c, want in zip(plain, rows, strict=True):
        assert decode(c).composition.reduced_composition == Composition(want).reduced_composition
