import gzip
from pathlib import Path

import pytest

from crystal_gpt import DatasetError, load_dataset
from crystal_gpt.data.datasets import (
    available_files,
    holdout_mask,
    protocol,
    read_rows,
    split_sources,
)

GOOD_CIF = """data_NaCl
_symmetry_space_group_name_H-M   'P 1'
_cell_length_a   5.64
_cell_length_b   5.64
_cell_length_c   5.64
_cell_angle_alpha   90
_cell_angle_beta   90
_cell_angle_gamma   90
_symmetry_Int_Tables_number   1
loop_
 _symmetry_equiv_pos_site_id
 _symmetry_equiv_pos_as_xyz
  1  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Na  Na0  0.0  0.0  0.0  1
  Cl  Cl1  0.5  0.5  0.5  1
"""


def write_csv(path: Path, rows: list[str], header: str = ",material_id,cif,energy") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_protocol_splits_of_mp20():
    files = available_files("mp_20")
    assert {"train_first1000", "val", "test"} <= set(files)
    assert protocol("mp_20")["kind"] == "local"
    train = split_sources("mp_20", "train")
    hold = split_sources("mp_20", "holdout")
    n_train = sum(len(r) for _, r in train)
    n_hold = sum(len(r) for _, r in hold)
    assert n_train + n_hold == 10_047 and n_hold == 502
    for (p1, r1), (p2, r2) in zip(train, hold, strict=True):
        assert p1 == p2 and not set(r1.tolist()) & set(r2.tolist())
    # the hold-out is fixed: same rows every time
    assert (holdout_mask(10_047) == holdout_mask(10_047)).all()
    assert protocol("perov_5")["kind"] == "standard"


def test_load_named_split_with_properties():
    ds = load_dataset("mp_20", "test", limit=5)
    assert len(ds) == 5 and not ds.errors
    rec = ds[0]
    assert rec.id.startswith("mp-") and rec.structure.num_sites > 0
    assert isinstance(rec.properties["formation_energy_per_atom"], float)
    assert isinstance(rec.properties["spacegroup.number"], int)
    assert "cif" not in rec.properties
    perov = load_dataset("perov_5", "holdout", limit=3)
    assert perov[0].properties["heat_ref"] is not None
    assert len(load_dataset("carbon_24", "val", limit=2)) == 2


def test_holdout_rows_load():
    ds = load_dataset("carbon_24", "holdout")
    assert len(ds) == round(0.05 * 2032)


def test_unknown_names_fail_clearly():
    with pytest.raises(DatasetError, match="unknown dataset 'mp20'"):
        load_dataset("mp20")
    with pytest.raises(DatasetError, match=r"no split 'bogus'.*train_first1000"):
        load_dataset("mp_20", "bogus")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset("/nonexistent/file.csv")


def test_user_csv_with_malformed_rows(tmp_path):
    quoted = '"' + GOOD_CIF + '"'
    rows = [
        f"0,good-1,{quoted},1.5",
        '1,bad-cif,"data_x\n_cell_length_a 3\nloop_\n nonsense",2.0',
        "2,short-row",
        f"3,good-2,{quoted},",
    ]
    path = write_csv(tmp_path / "mine.csv", rows)
    with pytest.warns(UserWarning, match="2 row"):
        ds = load_dataset(str(path))
    assert [r.id for r in ds] == ["good-1", "good-2"]
    assert ds[0].properties == {"energy": 1.5} and ds[1].properties == {"energy": None}
    reasons = {e.id: e.reason for e in ds.errors}
    assert "malformed CIF" in reasons["bad-cif"] or "no atoms" in reasons["bad-cif"]
    assert "expected 4 columns, found 2" in reasons["short-row"]
    assert "row 2" in str(ds.errors[1])
    with pytest.raises(DatasetError, match="bad-cif"):
        load_dataset(str(path), strict=True)


def test_csv_without_cif_column_and_gzip(tmp_path):
    with pytest.raises(DatasetError, match="no 'cif' column"):
        list(read_rows(write_csv(tmp_path / "x.csv", ["0,a,1"], ",material_id,energy")))
    gz = tmp_path / "y.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write(',material_id,cif\n0,m1,"' + GOOD_CIF + '"\n')
    assert load_dataset(str(gz))[0].structure.composition.reduced_formula == "NaCl"
    bad = tmp_path / "z.csv.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(str(bad))


def test_full_files_switch_to_standard_protocol(tmp_path, monkeypatch):
    """A user with the complete published files gets the standard train/val/test protocol."""
    folder = tmp_path / "carbon_24"
    folder.mkdir()
    quoted = '"' + GOOD_CIF + '"'
    for split in ("train", "val"):
        write_csv(folder / f"{split}.csv", [f"{i},{split}-{i},{quoted},0" for i in range(3)])
    monkeypatch.setenv("CRYSTAL_GPT_DATA", str(tmp_path))
    assert protocol("carbon_24")["kind"] == "standard"
    assert [r.id for r in load_dataset("carbon_24", "train")] == ["train-0", "train-1", "train-2"]
    assert next(r.id for r in load_dataset("carbon_24", "holdout")) == "val-0"
    assert len(load_dataset("carbon_24", "test", limit=3)) == 3  # bundled test still found


def test_a_csv_path_splits_into_train_and_holdout_without_overlap(tmp_path):
    from crystal_gpt import encode_dataset

    quoted = '"' + GOOD_CIF + '"'
    path = write_csv(tmp_path / "many.csv", [f"{i},c-{i},{quoted},{i}" for i in range(40)])
    whole = load_dataset(str(path))
    train = load_dataset(str(path), "train")
    hold = load_dataset(str(path), "holdout")
    ids = lambda ds: {r.id for r in ds}  # noqa: E731
    assert len(whole) == 40 and ids(train) | ids(hold) == ids(whole)
    assert not ids(train) & ids(hold) and len(hold) >= 1
    enc = encode_dataset(str(path), "holdout", workers=1, progress=False, use_cache=False)
    assert sorted(enc.ids) == sorted(ids(hold))
