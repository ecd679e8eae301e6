"""Lattice first and the distance rule: the order option, the geometry, and that distance-aware
placement samples the model's density truncated to the allowed region exactly."""

import numpy as np
import pytest
import torch
from scipy import stats

from crystal_gpt import encode_dataset
from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.data.cache import EncodedDataset
from crystal_gpt.data.codec import decode, encode
from crystal_gpt.data.datasets import load_dataset
from crystal_gpt.data.geometry import (
    DISTANCE_FRACTION,
    distance_thresholds,
    metric_tensor,
    periodic_distances,
    shortest_pair_distances,
)
from crystal_gpt.model.distributions import lattice_statistics
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.sampling.placement import Placement
from crystal_gpt.sampling.sampler import sample_crystals
from crystal_gpt.training import load_config
from tests.test_calibration import sharpen, vm_cdf


@pytest.fixture(scope="module")
def carbon():
    return PaddedCrystals(encode_dataset("carbon_24", "holdout", workers=1, progress=False))


@pytest.fixture(scope="module")
def first(carbon) -> CrystalGPT:
    """An untrained tiny lattice-first model with chemistry-aware element embeddings."""
    torch.manual_seed(0)
    cfg = load_config("tiny").model
    cfg.lattice_first, cfg.element_features = True, True
    m = CrystalGPT(cfg)
    m.lattice.mean[:], m.lattice.std[:] = lattice_statistics(carbon, per_atom=False)
    return m.eval()


def closest_pair(structure) -> float:
    d = structure.distance_matrix + np.eye(len(structure)) * 1e9
    return float(d.min()) if len(structure) > 1 else np.inf


def test_sites_see_the_lattice_and_the_lattice_does_not_see_the_sites(first, model, carbon):
    batch = carbon.batch(np.arange(8))
    other = {**batch, "lattice": batch["lattice"] * torch.tensor([1.1, 1.1, 1.1, 1, 1, 1])}
    moved = {**batch, "x": torch.remainder(batch["x"] + 0.1, 1.0)}
    a, b, c = (first(x, per_step=True) for x in (batch, other, moved))
    assert not torch.allclose(a["W"], b["W"]) and not torch.allclose(a["X"], b["X"])
    assert torch.allclose(a["L"], c["L"])  # P(L | g): no site enters it
    # lattice last: the sites never see the lattice
    a, b = model(batch), model(other)
    assert torch.allclose(a["W"] + a["A"] + a["X"], b["W"] + b["A"] + b["X"])
    assert not torch.allclose(a["L"], b["L"])


def test_lattice_first_cache_matches_full_recompute_with_the_rule(first):
    a = sample_crystals(first, 6, seed=1, min_distance=1.0, symprec=None)
    b = sample_crystals(first, 6, seed=1, min_distance=1.0, symprec=None, use_cache=False)
    assert sum(c.meta["site_redraws"] for c in a) > 0
    assert all(x == y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("which", ["first", "model"])
def test_the_rule_holds_in_every_sample(which, request):
    m = request.getfixturevalue(which)
    kept = sample_crystals(m, 40, seed=0, min_distance=1.2, symprec=None)
    assert min(closest_pair(decode(c)) for c in kept) >= 1.2 - 1e-6
    free = sample_crystals(m, 40, seed=0, min_distance=0, symprec=None)
    assert min(closest_pair(decode(c)) for c in free) < 1.2  # the rule did something
    if which == "first":  # sites are redrawn, not whole crystals
        assert sum(c.meta["site_redraws"] for c in kept) > 0


def test_periodic_distances_and_pair_table_match_pymatgen(carbon):
    records = load_dataset("mp_20", "train_first1000")
    ds = EncodedDataset.from_crystals([encode(records[i].structure) for i in range(25)])
    data = PaddedCrystals(ds)
    idx = np.arange(25)
    table = shortest_pair_distances(
        data.g[idx], data.w[idx], data.a[idx], data.x[idx], data.lattice[idx], data.n[idx]
    )
    expect = np.zeros((119, 119))
    for i in idx:
        s = decode(ds[int(i)])
        d = s.distance_matrix + np.eye(len(s)) * 1e9
        z = np.array([sp.Z for sp in s.species])
        for p in range(len(s)):
            for q in range(len(s)):
                if expect[z[p], z[q]] == 0 or d[p, q] < expect[z[p], z[q]]:
                    expect[z[p], z[q]] = d[p, q]
    expect[expect > 1e8] = 0
    np.testing.assert_allclose(table, expect, atol=1e-4)
    thr = distance_thresholds(table)
    assert np.all(thr[1:, 1:] > 0)
    np.testing.assert_allclose(thr[table > 0], DISTANCE_FRACTION * table[table > 0])


def test_metric_tensor_gives_cartesian_lengths():
    from pymatgen.core import Lattice

    lat = Lattice.from_parameters(4.0, 5.0, 6.0, 80.0, 95.0, 110.0)
    G = metric_tensor(torch.tensor([[4.0, 5.0, 6.0, 80.0, 95.0, 110.0]]))
    np.testing.assert_allclose(G[0].numpy(), lat.matrix @ lat.matrix.T, atol=1e-9)
    f = torch.tensor([[[0.3, -0.45, 0.2]]])
    d = periodic_distances(G, f)
    assert float(d) == pytest.approx(
        lat.get_distance_and_image([0, 0, 0], f[0, 0].numpy())[0], abs=1e-9
    )


def test_placement_redraws_follow_the_truncated_density(first):
    """Exactness: R-3m 6c (0, 0, z) with a rule that forbids z near its orbit images. The
    accepted z are uniform under the model's z density truncated to the allowed set (computed on
    a grid with the same rule), and not under the untruncated one."""
    sharp = sharpen(first)
    rule = 1.6
    crystals = sample_crystals(
        sharp, 400, seed=2, symprec=None, min_distance=rule, spacegroup=166, wyckoff_template="6c"
    )
    data = PaddedCrystals(EncodedDataset.from_crystals(crystals), sharp.config.max_sites)
    batch = data.batch(np.arange(len(data)))
    with torch.no_grad():
        out = sharp(batch, distributions=True)
    params = out["x_params"][:, 2]  # one site per crystal: the z head
    z = batch["x"][:, 0, 2]
    grid = torch.linspace(0, 1, 513)[:-1] + 1 / 1024
    n, G = len(z), len(grid)
    placement = Placement(batch["lattice"].repeat_interleave(G, 0), torch.full((119, 119), rule))
    xs = torch.zeros(n * G, 3)
    xs[:, 2] = grid.repeat(n)
    g = torch.full((n * G,), 166)
    w = torch.full((n * G,), 2)  # letter index of 6c
    allowed = ~placement.clashes(g, w, batch["a"][:, 0].repeat_interleave(G), xs)
    allowed = allowed.view(n, G).double()
    pdf = torch.stack(
        [
            torch.exp(
                __import__(
                    "crystal_gpt.model.distributions", fromlist=["x"]
                ).von_mises_mixture_logpdf(grid, params[i].expand(G, -1))
            ).double()
            for i in range(n)
        ]
    )
    mass = pdf * allowed
    # a crystal whose allowed z form a sliver narrower than the grid (a short c: one was
    # 0.3% of the interval) cannot be integrated here; leaving it out depends on its lattice
    # only, not on its z, so the others' PIT stays uniform
    seen = mass.sum(1) > 0
    assert seen.float().mean() > 0.95
    mass, pdf, z, params = mass[seen], pdf[seen], z[seen], params[seen]
    assert float((1 - mass.sum(1) / pdf.sum(1)).mean()) > 0.1  # the rule truncates a lot
    cdf = mass.cumsum(1) / mass.sum(1, keepdim=True)
    k = (z * G).floor().long().clamp(max=G - 1)
    pit = (
        cdf.gather(1, k[:, None])[:, 0]
        - mass.gather(1, k[:, None])[:, 0] / mass.sum(1) * (1 - (z * G - k).double())
    ).numpy()
    assert stats.kstest(pit, "uniform").pvalue > 1e-3
    assert stats.kstest(vm_cdf(z, params).numpy(), "uniform").pvalue < 1e-3


def balanced(structure) -> bool:
    """Independent check: one element, only metals, or a neutral choice of SMACT states."""
    import smact

    comp = structure.composition.get_el_amt_dict()
    if len(comp) == 1 or all(e in smact.metals for e in comp):
        return True
    sums = {0.0}
    for e, n in comp.items():
        try:
            states = smact.Element(e).oxidation_states or []
        except (KeyError, NameError):
            return False
        sums = {q + s * n for q in sums for s in states}
    return any(abs(q) < 1e-9 for q in sums)


@pytest.mark.parametrize("which", ["first", "model"])
def test_charge_balanced_samples_are_neutral(which, request):
    m = request.getfixturevalue(which)
    kwargs = dict(seed=0, symprec=None, min_distance=None, num_atoms=(1, 12))
    crystals = sample_crystals(m, 60, charge_balanced=True, **kwargs)
    assert all(balanced(decode(c)) for c in crystals)
    free = sample_crystals(m, 60, **kwargs)
    assert not all(balanced(decode(c)) for c in free)  # the untrained model alone is not
    with pytest.raises(ValueError, match="composition fixes the charges"):
        sample_crystals(m, 2, composition="NaCl", charge_balanced=True)


def test_cli_distance_and_charge_options(tmp_path, capsys):
    from crystal_gpt.cli import main

    out = tmp_path / "s"
    args = ["sample", "-n", "4", "--seed", "0", "--out", str(out)]
    assert main([*args, "--min-distance", "1.1", "--charge-balanced"]) == 0
    import csv

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and "site_redraws" in rows[0]
    assert "site coordinates redrawn" in capsys.readouterr().out
    for bad in ("-1", "abc", "inf"):
        assert main([*args, "--min-distance", bad]) != 0
        assert "--min-distance" in capsys.readouterr().err


def test_bundled_default_is_sites_first_and_the_other_orders_load():
    """The ablation's choice (benchmarks/RESULTS.md): mp_20 draws the sites' letters and
    elements, then the lattice, then the coordinates under the learnt distance rule; the
    lattice-first and lattice-last models stay loadable."""
    from crystal_gpt.data.geometry import distance_thresholds
    from crystal_gpt.model.checkpoints import load_model

    default, first, last = (
        load_model("mp_20"),
        load_model("mp_20_lattice"),
        load_model("mp_20_last"),
    )
    assert default.config.sites_first and not default.config.lattice_first
    assert first.config.lattice_first and not first.config.sites_first
    assert not last.config.lattice_first and not last.config.sites_first
    thr = distance_thresholds(first.pair_min_distance.double().numpy())
    for m in (first, last):
        for c in sample_crystals(m, 20, seed=0):
            s = decode(c)
            z = np.array([sp.Z for sp in s.species])
            d = s.distance_matrix + np.eye(len(s)) * 1e9
            assert (d >= thr[z[:, None], z[None, :]] - 1e-6).all()
