"""A few hundred fuzz cases over the command line and the API (benchmarks/fuzz.py; the
benchmark runs 10,000): every one must end in success with a checked output or a clear error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("crystal_gpt_fuzz", FUZZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_cases_end_in_success_or_a_clear_error():
    fuzz = _fuzz_module()
    res = fuzz.fuzz(200, seed=12345, workers=2, time_limit=90, progress=False)
    assert not res["failures"], json.dumps(res["failures"][:5], indent=1)
    assert set(res["outcomes"]) <= {"ok", "error"}
    # the generator reaches every kind, and both outcomes
    kinds = {key.split("/")[0] for key in res["by_kind"]}
    assert {"cif_api", "sample_cli", "sample_api", "checkpoint", "train_options"} <= kinds
    assert res["outcomes"]["ok"] > 20 and res["outcomes"]["error"] > 20


def test_the_harness_catches_what_it_must():
    """A case runner that raises something unclear, or returns a wrong result, is a failure."""
    import random

    fuzz = _fuzz_module()

    def unclear(rng, tmp):
        raise KeyError("deep inside")

    def wrong(rng, tmp):
        raise fuzz.Wrong("3 crystals written, 2 asked for")

    def multi_line(rng, tmp):
        raise ValueError("first line\nsecond line")

    for runner, outcome in ((unclear, "traceback"), (wrong, "wrong"), (multi_line, "traceback")):
        fuzz.KINDS["probe"] = (0.0, runner)
        assert fuzz.run_case((0, "probe", 1))[1] == outcome
    assert fuzz.cli_outcome(1, "")[0] == "traceback"
    assert fuzz.cli_outcome(2, "crystal-gpt: error: bad -n")[0] == "error"
    assert fuzz.cli_outcome(2, "Traceback (most recent call last):\n  ...\nerror: x")[0] == (
        "traceback"
    )
    # the case list and each case's input are functions of the seed (a failure can be re-run)
    assert fuzz.draw_cases(50, 7) == fuzz.draw_cases(50, 7) != fuzz.draw_cases(50, 8)
    assert fuzz.mutate_cif(random.Random(3)) == fuzz.mutate_cif(random.Random(3))
