"""The Ray executor: a local Ray (head + 2 worker processes on this machine) runs the heavy
stages with the process pool's results, time limits and failure records."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray: pip install 'crystal-gpt[ray]'")
pytest.importorskip("chgnet", reason="needs the eval extra: pip install 'crystal-gpt[eval]'")

from pymatgen.core import Lattice, Structure  # noqa: E402

from crystal_gpt.evaluation.stability import ReferenceHull, evaluate_stability  # noqa: E402
from crystal_gpt.utils import (  # noqa: E402
    JobFailure,
    parallel_map,
    supervised_map,
    use_executor,
)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs on 127.0.0.1, stopped after the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    yield
    ray.shutdown()


def test_jobs_on_ray_match_and_fail_alone(local_ray):
    # library functions: Ray's workers import them by name (this test module is not importable)
    with use_executor("ray"):
        assert parallel_map(abs, range(-15, 15), 2, 30, "abs", False) == [
            abs(i) for i in range(-15, 15)
        ]
        out = dict(supervised_map(time.sleep, [0.0, -1.0, 30.0, 0.1], 2, time_limit=3))
    assert out[0] is None and out[3] is None
    assert isinstance(out[1], JobFailure) and "non-negative" in out[1].reason
    assert isinstance(out[2], JobFailure) and "time limit" in out[2].reason
    with use_executor("ray"):
        died = dict(supervised_map(os._exit, [3], 2))  # the worker process exits mid-task
    assert isinstance(died[0], JobFailure) and "Ray task failed" in died[0].reason


def _alni_crystals(n: int) -> list[Structure]:
    """n Al-Ni crystals (B2 AlNi and L1_2 AlNi3, strained by different amounts)."""
    b2 = Structure.from_spacegroup("Pm-3m", Lattice.cubic(2.88), ["Al", "Ni"], [[0] * 3, [0.5] * 3])
    l12 = Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(3.57), ["Al", "Ni"], [[0] * 3, [0.5, 0.5, 0]]
    )
    out = []
    for k in range(n):
        s = (b2 if k % 2 else l12).copy()
        s.scale_lattice(s.volume * (0.97 + 0.006 * k) ** 3)
        out.append(s)
    return out


def test_stability_on_ray_equals_process_pool(local_ray, tmp_path):
    """evaluate_stability (what `evaluate --stability` runs) on 20 crystals: the same energies
    above the hull through Ray as through the process pool; Ray's run resumes from its cache."""
    crystals = _alni_crystals(20)
    hull = ReferenceHull.from_structures(
        crystals[:2], ids=["AlNi3", "AlNi"], cache=tmp_path / "hull", progress=False
    )
    masks = dict(novel_mask=[True] * 20, unique_mask=[True] * 20)
    kw = dict(hull=hull, steps=15, workers=2, progress=False, **masks)
    pool = evaluate_stability(crystals, cache=tmp_path / "pool.jsonl", **kw)
    with use_executor("ray"):
        on_ray = evaluate_stability(crystals, cache=tmp_path / "ray.jsonl", **kw)
        again = evaluate_stability(crystals, cache=tmp_path / "ray.jsonl", **kw)
    a, b = np.asarray(pool["e_above_hull"]), np.asarray(on_ray["e_above_hull"])
    assert len(a) == 20 and not np.isnan(a).any()
    assert np.allclose(a, b, atol=1e-4)
    assert np.array_equal(np.asarray(again["e_above_hull"]), b)  # all 20 from the cache
    assert pool["n_failed"] == on_ray["n_failed"] == 0
    assert math.isclose(pool["stable_0.1"], on_ray["stable_0.1"])


def test_parquet_shards_on_ray_equal_local_ones(local_ray, tmp_path):
    """`sample --format parquet --executor ray`: one Ray task per shard, the same shards."""
    import pyarrow.parquet as pq

    from crystal_gpt.cli import main as cli_main

    args = ["sample", "--skip-symmetry-check", "-n", "12", "--shard-size", "5", "--seed", "2"]
    args += ["--format", "parquet"]
    assert cli_main([*args, "--out", str(tmp_path / "local")]) == 0
    assert cli_main([*args, "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    for k in range(3):
        name = f"part-{k:05d}.parquet"
        assert pq.read_table(tmp_path / "ray" / name).equals(
            pq.read_table(tmp_path / "local" / name)
        )


def test_executor_errors():
    with pytest.raises(ValueError, match="--executor"), use_executor("dask"):
        pass
    with pytest.raises(ValueError, match="--ray-address needs"), use_executor("process", "x:1"):
        pass
