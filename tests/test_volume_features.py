"""The cell-volume input (``model.volume_features``): the fitted volumes per atom, the running
fill on real crystals, one truth for the sampler's incremental fill and teacher forcing, and
samples whose elements follow the volume-aware element head (PIT)."""

import copy

import numpy as np
import pytest
import torch
from pymatgen.core import Element
from scipy import stats

from crystal_gpt.data.codec import decode
from crystal_gpt.data.geometry import cell_volume, element_volumes, training_element_volumes
from crystal_gpt.model.config import ModelConfig
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.sampling.sampler import sample_crystals
from tests.conftest import tiny_lattice_first
from tests.test_calibration import pits
from tests.test_charge_features import assert_element_change_is_causal


@pytest.fixture(scope="module")
def volumes(data) -> np.ndarray:
    return training_element_volumes(data)


@pytest.fixture(scope="module")
def filled(data, volumes) -> CrystalGPT:
    """An untrained tiny lattice-first model with the volume input, its element head made to
    depend strongly on the fill (so a sampler that passed the wrong fill would show)."""
    m = tiny_lattice_first(data, 0, volume_features=True)
    m.element_volume.copy_(torch.as_tensor(volumes))
    with torch.no_grad():
        m.head_a_volume.weight.mul_(40.0)
        m.head_a_volume.bias.normal_(0.0, 3.0)
    return m


def test_volumes_are_recovered_from_additive_cells():
    """Cells whose volume is exactly the sum of per-element volumes give those volumes back;
    an element no cell holds gets a scaled atomic-radius sphere, padding none."""
    rng = np.random.default_rng(0)
    truth = np.zeros(119)
    truth[[3, 8, 26, 78]] = [11.0, 8.0, 10.5, 15.5]  # Li, O, Fe, Pt
    counts = np.zeros((300, 119))
    counts[:, [3, 8, 26, 78]] = rng.integers(0, 6, size=(300, 4))
    counts[counts.sum(1) == 0, 8] = 1
    fit = element_volumes(counts, counts @ truth)
    np.testing.assert_allclose(fit[[3, 8, 26, 78]], truth[[3, 8, 26, 78]], rtol=1e-6)
    assert fit[0] == 0
    assert fit[Element("Cs").Z] > fit[Element("Li").Z] > 0  # unseen: by atomic radius


def test_fitted_volumes_are_physical(volumes):
    v = {s: volumes[Element(s).Z] for s in ("O", "Pt", "Cs", "Li", "Fe")}
    assert 5 < v["O"] < 12 and 12 < v["Pt"] < 20 and v["Cs"] > 3 * v["Fe"]


def test_cell_volume_is_the_lattices(encoded):
    for i in range(0, 200, 7):
        s = decode(encoded[i])
        lat = torch.tensor([[*s.lattice.abc, *s.lattice.angles]], dtype=torch.float64)
        assert float(cell_volume(lat)[0]) == pytest.approx(s.volume, rel=1e-9)


def test_fill_is_the_decoded_crystals_atoms(filled, data, encoded, volumes):
    """The last fill of each sequence times the cell volume = the fitted volumes summed over
    the atoms of the decoded crystal, so multiplicities and padding are counted right."""
    idx = np.arange(60)
    batch = data.batch(idx)
    cell = cell_volume(batch["lattice"]).float()
    fill = filled.volume_fill(batch["g"], batch["w"], batch["a"], cell)
    for i in idx:
        s = decode(encoded[int(i)])
        expect = sum(volumes[sp.Z] for sp in s.species) / s.volume
        assert float(fill[i, batch["n"][i] - 1]) == pytest.approx(expect, rel=1e-4)
        assert float(fill[i, -1]) == pytest.approx(expect, rel=1e-4)  # padding adds nothing
    whole = fill[np.arange(len(idx)), batch["n"] - 1].numpy()
    assert 0.5 < np.median(whole) < 1.5  # training cells are about filled by their atoms


def test_the_samplers_running_fill_is_the_sequences(filled, data):
    """Site by site with ``before`` (the sampler) gives the fills and token embeddings of the
    whole sequence at once (teacher forcing)."""
    batch = data.batch(np.nonzero(data.n >= 4)[0][:16])
    g, w, a, x = batch["g"], batch["w"], batch["a"], batch["x"]
    cell = cell_volume(batch["lattice"]).float()
    whole = filled.volume_fill(g, w, a, cell)
    emb_whole = filled.embed_sites(g, w, a, x, fill=whole)
    running = torch.zeros(len(g))
    for k in range(w.shape[1]):
        step = filled.volume_fill(g, w[:, k : k + 1], a[:, k : k + 1], cell, running)
        running = step[:, 0]
        assert torch.allclose(running, whole[:, k])
        emb = filled.embed_sites(g, w[:, k : k + 1], a[:, k : k + 1], x[:, k : k + 1], fill=step)
        assert torch.allclose(emb[:, 0], emb_whole[:, k], atol=1e-5)
    with pytest.raises(ValueError, match="running fill"):
        filled.embed_sites(g, w, a, x)


def test_causal_with_the_volume_input(filled, data):
    """Changing site k's element moves the fill of sites >= k only: earlier terms and site k's
    own letter stay, later ones change."""
    assert_element_change_is_causal(filled, data, (55, 3))  # Cs <-> Li


def test_sampled_elements_follow_the_volume_aware_head(filled):
    """PIT of the drawn elements under the teacher-forced element head is uniform; the same
    crystals scored with other element volumes (a sampler that saw another fill) are not."""
    crystals = sample_crystals(filled, 400, seed=3, symprec=None, min_distance=None)
    u = pits(filled, crystals)["A"]
    assert len(u) > 400
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    other = copy.deepcopy(filled)
    other.element_volume.mul_(1.6)
    assert stats.kstest(pits(other, crystals)["A"], "uniform").pvalue < 1e-3


def test_sampling_with_the_volume_input_cache_matches_recompute(filled):
    a = sample_crystals(filled, 8, seed=2, symprec=None, min_distance=0)
    b = sample_crystals(filled, 8, seed=2, symprec=None, min_distance=0, use_cache=False)
    assert all(p == q for p, q in zip(a, b, strict=True))
    assert any(c.num_sites > 1 for c in a)


def test_a_checkpoint_keeps_the_volumes(filled):
    state = filled.state_dict()
    assert "element_volume" in state and "emb_volume.weight" in state
    fresh = CrystalGPT(filled.config)
    fresh.load_weights(state)
    assert torch.equal(fresh.element_volume, filled.element_volume)


def test_volume_features_need_the_lattice_first():
    with pytest.raises(ValueError, match="lattice_first"):
        ModelConfig(volume_features=True).validate()
    ModelConfig(volume_features=True, lattice_first=True).validate()
