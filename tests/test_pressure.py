"""The alex_pressure dataset (vendored, checked, split by material) and generation at pressure."""

import bz2
import csv
import gzip
import json
import shutil

import numpy as np
import pytest

from crystal_gpt.cli import main as cli_main
from crystal_gpt.data import datasets
from crystal_gpt.data.datasets import (
    PRESSURES,
    DatasetError,
    available_files,
    file_digest,
    load_dataset,
    material_split,
    verified,
)
from crystal_gpt.evaluation.pressure import PressureReference, evaluate_pressures
from crystal_gpt.model.checkpoints import load_model


def test_bundled_files_are_the_published_ones():
    files = available_files("alex_pressure")
    assert sorted(files) == sorted([f"P{p:03d}" for p in PRESSURES] + ["splits"])
    for path in files.values():
        assert verified(path) == path


def test_the_split_is_by_material():
    train, hold, test = (material_split(s) for s in ("train", "holdout", "test"))
    assert (len(train), len(hold), len(test)) == (7325, 915, 915)
    assert not set(train) & set(test) and not set(train) & set(hold) and not set(hold) & set(test)
    with pytest.raises(DatasetError, match="no split 'dev'"):
        material_split("dev")


def test_load_by_name_at_some_pressures():
    ds = load_dataset("alex_pressure", "test", pressures=[0, 150], limit=30)
    assert len(ds) == 30 and {r.properties["pressure"] for r in ds} == {0.0}
    test_ids = set(material_split("test"))
    assert all(r.id in test_ids for r in ds)
    r = ds[0]
    assert {"enthalpy_per_atom", "e_form", "e_above_hull", "band_gap"} <= set(r.properties)
    assert abs(r.properties["stress_pressure"]) < 5  # the DFT cell's own pressure, ~0 GPa
    assert 1 <= len(r.structure) <= 6
    with pytest.raises(DatasetError, match=r"no pressure 40.*conditioned model samples any"):
        load_dataset("alex_pressure", "test", pressures=[40])
    with pytest.raises(DatasetError, match="alex_pressure option"):
        load_dataset("mp_20", "test", pressures=[0], limit=1)


def test_a_changed_file_is_refused(tmp_path):
    folder = tmp_path / "alex_pressure"
    folder.mkdir()
    raw = bytearray(available_files("alex_pressure")["P050"].read_bytes())
    raw[1000] ^= 1
    (folder / "P050.json.bz2").write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="sha256 differs"):
        load_dataset("alex_pressure", "test", pressures=[50], data_dir=tmp_path, limit=1)


@pytest.fixture(scope="module")
def small_pressure_data(tmp_path_factory):
    """A 36-material alex_pressure (24 train, 6 val, 6 test; all seven pressures) in a data
    folder of its own, its digests standing in for the published ones."""
    root = tmp_path_factory.mktemp("pdata")
    folder = root / "alex_pressure"
    folder.mkdir()
    bundled = available_files("alex_pressure")
    chosen = None
    digests = {}
    for p in PRESSURES:
        with bz2.open(bundled[f"P{p:03d}"], "rt") as f:
            entries = json.load(f)["entries"]
        if chosen is None:
            chosen = sorted(e["data"]["mat_id"] for e in entries)[:36]
        keep = [e for e in entries if e["data"]["mat_id"] in set(chosen)]
        path = folder / f"P{p:03d}.json.bz2"
        with bz2.open(path, "wt") as f:
            json.dump({"entries": keep}, f)
        digests[f"P{p:03d}"] = file_digest(path)
    with gzip.open(folder / "splits.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mat_id", "split"])
        for i, m in enumerate(chosen):
            w.writerow([m, "train" if i < 24 else "val" if i < 30 else "test"])
    digests["splits"] = file_digest(folder / "splits.csv.gz")
    return root, digests


@pytest.fixture
def use_small(small_pressure_data, monkeypatch):
    root, digests = small_pressure_data
    monkeypatch.setenv("CRYSTAL_GPT_DATA", str(root))
    monkeypatch.setattr(datasets, "PRESSURE_SHA256", digests)
    return root


def test_data_info_per_pressure(use_small, capsys):
    assert cli_main(["data", "info", "alex_pressure", "--split", "train", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "split by material" in out and "per pressure" in out
    lines = [ln.split() for ln in out.splitlines() if ln.strip().split(" ")[0] in {"0", "150"}]
    v0, v150 = (float(ln[2]) for ln in lines)
    assert v150 < 0.8 * v0  # squeezed
    assert cli_main(["data", "info", "alex_pressure", "--split", "test", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["test"]["per_pressure"]
    assert set(st) == {f"{p:g}" for p in PRESSURES}
    assert st["0"]["crystals"] == 6 and st["0"]["changed_group_vs_lowest"] == 0


def test_pressure_conditioned_train_sample_evaluate(use_small, tmp_path, capsys):
    """Tiny pressure-conditioned models (generation and CSP) trained by the CLI; sampling at a
    pressure between grid points; the pressure evaluation and CSP at pressure run end to end."""
    common = ["--preset", "tiny", "--dataset", "alex_pressure", "--epochs", "2", "--quiet",
              "--condition-columns", "pressure", "--set", "model.lattice_first=true"]  # fmt: skip
    assert cli_main(["train", *common, "--out", str(tmp_path / "gen")]) == 0
    assert cli_main(["train", *common, "--set", "model.condition_on_composition=true",
                     "--out", str(tmp_path / "csp")]) == 0  # fmt: skip
    model = load_model(tmp_path / "gen" / "best.pt")
    mean, std = model.condition_stats[0].tolist()
    assert mean == pytest.approx(75.0) and std == pytest.approx(np.std(PRESSURES))
    structures = model.sample(4, seed=0, conditions={"pressure": 40.0})
    assert len(structures) == 4
    res = evaluate_pressures(model, [0, 40], 6, out_dir=tmp_path / "ev", progress=False)
    assert [r["pressure"] for r in res.rows] == [0.0, 40.0]
    assert res.rows[1]["data_pressures"] == [25.0, 50.0] and "wdist_density" in res.rows[0]
    assert 0 <= res.rows[0]["novel"] <= 1 and 0 <= res.rows[0]["unique"] <= 1
    for name in ("pressure.md", "pressure.json", "volume_vs_pressure.png"):
        assert (tmp_path / "ev" / name).exists()
    assert (tmp_path / "ev" / "samples_40GPa" / "summary.csv").exists()
    ref = PressureReference.from_split("test")
    assert np.median(ref.vpa[150.0]) < np.median(ref.vpa[0.0])
    code = cli_main(["evaluate-csp", "--model", str(tmp_path / "csp" / "best.pt"), "--dataset",
                     "alex_pressure", "--pressure", "50", "-k", "2", "--workers", "1",
                     "--out", str(tmp_path / "csp_out")])  # fmt: skip
    assert code == 0
    assert "at 50 GPa" in (tmp_path / "csp_out" / "csp.md").read_text()
    with pytest.raises(ValueError, match="not conditioned on pressure"):
        evaluate_pressures(load_model("mp_20"), [0], 2)
    shutil.rmtree(tmp_path / "ev")
