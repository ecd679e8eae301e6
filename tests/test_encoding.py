import csv
import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from crystal_gpt import DatasetError, decode, encode, encode_dataset, load_dataset
from crystal_gpt.cli import main as cli_main
from crystal_gpt.data.cache import EncodedDataset, cache_dir
from crystal_gpt.data.datasets import available_files


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    """The first 40 rows of mp_20/test plus one broken row, as a user CSV."""
    src = available_files("mp_20")["test"]
    out = tmp_path_factory.mktemp("csv") / "small.csv"
    with gzip.open(src, "rt", newline="") as f, open(out, "w", newline="") as g:
        reader, writer = csv.reader(f), csv.writer(g)
        header = next(reader)
        writer.writerow(header)
        for i, row in enumerate(reader):
            if i == 40:
                break
            writer.writerow(row)
        broken = list(row)
        broken[header.index("material_id")] = "mp-broken"
        broken[header.index("cif")] = "data_broken\n_cell_length_a 1\n"
        writer.writerow(broken)
    return out


def test_parallel_encoding_matches_serial_and_is_cached(small_csv):
    t0 = time.perf_counter()
    ds = encode_dataset(str(small_csv), workers=2, progress=False)
    cold = time.perf_counter() - t0
    assert len(ds) == 40 and [e.id for e in ds.errors] == ["mp-broken"]
    serial = encode_dataset(str(small_csv), workers=1, progress=False, use_cache=False)
    assert all(a == b for a, b in zip(ds, serial, strict=True))
    records = load_dataset(str(small_csv))
    assert ds[3] == encode(records[3].structure)
    assert len(list(cache_dir().glob("*.npz"))) >= 1
    t0 = time.perf_counter()
    again = encode_dataset(str(small_csv), workers=2, progress=False)
    assert time.perf_counter() - t0 < min(cold, 0.5)
    assert all(a == b for a, b in zip(ds, again, strict=True)) and len(again.errors) == 1
    np.testing.assert_array_equal(again.properties["band_gap"], ds.properties["band_gap"])


def test_cache_is_keyed_by_settings(small_csv):
    a = encode_dataset(str(small_csv), workers=1, progress=False)
    b = encode_dataset(str(small_csv), workers=1, progress=False, mode="p1")
    c = encode_dataset(str(small_csv), workers=1, progress=False, symprec=0.1)
    assert (b.spacegroup == 1).all() and not (a.spacegroup == 1).all()
    assert len({p.name for p in cache_dir().glob("*small-*.npz")}) >= 3
    assert len(c) == len(a)


def test_corrupt_cache_is_rebuilt(small_csv):
    encode_dataset(str(small_csv), workers=1, progress=False)
    for p in cache_dir().glob("*small-*wyckoff*.npz"):
        p.write_bytes(b"garbage")
    assert len(encode_dataset(str(small_csv), workers=1, progress=False)) == 40


def test_select_concatenate_and_arrays(small_csv):
    ds = encode_dataset(str(small_csv), workers=1, progress=False)
    sub = ds.select(np.array([5, 2]))
    assert sub[0] == ds[5] and sub[1] == ds[2] and len(sub) == 2
    both = EncodedDataset.concatenate([sub, ds.select(np.array([7]))])
    assert both[2] == ds[7] and both.site_start[-1] == len(both.wyckoff)
    assert (ds.num_atoms == [len(decode(w)) for w in ds]).all()
    assert ds[-1] == ds[len(ds) - 1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_named_split_encoding():
    ds = encode_dataset("carbon_24", "holdout", workers=2, progress=False)
    assert len(ds) == 102 and (ds.species == 6).all()


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'mp21'"):
        encode_dataset("mp21")


def test_cli_data_info(small_csv, capsys):
    assert cli_main(["data", "info", str(small_csv), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "crystals            40  (unreadable rows: 1" in out and "most common groups" in out
    assert cli_main(["data", "info", "nope", "--quiet"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert cli_main(["data", "list"]) == 0
    assert "mp_20" in capsys.readouterr().out
    assert cli_main(["info"]) == 0
    assert "1731 Wyckoff positions" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["data", "--help"])
    assert "info" in capsys.readouterr().out


def test_a_splits_failed_rows_stay_with_the_split(small_csv):
    """A user CSV split into train / holdout: the row that failed to encode is reported by the
    split it belongs to (selecting a split's crystals must not drop its errors)."""
    parts = [encode_dataset(str(small_csv), s, progress=False) for s in ("train", "holdout")]
    assert sum(len(p) for p in parts) == 40
    assert [e.id for p in parts for e in p.errors] == ["mp-broken"]
