"""Property conditions: one mechanism for training, likelihood and (guided) sampling."""

import copy
import json

import numpy as np
import pytest
import torch
from scipy import stats

from crystal_gpt import encode_dataset
from crystal_gpt.cli import main as cli_main
from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.data.cache import EncodedDataset
from crystal_gpt.model.checkpoints import load_model
from crystal_gpt.model.distributions import lattice_statistics
from crystal_gpt.model.transformer import CrystalGPT, guided
from crystal_gpt.sampling.sampler import sample_crystals
from crystal_gpt.training import load_config, train
from tests.test_calibration import discrete_pit, pits

N = 400
ALPHA = 1e-3


@pytest.fixture(scope="module")
def carbon():
    return encode_dataset("carbon_24", "holdout", workers=1, progress=False)


@pytest.fixture(scope="module")
def cond_model(carbon):
    """An untrained tiny model with a strong condition 'y': its encoder, the absent vector and
    the P(g) term are scaled up, so y changes every distribution (the tests have power)."""
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=['model.conditions={"y": 1}']).model
    m = CrystalGPT(cfg)
    m.lattice.mean[:], m.lattice.std[:] = lattice_statistics(PaddedCrystals(carbon))
    with torch.no_grad():
        m.cond_encoders["y"][-1].weight.mul_(30.0)
        m.cond_absent.normal_(0, 3.0)
        m.g_prior_cond.weight.mul_(5.0)
        m.set_condition_stats({"y": np.array([0.0, 2.0, 4.0])})
    return m.eval()


def test_a_condition_changes_the_likelihood_and_absent_is_nan(cond_model, carbon):
    data = PaddedCrystals(carbon)
    batch = data.batch(np.arange(40))
    with torch.no_grad():
        lo = cond_model(batch, {"y": torch.full((40,), 0.0)})["total"]
        hi = cond_model(batch, {"y": torch.full((40,), 4.0)})["total"]
        absent = cond_model(batch)["total"]
        nan = cond_model(batch, {"y": torch.full((40,), float("nan"))})["total"]
    assert (lo - hi).abs().mean() > 1.0
    torch.testing.assert_close(absent, nan)
    assert (absent - lo).abs().mean() > 1.0
    # the batch route ("cond:<name>") is the same as passing the values
    with torch.no_grad():
        routed = cond_model({**batch, "cond:y": torch.full((40,), 4.0)})["total"]
    torch.testing.assert_close(routed, hi)


def test_condition_dropout_hides_conditions_in_training_only(cond_model, carbon):
    m = copy.deepcopy(cond_model)
    m.config.condition_dropout, m.config.condition_dropout_all = 0.999999, 0.0
    batch = PaddedCrystals(carbon).batch(np.arange(20))
    m.train()
    m.config.dropout = 0.0
    for block in m.blocks:
        block.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = m.condition_vector(batch["g"], {"y": torch.full((20,), 4.0)})
        absent = m.condition_vector(batch["g"], None)
    torch.testing.assert_close(dropped, absent)
    m.eval()
    with torch.no_grad():
        kept = m.condition_vector(batch["g"], {"y": torch.full((20,), 4.0)})
    assert (kept - absent).abs().max() > 1.0


@pytest.mark.parametrize("y", [0.0, 4.0])
def test_conditioned_samples_follow_the_conditional_model(cond_model, y):
    crystals = sample_crystals(
        cond_model, N, seed=2, symprec=None, min_distance=None, conditions={"y": y}
    )
    res = pits(_Routed(cond_model, y), crystals)
    for part, u in res.items():
        if len(u) >= 20:
            p = stats.kstest(u, "uniform").pvalue
            assert p > ALPHA, f"y={y} {part}: KS p = {p:.2g} over {len(u)} draws"
    # and the space groups follow P(g | y), not P(g)
    with torch.no_grad():
        cond = cond_model.condition_vector(None, {"y": y}, size=1)
        logits = cond_model.g_logits(cond)[0]
    g = torch.as_tensor([c.spacegroup for c in crystals])
    u = discrete_pit(logits.masked_fill(torch.arange(231) == 0, -torch.inf).expand(N, -1), g,
                     np.random.default_rng(0))  # fmt: skip
    assert stats.kstest(u, "uniform").pvalue > ALPHA


class _Routed(torch.nn.Module):
    """The model with its condition fixed (so ``pits`` scores P(. | y))."""

    def __init__(self, model, y):
        super().__init__()
        self.model, self.y = model, y
        self.config, self.sym = model.config, model.sym

    def forward(self, batch, **kw):
        n = len(batch["g"])
        return self.model(batch, {"y": torch.full((n,), self.y)}, **kw)


def test_guided_samples_follow_the_guided_logits(cond_model):
    """Guidance: letters and elements follow log p(.|y)^s p(.)^(1-s), computed here from two
    teacher-forced passes (conditional, unconditional) over the sampled crystals; coordinates
    follow P(x | y). (s = 4: at s = 2.5 the power check below passed for one seed of three.)"""
    s, y = 4.0, 4.0
    crystals = sample_crystals(
        cond_model, N, seed=3, symprec=None, min_distance=None, conditions={"y": y}, guidance=s
    )
    data = PaddedCrystals(EncodedDataset.from_crystals(crystals))
    batch = data.batch(np.arange(len(data)))
    with torch.no_grad():
        c = cond_model(batch, {"y": torch.full((N,), y)}, distributions=True)
        u = cond_model(batch, distributions=True)
    rng = np.random.default_rng(0)
    B, T1, _ = c["w_logits"].shape
    steps = torch.arange(T1)
    valid = steps[None, :] <= batch["n"][:, None]
    pad = cond_model.sym.pad
    w_t = torch.cat([batch["w"], torch.full((B, 1), pad)], 1)
    w_t = torch.where(steps[None, :] < batch["n"][:, None], w_t, pad)
    legal = torch.isfinite(c["w_logits"])
    w_logits = torch.where(legal, guided(c["w_logits"], u["w_logits"].nan_to_num(), s), -torch.inf)
    res = {"W": discrete_pit(w_logits[valid], w_t[valid], rng)}
    is_site = steps[None, :] < batch["n"][:, None]
    a = torch.cat([batch["a"], torch.zeros(B, 1, dtype=torch.long)], 1)[is_site]
    legal_a = torch.isfinite(c["a_logits"])
    a_logits = torch.where(legal_a, guided(c["a_logits"], u["a_logits"], s), -torch.inf)
    res["A"] = discrete_pit(a_logits, a, rng)
    res.update({k: v for k, v in pits(_Routed(cond_model, y), crystals).items() if k[0] in "XL"})
    for part, vals in res.items():
        if len(vals) >= 20:
            p = stats.kstest(vals, "uniform").pvalue
            assert p > ALPHA, f"guided {part}: KS p = {p:.2g} over {len(vals)} draws"
    # the check has power: the same draws are not uniform under the unguided conditional
    plain = discrete_pit(c["w_logits"][valid], w_t[valid], np.random.default_rng(0))
    assert stats.kstest(plain, "uniform").pvalue < ALPHA


def test_guidance_one_is_the_conditional_model(cond_model):
    a = sample_crystals(cond_model, 30, seed=5, symprec=None, conditions={"y": 2.0})
    b = sample_crystals(cond_model, 30, seed=5, symprec=None, conditions={"y": 2.0}, guidance=1.0)
    assert [x.spacegroup for x in a] == [x.spacegroup for x in b]
    # per-crystal targets: one value per crystal
    c = sample_crystals(
        cond_model, 6, seed=5, symprec=None, conditions={"y": [0, 0, 0, 4, 4, 4]}, guidance=2.0
    )
    assert len(c) == 6


def test_condition_errors_are_named(cond_model, model):
    with pytest.raises(ValueError, match=r"not trained on condition.*band_gap.*knows: y"):
        sample_crystals(cond_model, 2, conditions={"band_gap": 1.0})
    with pytest.raises(ValueError, match="knows: none"):
        sample_crystals(model, 2, conditions={"band_gap": 1.0})
    with pytest.raises(ValueError, match="guidance needs a condition"):
        sample_crystals(cond_model, 2, guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be a number"):
        sample_crystals(cond_model, 2, conditions={"y": 1.0}, guidance=-1)
    with pytest.raises(ValueError, match="3 values given for 2 crystals"):
        sample_crystals(cond_model, 2, conditions={"y": [1, 2, 3]})
    with pytest.raises(ValueError, match="finite"):
        sample_crystals(cond_model, 2, conditions={"y": float("inf")})
    nodrop = copy.deepcopy(cond_model)
    nodrop.config.condition_dropout = nodrop.config.condition_dropout_all = 0.0
    with pytest.raises(ValueError, match="without condition dropout"):
        sample_crystals(nodrop, 2, conditions={"y": 1.0}, guidance=2.0)


def test_a_missing_condition_column_names_the_numeric_ones(carbon):
    with pytest.raises(ValueError, match=r"no such column.*energy_per_atom"):
        PaddedCrystals(carbon, conditions=["band_gap"])


def test_train_sample_and_score_a_conditioned_model(tmp_path, carbon, capsys):
    """A tiny run through the CLI: --condition-columns, then sample with --condition and
    --guidance, and the nll command scores the test crystals given their own values."""
    ds = carbon
    cfg = load_config("tiny", overrides=["epochs=2", 'model.conditions={"energy_per_atom": 1}'])
    # missing values are allowed: a third of the crystals have none
    values = ds.properties["energy_per_atom"].copy()
    values[::3] = np.nan
    ds = EncodedDataset(**{**ds.__dict__, "properties": {"energy_per_atom": values}})
    train(cfg, tmp_path / "run", train_data=ds.select(np.arange(80)),
          val_data=ds.select(np.arange(80, 102)), progress=False)  # fmt: skip
    m = load_model(tmp_path / "run" / "best.pt")
    mean, std = m.condition_stats[0].tolist()
    finite = values[:80][np.isfinite(values[:80])]
    assert mean == pytest.approx(finite.mean(), rel=1e-5) and std == pytest.approx(
        finite.std(), rel=1e-3
    )
    out = tmp_path / "s"
    code = cli_main(
        ["sample", "-n", "6", "--model", str(tmp_path / "run" / "best.pt"), "--seed", "0",
         "--condition", "energy_per_atom=-154.3", "--guidance", "1.5", "--out", str(out)]
    )  # fmt: skip
    assert code == 0 and len(list((out / "cif").glob("*.cif"))) == 6
    assert "condition_energy_per_atom" in (out / "summary.csv").read_text().splitlines()[0]
    # the likelihood in summary.csv is log P(crystal | y)
    structures = m.sample(4, seed=1, conditions={"energy_per_atom": -154.3})
    assert len(structures) == 4
    lp_c = m.log_prob(structures, conditions={"energy_per_atom": -154.3})["total"]
    lp_u = m.log_prob(structures)["total"]
    assert not torch.allclose(lp_c, lp_u)
    bad = ["sample", "-n", "2", "--condition", "band_gap", "--out", str(tmp_path / "x")]
    assert cli_main(bad) == 2
    err = capsys.readouterr().err
    assert "expected NAME=NUMBER" in err
    cli_main(["train", "--preset", "tiny", "--dataset", "carbon_24", "--limit", "40",
              "--epochs", "1", "--condition-columns", "energy_per_atom", "--quiet",
              "--out", str(tmp_path / "cli")])  # fmt: skip
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["model"]["conditions"] == {"energy_per_atom": 1}
    # nll: the test crystals given their own values, or with the condition hidden
    nll = ["nll", str(tmp_path / "run" / "best.pt"), "--dataset", "carbon_24", "--split",
           "holdout", "--quiet", "--json"]  # fmt: skip
    capsys.readouterr()
    assert cli_main(nll) == 0
    given = json.loads(capsys.readouterr().out)
    assert cli_main([*nll, "--hide-conditions", "all"]) == 0
    hidden = json.loads(capsys.readouterr().out)
    assert hidden["hidden_conditions"] == ["energy_per_atom"] and given["hidden_conditions"] == []
    assert hidden["crystals"] == given["crystals"] == 102
    assert hidden["nll_total"] != pytest.approx(given["nll_total"], abs=1e-4)
    assert cli_main([*nll, "--hide-conditions", "band_gap"]) == 2
    assert "no condition 'band_gap' (its conditions: energy_per_atom)" in capsys.readouterr().err


def _p_g(model, conditions=None, guidance=None):
    with torch.no_grad():
        cond = model.condition_vector(None, conditions or {}, size=1)
        guide = None
        if guidance is not None:
            guide = (model.condition_vector(None, {}, size=1), guidance)
        logits = model.g_logits(cond, guide)[0].clone()
    logits[0] = -torch.inf
    return torch.softmax(logits.double(), -1)


def _with_histogram_option(model, value: bool):
    out = copy.deepcopy(model)
    out.config = copy.deepcopy(model.config)
    out.config.g_marginal_histogram = value
    return out


def test_g_marginal_histogram_makes_nothing_given_the_prior(cond_model):
    """With the option, P(g | nothing given) is g_prior itself (the training histogram),
    guided or not, while a given condition still moves it; without it the learnt term does."""
    exact = _with_histogram_option(cond_model, True)
    legacy = _with_histogram_option(cond_model, False)
    logits = exact.g_prior.detach().clone()
    logits[0] = -torch.inf
    prior = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(_p_g(exact), prior)
    torch.testing.assert_close(_p_g(exact, guidance=3.0), prior)
    assert (_p_g(exact, {"y": 4.0}) - prior).abs().sum() > 0.1
    assert (_p_g(legacy) - prior).abs().sum() > 0.1  # the option is what makes it exact


def test_histogram_group_prior_rewrites_a_conditioned_checkpoint(tmp_path, cond_model, carbon):
    from crystal_gpt.model.checkpoints import histogram_group_prior
    from crystal_gpt.model.distributions import spacegroup_prior

    cond_model = _with_histogram_option(cond_model, False)  # a model from before the option
    src = tmp_path / "m.pt"
    meta = {"dataset": "carbon_24", "train_split": "holdout"}
    state = {k: v.clone() for k, v in cond_model.state_dict().items()}
    torch.save({"model": state, "model_config": cond_model.config.to_dict(), "meta": meta}, src)
    out = histogram_group_prior(src, tmp_path / "h.pt")
    new = load_model(out)
    assert new.config.g_marginal_histogram
    hist = spacegroup_prior(carbon.spacegroup).double()
    hist[0] = -torch.inf
    torch.testing.assert_close(_p_g(new), torch.softmax(hist, -1))
    # P(g | y) is the old one reweighted by histogram / old P(g | nothing)
    old_y, old_none = _p_g(cond_model, {"y": 4.0}), _p_g(cond_model)
    expect = old_y * torch.softmax(hist, -1) / old_none.clamp(min=1e-300)
    expect[0] = 0
    torch.testing.assert_close(_p_g(new, {"y": 4.0}), expect / expect.sum())
    for k, v in cond_model.state_dict().items():  # nothing else changed
        if k != "g_prior":
            torch.testing.assert_close(new.state_dict()[k], v)
    with pytest.raises(ValueError, match="histogram already"):
        histogram_group_prior(out)
    plain = tmp_path / "plain.pt"
    cfg = {**cond_model.config.to_dict(), "conditions": {}}
    torch.save({"model": {}, "model_config": cfg, "meta": meta}, plain)
    with pytest.raises(ValueError, match="not a conditioned model"):
        histogram_group_prior(plain)
    csp = tmp_path / "csp.pt"
    torch.save({"model": {}, "model_config": {**cfg, "condition_on_composition": True}}, csp)
    with pytest.raises(ValueError, match="always has a composition"):
        histogram_group_prior(csp)


def test_training_with_g_marginal_histogram_keeps_the_histogram(tmp_path, carbon):
    from crystal_gpt.model.distributions import spacegroup_prior

    cfg = load_config(
        "tiny",
        overrides=[
            "epochs=1",
            'model.conditions={"energy_per_atom": 1}',
            "model.g_marginal_histogram=true",
        ],
    )
    train_ds = carbon.select(np.arange(80))
    train(cfg, tmp_path / "run", train_data=train_ds, val_data=carbon.select(np.arange(80, 102)),
          progress=False)  # fmt: skip
    m = load_model(tmp_path / "run" / "best.pt")
    torch.testing.assert_close(m.g_prior.detach(), spacegroup_prior(train_ds.spacegroup))
    hist = spacegroup_prior(train_ds.spacegroup).double()
    hist[0] = -torch.inf
    torch.testing.assert_close(_p_g(m), torch.softmax(hist, -1))
