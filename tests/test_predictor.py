"""The property predictor, ranking, and steering by importance resampling."""

import csv

import numpy as np
import pytest
import torch

from crystal_gpt import encode_dataset
from crystal_gpt.cli import main as cli_main
from crystal_gpt.data.cache import EncodedDataset
from crystal_gpt.model.predictor import PredictorConfig, load_predictor, train_predictor
from crystal_gpt.sampling.steering import resample_indices, steer

TINY = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def predictor_run(tmp_path_factory):
    """A tiny predictor of a property that the representation determines exactly (the
    number of atoms in the cell), so that learning is checkable in seconds."""
    ds = encode_dataset("carbon_24", "holdout", workers=1, progress=False)
    ds = EncodedDataset(**{**ds.__dict__, "properties": {"atoms": ds.num_atoms.astype(float)}})
    out = tmp_path_factory.mktemp("pred")
    summary = train_predictor(
        "carbon_24", "atoms", out, config=PredictorConfig(**TINY), epochs=40, patience=40,
        train_data=ds.select(np.arange(70)), val_data=ds.select(np.arange(70, 86)),
        test_data=ds.select(np.arange(86, 102)), progress=False, lr=3e-3, batch_size=16,
    )  # fmt: skip
    return out, summary


def test_the_predictor_learns_and_reloads_weights_only(predictor_run):
    out, summary = predictor_run
    assert summary["test_mae"] < 0.5 * summary["test_mae_of_the_training_median"]
    p = load_predictor(out / "best.pt")
    assert p.config.target == "atoms" and p.meta["test_mae"] == pytest.approx(summary["test_mae"])
    (out / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable crystal-gpt predictor"):
        load_predictor(out / "bad.pt")
    with pytest.raises(FileNotFoundError, match="no predictor"):
        load_predictor("no_such_predictor")


def test_resampling_draws_in_proportion_to_the_weights():
    rng = np.random.default_rng(0)
    pred = np.array([0.0, 1.0, 2.0])
    w = np.exp(-0.5 * ((pred - 1.0) / 0.8) ** 2)
    counts = np.zeros(3)
    for _ in range(4000):
        idx, _ = resample_indices(pred, 1.0, 0.8, 1, rng)
        counts[idx] += 1
    np.testing.assert_allclose(counts / counts.sum(), w / w.sum(), atol=0.03)
    # a wide Gaussian keeps the pool as it is; a narrow one keeps the nearest
    pool = np.linspace(0, 10, 101)
    wide, ess = resample_indices(pool, 5.0, 1e6, 101, rng)
    assert len(wide) == 101 and ess == pytest.approx(101, rel=1e-6)
    near, _ = resample_indices(pool, 5.0, 1e-3, 3, rng)
    np.testing.assert_allclose(pool[near], [4.9, 5.0, 5.1])
    with pytest.raises(ValueError, match="width"):
        resample_indices(pool, 5.0, 0.0, 3, rng)


def test_steering_moves_the_samples_toward_the_target(model, predictor_run):
    out, _ = predictor_run
    p = load_predictor(out / "best.pt")
    torch.manual_seed(0)
    kept, record = steer(model, p, 20, 4.0, width=0.5, oversample=6, seed=0, symprec=None)
    assert len(kept) == 20 and record["pool"] == 120
    assert abs(record["kept_mean_prediction"] - 4.0) < abs(record["pool_mean_prediction"] - 4.0)
    assert all("atoms" in c.meta["predicted"] for c in kept)


def test_cli_steer_and_predict(tmp_path, predictor_run):
    out, _ = predictor_run
    s = tmp_path / "s"
    code = cli_main(["sample", "-n", "5", "--model", "carbon_24", "--seed", "0", "--steer",
                     "atoms=8", "--predictor", str(out / "best.pt"), "--oversample", "3",
                     "--out", str(s)])  # fmt: skip
    assert code == 0
    header = (s / "summary.csv").read_text().splitlines()[0]
    assert "predicted_atoms" in header
    code = cli_main(["predict", str(s), "--predictor", str(out / "best.pt"), "--target", "8",
                     "--out", str(tmp_path / "p.csv")])  # fmt: skip
    assert code == 0
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    dist = [abs(float(r["predicted_atoms"]) - 8) for r in rows]
    assert len(rows) == 5 and dist == sorted(dist)
    bad = ["sample", "-n", "2", "--model", "carbon_24", "--out", str(tmp_path / "x")]
    assert cli_main([*bad, "--predictor", str(out / "best.pt")]) == 2
    assert cli_main([*bad, "--steer", "band_gap=1", "--predictor", str(out / "best.pt")]) == 2


def test_evaluate_conditioning_with_a_predictor_and_with_chgnet(predictor_run, tmp_path):
    """The evaluation runs end to end on tiny untrained conditioned models: rows per target
    plus the unconditional one, the files and the plot; CHGNet formation energies (single
    points against the shipped mp_20 hull's elemental references) for the CHGNet path."""
    from crystal_gpt.evaluation.conditioning import evaluate_conditioning
    from crystal_gpt.model.transformer import CrystalGPT
    from crystal_gpt.training import load_config

    out, _ = predictor_run
    p = load_predictor(out / "best.pt")
    torch.manual_seed(0)
    m = CrystalGPT(load_config("tiny", overrides=['model.conditions={"atoms": 1}']).model).eval()
    m.load_weights(load_model_state("carbon_24", m))
    res = evaluate_conditioning(
        m, "atoms", [4.0, 8.0], 8, guidance=[1.0, 2.0], predictor=p, training_dataset=None,
        progress=False, out_dir=tmp_path / "c", symprec=None,
    )  # fmt: skip
    assert [(r["target"], r["guidance"]) for r in res.rows] == [
        (None, 1.0), (4.0, 1.0), (8.0, 1.0), (4.0, 2.0), (8.0, 2.0)
    ]  # fmt: skip
    assert all(np.isfinite(r["mean"]) for r in res.rows)
    for name in ("conditioning.md", "conditioning.json", "target_vs_achieved.png"):
        assert (tmp_path / "c" / name).exists()
    assert "closer" in (tmp_path / "c" / "conditioning.md").read_text()
    # the mean over valid crystals (structure + SMACT) is the per-crystal rows' mean
    for r in res.rows:
        mine = [
            c["achieved"] for c in res.per_crystal
            if c["target"] == ("" if r["target"] is None else r["target"])
            and c["guidance"] == r["guidance"] and c["smact_valid"] and c["achieved"] != ""
        ]  # fmt: skip
        assert r["measured_valid"] == len(mine)
        if mine:
            assert r["mean_valid"] == pytest.approx(np.mean(mine), abs=1e-3)
        else:
            assert np.isnan(r["mean_valid"])
    steered = evaluate_conditioning(
        m, "atoms", [6.0], 4, predictor=p, steer_with=p, oversample=2, baseline=False,
        training_dataset=None, progress=False, symprec=None,
    )  # fmt: skip
    assert [r["method"] for r in steered.rows] == ["steered"]
    with pytest.raises(ValueError, match="not conditioned on 'band_gap'"):
        evaluate_conditioning(m, "band_gap", [1.0], 2, predictor=p)
    # a predictor given for a property CHGNet could measure is the one used
    from crystal_gpt.evaluation.conditioning import achieved_values

    with pytest.raises(ValueError, match="predicts 'atoms', not 'formation_energy_per_atom'"):
        achieved_values("formation_energy_per_atom", [], [], predictor=p)
    with pytest.raises(ValueError, match="predicted, not relaxed"):
        evaluate_conditioning(m, "atoms", [4.0], 2, predictor=p, relax_steps=10)
    pytest.importorskip("chgnet")
    cfg = load_config("tiny", overrides=['model.conditions={"formation_energy_per_atom": 1}'])
    f = CrystalGPT(cfg.model).eval()
    f.load_weights(load_model_state("carbon_24", f))
    res = evaluate_conditioning(
        f, "formation_energy_per_atom", [-1.0], 3, training_dataset=None, progress=False,
        symprec=None, min_distance="auto",
    )  # fmt: skip
    assert "elemental references" in res.how
    assert res.rows[1]["measured"] >= 1 and np.isfinite(res.rows[1]["mean"])


def load_model_state(name, into):
    """The lattice statistics and training range of a bundled model, for an untrained one."""
    from crystal_gpt.model.checkpoints import load_model

    src = load_model(name).state_dict()
    state = into.state_dict()
    for key in ("lattice.mean", "lattice.std", "seen_elements", "atoms_range",
                "pair_min_distance"):  # fmt: skip
        state[key] = src[key]
    return state


def test_cli_evaluate_conditions_follows_the_models_dataset(tmp_path, predictor_run, monkeypatch):
    """A carbon_24 model is measured against carbon_24's training crystals, and its default
    predictor is carbon_24_<property>, not mp_20's (the evaluation itself is tested above)."""
    import crystal_gpt.evaluation.conditioning as conditioning

    out, _ = predictor_run
    seen = {}

    def fake(model, prop, targets, n, **kw):
        seen.update(kw, prop=prop)
        raise SystemExit(0)

    monkeypatch.setattr(conditioning, "evaluate_conditioning", fake)
    args = ["evaluate-conditions", "--model", "carbon_24", "--property", "atoms",
            "--targets", "8", "-n", "3", "--out", str(tmp_path / "e")]  # fmt: skip
    with pytest.raises(SystemExit):
        cli_main([*args, "--predictor", str(out / "best.pt")])
    assert seen["training_dataset"] == "carbon_24" and seen["prop"] == "atoms"
    assert "novelty against the carbon_24 training crystals" in seen["description"]
    with pytest.raises(SystemExit):
        cli_main([*args, "--predictor", str(out / "best.pt"), "--no-novelty"])
    assert seen["training_dataset"] is None
    with pytest.raises(SystemExit):
        cli_main([*args, "--predictor", str(out / "best.pt"), "--dataset", "perov_5"])
    assert seen["training_dataset"] == "perov_5"
    assert cli_main(args) == 2  # no bundled carbon_24_atoms predictor: a one-line error


def test_cli_steer_defaults_to_the_models_own_predictor(tmp_path, capsys):
    """`sample --model perov_5 --steer heat_ref=...` steers with the bundled perov_5_heat_ref,
    the predictor of the model's own dataset."""
    out = tmp_path / "s"
    code = cli_main(["sample", "-n", "3", "--model", "perov_5", "--seed", "0", "--steer",
                     "heat_ref=1.0", "--oversample", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert "steered toward heat_ref = 1" in capsys.readouterr().err
    assert "predicted_heat_ref" in (out / "summary.csv").read_text().splitlines()[0]
