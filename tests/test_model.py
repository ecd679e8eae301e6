import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from crystal_gpt import encode_dataset
from crystal_gpt.data.batching import PaddedCrystals, bucketed_batches
from crystal_gpt.data.symmetry import get_tables
from crystal_gpt.model.config import ModelConfig
from crystal_gpt.model.distributions import (
    LATTICE_DIMS,
    lattice_features,
    lattice_from_features,
    lattice_statistics,
    von_mises_mixture_logpdf,
)
from crystal_gpt.model.transformer import CrystalGPT, SymmetryTensors
from crystal_gpt.training import load_config

TINY = load_config("tiny").model


@pytest.fixture(scope="module")
def model(data) -> CrystalGPT:
    torch.manual_seed(0)
    m = CrystalGPT(TINY)
    m.lattice.mean[:], m.lattice.std[:] = lattice_statistics(data)
    return m.eval()


def test_causality(model, data):
    """Changing site k never changes the terms of earlier sites, only its own and later ones."""
    idx = np.nonzero(data.n >= 4)[0][:8]
    batch = data.batch(idx)
    ref = model(batch, per_step=True)
    k = 2  # change site index 2 (the third site): its input token is position 3
    changed = {key: v.clone() for key, v in batch.items()}
    changed["x"][:, k] = torch.rand_like(changed["x"][:, k])
    changed["a"][:, k] = (changed["a"][:, k] % 80) + 1
    new = model(changed, per_step=True)
    # output step j predicts site j: steps < k never see site k; its letter term neither
    for key in ("W_steps", "A_steps", "X_steps"):
        assert torch.allclose(ref[key][:, :k], new[key][:, :k], atol=1e-5), key
        assert not torch.allclose(ref[key][:, k + 1 :], new[key][:, k + 1 :]), key
    assert torch.allclose(ref["W_steps"][:, k], new["W_steps"][:, k], atol=1e-5)
    assert torch.allclose(ref["g"], new["g"])


def test_parts_sum_and_are_finite_for_every_training_crystal(model, data):
    """The masks never exclude a real crystal: every log-likelihood term is finite."""
    for idx in bucketed_batches(data.n, 256):
        out = model(data.batch(idx))
        for key in ("g", "W", "A", "X", "L", "total"):
            assert torch.isfinite(out[key]).all(), key
        parts = out["g"] + out["W"] + out["A"] + out["X"] + out["L"]
        assert torch.allclose(parts, out["total"])


def test_letter_masks_follow_the_rules():
    sym = SymmetryTensors()
    t = get_tables()
    g = torch.tensor([225, 225, 225, 2])
    prev = torch.tensor([0, 8, 0, 1])
    first = torch.tensor([True, False, False, False])
    mask = sym.letter_mask(g, prev, first)
    pad = sym.pad
    assert mask[0, :12].all() and not mask[0, 12:].any()  # first site: any letter, no end
    assert mask[1, 8:12].all() and not mask[1, :8].any() and mask[1, pad]  # 225 'i' has dof 1
    assert not mask[2, 0] and mask[2, 1]  # 'a' has no freedom: not twice
    assert t.dof[2, 1] == 0 and not mask[3, 1] and mask[3, 2:9].all()
    ended = sym.letter_mask(g[:1], torch.tensor([pad]), torch.tensor([False]))
    assert ended[0, pad] and ended[0].sum() == 1  # the end is absorbing


def test_categoricals_are_normalised(model, data):
    idx = np.arange(16)
    batch = data.batch(idx)
    h = torch.randn(16, TINY.d_model)
    g = batch["g"]
    logits = model.w_logits(h, g, batch["w"][:, 0], torch.zeros(16, dtype=torch.bool))
    p = torch.softmax(logits, -1)
    assert torch.allclose(p.sum(-1), torch.ones(16))
    assert (p[~torch.isfinite(logits)] == 0).all()
    step = model.site_content(
        h,
        g,
        batch["w"][:, 1],
        batch["w"][:, 0],
        batch["a"][:, 0],
        torch.zeros(16, dtype=torch.bool),
        a=batch["a"][:, 1],
        x=batch["x"][:, 1],
    )
    pa = torch.softmax(step.a_logits, -1)
    assert torch.allclose(pa.sum(-1), torch.ones(16)) and (pa[:, 0] == 0).all()


def test_von_mises_mixture_integrates_to_one():
    torch.manual_seed(1)
    params = torch.randn(5, 3 * 8) * 2
    grid = (torch.arange(20000) + 0.5) / 20000
    logp = von_mises_mixture_logpdf(grid[:, None].expand(-1, 5), params.expand(20000, -1, -1))
    integral = logp.exp().mean(0)
    assert torch.allclose(integral, torch.ones(5), atol=1e-4)


@pytest.mark.parametrize("system_group", [(6, 225), (3, 123), (5, 191)])
def test_lattice_density_integrates_to_one(model, system_group):
    """The lattice density, in Angstrom (and degrees), integrates to one on a grid."""
    system, g = system_group
    assert LATTICE_DIMS[system] in (1, 2)
    ctx = torch.randn(1, TINY.d_model)
    n_atoms = torch.tensor([8])
    mean, std = model.lattice.mean[system], model.lattice.std[system]
    lo = torch.exp(mean[0] - 6 * std[0] + math.log(8) / 3)
    hi = torch.exp(mean[0] + 6 * std[0] + math.log(8) / 3)
    if LATTICE_DIMS[system] == 1:
        a = torch.linspace(float(lo), float(hi), 20001)
        lat = torch.stack([a, a, a, *(torch.full_like(a, 90.0),) * 3], -1)
        lp = model.lattice_logprob(
            ctx.expand(len(a), -1),
            lat,
            torch.full_like(a, g, dtype=torch.long),
            n_atoms.expand(len(a)),
        )
        integral = torch.trapezoid(lp.exp(), a)
    else:
        lo_c = torch.exp(mean[2] - 6 * std[2] + math.log(8) / 3)
        hi_c = torch.exp(mean[2] + 6 * std[2] + math.log(8) / 3)
        a = torch.linspace(float(lo), float(hi), 400)
        c = torch.linspace(float(lo_c), float(hi_c), 400)
        A, C = torch.meshgrid(a, c, indexing="ij")
        gamma = 120.0 if system == 5 else 90.0
        lat = torch.stack(
            [
                A.flatten(),
                A.flatten(),
                C.flatten(),
                torch.full((A.numel(),), 90.0),
                torch.full((A.numel(),), 90.0),
                torch.full((A.numel(),), gamma),
            ],
            -1,
        )
        lp = model.lattice_logprob(
            ctx.expand(len(lat), -1),
            lat,
            torch.full((len(lat),), g, dtype=torch.long),
            n_atoms.expand(len(lat)),
        )
        integral = torch.trapezoid(torch.trapezoid(lp.exp().view(400, 400), c, dim=1), a)
    assert abs(float(integral) - 1.0) < 0.02


def test_lattice_feature_map_inverts(data):
    lat = torch.as_tensor(data.lattice[:200])
    g = torch.as_tensor(data.g[:200])
    system = torch.as_tensor(get_tables().crystal_system.astype("int64"))[g]
    n = torch.as_tensor(data.num_atoms[:200])
    z, _ = lattice_features(lat, system, n)
    assert torch.allclose(lattice_from_features(z, system, n), lat, atol=1e-3)


def test_log_prob_of_structures(model):
    from crystal_gpt import load_dataset

    structures = load_dataset("perov_5", "test", limit=4).structures
    out = model.log_prob(structures)
    assert out["total"].shape == (4,) and torch.isfinite(out["per_atom"]).all()
    assert torch.allclose(out["per_atom"] * 5, out["total"], atol=1e-3)  # cubic perovskites


def test_tiny_model_overfits_a_handful(data):
    torch.manual_seed(0)
    m = CrystalGPT(
        ModelConfig(
            d_model=64,
            n_layers=2,
            n_heads=4,
            d_ff=128,
            coord_mixtures=8,
            fourier_freqs=3,
            flow_transforms=2,
            flow_hidden=32,
        )
    )
    m.lattice.mean[:], m.lattice.std[:] = lattice_statistics(data)
    batch = data.batch(np.arange(8))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(250):
        loss = -m(batch)["total"].mean()
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first - 40, (first, float(loss))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("perov_5", "train"),
        ("perov_5", "val"),
        ("perov_5", "test"),
        ("carbon_24", "val"),
        ("carbon_24", "test"),
        ("mp_20", "train_first1000"),
        ("mp_20", "val"),
        ("mp_20", "test"),
        ("mpts_52", "val"),
        ("mpts_52", "test"),
    ],
)
def test_every_vendored_crystal_has_finite_likelihood(model, name, split):
    """Masks never exclude a real crystal, on every vendored file (slow: encodes them all)."""
    data = PaddedCrystals(encode_dataset(name, split, progress=False))
    for idx in bucketed_batches(data.n, 512):
        with torch.no_grad():
            out = model(data.batch(idx))
        assert torch.isfinite(out["total"]).all()


def test_spacegroup_prior_is_the_smoothed_histogram():
    from crystal_gpt.model.distributions import spacegroup_prior

    logp = spacegroup_prior(np.array([225, 225, 225, 1]), smoothing=0.5)
    p = logp[1:].exp()
    assert torch.isclose(p.sum(), torch.tensor(1.0))
    assert torch.isclose(p[224], torch.tensor(3.5 / (4 + 0.5 * 230)))
    m = CrystalGPT(TINY)
    with torch.no_grad():
        m.g_prior.copy_(logp)
    assert torch.isclose(m.g_logprob(torch.tensor([225]), None).exp(), p[224])


@pytest.mark.parametrize("dims", [3, 4, 6])
def test_higher_dimensional_lattice_flows_are_normalised(model, dims):
    """Importance sampling from a broad Gaussian: E_q[p / q] = 1 for the 3-, 4- and 6-D flows
    (in the standardised space; the change of variables is checked on grids above)."""
    torch.manual_seed(dims)
    flow = model.lattice.flows[str(dims)](torch.randn(1, TINY.d_model))
    q = torch.distributions.Normal(0.0, 2.5)
    z = q.sample((200_000, dims))
    with torch.no_grad():
        log_w = flow.log_prob(z) - q.log_prob(z).sum(-1)
    estimate = log_w.exp().mean()
    assert abs(float(estimate) - 1.0) < 0.05


def test_composition_conditioned_model(data):
    """The CSP variant reads each crystal's composition off its own sequence, gives a normalised
    P(g | composition), and its sampler needs (and honours) a composition."""
    from dataclasses import replace

    from crystal_gpt.data.codec import decode
    from crystal_gpt.data.symmetry import lattice_points
    from crystal_gpt.sampling.sampler import sample_crystals

    torch.manual_seed(0)
    m = CrystalGPT(replace(TINY, condition_on_composition=True)).eval()
    m.lattice.mean[:], m.lattice.std[:] = lattice_statistics(data)
    idx = np.arange(12)
    batch = data.batch(idx)
    counts = m.composition_counts(batch["g"], batch["w"], batch["a"], batch["n"])
    for i in idx:
        g, n = int(batch["g"][i]), int(batch["n"][i])
        expected = np.zeros(119)
        for w, a in zip(batch["w"][i, :n].tolist(), batch["a"][i, :n].tolist(), strict=True):
            expected[a] += get_tables().multiplicity[g, w] / lattice_points(g)
        assert np.allclose(counts[i].numpy(), expected)
    with torch.no_grad():
        out = m(batch)
        cond = m.condition_vector(batch["g"], None, counts)
        p_g = torch.softmax(m.g_logits(cond)[:, 1:], -1).sum(-1)
    assert torch.isfinite(out["total"]).all() and torch.allclose(p_g, torch.ones(12))
    with pytest.raises(ValueError, match="pass composition="):
        sample_crystals(m, 2)
    crystals = sample_crystals(m, 6, composition="Li2MnO3", seed=0)
    assert {decode(c).composition.reduced_formula for c in crystals} == {"Li2MnO3"}


class _Payload:
    """Unpickling this object would run a command (what a malicious checkpoint does)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_loading_a_checkpoint_never_runs_code(tmp_path):
    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.model.checkpoints import load_model

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="not a readable crystal-gpt checkpoint"):
        load_model(evil)
    assert cli_main(["sample", "-n", "1", "--model", str(evil), "--out", str(tmp_path / "s")])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_model(junk)
    assert not marker.exists()


def test_old_checkpoint_converts_with_one_command_and_run_folders_load(tmp_path, capsys):
    import dataclasses

    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.model.checkpoints import load_model, read_checkpoint
    from crystal_gpt.model.transformer import CrystalGPT

    # An old-style checkpoint: NumPy RNG state and a config dataclass, which only a full
    # unpickler reads.
    bundled = read_checkpoint(Path(str(resources.files("crystal_gpt"))) / "models/perov_5.pt")
    cfg = ModelConfig(**bundled["model_config"])
    old = tmp_path / "old.pt"
    torch.save(
        {"model": bundled["model"], "model_config": cfg, "np_rng": np.random.get_state()}, old
    )
    with pytest.raises(ValueError, match="not a readable"):
        load_model(old)
    new = tmp_path / "new.pt"
    assert cli_main(["convert", str(old), str(new)]) == 2  # --trust is required
    assert "unpickles it" in capsys.readouterr().err
    assert cli_main(["convert", str(old), str(new), "--trust"]) == 0
    model = load_model(new)
    assert dataclasses.asdict(model.config) == dataclasses.asdict(cfg)
    assert isinstance(read_checkpoint(new)["np_rng"][1], torch.Tensor)
    assert cli_main(["convert", str(old), str(new), "--trust"]) == 2  # never overwrites
    # A training run's folder loads (its best.pt); a folder that is not a run is an error.
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(new.read_bytes())
    assert CrystalGPT.from_pretrained(str(run)).config.d_model == cfg.d_model
    with pytest.raises(FileNotFoundError, match="not a run"):
        load_model(tmp_path)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    from crystal_gpt.model.checkpoints import load_model, read_checkpoint

    state = read_checkpoint(Path(str(resources.files("crystal_gpt"))) / "models/perov_5.pt")
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name] = state["model"][name].clone()
    state["model"][name].view(-1)[0] = float("nan")  # what a flipped byte can do
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="hold NaN or inf"):
        load_model(tmp_path / "damaged.pt")


@pytest.mark.parametrize("kappa", [1e-3, 0.3, 2.0, 40.0, 5e4])
def test_von_mises_sampler_follows_the_density(kappa):
    """The hand-rolled Best-Fisher draw against scipy's von Mises CDF, from tiny to huge kappa,
    and reproducible from the generator alone."""
    from scipy import stats

    from crystal_gpt.model.distributions import von_mises_sample

    loc = torch.full((4000,), 1.0)
    k = torch.full((4000,), kappa)
    draw = von_mises_sample(loc, k, torch.Generator().manual_seed(3))
    again = von_mises_sample(loc, k, torch.Generator().manual_seed(3))
    assert torch.equal(draw, again)
    # wrapped to (-pi, pi] around loc: scipy's von Mises lives there
    d = torch.remainder(draw - loc.double() + math.pi, 2 * math.pi) - math.pi
    p = stats.kstest(d.numpy(), stats.vonmises(kappa).cdf).pvalue
    assert p > 1e-3, f"kappa {kappa}: KS p = {p:.2g}"
    if kappa < 1e-2:  # nearly uniform, and still no NaN
        assert torch.isfinite(draw).all()
