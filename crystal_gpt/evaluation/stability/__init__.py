"""Thermodynamic stability of crystals: CHGNet relaxation and energy above a reference hull.

The S.U.N. protocol (MatterGen; WyFormer's MP-20 re-evaluation) relaxes each generated crystal
with a machine-learned potential and measures its energy above the convex hull of a large set of
known crystals. Every energy on both sides must come from the same potential, so the reference
hull is built here with CHGNet too (never mixed with DFT or another model):

- candidates: FIRE + ``FrechetCellFilter`` relaxation of positions and cell (default 500 steps,
  fmax 0.1 eV/A), energy = CHGNet energy of the final structure;
- reference crystals: the dataset's crystals (DFT-relaxed already) as CHGNet *single points* at
  their DFT geometries. Relaxing them again lowers the CHGNet energy by a median 0.4 meV/atom
  (mean 2.4, max 25 meV/atom over 30 mp_20 test crystals) at ~40x the cost (1 s instead of
  26 ms each: 5 h instead of 8 min for mp_20 on one core), so the single point is the sensible
  trade (``relax_steps`` turns the relaxation on where compute is cheap);
- elemental references: ``ase.build.bulk`` structures relaxed with CHGNet for every element ase
  knows (fmax 0.05), plus the dataset's own single-element crystals; the lowest energy wins.

No further energy correction is applied: CHGNet was trained on MP2020-corrected energies.
CHGNet and ASE are imported lazily, so this package imports without the ``eval`` extra.

The pieces: ``potential`` (CHGNet, threads), ``relaxation`` (relaxations, single points, the
resume cache), ``hull`` (the reference hull, energies above it) and ``sun`` (the stability
numbers and S.U.N. of a set of crystals).
"""

from crystal_gpt.evaluation.stability.hull import (
    ReferenceHull,
    chemical_system,
    element_structure,
    hull_path,
    parse_systems,
)
from crystal_gpt.evaluation.stability.potential import load_potential, potential_tag
from crystal_gpt.evaluation.stability.relaxation import (
    DEFAULT_FMAX,
    DEFAULT_STEPS,
    RelaxResult,
    displacement_rmsd,
    read_relax_cache,
    relax_structures,
    single_point_energies,
)
from crystal_gpt.evaluation.stability.sun import STABLE_THRESHOLD, evaluate_stability

__all__ = [
    "DEFAULT_FMAX",
    "DEFAULT_STEPS",
    "STABLE_THRESHOLD",
    "ReferenceHull",
    "RelaxResult",
    "chemical_system",
    "displacement_rmsd",
    "element_structure",
    "evaluate_stability",
    "hull_path",
    "load_potential",
    "parse_systems",
    "potential_tag",
    "read_relax_cache",
    "relax_structures",
    "single_point_energies",
]
