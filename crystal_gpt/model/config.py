"""The model's settings: one dataclass, written into every checkpoint as JSON-able values and
checked before a model is built from it (a training config, a file, a checkpoint)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int = 768
    dropout: float = 0.0
    coord_mixtures: int = 16
    fourier_freqs: int = 6
    max_sites: int = 64
    flow_transforms: int = 3
    flow_hidden: int = 128
    # scalar or vector conditions (property columns, pressure): name -> input dimension; each
    # is standardised with the training data's mean and std (``CrystalGPT.condition_stats``)
    conditions: dict[str, int] = field(default_factory=dict)
    # training only: each condition of a crystal is hidden with this probability, and all of
    # them together with ``condition_dropout_all``, so one model learns P(crystal | y), P(crystal
    # | some of y) and P(crystal) (classifier-free guidance needs the unconditional part)
    condition_dropout: float = 0.1
    condition_dropout_all: float = 0.1
    # P(crystal | composition): the structure-prediction (CSP) variant; the composition is read
    # off each training crystal, and sampling needs one (``composition=``)
    condition_on_composition: bool = False
    # the order of the factorisation: P(g) P(L | g) prod P(site | L, ...) ("first", the original
    # design: every site sees the lattice, so atoms are placed with their distances known) or
    # P(g) prod P(site | ...) P(L | g, sites) ("last")
    lattice_first: bool = False
    # a third order: P(g) prod P(letter, element | ...) P(L | g, letters, elements) prod
    # P(coordinates | L, ...): the cell follows the chemistry (its proportions fit the atoms)
    # and precedes the coordinates (placed with their distances known); one causal sequence
    # [g, site tokens without coordinates, lattice token, coordinate tokens]
    sites_first: bool = False
    # element embeddings built from chemistry (group, period, electronegativity, radius, ...)
    # added to the learnt ones, in the inputs and in the element head
    element_features: bool = False
    # each site token also carries the running charge of the atoms placed so far (typical,
    # lowest and highest oxidation states summed; ``layers.charge_features``), so the element
    # and letter heads see how far the crystal is from a neutral composition
    charge_features: bool = False
    # lattice first: each site token also carries the fraction of the drawn cell's volume
    # that the atoms placed so far take up (per-element volumes fitted to the training cells,
    # ``data.geometry.element_volumes``), and the element head scores every candidate by the
    # fraction it would leave filled; without it the model matched composition to the drawn
    # volume poorly (benchmarks/RESULTS.md, "The cell's volume and its atoms"). Sites first:
    # the lattice's context carries the fitted volume per atom of the sites drawn
    volume_features: bool = False
    # with charge_features: the element head also scores every candidate by the running charge
    # it would leave (the same seven features), as volume_features does with the fill; without
    # it the fill's direct path crowded out charge balance (benchmarks/RESULTS.md, "The cell's
    # volume and its atoms")
    charge_candidates: bool = False
    # each site token also says whether the composition so far passes SMACT's neutrality test
    # (one oxidation state per element summing to zero, or one element, or metals only;
    # ``data.chemistry.balanced_candidates``), and the element head scores every candidate by
    # whether it would pass after it: the end of the sequence and the last elements can follow
    # an exact test that summed charges only approximate
    balance_features: bool = False
    # P(g) with no condition given is the training histogram (its maximum-likelihood value) by
    # construction: conditions add a learnt offset that is zero when every one is absent.
    # Without it a conditioned model learns P(g | nothing) from the rows whose conditions were
    # all dropped, and the bundled mp_20 had drifted 0.10 (total variation) from the histogram
    # towards small-cell groups (benchmarks/RESULTS.md, "The space group without conditions")
    g_marginal_histogram: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Every setting of the right type and in range, named in the error (a config read from
        a file or a checkpoint would otherwise fail deep inside torch)."""
        ints = ("d_model", "n_layers", "n_heads", "d_ff", "coord_mixtures", "fourier_freqs",
                "max_sites", "flow_transforms", "flow_hidden")  # fmt: skip
        for name in ints:
            check_number(f"model.{name}", getattr(self, name), 1, int)
        for name in ("dropout", "condition_dropout", "condition_dropout_all"):
            check_number(f"model.{name}", getattr(self, name), 0.0, float)
            if getattr(self, name) >= 1:
                raise ValueError(f"setting model.{name}={getattr(self, name)!r} must be below 1")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be a multiple of model.n_heads={self.n_heads}"
            )
        for name in (
            "condition_on_composition",
            "lattice_first",
            "sites_first",
            "element_features",
            "charge_features",
            "volume_features",
            "charge_candidates",
            "balance_features",
            "g_marginal_histogram",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"setting model.{name}={getattr(self, name)!r} must be true/false")
        if self.volume_features and not (self.lattice_first or self.sites_first):
            raise ValueError(
                "setting model.volume_features=true needs model.lattice_first=true (the cell's "
                "volume known while the atoms are placed) or model.sites_first=true (the atoms' "
                "volume known when the cell is drawn)"
            )
        if self.sites_first and self.lattice_first:
            raise ValueError(
                "model.sites_first and model.lattice_first are two orders: set at most one"
            )
        if self.charge_candidates and not self.charge_features:
            raise ValueError(
                "setting model.charge_candidates=true needs model.charge_features=true"
            )
        conditions = self.conditions
        if not isinstance(conditions, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in conditions.items()
        ):
            raise ValueError(f"setting model.conditions={conditions!r} must map names to sizes")
        for name in conditions:
            if not name.isidentifier():
                raise ValueError(
                    f"condition name {name!r} must be a plain name (letters, digits, _)"
                )


def check_number(name: str, value, low: float, kind: type) -> None:
    """A setting that must be a whole number (``kind=int``) or a finite number, >= ``low``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and (isinstance(value, int) if kind is int else math.isfinite(value))
    if not ok or value < low:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"setting {name}={value!r} must be {what} >= {low}")


def per_crystal_conditions(conditions: dict | None, n: int) -> dict[str, np.ndarray]:
    """name -> one value, or one per crystal -> name -> (n,) float array, checked."""
    out = {}
    for name, value in (conditions or {}).items():
        v = np.asarray(value, dtype=float).reshape(-1)
        if len(v) == 1:
            v = np.full(n, v[0])
        if len(v) != n:
            raise ValueError(f"condition {name}: {len(v)} values given for {n} crystals")
        out[name] = v
    return out


def unknown_condition_message(asked: list[str], known: list[str]) -> str:
    knows = ", ".join(known) if known else "none (it samples unconditionally only)"
    return f"this model was not trained on condition(s) {', '.join(asked)}; it knows: {knows}"
