"""The sites-first order: group, letters and elements, then P(L | g, sites), then coordinates.

What must hold: the letters and elements see neither the lattice nor any coordinate, the
lattice sees no coordinate, a coordinate sees only the ones before it; a crystal's likelihood
does not depend on the crystals batched with it; the sampler (two phases, the second on
ragged caches) matches a full recompute in the training layout, keeps the distance rule, and
its samples follow the model's own densities (PIT, in tests/test_calibration.py); the option
trains and round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crystal_gpt import decode
from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.data.cache import EncodedDataset
from crystal_gpt.model.config import ModelConfig
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.sampling.sampler import sample_crystals
from tests.conftest import tiny_lattice_first


def tiny_sites_first(data: PaddedCrystals, seed: int = 0, **options) -> CrystalGPT:
    return tiny_lattice_first(data, seed, lattice_first=False, sites_first=True, **options)


@pytest.fixture(scope="module")
def sites(data) -> CrystalGPT:
    m = tiny_sites_first(data, charge_features=True, balance_features=True, volume_features=True)
    from crystal_gpt.data.geometry import training_element_volumes

    m.element_volume.copy_(torch.as_tensor(training_element_volumes(data)))
    return m


def closest_pair(structure) -> float:
    d = structure.distance_matrix + np.eye(len(structure)) * 1e9
    return float(d.min()) if len(structure) > 1 else np.inf


def test_what_each_part_sees(sites, data):
    batch = data.batch(np.arange(16))
    base = sites(batch, per_step=True)
    bigger = {**batch, "lattice": batch["lattice"] * torch.tensor([1.1, 1.1, 1.1, 1, 1, 1])}
    moved = {**batch, "x": torch.remainder(batch["x"] + 0.13, 1.0)}
    b, c = sites(bigger, per_step=True), sites(moved, per_step=True)
    for part in ("W", "A"):  # the chemistry sees neither the cell nor the coordinates
        assert torch.allclose(base[part], b[part]) and torch.allclose(base[part], c[part])
    assert torch.allclose(base["L"], c["L"])  # the lattice sees no coordinate
    assert not torch.allclose(base["X"], b["X"])  # the coordinates see the lattice
    # a coordinate sees only earlier ones: move the last site of each crystal
    n = batch["n"]
    last = {**batch, "x": batch["x"].clone()}
    rows = torch.arange(len(n))
    last["x"][rows, n - 1] = torch.remainder(last["x"][rows, n - 1] + 0.21, 1.0)
    d = sites(last, per_step=True)
    steps = torch.arange(d["X_steps"].shape[1])
    earlier = steps[None, :] < (n - 1)[:, None]
    assert torch.allclose(base["X_steps"][earlier], d["X_steps"][earlier], atol=1e-5)
    assert not torch.allclose(base["X_steps"], d["X_steps"])


def test_a_crystal_scores_the_same_alone_and_in_any_batch(sites, data):
    order = np.argsort(data.n)
    short, long_ = order[:3], order[-3:]
    together = sites(data.batch(np.concatenate([short, long_])))["total"]
    alone = sites(data.batch(short))["total"]
    assert torch.allclose(together[:3], alone, atol=1e-4)


def test_cache_matches_full_recompute_and_the_rule_holds(sites):
    a = sample_crystals(sites, 12, seed=1, min_distance=1.0, symprec=None)
    b = sample_crystals(sites, 12, seed=1, min_distance=1.0, symprec=None, use_cache=False)
    assert all(x == y for x, y in zip(a, b, strict=True))
    assert sum(c.meta["site_redraws"] for c in a) > 0  # the rule redraws sites, not crystals
    kept = sample_crystals(sites, 40, seed=0, min_distance=1.2, symprec=None)
    assert min(closest_pair(decode(c)) for c in kept) >= 1.2 - 1e-6
    free = sample_crystals(sites, 40, seed=0, min_distance=0, symprec=None)
    assert min(closest_pair(decode(c)) for c in free) < 1.2


def test_a_condemned_crystal_places_no_more_sites(sites):
    """A site that cannot be placed condemns its crystal to a redraw: the second phase stops
    drawing that crystal's later coordinates (they stay unset) instead of placing them for
    nothing, while the crystals that were placed have every site drawn."""
    from crystal_gpt.sampling.placement import thresholds_for
    from crystal_gpt.sampling.sampler import Shaping, _sample_batch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = _sample_batch(
            sites, 64, None, Shaping(1.0, 1.0), gen, torch.device("cpu"), None,
            thresholds=thresholds_for(sites, 2.6), max_site_tries=2,
        )  # fmt: skip
    free = sites.sym.dof
    unset = kept = 0
    for crystal, dead in zip(out.crystals, out.dead, strict=True):
        moving = free[crystal.spacegroup, torch.as_tensor(crystal.wyckoff).long()] > 0
        placed = ~torch.as_tensor(crystal.coords == 0).all(1)
        if dead:  # the unplaceable site is the last one drawn: free sites after it stay unset
            last = int(placed.nonzero().max()) if placed.any() else -1
            unset += int((moving[last + 1 :]).sum())
        else:
            kept += 1
            assert placed[moving].all()
    assert unset > 0 and kept > 0


def test_requests_and_likelihood_of_samples(sites):
    crystals = sample_crystals(sites, 20, seed=2, spacegroup=225, elements="Na,Cl", symprec=None)
    assert all(c.spacegroup == 225 and set(c.species.tolist()) <= {11, 17} for c in crystals)
    csp = sample_crystals(sites, 5, seed=3, composition="Na4Cl4", symprec=None)
    assert all(sorted(decode(c).composition.element_composition.values()) for c in csp)
    lp = sites.crystal_log_prob(crystals)["total"]
    assert torch.isfinite(lp).all()


def test_config_training_and_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="two orders"):
        ModelConfig(sites_first=True, lattice_first=True).validate()
    ModelConfig(sites_first=True, volume_features=True).validate()  # the lattice's context
    with pytest.raises(ValueError, match="sites_first=true"):
        ModelConfig(volume_features=True).validate()
    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.model.checkpoints import load_model

    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--dataset", "carbon_24", "--limit", "64", "--epochs",
            "2", "--out", str(out), "--quiet", "--set", "model.sites_first=true"]  # fmt: skip
    assert cli_main(args) == 0
    model = load_model(out / "best.pt")
    assert model.config.sites_first
    crystals = sample_crystals(model, 8, seed=0)
    assert len(crystals) == 8 and all(c.spacegroup >= 1 for c in crystals)
    data = PaddedCrystals(EncodedDataset.from_crystals(crystals), model.config.max_sites)
    lp = model(data.batch(np.arange(len(data))))["total"]
    assert torch.isfinite(lp).all()


def test_the_lattice_sees_the_fitted_volume_of_the_sites(sites, data):
    """With ``volume_features`` the flow's context carries the sites' fitted volume per atom:
    other element volumes change P(L | .) and nothing else."""
    import copy

    batch = data.batch(np.arange(16))
    other = copy.deepcopy(sites)
    other.element_volume.mul_(1.5)
    a, b = sites(batch), other(batch)
    for part in ("W", "A", "X"):
        assert torch.allclose(a[part], b[part])
    assert not torch.allclose(a["L"], b["L"])


def test_bundled_sites_first_model_keeps_the_rule_and_takes_conditions():
    """The bundled default ``mp_20`` is sites first; guided samples keep the learnt distance
    rule and score finitely under the model that drew them."""
    from crystal_gpt.data.geometry import distance_thresholds
    from crystal_gpt.model.checkpoints import load_model

    model = load_model("mp_20")
    assert model.config.sites_first and not model.config.lattice_first
    assert "band_gap" in model.config.conditions
    thr = distance_thresholds(model.pair_min_distance.double().numpy())
    crystals = sample_crystals(model, 16, seed=0, conditions={"band_gap": 3.0}, guidance=1.5)
    for c in crystals:
        s = decode(c)
        z = np.array([sp.Z for sp in s.species])
        d = s.distance_matrix + np.eye(len(s)) * 1e9
        assert (d >= thr[z[:, None], z[None, :]] - 1e-6).all()
    data = PaddedCrystals(EncodedDataset.from_crystals(crystals), model.config.max_sites)
    assert torch.isfinite(model(data.batch(np.arange(len(data))))["total"]).all()
