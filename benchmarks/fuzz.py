"""Fuzz the command line and the Python API with broken and odd inputs.

Every case ends in one of two acceptable outcome classes:

- ``ok``: it worked, and its output passed the case's check (samples honour every constraint
  that was asked for and their CIFs read back; a loaded checkpoint is a model; a parsed CIF
  encodes and scores to a finite likelihood, or is refused with a clear error);
- ``error``: a clear error: exit status 2 and one line ``crystal-gpt: error: ...`` on the command
  line, a ``ValueError`` / ``FileNotFoundError`` with a one-line message in the API.

Anything else is a failure: ``traceback`` (another exception, another exit status, a traceback
on stderr), ``wrong`` (a success whose output is wrong, or a checkpoint that ran code), ``hang``
(past the per-case time limit) and ``crash`` (the worker process died).

    python benchmarks/fuzz.py -n 10000 --seed 0 --workers 2      # the benchmark (RESULTS.md)
    python benchmarks/fuzz.py -n 200 --seed 1 --show-failures    # what tests/test_fuzz.py runs

Cases are drawn from a seeded generator (kinds: CIF text through the reader, encoder and
likelihood; CIFs through ``crystal-gpt evaluate``; ``crystal-gpt sample`` option values, space
groups, elements and compositions; the same through ``CrystalGPT.sample``; checkpoint files;
``train`` settings), and each runs in a watched worker process (``utils.supervised_map``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path

OK, ERROR = "ok", "error"
FAILURES = ("traceback", "wrong", "hang", "crash")
CLEAR_ERRORS = (ValueError, FileNotFoundError)


class Wrong(Exception):
    """A success whose output is not what was asked for."""


# ---------------------------------------------------------------------------------------------
# ingredients


def _package_file(*parts: str) -> Path:
    return Path(str(resources.files("crystal_gpt").joinpath(*parts)))


_CIFS: list[str] = []


def real_cifs() -> list[str]:
    """A few dozen CIFs of the mp_20 test split (the seeds of the CIF mutations)."""
    if not _CIFS:
        with gzip.open(_package_file("datasets", "mp_20", "test.csv.gz"), "rt") as f:
            for k, row in enumerate(csv.DictReader(f)):
                if k >= 40:
                    break
                _CIFS.append(row["cif"])
    return _CIFS


SPACEGROUPS = [
    "225", "1", "2", "62", "194", "230", "0", "231", "-1", "999999999999", "Fm-3m", "P6_3/mmc",
    "Pnma", "P1", "P-1", "Fm3m", "F m -3 m", "cubic", "hexagonal", "trigonal", "triclinic",
    "CUBIC", "cubicc", "194,225", "225,", ",", "", " ", "1.5", "nan", "inf", "P 1", "Ia-3d",
    "R-3m", "I4/mmm", "Fd-3m:2", "\u00e9", "225;194", "225 194", "0x10", "1e2", "+225",
]  # fmt: skip
ELEMENTS = [
    "Li,O", "Li,Fe,P,O", "Na,Cl", "C", "Si,O", "Xx", "li,o", "LI,O", "Li,,O", ",", "", "Li O",
    "Og", "Li,Xx", "H,He", "Fe", "U,O", "Ne,Ar", "Cs,Au", "Li;O", "1,2", "O,O,O",
]  # fmt: skip
COMPOSITIONS = [
    "LiFePO4", "Li4Fe4P4O16", "NaCl", "Na4Cl4", "SrTiO3", "C", "Si2", "Fe2O3", "Li0O", "Li-1O",
    "Xx2O", "NaCl0.5", "(((", "", "Li1000O1000", "H", "O2", "Ne", "LiFePO4LiFePO4", "Na1Cl1",
    "na1cl1", "Ba2Cu3YO7", "Cs1Au1", "Li2O", "1", "Na Cl", "NaCl)", "U2O5", "He2",
]  # fmt: skip
NUMBERS = ["-1", "0", "1", "2", "3", "1.5", "abc", "", "nan", "inf", "-inf", "1e-9", "0.5",
           "100000000000000000000", "2e0", "3"]  # fmt: skip
MODELS = ["mp_20", "mp_20_last", "mp_20_csp", "perov_5", "carbon_24", "nope", "mp_20.pt", ""]
TRAIN_KEYS = [
    "lr", "batch_size", "epochs", "seed", "patience", "weight_decay", "grad_clip", "warmup_steps",
    "max_tokens", "model.d_model", "model.n_heads", "model.n_layers", "model.max_sites",
    "model.coord_mixtures", "model.dropout", "model.lattice_first", "nonsense", "model.nope",
    "dataset", "symprec", "limit", "threads", "device", "min_lr_ratio",
]  # fmt: skip
TRAIN_VALUES = ["0", "-1", "1", "3", "33", "64", "1e-3", "abc", "true", "false", '"x"', "nan",
                "inf", "[]", "{}", "null", "1e30", '"mp_20"', '"cuda:7"', "0.5"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# CIF mutations


def mutate_cif(rng: random.Random) -> tuple[str, bytes]:
    """(what was done, the file's bytes)."""
    cif = rng.choice(real_cifs())
    lines = cif.splitlines()
    kind = rng.choice(
        ["truncate", "flip", "garbage", "overlap", "huge", "tiny", "zero", "negative", "nan",
         "element", "occupancy", "empty", "binary", "drop_line", "duplicate_loop", "angles",
         "many_atoms", "as_is"]
    )  # fmt: skip
    if kind == "truncate":
        text = cif[: rng.randrange(len(cif))]
    elif kind == "flip":
        b = bytearray(cif.encode())
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return kind, bytes(b)
    elif kind == "garbage":
        text = "".join(rng.choice("abc_ 0123456789.-#'\n\t;loop_") for _ in range(300))
    elif kind == "binary":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000)))
    elif kind == "empty":
        text = ""
    elif kind in ("huge", "tiny", "zero", "negative", "nan"):
        factor = {"huge": "1e6", "tiny": "1e-6", "zero": "0", "negative": "-5", "nan": "nan"}[kind]
        out = []
        for line in lines:
            if line.startswith("_cell_length_") and rng.random() < 0.7:
                value = (
                    factor
                    if kind in ("zero", "negative", "nan")
                    else str(float(line.split()[-1]) * float(factor))
                )
                line = f"{line.split()[0]}   {value}"
            out.append(line)
        text = "\n".join(out)
    elif kind == "angles":
        out = []
        for line in lines:
            if line.startswith("_cell_angle_"):
                line = f"{line.split()[0]}   {rng.choice(['0', '180', '359', '-90', '1', '179.9'])}"
            out.append(line)
        text = "\n".join(out)
    elif kind in ("overlap", "element", "occupancy", "many_atoms"):
        atom_lines = [i for i, line in enumerate(lines) if len(line.split()) >= 6
                      and line.strip()[0].isalpha() and not line.startswith("_")]  # fmt: skip
        if not atom_lines:
            return kind, cif.encode()
        i = rng.choice(atom_lines)
        parts = lines[i].split()
        if kind == "overlap":
            parts2 = list(parts)
            for j in (3, 4, 5):
                with contextlib.suppress(ValueError):
                    parts2[j] = f"{float(parts2[j]) + rng.choice([0.0, 1e-4, 1e-3, 0.01]):.6f}"
            lines.insert(i + 1, "  ".join(parts2))
        elif kind == "element":
            parts[0] = rng.choice(["Xx", "Q", "D", "Uuo", "X", "Og", "e", "Fe3+", "0"])
            lines[i] = "  ".join(parts)
        elif kind == "occupancy":
            parts[-1] = rng.choice(["0.5", "0", "2", "-1", "abc"])
            lines[i] = "  ".join(parts)
        else:  # many_atoms: the same site copied at random positions
            for _ in range(rng.choice([50, 300, 3000])):
                p = list(parts)
                for j in (3, 4, 5):
                    p[j] = f"{rng.random():.6f}"
                lines.insert(i + 1, "  ".join(p))
        text = "\n".join(lines)
    elif kind == "drop_line":
        del lines[rng.randrange(len(lines))]
        text = "\n".join(lines)
    elif kind == "duplicate_loop":
        text = cif + "\n" + cif
    else:
        text = cif
    return kind, text.encode()


# ---------------------------------------------------------------------------------------------
# case runners (each returns a short note on success, raises Wrong / other exceptions)


def _one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message.strip() and "Traceback" not in message


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from crystal_gpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse: exit 2 with usage and "error:"
            rc = exit_.code if isinstance(exit_.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def cli_outcome(rc: int, err: str, check: Callable[[], None] | None = None) -> tuple[str, str]:
    if rc == 2:
        last = [line for line in err.strip().splitlines() if line.strip()]
        if "Traceback" in err or not last or "error:" not in last[-1]:
            return "traceback", err[-300:]
        return ERROR, last[-1][:200]
    if rc == 0:
        if "Traceback" in err:
            return "traceback", err[-300:]
        if check is not None:
            check()
        return OK, ""
    return "traceback", f"exit {rc}: {err[-300:]}"


def case_cif_api(rng: random.Random, tmp: Path) -> tuple[str, str]:
    from pymatgen.core import Composition

    from crystal_gpt.data.codec import decode, encode
    from crystal_gpt.evaluation.readers import load_structures
    from crystal_gpt.model.checkpoints import load_model

    what, data = mutate_cif(rng)
    path = tmp / "x.cif"
    path.write_bytes(data)
    try:
        loaded = load_structures(path, progress=False)
    except CLEAR_ERRORS as err:
        return (ERROR, str(err)[:200]) if _one_line(str(err)) else ("traceback", str(err)[:300])
    for s in loaded.structures:
        if len(s) == 0:
            raise Wrong(f"{what}: a crystal with no atoms was read")
        try:
            crystal = encode(s)
        except CLEAR_ERRORS as err:
            if not _one_line(str(err)):
                return "traceback", str(err)[:300]
            return ERROR, f"{what}: {str(err)[:200]}"
        back = decode(crystal)
        if back.composition.reduced_composition != Composition(s.composition).reduced_composition:
            raise Wrong(f"{what}: encode/decode changed {s.composition} to {back.composition}")
        model = load_model(rng.choice(["mp_20", "perov_5"]))
        try:
            lp = model.log_prob([s])["total"]
        except CLEAR_ERRORS as err:
            if not _one_line(str(err)):
                return "traceback", str(err)[:300]
            return ERROR, f"{what}: {str(err)[:200]}"
        if not math.isfinite(float(lp[0])):
            raise Wrong(f"{what}: log p = {float(lp[0])}")
    return OK, what


def case_cif_cli(rng: random.Random, tmp: Path) -> tuple[str, str]:
    what, data = mutate_cif(rng)
    path = tmp / "x.cif"
    path.write_bytes(data)
    argv = ["evaluate", str(path), "--no-novelty", "--reference-limit", "5", "--workers", "1",
            "--quiet", "--out", str(tmp / "eval"), "--time-limit", "20"]  # fmt: skip
    rc, _, err = run_cli(argv)

    def check():
        m = json.loads((tmp / "eval" / "metrics.json").read_text())
        if m["crystals"] < 1 or m["comparable"]:
            raise Wrong(f"{what}: metrics.json {m['crystals']} crystals, comparable")

    return cli_outcome(rc, err, check)


def _sample_options(rng: random.Random) -> dict[str, str]:
    opts: dict[str, str] = {"-n": rng.choice(["1", "2", "3"] * 6 + NUMBERS)}
    if rng.random() < 0.8:
        opts["--model"] = rng.choice(MODELS[:5] * 4 + MODELS[5:])
    for key, pool, p in (
        ("--spacegroup", SPACEGROUPS, 0.4),
        ("--elements", ELEMENTS, 0.25),
        ("--exclude-elements", ELEMENTS, 0.1),
        ("--chemsys", [e.replace(",", "-") for e in ELEMENTS], 0.1),
        ("--composition", COMPOSITIONS, 0.3),
        ("--formula-units", NUMBERS, 0.05),
        ("--num-atoms", ["4", "1-10", "10-4", "0", "-3", "abc", "2-2", "1000", "3-"], 0.1),
        ("--wyckoff-template", ["4a 4b", "1a", "4a", "zz", "", "8c 4a", "4a 4a 4a"], 0.05),
        ("--temperature", NUMBERS, 0.2),
        ("--top-p", NUMBERS, 0.15),
        ("--seed", NUMBERS, 0.3),
        ("--min-distance", [*NUMBERS, "auto", "Auto"], 0.1),
    ):
        if rng.random() < p:
            opts[key] = rng.choice(pool)
    return opts


def _check_samples(folder: Path, opts: dict[str, str], flags: list[str]) -> None:
    """What a successful ``sample`` must have written: n rows, each honouring the request, each
    CIF readable with the same content."""
    from pymatgen.core import Composition, Structure

    from crystal_gpt.sampling.sampler import parse_elements, parse_spacegroups

    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    n = int(float(opts.get("-n", "100")))
    if len(rows) != n:
        raise Wrong(f"{len(rows)} crystals written, {n} asked for")
    cifs = sorted((folder / "cif").glob("*.cif"))
    if len(cifs) != n:
        raise Wrong(f"{len(cifs)} CIF files for {n} crystals")
    groups = set(parse_spacegroups(opts["--spacegroup"])) if "--spacegroup" in opts else None
    allowed = set(parse_elements(opts.get("--elements")) or []) or None
    banned = set(parse_elements(opts.get("--exclude-elements")) or [])
    chemsys = None
    if "--chemsys" in opts:
        chemsys = {e.strip() for e in opts["--chemsys"].split("-") if e.strip()}
    for row in rows:
        s = Structure.from_file(folder / row["cif"])
        comp = s.composition
        if comp.reduced_formula != Composition(row["formula"]).reduced_formula:
            raise Wrong(f"CIF {row['cif']} holds {comp.reduced_formula}, summary {row['formula']}")
        els = {e.symbol for e in comp.elements}
        if groups is not None and int(row["spacegroup"]) not in groups:
            raise Wrong(f"space group {row['spacegroup']} not in {sorted(groups)}")
        if allowed is not None and not els <= allowed:
            raise Wrong(f"{els} not within --elements {allowed}")
        if els & banned:
            raise Wrong(f"{els} holds an excluded element")
        if chemsys is not None and els != chemsys:
            raise Wrong(f"{els} is not the chemical system {chemsys}")
        if "--composition" in opts:
            want = Composition(opts["--composition"])
            if comp.reduced_composition != want.reduced_composition:
                raise Wrong(f"{comp.reduced_formula} is not {want.reduced_formula}")
        if "--skip-symmetry-check" not in flags and len(s) > 1:
            d = s.distance_matrix
            d[range(len(s)), range(len(s))] = math.inf
            if d.min() < 0.1:
                raise Wrong(f"two atoms {d.min():.3f} A apart")


def case_sample_cli(rng: random.Random, tmp: Path) -> tuple[str, str]:
    opts = _sample_options(rng)
    flags = [f for f in ("--allow-unseen", "--skip-symmetry-check", "--charge-balanced")
             if rng.random() < 0.15]  # fmt: skip
    out = tmp / "samples"
    argv = ["sample", *[x for kv in opts.items() for x in kv], *flags, "--out", str(out)]
    rc, _, err = run_cli(argv)
    return cli_outcome(rc, err, lambda: _check_samples(out, opts, flags))


def case_sample_api(rng: random.Random, tmp: Path) -> tuple[str, str]:
    from pymatgen.core import Composition

    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.sampling.sampler import parse_spacegroups

    name = rng.choice(MODELS[:5])
    kw: dict = {}
    if rng.random() < 0.5:
        kw["spacegroup"] = rng.choice([*SPACEGROUPS, 225, 0, 231, -3, [194, 225], 2.5])
    if rng.random() < 0.3:
        kw["elements"] = rng.choice([*ELEMENTS, ["Li", "O"], ["Xx"], []])
    if rng.random() < 0.3:
        kw["composition"] = rng.choice([*COMPOSITIONS, {"Li": 4, "O": 2}, {"Na": -1}, {}])
    if rng.random() < 0.3:
        kw["temperature"] = rng.choice([0.5, 1.0, 0, -1, math.inf, math.nan, 1e-9, 3.0])
    if rng.random() < 0.2:
        kw["top_p"] = rng.choice([0.9, 1.0, 0, 1.5, -0.1, math.nan])
    n = rng.choice([1, 2, 0, -1, 2.5])
    model = load_model(name)
    try:
        structures = model.sample(n, seed=rng.randrange(1000), **kw)
    except CLEAR_ERRORS as err:
        return (ERROR, str(err)[:200]) if _one_line(str(err)) else ("traceback", str(err)[:300])
    if len(structures) != n:
        raise Wrong(f"{len(structures)} structures for n={n}")
    for s in structures:
        if "spacegroup" in kw:
            from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

            # the sampler's definition: spglib at 0.01 A with spglib's own angle tolerance
            # (pymatgen's default of 5 degrees calls a cell with 89-91 degree angles square)
            sga = SpacegroupAnalyzer(s, symprec=0.01, angle_tolerance=-1)
            sg = sga.get_space_group_number()
            if sg not in parse_spacegroups(kw["spacegroup"]):
                raise Wrong(f"space group {sg} for {kw['spacegroup']!r}")
        if "composition" in kw:
            want = Composition(kw["composition"]).reduced_composition
            if s.composition.reduced_composition != want:
                raise Wrong(f"{s.composition.reduced_formula} for {kw['composition']!r}")
    return OK, name


def _checkpoint_bytes(rng: random.Random, tmp: Path) -> tuple[str, bytes]:
    real = _package_file("models", rng.choice(["perov_5", "carbon_24"]) + ".pt").read_bytes()
    kind = rng.choice(["truncated", "flipped", "random", "empty", "payload", "zip_junk",
                       "wrong_dict", "real", "text"])  # fmt: skip
    if kind == "truncated":
        return kind, real[: rng.randrange(len(real))]
    if kind == "flipped":
        b = bytearray(real)
        for _ in range(rng.randint(1, 50)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "random":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randint(1, 5000)))
    if kind == "empty":
        return kind, b""
    if kind == "text":
        return kind, b"model: mp_20\n"
    if kind == "payload":
        import torch

        buf = io.BytesIO()
        torch.save({"model": {}, "x": _Payload(str(tmp / "RAN"))}, buf)
        return kind, buf.getvalue()
    if kind == "zip_junk":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"model": 1}))
        return kind, buf.getvalue()
    if kind == "wrong_dict":
        import torch

        buf = io.BytesIO()
        torch.save(rng.choice([{"model": {}}, {"weights": 1}, [1, 2], {"model": {"x": 1},
                   "model_config": {"d_model": -1}}]), buf)  # fmt: skip
        return kind, buf.getvalue()
    return kind, real


class _Payload:
    """Unpickling this would create a file: a checkpoint that runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def case_checkpoint(rng: random.Random, tmp: Path) -> tuple[str, str]:
    from crystal_gpt.model.checkpoints import load_model

    kind, data = _checkpoint_bytes(rng, tmp)
    path = tmp / "model.pt"
    path.write_bytes(data)
    if rng.random() < 0.5:
        rc, _, err = run_cli(["sample", "-n", "1", "--model", str(path), "--out", str(tmp / "s")])
        outcome = cli_outcome(rc, err)
    else:
        try:
            model = load_model(path)
            outcome = (OK, kind)
            if model.num_parameters() <= 0:
                raise Wrong("a model without parameters")
        except CLEAR_ERRORS as err:
            outcome = (ERROR, str(err)[:200]) if _one_line(str(err)) else ("traceback", str(err))
    if (tmp / "RAN").exists():
        raise Wrong("loading the checkpoint ran code")
    if outcome[0] == OK and kind not in ("real", "flipped", "truncated"):
        raise Wrong(f"a {kind} file loaded as a model")
    return outcome


def case_train_options(rng: random.Random, tmp: Path) -> tuple[str, str]:
    sets = [
        f"{rng.choice(TRAIN_KEYS)}={rng.choice(TRAIN_VALUES)}" for _ in range(rng.randint(1, 3))
    ]
    argv = ["train", "--preset", rng.choice(["tiny", "small", "large", "huge"]),
            "--dataset", rng.choice(["no_such_dataset", str(tmp / "missing.csv")]),
            "--out", str(tmp / "run")]  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    if rng.random() < 0.3:
        argv += ["--epochs", rng.choice(NUMBERS)]
    rc, _, err = run_cli(argv)
    if rc == 0:
        return "wrong", "trained on a dataset that does not exist"
    return cli_outcome(rc, err)


KINDS: dict[str, tuple[float, Callable]] = {
    "cif_api": (0.25, case_cif_api),
    "cif_cli": (0.01, case_cif_cli),
    "sample_cli": (0.35, case_sample_cli),
    "sample_api": (0.15, case_sample_api),
    "checkpoint": (0.12, case_checkpoint),
    "train_options": (0.12, case_train_options),
}


def draw_cases(n: int, seed: int) -> list[tuple[int, str, int]]:
    """(index, kind, case seed): the case list is a pure function of n and seed."""
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[k][0] for k in names]
    return [(i, rng.choices(names, weights)[0], rng.randrange(2**32)) for i in range(n)]


def run_case(case: tuple[int, str, int]) -> tuple[str, str, str]:
    """(kind, outcome, detail) of one case, in a fresh temporary folder."""
    import warnings

    warnings.filterwarnings("ignore")
    _, kind, seed = case
    tmp = Path(tempfile.mkdtemp(prefix="fuzz"))
    try:
        outcome, detail = KINDS[kind][1](random.Random(seed), tmp)
    except Wrong as err:
        outcome, detail = "wrong", str(err)[:300]
    except CLEAR_ERRORS as err:  # escaped to the top of an API case: acceptable if one line
        outcome, detail = (ERROR, str(err)[:200]) if _one_line(str(err)) else ("traceback", "")
    except Exception as err:
        import traceback

        outcome = "traceback"
        detail = f"{type(err).__name__}: {err} | {traceback.format_exc()[-400:]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kind, outcome, detail


def fuzz(n: int, seed: int, workers: int, time_limit: float, progress: bool = True) -> dict:
    """Run n cases; counts by kind and outcome, and the failing cases."""
    from tqdm.auto import tqdm

    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.utils import JobFailure, supervised_map

    for name in MODELS[:5]:
        load_model(name)  # warm the imports before the workers fork
    real_cifs()
    cases = draw_cases(n, seed)
    counts: Counter = Counter()
    failures = []
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="fuzz", unit="case", disable=not progress, file=sys.stderr)
    for i, res in supervised_map(run_case, cases, workers, time_limit):
        kind = cases[i][1]
        if isinstance(res, JobFailure):
            outcome = "hang" if "time limit" in res.reason else "crash"
            detail = res.reason
        else:
            kind, outcome, detail = res
        counts[(kind, outcome)] += 1
        if outcome in FAILURES:
            failures.append({"case": list(cases[i]), "kind": kind, "outcome": outcome,
                             "detail": detail})  # fmt: skip
        bar.update()
        bar.set_postfix(failures=len(failures))
    bar.close()
    by_outcome = Counter()
    for (_, outcome), c in counts.items():
        by_outcome[outcome] += c
    return {
        "cases": n,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "outcomes": dict(by_outcome),
        "by_kind": {f"{k}/{o}": c for (k, o), c in sorted(counts.items())},
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="cases (default 10,000)")
    ap.add_argument("--seed", type=int, default=0, help="case generator seed")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--show-failures", action="store_true", help="print every failing case")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    res = fuzz(args.n, args.seed, args.workers, args.time_limit)
    print(f"{res['cases']} cases (seed {res['seed']}) in {res['seconds']} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(res["outcomes"].items())))  # fmt: skip
    for key, c in res["by_kind"].items():
        print(f"  {key:28s} {c}")
    if args.show_failures:
        for f in res["failures"]:
            print(json.dumps(f))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
