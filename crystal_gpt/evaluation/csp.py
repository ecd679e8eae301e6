"""Crystal structure prediction (CSP) benchmark: given a test crystal's composition, sample k
structures with the exact-composition constraint and ask whether one is the test crystal.

Protocol (DiffCSP / FlowMM, REFERENCE.md section 1): pymatgen
``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)``; match rate = matched / all test crystals
(a composition the model cannot build counts as a miss); RMSE = mean ``get_rms_dist`` (normalised
by (V/N)^(1/3)) over matched crystals only; "@k" matches if any of k samples does, keeping the
lowest RMSE. The composition given to the sampler is the test crystal's primitive-cell content.

The validity gate, as CDVAE's and DiffCSP's code apply it: a prediction counts only if it is
structurally and compositionally valid (CDVAE's rules, SMACT 2.2.1's table), and @1 also needs
a valid target (DiffCSP's single-sample evaluation). The gated figures are the headline; the
ungated ones (any ``get_rms_dist`` hit) are reported beside them.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystal_gpt.utils import fmt

MATCHER = {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}


def primitive_composition(structure: Structure) -> dict[str, int]:
    """Element -> count in the primitive cell (spglib, symprec 0.01; the cell as given if spglib
    finds no symmetry)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        prim = SpacegroupAnalyzer(structure, symprec=0.01).find_primitive() or structure
    except Exception:  # spglib gives up on some distorted cells: keep the given cell
        prim = structure
    if len(prim) > len(structure) or len(structure) % len(prim):
        prim = structure
    return {el.symbol: round(n) for el, n in prim.composition.items()}


def _prepare(job: tuple[Structure, int]) -> tuple[dict[str, int], bool]:
    """A target's primitive-cell composition, and whether some space group can hold it within
    the model's site limit."""
    from crystal_gpt.sampling.constraints import Planner, feasible_groups, make_request

    structure, max_sites = job
    comp = primitive_composition(structure)
    planner = Planner(make_request(composition=comp), max_sites)
    return comp, bool(feasible_groups(planner, range(1, 231)))


def crystal_validity(structure: Structure | None) -> bool:
    """CDVAE's ``Crystal.valid``: structurally and compositionally valid (a failed sample is
    not)."""
    from crystal_gpt.evaluation.metrics import smact_validity, structure_validity

    if structure is None:
        return False
    try:
        return structure_validity(structure) and smact_validity(structure.composition)
    except Exception:  # disordered or dummy species
        return False


def reduced_structure(structure: Structure) -> Structure:
    """What ``StructureMatcher`` compares a structure as (Niggli cell, then primitive), computed
    once: a CSP draw is compared with other draws and with its target, and pymatgen would
    reduce it again for each comparison."""
    niggli = structure.get_reduced_structure(reduction_algo="niggli")
    return Structure.from_sites(niggli.get_primitive_structure())


class _Reduced:
    """Structures reduced on first use (``reduced_structure``; None for a failed draw or a
    degenerate cell), so that clustering and matching share each reduction."""

    def __init__(self, structures: list[Structure | None]) -> None:
        self.structures, self.done = structures, {}

    def __getitem__(self, i: int) -> Structure | None:
        if i not in self.done:
            s = self.structures[i]
            try:
                self.done[i] = None if s is None else reduced_structure(s)
            except Exception:  # degenerate cells: compared as distinct, matched as misses
                self.done[i] = None
        return self.done[i]


def _matcher():
    """The protocol's ``StructureMatcher`` for structures reduced by ``reduced_structure``: its
    own reduction left out (the same result: both reductions are idempotent; a test compares
    it with the plain matcher on unreduced structures)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    class PreReduced(StructureMatcher):
        @classmethod
        def _get_reduced_structure(cls, struct, primitive_cell=True, niggli=True):
            return Structure.from_sites(struct)

    return PreReduced(**MATCHER)


def _rms_distances(
    job: tuple[Structure, list[Structure | None]], reduced: list | _Reduced | None = None
) -> list[float]:
    """Normalised RMS distance of each candidate to the target (NaN where no match);
    ``reduced``: the candidates already reduced (``_Reduced`` or a list)."""
    target, candidates = job
    matcher = _matcher()
    reduced = _Reduced(candidates) if reduced is None else reduced
    try:
        goal = reduced_structure(target)
    except Exception:  # a target pymatgen cannot reduce matches nothing
        return [math.nan] * len(candidates)
    out = []
    for i in range(len(candidates)):
        rms = None
        cand = reduced[i]
        if cand is not None:
            try:
                rms = matcher.get_rms_dist(cand, goal)
            except Exception:  # degenerate generated cells (overlapping atoms, flat lattices)
                rms = None
        out.append(float(rms[0]) if rms is not None else math.nan)
    return out


def candidate_clusters(
    structures: list[Structure | None],
    groups: list[int],
    mass: list[float],
    density: list[float] | None = None,
    reduced: _Reduced | None = None,
) -> list[list[int]]:
    """The drawn samples as distinct structures, most probable first, each a list of sample
    indices with its representative first (see :func:`rank_candidates`). ``reduced``: the
    structures' reductions, shared with a later matching."""
    matcher = _matcher()
    reduced = _Reduced(structures) if reduced is None else reduced

    def same(i: int, j: int) -> bool:
        a, b = reduced[i], reduced[j]
        return a is not None and b is not None and matcher.fit(a, b)

    drawn = [i for i, s in enumerate(structures) if s is not None]
    return ranked_clusters(greedy_clusters(drawn, groups, same), mass, density)


def greedy_clusters(indices: list[int], groups: list[int], same) -> list[list[int]]:
    """Samples in drawing order, each joined to the first cluster of its space group whose
    first member it is ``same(first, it)`` as, else a cluster of its own (an error in ``same``
    counts as distinct)."""
    clusters: list[list[int]] = []
    by_group: dict[int, list[list[int]]] = {}
    for i in indices:
        for cluster in by_group.setdefault(groups[i], []):
            try:
                joined = same(cluster[0], i)
            except Exception:  # degenerate cells: treat as distinct
                joined = False
            if joined:
                cluster.append(i)
                break
        else:
            by_group[groups[i]].append([i])
            clusters.append(by_group[groups[i]][-1])
    return clusters


def ranked_clusters(
    clusters: list[list[int]], mass: list[float], density: list[float] | None = None
) -> list[list[int]]:
    """Clusters most drawn first (ties: larger ``mass``), members by ``density`` (default
    ``mass``)."""
    density = mass if density is None else density
    members = [sorted(c, key=lambda i: (-density[i], i)) for c in clusters]
    order = sorted(range(len(clusters)), key=lambda j: (-len(members[j]), -mass[members[j][0]], j))
    return [members[j] for j in order]


def rank_candidates(
    structures: list[Structure | None],
    groups: list[int],
    mass: list[float],
    density: list[float] | None = None,
) -> list[int]:
    """Every drawn sample once, most probable structure first: samples of one space group
    that ``StructureMatcher`` (the protocol's tolerances) calls the same structure are one
    candidate, ranked by how many samples drew it (a Monte Carlo estimate of its probability
    mass), ties by ``mass`` (the log-probability of the discrete draws: group, letters, types);
    each candidate represented by its sample of highest ``density`` (the full log-probability,
    comparable within a candidate; default ``mass``). The representatives come first, then the
    other draws of each candidate in the same order (they fill k predictions when fewer than k
    distinct structures were drawn). Failed samples (None) are left out. Comparing within a
    space group keeps the cost near linear; a distorted copy of a higher-symmetry structure
    counts as a distinct guess."""
    return _ranked_order(candidate_clusters(structures, groups, mass, density))


def _ranked_order(clusters: list[list[int]]) -> list[int]:
    """The representatives first, then the other members, as :func:`rank_candidates` says."""
    return [c[0] for c in clusters] + [i for c in clusters for i in c[1:]]


def draw_scores(model, crystals: list, conditions: dict | None = None) -> tuple[list, list]:
    """(mass, density) of each drawn crystal for :func:`rank_candidates`: the log-probability
    of its discrete draws (group, letters, types: a mass, comparable between candidates) and
    its full log-likelihood; -inf for a failed draw (None). ``conditions``: name -> a value, or
    one per crystal."""
    mass = [-math.inf] * len(crystals)
    density = [-math.inf] * len(crystals)
    drawn = [j for j, c in enumerate(crystals) if c is not None]
    if drawn:
        picked = {
            name: np.asarray(v)[drawn] if np.ndim(v) else v
            for name, v in (conditions or {}).items()
        }
        lp = model.crystal_log_prob([crystals[j] for j in drawn], conditions=picked or None)
        discrete = (lp["g"] + lp["W"] + lp["A"]).tolist()
        for j, v, t in zip(drawn, discrete, lp["total"].tolist(), strict=True):
            mass[j], density[j] = float(v), float(t)
    return mass, density


def predict_structures(
    model,
    composition,
    k: int = 5,
    candidates: int = 40,
    *,
    temperature: float = 1.0,
    seed: int | None = None,
    conditions: dict | None = None,
    min_distance: float | str | None = "auto",
) -> list[Structure]:
    """Structure prediction for one composition: the k most probable distinct structures
    among ``candidates`` draws of a composition-conditioned model (fewer if fewer are
    distinct; a draw the sampler cannot place after its redraws is dropped), each with
    ``properties["draws"]`` (how many of the draws it took) and ``properties["log_prob"]``
    (its representative's log-likelihood, nats)."""
    from crystal_gpt.data.codec import decode
    from crystal_gpt.sampling.sampler import sample_crystals

    if k < 1 or candidates < k:
        raise ValueError(f"need 1 <= k <= candidates, got k={k}, candidates={candidates}")
    crystals = sample_crystals(
        model, candidates, composition=composition, temperature=temperature, seed=seed,
        conditions=conditions, min_distance=min_distance, progress=False, give_up=True,
    )  # fmt: skip
    crystals = [c for c in crystals if c is not None]  # a draw that found no room is dropped
    if not crystals:
        raise ValueError(f"the model placed none of {candidates} draws of {composition}")
    structures = [decode(c) for c in crystals]
    mass, total = draw_scores(model, crystals, conditions)
    clusters = candidate_clusters(structures, [c.spacegroup for c in crystals], mass, total)
    out = []
    for members in clusters[:k]:
        s = structures[members[0]].copy()
        s.properties.update(draws=len(members), log_prob=round(float(total[members[0]]), 4))
        out.append(s)
    return out


def _match_job(
    job: tuple[Structure, list[Structure | None], tuple | None],
) -> tuple[list[float], list[bool]]:
    """RMS distances and the candidates' validity, in one worker call. With a ranking
    (groups, masses, densities, k): the k first samples of :func:`rank_candidates` are the
    predictions."""
    target, candidates, ranking = job
    reduced = _Reduced(candidates)
    if ranking is not None:
        groups, mass, density, k = ranking
        clusters = candidate_clusters(candidates, groups, mass, density, reduced)
        picked = _ranked_order(clusters)[:k]
        candidates = [candidates[i] for i in picked] + [None] * (k - len(picked))
        reduced = [reduced[i] for i in picked] + [None] * (k - len(picked))
    return _rms_distances((target, candidates), reduced), [crystal_validity(c) for c in candidates]


def _best(rms: np.ndarray) -> np.ndarray:
    """Per target, the lowest RMS of its k predictions (NaN: none matched)."""
    best = np.where(np.isnan(rms), np.inf, rms).min(axis=1)
    return np.where(np.isinf(best), np.nan, best)


def _rate(x: np.ndarray) -> tuple[float, float]:
    """(share matched, mean RMS over the matched) of per-target RMS values (NaN = no match)."""
    hit = ~np.isnan(x)
    return float(hit.mean()), float(x[hit].mean()) if hit.any() else math.nan


@dataclass
class CSPResult:
    """Per-target RMS distances of the k samples, and the summary figures."""

    ids: list[str]
    formulas: list[str]
    rms: np.ndarray  # (targets, k), NaN = no match / not generated
    feasible: np.ndarray  # (targets,) bool: the composition can be built by the model
    valid: np.ndarray  # (targets, k) bool: the prediction is valid (CDVAE's rules)
    target_valid: np.ndarray  # (targets,) bool
    seconds: dict[str, float] = field(default_factory=dict)
    protocol: str = ""

    def gated(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-target RMS @1 and @k after the validity gate: @1 needs a valid prediction and a
        valid target (DiffCSP's single-sample rule), @k a valid prediction."""
        valid_only = np.where(self.valid, self.rms, np.nan)
        return np.where(self.target_valid, valid_only[:, 0], np.nan), _best(valid_only)

    def summary(self) -> dict:
        k = self.rms.shape[1]
        first, best = self.gated()
        (m1, r1), (mk, rk) = _rate(first), _rate(best)
        (u1, ur1), (uk, urk) = _rate(self.rms[:, 0]), _rate(_best(self.rms))
        ungated = {"match_rate@1": u1, "rmse@1": ur1, f"match_rate@{k}": uk, f"rmse@{k}": urk}
        return {
            "targets": len(self.ids),
            "k": k,
            "match_rate@1": m1,
            "rmse@1": r1,
            f"match_rate@{k}": mk,
            f"rmse@{k}": rk,
            "ungated": ungated,
            "valid_predictions": float(self.valid.mean()) if self.valid.size else math.nan,
            "invalid_targets": int((~self.target_valid).sum()),
            "infeasible_compositions": int((~self.feasible).sum()),
            "seconds": self.seconds,
            "protocol": self.protocol,
        }

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        (out / "csp.json").write_text(json.dumps(summary, indent=2))
        with open(out / "csp.csv", "w", newline="") as f:
            w = csv.writer(f)
            header = ["id", "formula", "feasible", "target_valid", "valid_predictions"]
            w.writerow([*header, "matched@1", "rms@1", "matched@k", "rms@k", "matched_ungated@k"])
            first, best = self.gated()
            for i, (cid, formula) in enumerate(zip(self.ids, self.formulas, strict=True)):
                w.writerow(
                    [cid, formula, bool(self.feasible[i]), bool(self.target_valid[i]),
                     int(self.valid[i].sum()), not np.isnan(first[i]), fmt(first[i], 5, missing=""),
                     not np.isnan(best[i]), fmt(best[i], 5, missing=""),
                     bool((~np.isnan(self.rms[i])).any())]
                )  # fmt: skip
        k = self.rms.shape[1]
        un = summary["ungated"]
        lines = [
            "# Crystal structure prediction",
            "",
            f"Protocol: {self.protocol}",
            "",
            f"| count a match | match rate @1 | RMSE @1 | match rate @{k} | RMSE @{k} |",
            "|---|---|---|---|---|",
            f"| valid predictions only (CDVAE / DiffCSP code) | "
            f"{100 * summary['match_rate@1']:.2f}% | {summary['rmse@1']:.4f} | "
            f"{100 * summary[f'match_rate@{k}']:.2f}% | {summary[f'rmse@{k}']:.4f} |",
            f"| any prediction (no gate) | {100 * un['match_rate@1']:.2f}% | "
            f"{un['rmse@1']:.4f} | {100 * un[f'match_rate@{k}']:.2f}% | {un[f'rmse@{k}']:.4f} |",
            "",
            f"{summary['targets']} targets; {100 * summary['valid_predictions']:.2f}% of the "
            f"predictions valid; {summary['invalid_targets']} targets invalid (no @1 match "
            f"possible under the gate); {summary['infeasible_compositions']} compositions the "
            "model cannot build.",
            "",
            "Published MP-20 figures for comparison (full test set, each paper's own table): "
            "see docs in REFERENCE.md; ours are on the subset and split stated above.",
        ]
        (out / "csp.md").write_text("\n".join(lines) + "\n")
        return out


def evaluate_csp(
    model,
    targets: list[Structure],
    ids: list[str] | None = None,
    *,
    k: int = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
    workers: int | None = None,
    progress: bool = True,
    description: str = "",
    min_distance: float | str | None = "auto",
    conditions: dict[str, np.ndarray] | None = None,
    candidates: int | None = None,
) -> CSPResult:
    """Sample k structures per target composition and match them against the target
    (``min_distance``: the sampler's distance rule; ``conditions``: name -> one value per
    target, e.g. its pressure, given to a conditioned model with the composition).

    ``candidates`` = m >= k: draw m per target and predict the k most probable distinct
    structures among them (:func:`rank_candidates`: by how often drawn, then by the
    log-probability of the space group, letters and types; other draws of the most probable
    ones where fewer than k are distinct), the first of them @1 -- one prediction still,
    chosen from the model's own draws without looking at the target."""
    from crystal_gpt.data.codec import decode
    from crystal_gpt.sampling.sampler import sample_crystals
    from crystal_gpt.utils import parallel_map

    if k < 1:
        raise ValueError("k must be at least 1")
    if candidates is not None and candidates < k:
        raise ValueError(f"candidates ({candidates}) must be at least k ({k})")
    m = candidates or k
    ranked = candidates is not None
    ids = ids or [str(i) for i in range(len(targets))]
    t0 = time.perf_counter()
    jobs = [(s, model.config.max_sites) for s in targets]
    prepared = parallel_map(_prepare, jobs, workers, len(jobs), "compositions", progress)
    comps = [comp for comp, _ in prepared]
    feasible = np.array([ok for _, ok in prepared], dtype=bool)
    t1 = time.perf_counter()
    todo = [i for i in range(len(targets)) if feasible[i]]
    rows = [comps[i] for i in todo for _ in range(m)]
    asked = {
        name: np.repeat(np.asarray(v, dtype=float)[todo], m)
        for name, v in (conditions or {}).items()
    }
    crystals = sample_crystals(
        model,
        len(rows),
        composition=rows,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        min_distance=min_distance,
        give_up=True,  # a composition the model cannot place counts as unmatched
        conditions=asked or None,
    )
    generated: list[Structure | None] = []
    for c in crystals:
        if c is None:
            generated.append(None)
            continue
        try:
            generated.append(decode(c))
        except Exception:  # a lattice the decoder rejects counts as a failed sample
            generated.append(None)
    if ranked:
        groups = [0 if c is None else int(c.spacegroup) for c in crystals]
        mass, density = draw_scores(model, crystals, asked)
    t2 = time.perf_counter()

    def ranking(j: int) -> tuple | None:
        part = slice(j * m, (j + 1) * m)
        return (groups[part], mass[part], density[part], k) if ranked else None

    jobs = [(targets[i], generated[j * m : (j + 1) * m], ranking(j)) for j, i in enumerate(todo)]
    matched = parallel_map(_match_job, jobs, workers, len(jobs), "matching", progress)
    t3 = time.perf_counter()
    rms = np.full((len(targets), k), np.nan)
    valid = np.zeros((len(targets), k), dtype=bool)
    for j, i in enumerate(todo):
        rms[i], valid[i] = matched[j]
    target_valid = np.array([crystal_validity(s) for s in targets], dtype=bool)
    from pymatgen.core import Composition

    return CSPResult(
        ids=list(ids),
        formulas=[Composition(c).formula.replace(" ", "") for c in comps],
        rms=rms,
        feasible=feasible,
        valid=valid,
        target_valid=target_valid,
        seconds={
            "feasibility": round(t1 - t0, 2),
            "sampling": round(t2 - t1, 2),
            "matching": round(t3 - t2, 2),
        },
        protocol=csp_protocol(
            k, candidates, temperature, top_p, str(seed), min_distance, description
        ),
    )


def csp_protocol(
    k: int,
    candidates: int | None,
    temperature: float,
    top_p: float,
    seed: str,
    min_distance,
    description: str = "",
) -> str:
    """The protocol line of a CSP report."""
    how = (
        f"predictions per target, the most probable distinct structures among {candidates} "
        "samples (ranked by how often drawn, then the discrete draws' log-probability) "
        if candidates is not None
        else "samples per target "
    )
    return (
        f"CSP, composition = primitive cell of each target; {k} {how}(temperature "
        f"{temperature}, top-p {top_p}, seed {seed}, min distance {min_distance}); "
        "StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3); match rate over all targets, RMSE "
        "over matched; a match counts only for a valid prediction (and, @1, a valid target), "
        "the ungated figures beside" + (f"; {description}" if description else "")
    )


CHUNK_SETTINGS = "settings.json"


def concatenate(parts: list[CSPResult], protocol: str) -> CSPResult:
    """One result from consecutive chunks of the targets (seconds summed)."""
    if not parts:
        raise ValueError("no CSP results to join")
    seconds: dict[str, float] = {}
    for p in parts:
        for key, v in p.seconds.items():
            seconds[key] = round(seconds.get(key, 0.0) + v, 2)
    return CSPResult(
        ids=[i for p in parts for i in p.ids],
        formulas=[f for p in parts for f in p.formulas],
        rms=np.concatenate([p.rms for p in parts]),
        feasible=np.concatenate([p.feasible for p in parts]),
        valid=np.concatenate([p.valid for p in parts]),
        target_valid=np.concatenate([p.target_valid for p in parts]),
        seconds=seconds,
        protocol=protocol,
    )


def _save_chunk(result: CSPResult, path: Path) -> None:
    """A finished chunk as plain arrays (npz without pickled objects), written atomically."""
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez(
        tmp,
        ids=np.array(result.ids, dtype=str),
        formulas=np.array(result.formulas, dtype=str),
        rms=result.rms,
        feasible=result.feasible,
        valid=result.valid,
        target_valid=result.target_valid,
        seconds=np.array([result.seconds.get(k, 0.0) for k in _SECONDS]),
    )
    tmp.replace(path)


_SECONDS = ("feasibility", "sampling", "matching")


def _load_chunk(path: Path, ids: list[str], k: int) -> CSPResult:
    with np.load(path, allow_pickle=False) as z:
        found = [str(i) for i in z["ids"]]
        if found != ids or z["rms"].shape != (len(ids), k):
            raise ValueError(
                f"{path}: holds other targets than this run's chunk (the dataset, --limit or "
                "--chunk-size changed): use another --out, or delete its chunks/ folder"
            )
        return CSPResult(
            ids=found,
            formulas=[str(f) for f in z["formulas"]],
            rms=z["rms"],
            feasible=z["feasible"],
            valid=z["valid"],
            target_valid=z["target_valid"],
            seconds=dict(zip(_SECONDS, (float(s) for s in z["seconds"]), strict=True)),
        )


def parse_chunks(spec: str) -> list[int]:
    """'1-5,9' (chunk numbers as the log counts them, from 1) -> [0, 1, 2, 3, 4, 8]."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--chunks: expected numbers like 1-5,9, got {spec!r}") from None
        if not 1 <= a <= b:
            raise ValueError(f"--chunks: {part.strip()!r} is no range of chunk numbers (from 1)")
        out.extend(range(a - 1, b))
    return sorted(set(out))


def _number_ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    runs: list[list[int]] = []
    for x in sorted(numbers):
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _csp_defaults() -> dict:
    """evaluate_csp's keyword defaults (k, temperature, ...)."""
    return {
        name: p.default
        for name, p in inspect.signature(evaluate_csp).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def evaluate_csp_in_chunks(
    model,
    targets: list[Structure],
    ids: list[str],
    folder: str | Path,
    *,
    chunk_size: int,
    settings: dict,
    seed: int = 0,
    conditions: dict[str, np.ndarray] | None = None,
    log=None,
    only: Iterable[int] | None = None,
    **options,
) -> CSPResult | None:
    """:func:`evaluate_csp` over consecutive chunks of the targets, each saved in ``folder`` as
    it finishes (``chunk-00000.npz``, ...), so that a long run (the full mp_20 test split takes
    hours on a CPU) survives being stopped: run again with the same settings and the chunks
    already there are read back, not redrawn. Chunk c is drawn with its own seed
    (``shard_seed(seed, c)``), so the result does not depend on which chunks came from disk.
    ``settings`` (model, data, every option that changes the result) is recorded in
    ``folder``; chunks made with other settings are refused, never mixed in.

    ``only`` (chunk numbers from 0): draw only these of the missing chunks, so that several
    processes or machines share one run (each its own chunks, one folder); returns None while
    chunks are still missing, the joined result once every chunk is there."""
    from crystal_gpt.utils import shard_seed

    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be at least 1, got {chunk_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = {**settings, "seed": seed, "chunk_size": chunk_size, "targets": len(targets)}
    settings_file = folder / CHUNK_SETTINGS
    if settings_file.exists():
        before = json.loads(settings_file.read_text())
        if before != json.loads(json.dumps(recorded)):
            changed = sorted(
                key for key in set(before) | set(recorded) if before.get(key) != recorded.get(key)
            )
            raise ValueError(
                f"{folder} holds chunks of a run with other settings ({', '.join(changed)} "
                "differ): use another --out, or delete that folder to start over"
            )
    else:
        if any(folder.glob("chunk-*.npz")):
            raise ValueError(
                f"{folder} holds chunks but no {CHUNK_SETTINGS}: their settings are unknown, so "
                "they cannot be continued; remove that folder to start over"
            )
        tmp = settings_file.with_suffix(".partial")
        tmp.write_text(json.dumps(recorded, indent=2))
        tmp.replace(settings_file)
    parts = []
    starts = range(0, len(targets), chunk_size)
    chosen = None if only is None else set(only)
    if chosen is not None and (beyond := sorted(c for c in chosen if not 0 <= c < len(starts))):
        raise ValueError(f"no chunk {beyond[-1] + 1}: this run has {len(starts)} chunks")
    missing = []
    opt = {**_csp_defaults(), **options}  # evaluate_csp's own defaults: one place for them
    for c, start in enumerate(starts):
        part = slice(start, start + chunk_size)
        path = folder / f"chunk-{c:05d}.npz"
        if path.exists():
            try:
                parts.append(_load_chunk(path, ids[part], opt["k"]))
                continue
            except (OSError, KeyError, EOFError, zipfile.BadZipFile) as err:  # cut short
                if log is not None:
                    log(f"{path}: unreadable ({err}); drawing that chunk again")
        if chosen is not None and c not in chosen:
            missing.append(c)
            continue
        asked = {name: np.asarray(v)[part] for name, v in (conditions or {}).items()}
        result = evaluate_csp(
            model, targets[part], ids[part], seed=shard_seed(seed, c), conditions=asked or None,
            **options,
        )  # fmt: skip
        _save_chunk(result, path)
        parts.append(result)
        if log is not None:
            s, k = result.summary(), result.rms.shape[1]
            log(
                f"chunk {c + 1}/{len(starts)} ({len(result.ids)} targets): @1 "
                f"{100 * s['match_rate@1']:.1f}%, @{k} {100 * s[f'match_rate@{k}']:.1f}% "
                f"in {sum(result.seconds.values()):.0f} s -> {path}"
            )
    if missing:
        if log is not None:
            log(
                f"{len(starts) - len(missing)} of {len(starts)} chunks done; chunks "
                f"{_number_ranges([c + 1 for c in missing])} are left to other runs (run again "
                "with --resume, without --chunks, to finish)"
            )
        return None
    seeds = f"{seed}, chunks of {chunk_size} targets, chunk c seeded shard_seed({seed}, c)"
    protocol = csp_protocol(
        opt["k"], opt["candidates"], opt["temperature"], opt["top_p"], seeds,
        opt["min_distance"], opt["description"],
    )  # fmt: skip
    return concatenate(parts, protocol)
