"""Parquet shards: one seed per shard, reproducible, resumable, read back exactly."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from crystal_gpt.cli import main as cli_main
from crystal_gpt.evaluation.readers import load_structures
from crystal_gpt.sampling.shards import shard_seed, shard_sizes

FAST = ["--model", "mp_20", "--skip-symmetry-check"]


def _run(out, *extra):
    return cli_main(["sample", *FAST, "--format", "parquet", "--out", str(out), *extra])


def test_shard_plan():
    assert shard_sizes(25, 10) == [10, 10, 5] and shard_sizes(20, 10) == [10, 10]
    assert len({shard_seed(0, k) for k in range(100)}) == 100
    assert shard_seed(1, 0) != shard_seed(0, 1)
    with pytest.raises(ValueError, match="shard-size"):
        shard_sizes(5, 0)


def test_parquet_run_is_reproducible_and_resumable(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "-n", "25", "--shard-size", "10", "--seed", "5") == 0
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(out)  # the folder reads as one dataset (_run.json is skipped)
    assert table.num_rows == 25 and table.column("index").to_pylist() == list(range(25))
    for col in ("formula", "spacegroup", "wyckoff", "a", "gamma", "cif", "loglik_total"):
        assert col in table.column_names
    assert all(t.startswith("data_") for t in table.column("cif").to_pylist())
    first = pq.read_table(out / "part-00001.parquet")

    # an interrupted run: the missing shard is drawn again, the same crystals as before
    (out / "part-00001.parquet").unlink()
    capsys.readouterr()
    assert _run(out, "-n", "25", "--shard-size", "10", "--seed", "5", "--resume") == 0
    assert "15 kept from before" in capsys.readouterr().out
    assert pq.read_table(out / "part-00001.parquet").equals(first)

    # a shard does not depend on how many shards the run has
    other = tmp_path / "shorter"
    assert _run(other, "-n", "20", "--shard-size", "10", "--seed", "5") == 0
    assert pq.read_table(other / "part-00001.parquet").equals(first)

    # resuming with other settings is refused, naming them
    capsys.readouterr()
    assert _run(out, "-n", "25", "--shard-size", "10", "--seed", "6", "--resume") == 2
    assert "seed" in capsys.readouterr().err


def test_shards_read_back_exactly(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "-n", "12", "--shard-size", "5", "--seed", "1") == 0
    loaded = load_structures(out)
    assert len(loaded.structures) == 12 and not loaded.errors
    table = pq.read_table(out).to_pydict()
    for s, frac, formula in zip(
        loaded.structures, table["frac_coords"], table["formula"], strict=True
    ):
        assert np.allclose(s.frac_coords.ravel(), frac) and s.composition.reduced_formula == formula
    single = load_structures(out / "part-00002.parquet")
    assert len(single.structures) == 2


def test_bad_shard_requests(tmp_path, capsys):
    assert _run(tmp_path / "a", "-n", "5", "--shard-size", "0") == 2
    assert "--shard-size" in capsys.readouterr().err
    assert _run(tmp_path / "a", "-n", "5", "--batch-size", "0") == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert _run(tmp_path / "a", "-n", "5", "--gpu-processes", "0") == 2
    assert "--gpu-processes must be at least 1" in capsys.readouterr().err
    assert cli_main(["sample", *FAST, "-n", "2", "--resume", "--out", str(tmp_path / "b")]) == 2
    assert "--resume applies to --format parquet" in capsys.readouterr().err
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="cannot read as crystal-gpt parquet"):
        load_structures(tmp_path / "junk.parquet")


def test_a_failed_shard_stops_nothing_else(tmp_path):
    """A shard whose draw fails is reported at the end; the others are written, and a resumed
    run draws only the failed one."""
    from pymatgen.core import Lattice, Structure

    from crystal_gpt.data.codec import encode
    from crystal_gpt.sampling.shards import write_shards

    nacl = encode(
        Structure.from_spacegroup(
            "Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
        )
    )
    broken = {shard_seed(0, 1)}

    def draw(count, seed):
        if seed in broken:
            raise RuntimeError("out of luck")
        return [nacl] * count, {"total": [-1.0] * count}

    kw = dict(shard_size=2, seed=0, settings={"model": "fake"}, workers=1, log=lambda _: None)
    with pytest.raises(ValueError, match=r"1 of 3 shards failed.*out of luck.*--resume"):
        write_shards(draw, 6, tmp_path, **kw)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00002.parquet",
    ]
    broken.clear()  # (the draws run in forked workers: the parent's set is theirs at the fork)
    done = write_shards(draw, 6, tmp_path, resume=True, **kw)
    assert done["written"] == 2 and done["kept"] == 4
    assert pq.read_table(tmp_path).column("loglik_total").to_pylist() == [-1.0] * 6


def test_workers_0_draws_every_shard_here(tmp_path):
    """workers=0 (a model on a GPU, which cannot cross a fork): every shard in this process."""
    from pymatgen.core import Lattice, Structure

    from crystal_gpt.data.codec import encode
    from crystal_gpt.sampling.shards import write_shards

    cscl = encode(Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    seeds = []

    def draw(count, seed):
        seeds.append(seed)  # visible here only if drawn in this process
        return [cscl] * count, {"total": [0.0] * count}

    write_shards(draw, 5, tmp_path, shard_size=2, seed=3, settings={}, workers=0, log=print)
    assert seeds == [shard_seed(3, k) for k in range(3)]


def test_rows_written_by_workers_equal_rows_written_here(tmp_path):
    """A GPU run draws here and has worker processes make and write the rows: the same files
    as writing them here, and a shard whose rows cannot be made is reported without stopping
    the others."""
    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.sampling.sampler import sample_crystals
    from crystal_gpt.sampling.shards import write_shards

    model = load_model("mp_20")
    broken = {shard_seed(4, 1)}

    def draw(count, seed):
        crystals = sample_crystals(model, count, seed=seed, symprec=None, min_distance=0)
        short = seed in broken  # a log-likelihood missing: that shard's rows cannot be made
        return crystals, {"total": [float(k) for k in range(count - short)]}

    kw = dict(shard_size=3, seed=4, settings={}, workers=0, log=lambda _: None)
    with pytest.raises(ValueError, match=r"1 of 3 shards failed \(shard 1: IndexError"):
        write_shards(draw, 8, tmp_path / "there", record_workers=2, **kw)
    assert sorted(p.name for p in (tmp_path / "there").glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00002.parquet",
    ]
    broken.clear()
    write_shards(draw, 8, tmp_path / "here", **kw)
    for k in (0, 2):
        name = f"part-{k:05d}.parquet"
        there = pq.read_table(tmp_path / "there" / name)
        assert there.num_rows == (3 if k == 0 else 2)
        assert there.equals(pq.read_table(tmp_path / "here" / name))


def test_processes_started_fresh_draw_what_forked_ones_draw(tmp_path):
    """--gpu-processes: drawing processes are spawned (CUDA cannot cross a fork) and load the
    model themselves from the picklable SampleDraw; the shards equal forked workers' ones."""
    import functools
    import pickle

    from crystal_gpt.sampling.shards import SampleDraw, write_shards

    options = dict(batch_size=500, symprec=None, min_distance=0)
    draw = SampleDraw("mp_20", "cpu", options)
    assert len(pickle.dumps(draw)) < 10_000  # the model does not travel
    job = functools.partial(draw, progress=False, check_workers=0)
    kw = dict(shard_size=3, seed=7, settings={}, workers=2, log=lambda _: None)
    write_shards(job, 6, tmp_path / "spawned", start_method="spawn", **kw)
    write_shards(job, 6, tmp_path / "forked", **kw)
    for k in range(2):
        name = f"part-{k:05d}.parquet"
        spawned = pq.read_table(tmp_path / "spawned" / name)
        assert spawned.num_rows == 3 and spawned.equals(pq.read_table(tmp_path / "forked" / name))


def test_chunked_plain_sampling_does_not_depend_on_the_cores(tmp_path, capsys):
    """`sample -n N` above --chunk-size draws chunks at once, each seeded from --seed: the
    crystals are those of the parquet shards of the same seed and size, whatever the workers."""
    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.sampling.shards import SampleDraw, draw_in_chunks

    draw = SampleDraw("mp_20", "cpu", {"symprec": None, "min_distance": "auto"})
    draw.keep(load_model("mp_20"))
    one = [r for _, r in sorted(draw_in_chunks(draw, 7, 5, 3, workers=1, log=lambda _: None))]
    two = dict(draw_in_chunks(draw, 7, 5, 3, workers=2, log=lambda _: None))
    two = [two[k] for k in range(3)]
    assert [len(c) for c, _ in one] == [3, 3, 1]
    one_c, two_c = [c for p, _ in one for c in p], [c for p, _ in two for c in p]
    assert [c.spacegroup for c in one_c] == [c.spacegroup for c in two_c]
    for a, b in zip(one_c, two_c, strict=True):
        np.testing.assert_array_equal(a.lattice_parameters, b.lattice_parameters)
    for (_, a), (_, b) in zip(one, two, strict=True):
        np.testing.assert_allclose(a["total"], b["total"], rtol=1e-6)

    out = tmp_path / "s"
    args = ["sample", *FAST, "-n", "7", "--chunk-size", "3", "--seed", "5"]
    assert cli_main([*args, "--out", str(out)]) == 0
    assert "sampled 7/7" in capsys.readouterr().err
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 8 and len(list((out / "cif").glob("*.cif"))) == 7
    from ase.io import read

    frames = read(out / "samples.extxyz", index=":")
    assert [f.info["spacegroup"] for f in frames] == [int(r.split(",")[2]) for r in summary[1:]]
    assert cli_main([*args, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "summary.csv").read_text().splitlines() == summary
    # chunk k is shard k of a parquet run with the same seed and size
    assert _run(tmp_path / "pq", "-n", "7", "--shard-size", "3", "--seed", "5") == 0
    formulas = pq.read_table(tmp_path / "pq").column("formula").to_pylist()
    assert [row.split(",")[1] for row in summary[1:]] == formulas
    assert cli_main([*args, "--chunk-size", "0", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert cli_main([*args, "-n", "100000000000000000000", "--out", str(tmp_path / "y")]) == 2
    assert "at most 1,000,000,000 crystals per run" in capsys.readouterr().err


def _fails_once(marker, n, seed, progress=False, check_workers=None):
    """A draw whose first call for seed 0's second chunk dies, as a worker might."""
    from crystal_gpt.sampling.shards import shard_seed

    if seed == shard_seed(0, 1) and not marker.exists():
        marker.touch()
        raise RuntimeError("worker lost")
    return [seed] * n, {"total": [0.0] * n}


def test_a_failed_chunk_is_drawn_once_more_then_it_is_an_error(tmp_path):
    import functools

    from crystal_gpt.sampling.shards import draw_in_chunks

    lines = []
    draw = functools.partial(_fails_once, tmp_path / "marker")
    got = dict(draw_in_chunks(draw, 5, 0, 2, workers=2, log=lines.append))
    assert sorted(got) == [0, 1, 2] and got[1][0] == [shard_seed(0, 1)] * 2
    assert any("chunk 2 of 3 failed" in line and "again" in line for line in lines)
    always = functools.partial(_fails_once, tmp_path / "never" / "marker")  # touch() fails too
    with pytest.raises(ValueError, match="chunk 2 of 3 failed"):
        dict(draw_in_chunks(always, 5, 0, 2, workers=2, log=lambda _: None))
