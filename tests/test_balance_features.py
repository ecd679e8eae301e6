"""The charge-balance input (``model.balance_features``): the exact test behind it against a
brute-force one, what it says about real crystals, that the sampler's incremental inputs are
the training sequence's, causality, and that samples follow the element head it scores (PIT)."""

import copy
import itertools

import numpy as np
import pytest
import torch
from pymatgen.core import Element
from scipy import stats

from crystal_gpt.data.chemistry import balanced_candidates, is_balanced, oxidation_table
from crystal_gpt.data.codec import decode
from crystal_gpt.model.config import ModelConfig
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.sampling.charge import ChargeBalance
from crystal_gpt.sampling.sampler import sample_crystals
from tests.conftest import tiny_lattice_first
from tests.test_calibration import pits
from tests.test_charge_features import assert_element_change_is_causal


def brute_force_balanced(counts: dict[int, int]) -> bool:
    table, real, metal = oxidation_table()
    zs = [z for z, n in counts.items() if n > 0]
    if not zs:
        return False
    if len(zs) == 1 or all(metal[z] for z in zs):
        return True
    states = [table[z][real[z]].tolist() for z in zs]
    return any(
        sum(s * counts[z] for s, z in zip(combo, zs, strict=True)) == 0
        for combo in itertools.product(*states)
    )


def test_candidates_agree_with_enumerating_every_oxidation_state():
    rng = np.random.default_rng(0)
    symbols = ("O", "N", "S", "F", "Cl", "Na", "K", "Mg", "Ca", "Fe", "Mn", "Ti", "Cu", "Al",
               "Si", "P", "Ba", "La", "Pt", "He", "Se")  # fmt: skip
    pool = [Element(e).Z for e in symbols]
    checked = 0
    for _ in range(150):
        counts = {int(z): int(rng.integers(1, 9)) for z in rng.choice(pool, rng.integers(0, 4))}
        m = int(rng.choice([1, 2, 3, 4, 6, 8]))
        got = balanced_candidates(tuple(sorted(counts.items())), m)
        assert not got[0]
        for z in range(1, 119):
            after = dict(counts)
            after[z] = after.get(z, 0) + m
            assert got[z] == brute_force_balanced(after), (counts, m, z)
            checked += 1
        assert is_balanced(counts) == brute_force_balanced(counts), counts
    assert checked == 150 * 118


def test_known_compositions():
    Z = {s: Element(s).Z for s in ("Fe", "O", "Ba", "Na", "Cl", "He", "Cu", "Zn")}
    assert is_balanced({Z["Fe"]: 2, Z["O"]: 3}) and is_balanced({Z["Na"]: 4, Z["Cl"]: 4})
    assert not is_balanced({Z["Ba"]: 1, Z["O"]: 8})  # the BaO8 of the samples
    assert is_balanced({Z["Cu"]: 3, Z["Zn"]: 1})  # metals only
    assert not is_balanced({Z["He"]: 1, Z["O"]: 1}) and not is_balanced({})
    # Ba on a site of 1: BaO balances, a second O site of 2 (BaO3) does not, Fe's states do
    cand = balanced_candidates(((Z["O"], 1),), 1)
    assert cand[Z["Ba"]] and not cand[Z["He"]] and cand[Z["O"]]  # O alone stays one element
    # BaO is balanced; no element on a site of two more atoms keeps it so (no state 0)
    assert not balanced_candidates(((Z["O"], 1), (Z["Ba"], 1)), 2).any()


@pytest.fixture(scope="module")
def balanced_model(data) -> CrystalGPT:
    """An untrained tiny lattice-first model with the balance input, its element head made
    to lean on it (sharpened)."""
    m = tiny_lattice_first(data, 4, balance_features=True)
    with torch.no_grad():
        m.head_a_balance.weight.mul_(30.0)
        m.head_a_balance.bias.fill_(2.0)
    return m


def test_balanced_after_the_last_site_is_the_decoded_crystals(balanced_model, data, encoded):
    idx = np.arange(200)
    batch = data.batch(idx)
    cand, balanced = balanced_model.balance_inputs(batch["g"], batch["w"], batch["a"])
    assert cand.shape == (int(batch["n"].sum()), 119)
    last = balanced[torch.arange(len(idx)), batch["n"] - 1].tolist()
    seen = set()
    for i in idx:
        s = decode(encoded[int(i)])
        counts = {sp.Z: int(n) for sp, n in s.composition.items()}
        assert last[i] == is_balanced(counts) == brute_force_balanced(counts), s.formula
        seen.add(last[i])
        # the sampler's charge-balance option ends a crystal on the same rule
        charge = ChargeBalance(batch["g"][i : i + 1], None, None)
        charge.counts = [counts]
        assert charge.can_end() == [last[i]]
    assert seen == {True, False}
    assert not balanced[batch["a"] == 0].any()  # padding


def test_the_samplers_running_inputs_are_the_sequences(balanced_model, data):
    """Site by site from the atoms so far (the sampler) gives the candidates and token
    embeddings of the whole sequence at once (teacher forcing)."""
    m = balanced_model
    batch = data.batch(np.nonzero(data.n >= 4)[0][:16])
    g, w, a, x = batch["g"], batch["w"], batch["a"], batch["x"]
    cand, balanced = m.balance_inputs(g, w, a)
    emb_whole = m.embed_sites(g, w, a, x)
    atoms = torch.zeros(len(g), 119, dtype=torch.long)
    real = a > 0
    index = torch.cumsum(real.flatten(), 0).view(real.shape) - 1  # row of cand (row-major)
    for k in range(w.shape[1]):
        rows = real[:, k]
        if not rows.any():
            break
        step = m.balance_candidates(g[rows], w[rows, k], atoms[rows])
        assert torch.equal(step, cand[index[rows, k]])
        bal = step.gather(1, a[rows, k : k + 1])
        assert torch.equal(bal[:, 0], balanced[rows, k])
        emb = m.embed_sites(
            g[rows], w[rows, k : k + 1], a[rows, k : k + 1], x[rows, k : k + 1], balanced=bal
        )
        assert torch.allclose(emb[:, 0], emb_whole[rows, k], atol=1e-5)
        atoms[rows, a[rows, k]] += m.sym.multiplicity[g[rows], w[rows, k]].long()


def test_causal_with_the_balance_input(balanced_model, data):
    assert_element_change_is_causal(balanced_model, data, (8, 11))  # O <-> Na


def test_sampling_with_the_balance_input_cache_matches_recompute(balanced_model):
    a = sample_crystals(balanced_model, 8, seed=2, symprec=None, min_distance=0)
    b = sample_crystals(balanced_model, 8, seed=2, symprec=None, min_distance=0, use_cache=False)
    assert all(p == q for p, q in zip(a, b, strict=True))
    assert any(c.num_sites > 1 for c in a)


def test_sampled_elements_follow_the_balance_scored_head(balanced_model):
    """PIT of the drawn elements under the teacher-forced element head is uniform; scored with
    the balance bits flipped (a sampler that tracked other atoms) they are not."""
    crystals = sample_crystals(balanced_model, 400, seed=3, symprec=None, min_distance=None)
    u = pits(balanced_model, crystals)["A"]
    assert len(u) > 400
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    other = copy.deepcopy(balanced_model)
    exact = other.balance_candidates
    other.balance_candidates = lambda g, w, counts: ~exact(g, w, counts)
    assert stats.kstest(pits(other, crystals)["A"], "uniform").pvalue < 1e-3


def test_a_checkpoint_round_trip_and_the_setting(balanced_model):
    state = balanced_model.state_dict()
    assert "emb_balance.weight" in state and "head_a_balance.weight" in state
    fresh = CrystalGPT(balanced_model.config)
    fresh.load_weights(state)
    assert torch.equal(fresh.head_a_balance.weight, balanced_model.head_a_balance.weight)
    assert ModelConfig().balance_features is False  # models saved before it load without it
    with pytest.raises(ValueError, match="balance_features"):
        ModelConfig(balance_features=1).validate()  # type: ignore[arg-type]
