"""Does decode(encode(s)) give back s? The codec's acceptance check, per crystal and in bulk.

A round trip passes when pymatgen's StructureMatcher with its default tolerances (ltol 0.2,
stol 0.3, angle_tol 5) matches the original and the decoded crystal. StructureMatcher first
reduces both to primitive cells with its own 0.25 A tolerance; for pseudo-symmetric crystals
the ideal (symmetrised) copy can reduce to a smaller cell than the slightly distorted original,
and the plain fit then fails for a reason unrelated to the codec. Such cases are retried with
``attempt_supercell=True`` (same tolerances) and reported separately as ``match_supercell``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystal_gpt.data.codec import DEFAULT_SYMPREC, decode, encode
from crystal_gpt.utils import parallel_map

STATUSES = ("match", "match_supercell", "no_match", "error")


@dataclass(frozen=True)
class RoundTrip:
    status: str  # one of STATUSES
    spacegroup: int = 0
    num_sites: int = 0
    fallback: bool = False
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("match", "match_supercell")


def check_roundtrip(
    structure: Structure, symprec: float = DEFAULT_SYMPREC, mode: str = "wyckoff"
) -> RoundTrip:
    try:
        wc = encode(structure, symprec, mode=mode)
        decoded = decode(wc)
    except Exception as err:
        return RoundTrip("error", reason=f"{type(err).__name__}: {err}")
    info = dict(spacegroup=wc.spacegroup, num_sites=wc.num_sites, fallback="fallback" in wc.meta)
    if decoded.composition.reduced_composition != structure.composition.reduced_composition:
        return RoundTrip(
            "no_match",
            **info,
            reason=f"composition changed: {structure.composition} -> {decoded.composition}",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if StructureMatcher().fit(structure, decoded):
            return RoundTrip("match", **info)
        if StructureMatcher(attempt_supercell=True).fit(structure, decoded):
            return RoundTrip(
                "match_supercell",
                **info,
                reason="StructureMatcher's primitive reduction differs for original and decoded",
            )
    return RoundTrip("no_match", **info, reason=f"StructureMatcher found no match ({wc!r})")


def _check(args: tuple[Structure, float, str]) -> RoundTrip:
    return check_roundtrip(*args)


def check_roundtrips(
    structures: list[Structure],
    symprec: float = DEFAULT_SYMPREC,
    mode: str = "wyckoff",
    workers: int = 1,
    progress: bool = False,
    desc: str = "round trip",
) -> list[RoundTrip]:
    jobs = [(s, symprec, mode) for s in structures]
    return parallel_map(_check, jobs, workers, len(jobs), desc, progress)


def summarize(results: list[RoundTrip]) -> dict[str, float]:
    """Counts per status and the two rates: strict (default matcher) and with supercell retry."""
    counts = Counter(r.status for r in results)
    n = max(len(results), 1)
    return {
        "n": len(results),
        **{s: counts.get(s, 0) for s in STATUSES},
        "fallback": sum(r.fallback for r in results),
        "rate_strict": counts.get("match", 0) / n,
        "rate": (counts.get("match", 0) + counts.get("match_supercell", 0)) / n,
    }
