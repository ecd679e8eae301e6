"""The running-charge input (``model.charge_features``): what it sums on real crystals, that the
sampler's incremental totals are the training sequence's, and that the model stays causal; and
the element head's per-candidate charge scores (``model.charge_candidates``): samples follow
them (PIT)."""

import copy

import numpy as np
import pytest
import torch
from pymatgen.core import Element
from scipy import stats

from crystal_gpt.data.codec import decode
from crystal_gpt.model.config import ModelConfig
from crystal_gpt.model.layers import charge_features, charge_table
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.sampling.sampler import sample_crystals
from tests.conftest import tiny_lattice_first
from tests.test_calibration import pits


@pytest.fixture(scope="module")
def charged(data) -> CrystalGPT:
    """An untrained tiny lattice-first model with the running-charge input."""
    return tiny_lattice_first(data, 0, charge_features=True)


def test_the_table_holds_the_usual_ions():
    t = charge_table()
    rows = {s: t[Element(s).Z].tolist() for s in ("O", "Na", "Cl", "Fe", "He")}
    assert rows["O"][0] == -2 and rows["O"][3] == 1  # typical -2, a non-metal
    assert rows["Na"] == [1, 1, 1, 0]
    assert rows["Cl"][0] == -1 and rows["Cl"][1] == -1
    assert rows["Fe"][0] == 2 and rows["Fe"][1] <= 2 <= rows["Fe"][2]
    assert rows["He"] == [0, 0, 0, 0]  # no oxidation state: no charge
    assert t[0].abs().sum() == 0  # padding adds nothing


def test_totals_are_the_charges_of_the_decoded_crystal(charged, data, encoded):
    """The last totals of each sequence = the table summed over the atoms of the crystal
    (conventional cell), so multiplicities and padding are counted right."""
    idx = np.arange(60)
    batch = data.batch(idx)
    tot = charged.charge_totals(batch["g"], batch["w"], batch["a"])
    last = tot[torch.arange(len(idx)), batch["n"] - 1].numpy()
    table = charge_table().numpy()
    for i in idx:
        s = decode(encoded[int(i)])
        z = np.array([sp.Z for sp in s.species])
        expect = np.concatenate([table[z].sum(0), [len(z)]])
        np.testing.assert_allclose(last[i], expect, err_msg=s.composition.reduced_formula)
        # padding after the last site changes nothing
        np.testing.assert_allclose(tot[i, -1].numpy(), last[i])
    # balanced with the typical ions (Mg2+ H-, Cr3+ Se2-): charge 0, zero within reach
    formulas = {"MgH2", "Cr2Se3"}
    salts = [i for i in idx if decode(encoded[int(i)]).composition.reduced_formula in formulas]
    assert len(salts) == 2
    for i in salts:
        f = charge_features(torch.as_tensor(last[i]))
        assert f[0] == 0 and f[4] == 1 and f[6] == 1


def test_the_samplers_running_totals_are_the_sequences(charged, data):
    """One truth for training and sampling: site by site with ``before`` (the sampler) gives the
    totals and token embeddings of the whole sequence at once (teacher forcing)."""
    batch = data.batch(np.nonzero(data.n >= 4)[0][:16])
    g, w, a, x = batch["g"], batch["w"], batch["a"], batch["x"]
    whole = charged.charge_totals(g, w, a)
    emb_whole = charged.embed_sites(g, w, a, x)
    running = torch.zeros(len(g), 5)
    for k in range(w.shape[1]):
        step = charged.charge_totals(g, w[:, k : k + 1], a[:, k : k + 1], running)
        running = step[:, 0]
        assert torch.allclose(running, whole[:, k])
        emb = charged.embed_sites(g, w[:, k : k + 1], a[:, k : k + 1], x[:, k : k + 1], step)
        assert torch.allclose(emb[:, 0], emb_whole[:, k], atol=1e-5)
    # without ``before`` a continuation would start from zero: the embedding differs
    alone = charged.embed_sites(g, w[:, 3:4], a[:, 3:4], x[:, 3:4])
    assert not torch.allclose(alone[:, 0], emb_whole[:, 3])


def test_causal_with_the_charge_input(charged, data):
    """Changing site k's element moves the running charge of sites >= k only: earlier terms
    and site k's own letter stay, later ones change."""
    assert_element_change_is_causal(charged, data, (8, 11))  # O <-> Na


def assert_element_change_is_causal(model, data, pair: tuple[int, int], k: int = 2) -> None:
    """Swapping site k's element between ``pair`` (a running sum over sites changes from k on)
    leaves the terms before k and site k's letter alone and moves every later step."""
    batch = data.batch(np.nonzero(data.n >= 4)[0][:8])
    ref = model(batch, per_step=True)
    changed = {key: v.clone() for key, v in batch.items()}
    changed["a"][:, k] = torch.where(changed["a"][:, k] == pair[0], pair[1], pair[0])
    new = model(changed, per_step=True)
    for key in ("W_steps", "A_steps", "X_steps"):
        assert torch.allclose(ref[key][:, :k], new[key][:, :k], atol=1e-5), key
        assert not torch.allclose(ref[key][:, k + 1 :], new[key][:, k + 1 :]), key
    assert torch.allclose(ref["W_steps"][:, k], new["W_steps"][:, k], atol=1e-5)


def test_sampling_with_the_charge_input_cache_matches_recompute(charged):
    a = sample_crystals(charged, 8, seed=2, symprec=None, min_distance=0)
    b = sample_crystals(charged, 8, seed=2, symprec=None, min_distance=0, use_cache=False)
    assert all(p == q for p, q in zip(a, b, strict=True))
    assert any(c.num_sites > 1 for c in a)


def test_a_checkpoint_keeps_the_table(charged):
    state = charged.state_dict()
    assert "charge_table" in state and "emb_charge.weight" in state
    fresh = CrystalGPT(charged.config)
    fresh.load_weights(state)
    assert torch.equal(fresh.charge_table, charged.charge_table)


@pytest.fixture(scope="module")
def candidates(data) -> CrystalGPT:
    """Like ``charged`` with the per-candidate charge scores, made to matter (sharpened)."""
    m = tiny_lattice_first(data, 1, charge_features=True, charge_candidates=True)
    with torch.no_grad():
        m.head_a_charge.weight.mul_(40.0)
        m.head_a_charge.bias.normal_(0.0, 3.0)
    return m


def test_sampled_elements_follow_the_charge_scored_head(candidates):
    """PIT of the drawn elements under the teacher-forced element head is uniform; scored with
    another charge table (a sampler that carried other totals) they are not."""
    crystals = sample_crystals(candidates, 400, seed=3, symprec=None, min_distance=None)
    u = pits(candidates, crystals)["A"]
    assert len(u) > 400
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    other = copy.deepcopy(candidates)
    other.charge_table[:, :3].mul_(-1.0)
    assert stats.kstest(pits(other, crystals)["A"], "uniform").pvalue < 1e-3


def test_charge_candidates_cache_matches_recompute_and_need_the_charge(candidates):
    a = sample_crystals(candidates, 8, seed=2, symprec=None, min_distance=0)
    b = sample_crystals(candidates, 8, seed=2, symprec=None, min_distance=0, use_cache=False)
    assert all(p == q for p, q in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="charge_features"):
        ModelConfig(charge_candidates=True).validate()
