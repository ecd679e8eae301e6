"""Ancestral sampling with a key/value cache: each site costs one incremental transformer step.

Every sample is symmetry-consistent by construction: letters come from the masked categorical
of the group, coordinates are projected onto their Wyckoff position (fixed coordinates exact),
and the lattice is drawn in the crystal system's free parameters only.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crystal_gpt.data.codec import (
    DEFAULT_SYMPREC,
    WyckoffCrystal,
    crystal_problem,
    expand,
    reduce_lattice_parameters,
)
from crystal_gpt.data.geometry import cell_volume
from crystal_gpt.data.symmetry import (
    CRYSTAL_SYSTEMS,
    check_spacegroup,
    get_tables,
    lowest_next_element,
    space_group_number,
)
from crystal_gpt.model.distributions import (
    NUM_ELEMENTS,
    von_mises_mixture_sample,
)
from crystal_gpt.sampling.charge import ChargeBalance
from crystal_gpt.sampling.constraints import (
    ConstraintError,
    ElementCount,
    Planner,
    explain_infeasible,
    feasible_groups,
    make_request,
)
from crystal_gpt.sampling.placement import Placement, clashing_crystals, thresholds_for

if TYPE_CHECKING:  # the model imports the sampler (CrystalGPT.sample): no import back
    from crystal_gpt.model.transformer import CrystalGPT


class Shaping(NamedTuple):
    """How the categorical draws (group, letters, elements) are shaped."""

    temperature: float
    top_p: float


def _sample_logits(logits: Tensor, shaping: Shaping, gen: torch.Generator | None) -> Tensor:
    """Draw from a categorical with (temperature, top_p): nucleus sampling keeps the smallest
    set of most likely outcomes whose probability reaches top_p."""
    temperature, top_p = shaping
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely outcomes
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _Drawer:
    """Draws for ``CrystalGPT.site_content``: categoricals with (temperature, top-p) from the
    seeded generator; von Mises mixtures (component and angle from the generator too)."""

    def __init__(self, shaping: Shaping, gen: torch.Generator) -> None:
        self.shaping, self.gen = shaping, gen

    def categorical(self, logits: Tensor) -> Tensor:
        return _sample_logits(logits.cpu(), self.shaping, self.gen).to(logits.device)

    def von_mises(self, params: Tensor) -> Tensor:
        return von_mises_mixture_sample(params.cpu(), self.gen).to(params.device)


FAR_OUTSIDE = 3  # requests beyond this many times the largest training cell need allow_unseen
MAX_SAMPLES = 100_000_000  # per call: the crystals are kept in memory (~1 kB each)
TAIL_COPIES = 16  # at most this many copies of a crystal in one batch of the queue's tail
CONTAINS_REDRAWS = 20_000  # draws per crystal for ``contains`` (a rare element is rare)


def parse_spacegroups(spacegroups: int | str | Iterable[int | str]) -> list[int]:
    """Space groups from what a user writes: numbers, Hermann-Mauguin symbols ('Fm-3m',
    'P6_3/mmc'), crystal systems ('cubic'), or a comma-separated list of these ('194,225')."""
    if isinstance(spacegroups, int | np.integer):
        return [int(spacegroups)]
    if isinstance(spacegroups, str):
        parts = spacegroups.split(",")
    elif isinstance(spacegroups, Iterable):
        parts = list(spacegroups)
    else:
        raise ValueError(
            f"space group {spacegroups!r}: give a number, a symbol such as 'Fm-3m', a crystal "
            "system or a list of these"
        )
    tables = get_tables()
    out: list[int] = []
    for part in parts:
        if isinstance(part, int | np.integer):
            out.append(int(part))
            continue
        part = str(part).strip()
        if part in CRYSTAL_SYSTEMS:
            index = CRYSTAL_SYSTEMS.index(part)
            out += [g for g in range(1, 231) if tables.crystal_system[g] == index]
        elif part.isdigit():
            out.append(int(part))
        elif part.replace("_", "") in _symbol_numbers():
            out.append(_symbol_numbers()[part.replace("_", "")])
        else:
            raise ValueError(f"unknown space group or crystal system {part!r}")
    return out


@functools.cache
def _symbol_numbers() -> dict[str, int]:
    """Hermann-Mauguin symbol (underscores dropped) -> space-group number."""
    return {str(sym).replace("_", ""): g for g, sym in enumerate(get_tables().symbol) if g}


def parse_elements(elements: str | Iterable[str] | None) -> list[str] | None:
    """'Li,Fe,O' or a list -> symbols (validated where they are used)."""
    if elements is None:
        return None
    if isinstance(elements, str):
        elements = elements.split(",")
    return [str(e).strip() for e in elements if str(e).strip()]


def spacegroup_mask(spacegroups: int | str | Iterable[int | str] | None, device) -> Tensor:
    """Allowed space groups as a (231,) bool mask (index 0 never allowed)."""
    mask = torch.zeros(231, dtype=torch.bool, device=device)
    if spacegroups is None:
        mask[1:] = True
        return mask
    groups = parse_spacegroups(spacegroups)
    if not groups:
        raise ValueError("no space group to sample from")
    for g in groups:
        mask[check_spacegroup(int(g))] = True
    return mask


def element_mask(
    elements: Iterable[str] | None, exclude: Iterable[str] | None, device
) -> Tensor | None:
    """Allowed atom types as a (119,) bool mask over atomic numbers, or None for all."""
    from pymatgen.core.periodic_table import Element

    if elements is None and exclude is None:
        return None

    def numbers(symbols: Iterable[str]) -> list[int]:
        out = []
        for sym in symbols:
            if not Element.is_valid_symbol(str(sym)):
                raise ValueError(f"unknown element {sym!r}")
            out.append(Element(str(sym)).Z)
        return out

    mask = torch.zeros(NUM_ELEMENTS, dtype=torch.bool, device=device)
    if elements is None:
        mask[1:] = True
    else:
        mask[numbers(elements)] = True
    if exclude is not None:
        mask[numbers(exclude)] = False
    if not mask.any():
        raise ValueError("the element constraints leave no element to choose")
    return mask


@torch.no_grad()
def sample_crystals(
    model: CrystalGPT,
    n: int,
    *,
    spacegroup: int | str | Iterable[int | str] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 500,
    use_cache: bool = True,
    elements: Iterable[str] | None = None,
    exclude_elements: Iterable[str] | None = None,
    composition=None,
    formula_units: int | None = None,
    num_atoms=None,
    wyckoff_template=None,
    chemsys: str | Iterable[str] | None = None,
    contains: str | Iterable[str] | None = None,
    allow_unseen: bool = False,
    symprec: float | None = DEFAULT_SYMPREC,
    max_redraws: int | None = None,
    min_distance: float | str | None = "auto",
    max_site_tries: int = 20,
    charge_balanced: bool = False,
    progress: bool = False,
    check_workers: int | None = None,
    give_up: bool = False,
    conditions: dict | None = None,
    guidance: float = 1.0,
    num_elements: int | str | tuple[int, int] | None = "auto",
) -> list[WyckoffCrystal]:
    """Draw n crystals; ``spacegroup`` fixes the group (one or a list) by masking P(g);
    ``elements`` / ``exclude_elements`` restrict atom types by masking P(A). ``temperature`` and
    ``top_p`` shape the categorical draws (group, letters, elements). ``use_cache=False``
    re-runs the full prefix at every step (the reference the key/value cache must match).

    Constraints with look-ahead (``sampling.constraints``), all per primitive cell: ``composition``
    (a formula such as 'Li4Fe4P4O16', a mapping or a pymatgen Composition; with
    ``formula_units`` a reduced formula times that many units) is met exactly (crystal structure
    prediction); ``num_atoms`` (N or (low, high)) bounds the atoms per cell;
    ``wyckoff_template`` ('4a 4b 8c' or letters, one space group) fixes the occupied Wyckoff
    positions, the elements left to the model. Requests that no crystal can meet raise
    ``ConstraintError`` before sampling. ``chemsys`` ('Li-Fe-P-O' or a list) asks for exactly
    those elements, each present: the end of the sequence is masked until all are placed.
    ``contains`` ('O', 'Li,O' or a list) asks for these elements in every crystal, the others
    free (e.g. oxides): exact conditioning, by redrawing crystals without them (a rare element
    costs many draws; an element list makes it cheap).

    Samples are what was asked for: a crystal whose symmetry (moyopy or spglib at
    ``symprec``; None: no check) is higher than its sampled group, or whose cell is impossible,
    is redrawn, as is a chemical system that runs out of room; ``meta['redraws']`` counts the
    draws each crystal replaced (``max_redraws`` per crystal, then an error; default 100, or
    ``CONTAINS_REDRAWS`` with ``contains``). By default only
    elements seen in the model's training data and atom counts within its training range are
    sampled; ``allow_unseen=True`` lifts that, and explicit requests outside it are kept with
    a warning.

    Distance rule (``sampling.placement``): no two atoms closer than ``min_distance`` ("auto":
    0.8 of the shortest distance of that element pair in the model's training data; a number:
    Angstrom for every pair; 0 or None: no rule). A model that draws the lattice before the
    coordinates (lattice first, or sites first) redraws a clashing site's coordinates (up to
    ``max_site_tries``, then the crystal; ``meta['site_redraws']`` counts them); a lattice-last
    model can only redraw the whole crystal.

    ``charge_balanced``: only compositions SMACT's neutrality test accepts (``sampling.charge``:
    one oxidation state per element summing to zero, or one element, or only metals), with a
    look-ahead that offers a letter or an element only if a balanced completion remains.

    ``give_up=True``: a crystal still unacceptable after ``max_redraws`` draws is None in the
    result instead of an error for the whole run (benchmarks that must go on, e.g. CSP).

    ``conditions``: name -> a target value, or one per crystal (e.g. ``{"band_gap": 3.0}``,
    ``{"pressure": 40}``), for a model trained with them (``ModelConfig.conditions``); without
    them a conditioned model samples unconditionally. ``guidance``: classifier-free guidance
    scale for the discrete choices (group, letters, elements): 1 samples P(crystal | y), above 1
    pushes further toward y, 0 ignores it; coordinates and the lattice follow P(. | y).

    ``num_elements``: distinct elements per crystal. N, 'LOW-HIGH' or (low, high): a
    constraint (``constraints.ElementCount``); 'prior': the training crystals' distribution of
    the count (``model.element_counts``), by rejection (``_CountResampler``: within each count
    the model's own distribution), as DiffCSP draws the atom count from the training data;
    'model' or None: the model's own choice. 'auto' (default): 'prior' for unconstrained
    sampling (no space group, element, composition, size, template, charge-balance or
    condition request; a model that records the counts), else 'model'.

    ``check_workers``: processes for the symmetry check (default: one fewer than the cores, for
    runs of at least ``_POOL_MIN`` crystals; 0 = in this process); the samples do not depend
    on it."""
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 0 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be a whole number from 0 to {MAX_SAMPLES:,}, got {n!r}")
    if not (isinstance(temperature, int | float) and temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if spacegroup is not None:
        spacegroup = parse_spacegroups(spacegroup)
    elements, exclude_elements = parse_elements(elements), parse_elements(exclude_elements)
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    if getattr(model.config, "condition_on_composition", False) and composition is None:
        raise ValueError(
            "this model predicts structures for a given composition: pass composition="
            " (CLI: --composition)"
        )
    cond_values = _condition_values(model, conditions, guidance, n)
    required = None
    if chemsys is not None:
        if elements is not None or composition is not None:
            raise ConstraintError(
                "chemsys fixes the elements: give it without elements/composition"
            )
        elements = parse_chemsys(chemsys)
        if exclude_elements is not None and set(elements) & set(exclude_elements):
            raise ConstraintError(
                f"chemsys elements {sorted(set(elements) & set(exclude_elements))} are excluded"
            )
        required = element_mask(elements, None, device)
    allowed_a = element_mask(elements, exclude_elements, device)
    contains = list(dict.fromkeys(parse_elements(contains) or [])) or None
    lacking = None  # contains: which crystals lack an element they must hold (redrawn)
    if contains is not None:
        # an explicit element list decides what is seen, as it does without ``contains``
        lacking = _contained(
            model, contains, allowed_a, composition, allow_unseen or elements is not None
        )
    if max_redraws is None:
        max_redraws = 100 if lacking is None else CONTAINS_REDRAWS
    asked_atoms = num_atoms
    num_atoms = _training_range(
        model, allowed_a, elements, composition, num_atoms, wyckoff_template, allow_unseen
    )
    if not allow_unseen and elements is None and composition is None:
        seen = model.seen_elements.to(device)
        allowed_a = seen if allowed_a is None else allowed_a & seen
        if not allowed_a.any():
            raise ConstraintError(
                "no element the model was trained on is allowed (allow_unseen=True / "
                "--allow-unseen lifts the training-data restriction)"
            )
    per_crystal = isinstance(composition, list | tuple)
    if per_crystal and len(composition) != n:
        raise ValueError(f"{len(composition)} compositions given for {n} crystals")
    plans: dict = {}  # one planner and group list per distinct request

    def plan(comp) -> tuple[Planner | None, list[int] | None]:
        key = comp if isinstance(comp, str | None) else repr(comp)
        if key not in plans:
            request = make_request(
                composition=comp,
                formula_units=formula_units,
                num_atoms=num_atoms,
                wyckoff_template=wyckoff_template,
                spacegroup=spacegroup,
                elements=elements,
                exclude_elements=exclude_elements,
            )
            if not request.active:
                plans[key] = (None, None)
            else:
                planner = Planner(request, model.config.max_sites)
                candidates = spacegroup_mask(spacegroup, "cpu").nonzero().flatten().tolist()
                groups = feasible_groups(planner, candidates)
                if not groups:
                    raise ConstraintError(
                        explain_infeasible(request, candidates, planner.max_sites)
                    )
                plans[key] = (planner, groups)
        return plans[key]

    if charge_balanced and composition is not None:
        raise ConstraintError(
            "a composition fixes the charges: charge_balanced (--charge-balanced) does not "
            "combine with composition (--composition)"
        )
    charge_atoms = None
    if charge_balanced:
        from crystal_gpt.sampling.constraints import parse_atom_range

        charge_atoms = 64 if num_atoms is None else parse_atom_range(num_atoms)[1]
    rows = [plan(c) for c in composition] if per_crystal else [plan(composition)] * n
    thresholds = thresholds_for(model, min_distance)
    if thresholds is not None:
        thresholds = thresholds.to(device)
    seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % 2**62)
    unconstrained = all(
        v is None
        for v in (spacegroup, elements, exclude_elements, composition, asked_atoms,
                  wyckoff_template, chemsys, contains)
    ) and not (cond_values or charge_balanced)  # fmt: skip
    template_sites = None
    if wyckoff_template is not None and spacegroup is not None and len(spacegroup) == 1:
        from crystal_gpt.sampling.constraints import parse_template

        template_sites = len(parse_template(spacegroup[0], wyckoff_template))
    if contains is not None and template_sites is not None and len(contains) > template_sites:
        raise ConstraintError(
            f"{len(contains)} elements to contain need {len(contains)} sites; the template has "
            f"{template_sites}"
        )
    counts = element_bounds(
        model, num_elements, n, unconstrained, allowed_a, chemsys, composition, asked_atoms,
        template_sites,
    )  # fmt: skip
    too_few = counts is not None and counts.ndim == 2 and int(counts[0, 1]) < len(contains or [])
    if contains is not None and too_few:
        raise ConstraintError(
            f"at most {int(counts[0, 1])} distinct elements asked, but {len(contains)} "
            f"must be contained ({', '.join(contains)})"
        )
    resampler = None
    if counts is not None and counts.ndim == 1:
        resampler, counts = _CountResampler(counts, seed), None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    result: list[WyckoffCrystal | None] = [None] * n
    redraws = np.zeros(n, dtype=int)
    placed = np.zeros(n, dtype=int)  # coordinate redraws by the distance rule
    pending = deque(range(n))  # crystals still to draw; a redraw goes to the back
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # shown once sampling has taken 2 s (a quick call stays quiet), with the redraws so far:
        # a hard request shows that it is being worked on, not stuck
        bar = tqdm(total=n, desc="sampling", unit="crystal", delay=2)

    def settle(idx, batch, dead, moved, reasons) -> None:
        """Keep a checked batch's accepted crystals; send the others back to be redrawn. A
        crystal drawn several times in the batch (the tail's copies) keeps its first accepted
        copy: the first acceptable one of i.i.d. draws, as one draw after another would give."""
        done = 0
        if resampler is not None:  # among the crystals that passed every check
            passed = [not stuck and why is None for stuck, why in zip(dead, reasons, strict=True)]
            kept = resampler.keep(batch, passed)
            reasons = [
                "resampled to the training numbers of elements" if ok and not k else why
                for ok, k, why in zip(passed, kept, reasons, strict=True)
            ]
        last: dict[int, str] = {}
        for i, crystal, stuck, m, why in zip(idx, batch, dead, moved, reasons, strict=True):
            if result[i] is not None:  # a copy after the accepted one: not drawn, in effect
                continue
            placed[i] += m
            reason = "a dead end (no room for every element, or atoms too close)" if stuck else why
            if stuck and lacking is not None and lacking(crystal):
                reason = f"without an element it must contain ({', '.join(contains or [])})"
            if reason is None:
                crystal.meta["redraws"] = int(redraws[i])
                crystal.meta["site_redraws"] = int(placed[i])
                if cond_values:
                    crystal.meta["conditions"] = {k: float(v[i]) for k, v in cond_values.items()}
                result[i] = crystal
                done += 1
                continue
            redraws[i] += 1
            last[i] = reason
        for i, reason in last.items():
            if result[i] is not None:
                continue
            if redraws[i] > max_redraws:
                if give_up:
                    if bar is not None:
                        bar.update(1)
                    continue
                raise ConstraintError(
                    f"no acceptable crystal after {max_redraws} draws (last: {reason}); "
                    "the request may be one the model cannot meet"
                )
            pending.append(i)
        if bar is not None:
            bar.update(done)
            bar.set_postfix(redraws=int(redraws.sum()), refresh=False)

    # The symmetry check of one batch runs in worker processes while the next batch is drawn;
    # the schedule (a batch's redraws join the queue after the next batch is taken) is the same
    # with or without workers, so a seed gives the same crystals either way.
    checker = _Checker(symprec, workers=check_workers, n=n)
    scratch: dict[str, list[Tensor]] = {}  # buffers the batches reuse (``_continued_caches``)
    # the lattice flow draws from torch's global RNG: seed it without disturbing the caller's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            in_flight = None
            while pending or in_flight is not None:
                drawn = None
                if pending:
                    idx = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                    if len(idx) < batch_size and all(redraws[i] for i in idx):
                        # the tail, only redraws left: a few hard requests drawn as copies at
                        # once, instead of one small batch (a whole pass) per redraw
                        # (with ``contains`` most draws fail: fill the batch with copies)
                        cap = TAIL_COPIES if lacking is None else batch_size
                        copies = min(batch_size // len(idx), cap)
                        idx = [  # never more draws in all than max_redraws allows
                            i for i in idx
                            for _ in range(max(1, min(copies, max_redraws + 1 - int(redraws[i]))))
                        ]  # fmt: skip
                    todo = [rows[i] for i in idx]
                    asked = {k: v[idx] for k, v in cond_values.items()}
                    bounds = None if counts is None else torch.as_tensor(counts[idx])
                    batch, dead, moved = _sample_batch(
                        model,
                        len(todo),
                        spacegroup,
                        Shaping(temperature, top_p),
                        gen,
                        device,
                        allowed_a,
                        use_cache,
                        todo if todo[0][0] is not None else None,
                        required,
                        thresholds,
                        max_site_tries,
                        charge_atoms,
                        asked,
                        guidance,
                        bounds,
                        scratch,
                    )
                    if lacking is not None:  # redrawn without their symmetry check
                        dead = [d or lacking(c) for d, c in zip(dead, batch, strict=True)]
                    drawn = (idx, batch, dead, moved, checker.submit(batch, dead))
                if in_flight is not None:
                    *drawn_before, handle = in_flight
                    settle(*drawn_before, checker.result(handle, in_flight[2]))
                in_flight = drawn
        finally:
            checker.close()
            model.train(was_training)
            if bar is not None:
                bar.close()
    return result  # type: ignore[return-value]


class _CountResampler:
    """'prior' numbers of elements by rejection: a drawn crystal with k distinct elements is
    kept with probability proportional to P_train(k) / P_drawn(k), where P_drawn is the
    histogram of this run's checked draws so far (one pseudo-draw per count to start), so the
    kept crystals have the training distribution of k, and within each k the model's own
    distribution. Only counts actually drawn set the scale: a count the model never reaches
    drops out (the training distribution restricted to the reachable counts) instead of
    driving every acceptance to zero. Its own generator (seeded from the run's seed) leaves the
    other draws alone."""

    def __init__(self, train: np.ndarray, seed: int) -> None:
        self.target = train / train.sum()
        self.seen = np.zeros(len(train))
        self.rng = np.random.default_rng([int(seed), 0xE1E])

    def keep(self, crystals: list[WyckoffCrystal], passed: list[bool]) -> list[bool]:
        """Of a checked batch (``passed``: accepted by every other check), which to keep."""
        size = len(self.target)
        ks = [min(len(set(c.species.tolist())), size - 1) for c in crystals]
        for k, ok in zip(ks, passed, strict=True):
            if ok:
                self.seen[k] += 1.0
        drawn = self.seen + 1.0
        ratio = self.target / (drawn / drawn.sum())
        reached = self.seen > 0
        if not (ratio[reached] > 0).any():  # nothing drawn yet that the training data has
            accept = np.zeros(size)
        else:
            accept = np.minimum(ratio / ratio[reached].max(), 1.0)
        u = self.rng.random(len(ks))
        return [ok and bool(ui < accept[k]) for k, ui, ok in zip(ks, u, passed, strict=True)]


def element_bounds(
    model,
    spec,
    n: int,
    unconstrained: bool,
    allowed_a: Tensor | None,
    chemsys=None,
    composition=None,
    num_atoms=None,
    template_sites: int | None = None,
) -> np.ndarray | None:
    """(n, 2) bounds on each crystal's number of distinct elements, or for 'prior' the training
    histogram of counts (1-D), or None for the model's own choice (see ``sample_crystals``'
    ``num_elements``); requests no crystal can meet are refused here, before sampling."""
    from crystal_gpt.sampling.constraints import parse_atom_range, parse_element_count

    if spec is None or spec == "model":
        return None
    recorded = model.element_counts.detach().cpu().double().numpy()
    if spec == "auto":
        if not unconstrained or not recorded.any():
            return None
        spec = "prior"
    if spec == "prior":
        if not unconstrained:
            raise ConstraintError(
                "num_elements='prior' is the training data's distribution for unconstrained "
                "sampling: with a space group, element, composition, size, template, charge or "
                "condition request give a number (e.g. 3), a range (2-4) or 'model'"
            )
        if not recorded.any():
            raise ConstraintError(
                "this model does not record its training crystals' numbers of elements: "
                "num_elements='prior' needs a model trained or exported since they are (or give "
                "a number, e.g. 3, or 'model')"
            )
        if allowed_a is not None:  # at most as many as may be chosen
            recorded = recorded.copy()
            recorded[int(allowed_a.sum()) + 1 :] = 0.0
            if not recorded[1:].any():
                raise ConstraintError("the allowed elements leave no training count to draw")
        return recorded
    if chemsys is not None or composition is not None:
        what = "chemsys" if chemsys is not None else "a composition"
        raise ConstraintError(
            f"{what} fixes the number of elements: num_elements does not combine with it"
        )
    low, high = parse_element_count(spec)
    if low > model.config.max_sites:
        raise ConstraintError(
            f"{low} elements need {low} sites; this model places at most {model.config.max_sites}"
        )
    if allowed_a is not None and low > int(allowed_a.sum()):
        raise ConstraintError(
            f"{low} distinct elements asked, but only {int(allowed_a.sum())} are allowed"
        )
    if num_atoms is not None and low > parse_atom_range(num_atoms)[1]:
        raise ConstraintError(
            f"{low} distinct elements need at least {low} atoms; at most "
            f"{parse_atom_range(num_atoms)[1]} per cell were asked"
        )
    if template_sites is not None and low > template_sites:
        raise ConstraintError(
            f"{low} distinct elements need at least {low} sites; the template has {template_sites}"
        )
    return np.tile(np.array([[low, high]], dtype=np.int64), (n, 1))


def _contained(model, contains: list[str], allowed_a, composition, allow_unseen: bool):
    """``contains``: a test of whether a drawn crystal lacks one of these elements (it is then
    redrawn: exact conditioning on holding them); refused here when the other requests exclude
    one of them."""
    from pymatgen.core.periodic_table import Element

    from crystal_gpt.sampling.constraints import parse_composition

    device = next(model.parameters()).device
    unknown = [e for e in contains if not Element.is_valid_symbol(e)]
    if unknown:
        raise ConstraintError(f"unknown element {unknown[0]!r} in contains")
    wanted = frozenset(Element(e).Z for e in contains)

    def lacks(crystal: WyckoffCrystal) -> bool:
        return not wanted <= {int(z) for z in crystal.species}

    if composition is not None:  # the composition decides (and its own checks apply)
        comps = composition if isinstance(composition, list | tuple) else [composition]
        for comp in comps:
            have = {Element.from_Z(z).symbol for z in parse_composition(comp)}
            missing = sorted(set(contains) - have)
            if missing:
                raise ConstraintError(f"the composition {comp} does not contain {missing}")
        return lacks
    mask = element_mask(contains, None, device)
    if len(contains) > model.config.max_sites:
        raise ConstraintError(
            f"{len(contains)} elements to contain need as many sites; this model places at "
            f"most {model.config.max_sites}"
        )
    if allowed_a is not None and bool((mask & ~allowed_a).any()):
        refused = [e for e in contains if not bool(allowed_a[Element(e).Z])]
        raise ConstraintError(
            f"elements to contain {refused} are excluded by the other element requests"
        )
    if not allow_unseen:
        unseen = [e for e in contains if not bool(model.seen_elements[Element(e).Z])]
        if unseen:
            raise ConstraintError(
                f"elements to contain {unseen} are not in the model's training data "
                "(allow_unseen=True / --allow-unseen lifts that)"
            )
    return lacks


def _condition_values(model, conditions, guidance, n: int) -> dict[str, np.ndarray]:
    """The asked conditions per crystal, checked against what the model was trained on."""
    from crystal_gpt.model.config import per_crystal_conditions, unknown_condition_message

    known = list(model.config.conditions)
    conditions = dict(conditions or {})
    unknown = sorted(set(conditions) - set(known))
    if unknown:
        raise ValueError(unknown_condition_message(unknown, known))
    try:
        values = per_crystal_conditions(conditions, n)
    except (TypeError, ValueError) as err:
        raise ValueError(f"conditions must be numbers (one, or one per crystal): {err}") from None
    for name, v in values.items():
        if not np.isfinite(v).all():
            raise ValueError(f"condition {name} must be a finite number")
    g = guidance
    if not (isinstance(g, int | float) and not isinstance(g, bool) and np.isfinite(g) and g >= 0):
        raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
    if g != 1 and not values:
        raise ValueError("guidance needs a condition to guide toward (conditions= / --condition)")
    if g != 1 and max(model.config.condition_dropout, model.config.condition_dropout_all) <= 0:
        raise ValueError(
            "this model was trained without condition dropout, so it has no unconditional part "
            "to guide against: use guidance 1"
        )
    return values


def parse_chemsys(chemsys: str | Iterable[str]) -> list[str]:
    """'Li-Fe-P-O' (or a list) -> element symbols, validated."""
    from pymatgen.core.periodic_table import Element

    parts = chemsys.replace(",", "-").split("-") if isinstance(chemsys, str) else list(chemsys)
    symbols = [str(p).strip() for p in parts if str(p).strip()]
    if not symbols:
        raise ConstraintError(f"empty chemical system {chemsys!r}")
    for sym in symbols:
        if not Element.is_valid_symbol(sym):
            raise ConstraintError(f"unknown element {sym!r} in chemical system {chemsys!r}")
    if len(set(symbols)) != len(symbols):
        raise ConstraintError(f"chemical system {chemsys!r} repeats an element")
    return symbols


def _training_range(model, allowed_a, elements, composition, num_atoms, template, allow_unseen):
    """The atoms-per-cell range to sample in by default (the training data's), and warnings
    for explicit requests outside what the model has seen."""
    import warnings

    from pymatgen.core.periodic_table import Element

    seen = model.seen_elements.cpu()
    low, high = (int(v) for v in model.atoms_range.cpu())
    asked: set[int] = set()
    if elements is not None and allowed_a is not None:
        asked = set(allowed_a.nonzero().flatten().cpu().tolist())
    if composition is not None and not isinstance(composition, list | tuple):
        from crystal_gpt.sampling.constraints import parse_composition

        asked |= set(parse_composition(composition).keys())
    unseen = sorted(z for z in asked if not seen[z])
    if unseen and not seen.all():
        warnings.warn(
            "elements not in this model's training data: "
            + ", ".join(Element.from_Z(z).symbol for z in unseen)
            + " (sampled as asked; expect poor crystals)",
            stacklevel=3,
        )
    if high >= 10**6 or allow_unseen:
        return num_atoms
    fewest = None
    if num_atoms is not None:
        from crystal_gpt.sampling.constraints import parse_atom_range

        fewest = parse_atom_range(num_atoms)[0]
    if composition is not None and not isinstance(composition, list | tuple):
        from crystal_gpt.sampling.constraints import parse_composition

        fewest = max(fewest or 0, sum(parse_composition(composition).values()))
    if fewest is not None and fewest > FAR_OUTSIDE * high:
        # its lattice and sites were learnt on cells of at most `high` atoms: such a request
        # ends in dead ends draw after draw, and only fails after minutes of redraws
        raise ConstraintError(
            f"{fewest} atoms per primitive cell: this model was trained on {low}-{high}; "
            "requests this far outside are practically never met (pass allow_unseen=True, "
            "--allow-unseen, to try anyway)"
        )
    if num_atoms is not None:
        lo, hi = parse_atom_range(num_atoms)
        if lo < low or hi > high:
            warnings.warn(
                f"atoms per primitive cell {lo}-{hi} reach outside this model's training range "
                f"{low}-{high}",
                stacklevel=3,
            )
        return num_atoms
    if composition is None and template is None:
        return (low, high)
    return num_atoms


def _reject(crystal: WyckoffCrystal, symprec: float | None) -> str | None:
    """Why a sampled crystal is not what was asked for, or None: an impossible cell, or a
    symmetry (at symprec; ``data.symmetry.space_group_number``) other than the sampled group."""
    if symprec is None:
        problem = crystal_problem(crystal)
        return None if problem is None else f"impossible cell: {problem}"
    try:
        cell = expand(crystal)
    except ValueError as err:
        return f"impossible cell: {err}"
    found = space_group_number(cell, symprec)
    if found is None:
        return "no symmetry found"
    if found != crystal.spacegroup:
        return f"symmetry {found} instead of the sampled {crystal.spacegroup}"
    return None


_POOL_MIN = 256  # fewer crystals are checked in this process: a pool costs more to start


class _Checker:
    """``_reject`` over whole batches, in worker processes for large runs: ``submit`` returns
    at once, ``result`` waits for that batch's reasons (None = accepted)."""

    def __init__(self, symprec: float | None, workers: int | None, n: int) -> None:
        from crystal_gpt.utils import process_pool

        self.symprec = symprec
        if workers is None:  # without spglib the check is a cell check: cheaper than shipping it
            big = n >= _POOL_MIN and symprec is not None
            workers = (os.cpu_count() or 1) - 1 if big else 0
        self.pool = process_pool(workers) if workers > 0 else None

    def submit(self, crystals: list[WyckoffCrystal], dead: list[bool]):
        jobs = [(c, self.symprec) for c, stuck in zip(crystals, dead, strict=True) if not stuck]
        if self.pool is None:
            return [_reject(*job) for job in jobs]
        return self.pool.starmap_async(_reject, jobs, chunksize=16)

    @staticmethod
    def result(handle, dead: list[bool]) -> list[str | None]:
        reasons = iter(handle if isinstance(handle, list) else handle.get())
        return [None if stuck else next(reasons) for stuck in dead]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class _PlannerMasks:
    """Per-row look-ahead masks for one batch: each crystal's planner and state."""

    def __init__(self, planners: list[Planner], g: Tensor, num_letters: int) -> None:
        self.planners = planners
        self.g = g.cpu().tolist()
        self.states = [p.initial_state(gi) for p, gi in zip(planners, self.g, strict=True)]
        self.L = num_letters
        self.moves: list = [None] * len(self.g)

    def letters(self, device) -> Tensor:
        mask = np.ones((len(self.g), self.L + 1), dtype=bool)
        for i in range(len(self.g)):
            can_end, allowed = self.planners[i].moves(self.g[i], self.states[i])
            self.moves[i] = allowed
            mask[i] = False
            mask[i, list(allowed)] = True
            mask[i, self.L] = can_end
        return torch.as_tensor(mask, device=device)

    def keep(self, keep: list[bool]) -> None:
        """Drop the rows of finished crystals (the sampler compacts its batch)."""
        pick = [i for i, k in enumerate(keep) if k]
        self.planners = [self.planners[i] for i in pick]
        self.g = [self.g[i] for i in pick]
        self.states = [self.states[i] for i in pick]
        self.moves = [self.moves[i] for i in pick]

    def elements(self, w: Tensor, base: Tensor | None, device) -> Tensor | None:
        mask = np.ones((len(self.g), NUM_ELEMENTS), dtype=bool)
        for i, wi in enumerate(w.tolist()):
            if self.moves[i][wi]:
                mask[i] = False
                mask[i, list(self.moves[i][wi])] = True
        out = torch.as_tensor(mask, device=device)
        return out if base is None else out & base

    def advance(self, w: Tensor, a: Tensor, multiplicity: Tensor) -> None:
        for i, (wi, ai) in enumerate(zip(w.tolist(), a.tolist(), strict=True)):
            p = self.planners[i]
            g, state = self.g[i], self.states[i]
            m = int(multiplicity[g, wi])
            if p.request.composition is not None:
                e = p.element_index(ai)
                rem = list(state[0])
                rem[e] -= m
                self.states[i] = p.next_state(g, state, wi, e, tuple(rem))
            else:
                self.states[i] = p.next_state(g, state, wi, 0, state[0] + m)


class _BatchResult(NamedTuple):
    crystals: list[WyckoffCrystal]
    dead: list[bool]  # reached a dead end or broke the distance rule: redraw the crystal
    site_redraws: list[int]  # coordinate draws the distance rule rejected


def _sample_batch(
    model: CrystalGPT,
    B: int,
    spacegroup,
    shaping: Shaping,
    gen: torch.Generator,
    device,
    allowed_a: Tensor | None,
    use_cache: bool = True,
    plans: list[tuple[Planner, list[int]]] | None = None,
    required: Tensor | None = None,
    thresholds: Tensor | None = None,
    max_site_tries: int = 20,
    charge_atoms: int | None = None,
    conditions: dict[str, np.ndarray] | None = None,
    guidance: float = 1.0,
    element_bounds: Tensor | None = None,
    scratch: dict | None = None,
) -> _BatchResult:
    """``plans``: per crystal, the look-ahead planner and the groups that can meet it;
    ``required``: elements every crystal must contain (the end is masked until they are);
    ``thresholds``: the distance rule's (119, 119) closest approaches (None: no rule);
    ``charge_atoms``: charge balance with this many atoms per primitive cell at most;
    ``conditions``: name -> value per crystal; ``guidance`` != 1 runs a second, unconditional
    stream through the transformer beside the conditional one (``model.transformer.guided``);
    ``element_bounds``: (B, 2) distinct elements allowed per crystal (``ElementCount``);
    ``scratch``: buffers kept from batch to batch."""
    sym = model.sym
    sites_first = model.config.sites_first
    drawer = _Drawer(shaping, gen)
    allowed_g = spacegroup_mask(spacegroup, device).expand(B, -1)
    counts = None
    if plans is not None:
        allowed_g = torch.zeros(B, 231, dtype=torch.bool, device=device)
        counts = torch.zeros(B, NUM_ELEMENTS, device=device)
        for i, (planner, groups) in enumerate(plans):
            allowed_g[i, groups] = True
            for z, c in planner.request.composition or ():
                counts[i, z] = c
    cond = model.condition_vector(None, conditions, counts, size=B)
    guide = guidance != 1 and bool(conditions)
    cond_u = model.condition_vector(None, None, counts, size=B) if guide else None
    g_logits = model.g_logits(cond, (cond_u, guidance) if guide else None)
    g_logits = g_logits.expand(B, -1).masked_fill(~allowed_g, float("-inf"))
    g = _sample_logits(g_logits.cpu(), shaping, gen).to(device)
    masks = None
    if plans is not None:
        masks = _PlannerMasks([p for p, _ in plans], g, sym.max_letters)
    charge = None if charge_atoms is None else ChargeBalance(g, allowed_a, charge_atoms)
    count = None
    if element_bounds is not None:
        count = ElementCount(element_bounds.to(device), model.config.max_sites)

    start = model.start_token(g, cond)
    start_u = model.start_token(g, cond_u) if guide else None
    lattice = lat_emb = placement = None
    if model.config.lattice_first:  # P(L | g): drawn before any atom, seen by every site
        lattice = _draw_lattice(model, model.first_lattice_context(start, g), g, None)
        lat_emb = model.lattice_embedding(lattice)
        start = start + lat_emb.unsqueeze(1)
        if guide:
            start_u = start_u + lat_emb.unsqueeze(1)
        if thresholds is not None:
            placement = Placement(lattice, thresholds)
    caches: list[dict] | None = [{} for _ in model.blocks] if use_cache else None
    tokens = [start]  # only used without the cache
    h = model.backbone(start, caches, offset=0)[:, -1]  # token 0: group, conditions (lattice)
    # the unconditional stream of classifier-free guidance: same sites, its own keys/values
    uncond = _Stream(model, start_u, use_cache) if guide else None
    max_sites = model.config.max_sites
    # Finished crystals leave the batch, so the long tail of a few big crystals costs only
    # their own rows; ``rows`` maps the active rows to the batch's crystals.
    g_all, rows = g, torch.arange(B, device=device)
    prev_w = torch.zeros(B, dtype=torch.long, device=device)
    prev_a = torch.zeros(B, dtype=torch.long, device=device)
    h_end = torch.zeros_like(h)
    W = torch.full((max_sites, B), sym.pad, dtype=torch.long, device=device)
    A = torch.zeros((max_sites, B), dtype=torch.long, device=device)
    X = torch.zeros((max_sites, B, 3), device=device)
    present = torch.zeros(B, NUM_ELEMENTS, dtype=torch.bool, device=device)
    dead = torch.zeros(B, dtype=torch.bool, device=device)
    site_redraws = torch.zeros(B, dtype=torch.long, device=device)
    # running charge of each crystal's sites (models with ``charge_features``)
    charge_sum = torch.zeros(B, 5, device=device) if model.emb_charge is not None else None
    # the fraction of each cell its atoms fill so far (models with ``volume_features``)
    fill_sum = cell = None
    if model.emb_volume is not None:
        cell = cell_volume(lattice).float()
        fill_sum = torch.zeros(B, device=device)
    # atoms of each element so far (models with ``balance_features``)
    atoms = None
    if model.emb_balance is not None:
        atoms = torch.zeros(B, NUM_ELEMENTS, dtype=torch.long, device=device)
    steps = 0
    ended: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]] = []  # sites first: end caches
    for k in range(max_sites + 1):
        n = len(rows)
        first = torch.full((n,), k == 0, device=device)
        w_logits = model.w_logits(h, g, prev_w, first, uncond and (uncond.h, guidance))
        if k == max_sites:  # no room for another site: end
            w_logits = torch.where(
                torch.arange(w_logits.shape[-1], device=device) == sym.pad, 0.0, float("-inf")
            ).expand_as(w_logits)
        if masks is not None:
            w_logits = w_logits.masked_fill(~masks.letters(device), float("-inf"))
        w_logits = w_logits.clone()
        if required is not None:
            missing = (required & ~present[rows]).any(-1)
            w_logits[missing, sym.pad] = float("-inf")
        if count is not None:
            w_logits[~count.may_end(present[rows]), sym.pad] = float("-inf")
        if charge is not None:
            w_logits[~charge.letters(torch.isfinite(w_logits))] = float("-inf")
        # nothing legal, or already condemned by the distance rule: end it, redraw it
        stuck = ~torch.isfinite(w_logits).any(-1) | dead[rows]
        if bool(stuck.any()):
            dead[rows[stuck]] = True
            w_logits[stuck] = float("-inf")
            w_logits[stuck, sym.pad] = 0.0
        w = _sample_logits(w_logits.cpu(), shaping, gen).to(device)
        ends = w == sym.pad
        if bool(ends.any()):
            h_end[rows[ends]] = h[ends]
            if sites_first and caches is not None:  # phase 2 continues these sequences
                ended.append((rows[ends], [(c["k"][ends], c["v"][ends]) for c in caches]))
            keep = ~ends
            if not bool(keep.any()):
                break
            rows, h, g, w, prev_w, prev_a, first = (
                t[keep] for t in (rows, h, g, w, prev_w, prev_a, first)
            )
            if lat_emb is not None:
                lat_emb = lat_emb[keep]
            for c in caches or ():
                c["k"], c["v"] = c["k"][keep], c["v"][keep]
            tokens = [t[keep] for t in tokens]
            if uncond is not None:
                uncond.keep(keep)
            if masks is not None:
                masks.keep(keep.tolist())
            if placement is not None:
                placement.keep(keep)
            if charge is not None:
                charge.keep(keep.tolist())
            if count is not None:
                count.keep(keep)
        allowed = allowed_a if masks is None else masks.elements(w, allowed_a, device)
        if charge is not None:
            allowed = _narrowed(allowed, charge.elements(w), w, prev_w, prev_a, first, dead, rows)
        if count is not None:
            allowed = _narrowed(
                allowed, count.elements(present[rows], k), w, prev_w, prev_a, first, dead, rows
            )
        balance = None if atoms is None else model.balance_candidates(g, w, atoms[rows])
        step = model.site_content(
            h,
            g,
            w,
            prev_w,
            prev_a,
            first,
            allowed=allowed,
            draw=drawer,
            lattice=lat_emb,
            guide=uncond and (uncond.h, guidance),
            score=False,
            volume=None if fill_sum is None else torch.stack([fill_sum[rows], cell[rows]], -1),
            charge=None if charge_sum is None else charge_sum[rows],
            balance=balance,
            place=not sites_first,  # sites first: coordinates once the lattice is drawn
        )
        a, x = step.a, step.x
        if placement is not None:
            x, tries = _place(model, placement, drawer, step, g, w, max_site_tries)
            site_redraws[rows] += tries.clamp(min=0)
            dead[rows[tries < 0]] = True
            placement.add(g, w, a, x)
        present[rows, a] = True
        if masks is not None:
            masks.advance(w, a, sym.multiplicity)
        if charge is not None:
            charge.advance(w, a)
        W[k, rows], A[k, rows], X[k, rows] = w, a, x
        steps = k + 1
        totals = None
        if charge_sum is not None:
            totals = model.charge_totals(g, w.unsqueeze(1), a.unsqueeze(1), charge_sum[rows])
            charge_sum[rows] = totals[:, 0]
        fills = None
        if fill_sum is not None:
            fills = model.volume_fill(
                g, w.unsqueeze(1), a.unsqueeze(1), cell[rows], before=fill_sum[rows]
            )
            fill_sum[rows] = fills[:, 0]
        balanced = None
        if atoms is not None:
            balanced = balance.gather(1, a.unsqueeze(1))
            atoms[rows, a] += sym.multiplicity[g, w].long()
        emb = model.embed_sites(
            g, w.unsqueeze(1), a.unsqueeze(1), None if sites_first else x.unsqueeze(1), totals,
            fills, balanced,
        )  # fmt: skip
        if use_cache:
            h = model.backbone(emb, caches, offset=k + 1)[:, -1]
        else:  # the reference: re-run the whole prefix for every new token
            tokens.append(emb)
            h = model.backbone(torch.cat(tokens, dim=1))[:, -1]
        if uncond is not None:
            uncond.advance(emb, k + 1)
        prev_w, prev_a = w, a

    sites_w, sites_a, sites_x = list(W[:steps]), list(A[:steps]), list(X[:steps])
    if sites_first:  # the lattice given the sites, then their coordinates
        lattice, sites_x = _sites_first_coordinates(
            model, g_all, sites_w, sites_a, h_end, start, thresholds, drawer, max_site_tries,
            dead, site_redraws, ended if use_cache else None, scratch,
        )  # fmt: skip
    elif lattice is None:
        lattice = _sample_lattice(model, h_end, g_all, sites_w)
        if thresholds is not None:  # lattice last: the rule can only judge whole crystals
            dead |= clashing_crystals(
                lattice,
                thresholds,
                g_all,
                list(zip(sites_w, sites_a, sites_x, strict=True)),
                sym.pad,
            )
    crystals = _to_crystals(g_all, sites_w, sites_a, sites_x, lattice, sym.pad)
    return _BatchResult(crystals, dead.cpu().tolist(), site_redraws.cpu().tolist())


class _Stream:
    """A second pass through the transformer over the same sites from another token 0 (the
    unconditional one of guidance): its own key/value cache, compacted with the batch."""

    def __init__(self, model, start: Tensor, use_cache: bool) -> None:
        self.model = model
        self.caches: list[dict] | None = [{} for _ in model.blocks] if use_cache else None
        self.tokens = [start]
        self.h = model.backbone(start, self.caches, offset=0)[:, -1]

    def keep(self, keep: Tensor) -> None:
        self.h = self.h[keep]
        self.tokens = [t[keep] for t in self.tokens] if self.caches is None else []
        for c in self.caches or ():
            c["k"], c["v"] = c["k"][keep], c["v"][keep]

    def advance(self, emb: Tensor, offset: int) -> None:
        if self.caches is not None:
            self.h = self.model.backbone(emb, self.caches, offset=offset)[:, -1]
        else:
            self.tokens.append(emb)
            self.h = self.model.backbone(torch.cat(self.tokens, dim=1))[:, -1]


def _narrowed(allowed, extra, w, prev_w, prev_a, first, dead, rows) -> Tensor:
    """The element mask narrowed by another constraint's (charge balance, element count); a
    row left with no element that also keeps the canonical order is condemned (redrawn) and
    keeps its other constraints for this site."""
    out = extra if allowed is None else allowed & extra
    floor = torch.where(first, 0, lowest_next_element(w, prev_w, prev_a))
    ordered = torch.arange(NUM_ELEMENTS, device=w.device) >= floor.unsqueeze(-1)
    empty = ~(out & ordered).any(-1)
    if bool(empty.any()):
        dead[rows[empty]] = True
        base = torch.ones_like(out) if allowed is None else allowed.expand_as(out)
        out = torch.where(empty.unsqueeze(-1), base, out)
    return out


def _place(model, placement, drawer, step, g, w, tries: int, per_round: int = 8):
    """Redraw the coordinates of sites that break the distance rule (same letter and element),
    up to ``tries`` draws, ``per_round`` at a time: i.i.d. draws from the site's coordinate
    density, the first allowed one kept, so the result follows the density truncated to the
    allowed region exactly. Returns the coordinates and per row the rejected draws (-1: could not
    be placed). A round costs about the same for 4 draws per row as for 8 (its small batches
    are bound by per-call overhead), so 8 at a time: fewer rounds, ~5% faster sampling."""
    x = step.x
    bad = placement.clashes(g, w, step.a, x)
    count = torch.zeros(len(g), dtype=torch.long, device=g.device)
    movable = model.sym.dof[g, w] > 0  # a site without free coordinates cannot move
    left = tries
    while left > 0:
        redo = (bad & movable).nonzero().flatten()
        if not len(redo):
            break
        size = min(per_round, left)
        left -= size
        rep = redo.repeat_interleave(size)
        inp = model.coordinate_input(step.ctx[redo], step.a[redo]).repeat_interleave(size, 0)
        xs, _, _ = model.coordinates(
            step.ctx[rep], g[rep], w[rep], step.a[rep], draw=drawer, score=False, inp=inp
        )
        ok = ~placement.clashes(g[rep], w[rep], step.a[rep], xs, rows=rep).view(-1, size)
        found = ok.any(1)
        first_ok = ok.int().argmax(1)
        count[redo] += torch.where(found, first_ok, size)
        hit = found.nonzero().flatten()
        x = x.clone()
        x[redo[hit]] = xs.view(-1, size, 3)[hit, first_ok[hit]]
        bad[redo[hit]] = False
    return x, torch.where(bad, -1, count)


class _Drawn(NamedTuple):
    """What ``_place`` reads of a drawn site."""

    a: Tensor
    x: Tensor
    ctx: Tensor


def _continued_caches(ended, B: int, capacity: int, scratch: dict | None = None) -> list[dict]:
    """Ragged caches (``Block``) of the first phase's sequences, [start, site tokens] per
    crystal, saved as crystals ended (``ended``: their rows and per block keys and values),
    with room for ``capacity`` tokens per crystal. The buffers come from ``scratch`` when an
    earlier batch left large enough ones: columns past a row's length are never read, they
    need only be finite (zeros at first, then earlier keys and values), so they are not
    cleared."""
    scratch = {} if scratch is None else scratch
    k0 = ended[0][1][0][0]
    shape = (B, k0.shape[1], capacity, k0.shape[3])
    bufs = scratch.get("caches")
    if bufs is None or any(have < need for have, need in zip(bufs[0].shape, shape, strict=True)):
        bufs = [k0.new_zeros(shape) for _ in range(2 * len(ended[0][1]))]
        scratch["caches"] = bufs
    caches = []
    for layer in range(len(ended[0][1])):
        keys, values = (b[:B, :, :capacity] for b in bufs[2 * layer : 2 * layer + 2])
        for rows, kv in ended:
            k, v = kv[layer]
            keys[rows, :, : k.shape[2]] = k
            values[rows, :, : v.shape[2]] = v
        caches.append({"k": keys, "v": values})
    return caches


def _sites_first_coordinates(
    model, g, sites_w, sites_a, h_end, start, thresholds, drawer, tries: int, dead,
    site_redraws, ended, scratch=None,
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """Sites first, once every crystal's letters and elements are drawn: its lattice from
    P(L | g, sites) (``h_end``: the output at its end), then each site's coordinates given the
    lattice and the coordinates before it, under the distance rule site by site (``_place``;
    a site that cannot be placed condemns its crystal, in ``dead``). Each crystal's sequence
    goes on from its end, [start, site tokens, lattice token, coordinate tokens]
    (``CrystalGPT.sites_first_layout``): with the first phase's caches (``ended``) one ragged
    transformer step per site index advances every crystal still placing sites, whatever its
    number of sites; without (None, the reference) the whole sequence is recomputed in the
    training layout at every step. The heads and the rule run once per site index."""
    sym = model.sym
    B = len(g)
    letters = torch.stack(sites_w, 1) if sites_w else torch.zeros(B, 0, dtype=torch.long)
    elems = torch.stack(sites_a, 1) if sites_a else torch.zeros(B, 0, dtype=torch.long)
    real = letters != sym.pad
    n = real.sum(1)
    elems = torch.where(real, elems, 0)
    n_atoms = (sym.multiplicity[g.unsqueeze(1), letters] * real).sum(1).long().clamp(min=1)
    ctx = model.sites_lattice_context(h_end, g, letters, elems)
    lattice = _draw_lattice(model, ctx, g, n_atoms)
    lat_emb = model.lattice_embedding(lattice)
    T = letters.shape[1]
    coords = torch.zeros(B, T, 3, device=g.device)
    # a crystal already condemned (phase one, or a site that could not be placed) is redrawn:
    # it places nothing more
    act = ((n > 0) & ~dead).nonzero().flatten()
    if not len(act):
        return lattice, list(coords.transpose(0, 1))
    caches = None
    # crystals in the caches: ``act`` and some that have left (dropped from the caches only
    # once they are a quarter, as each drop copies the caches; until then they run along and
    # write their tokens into their own spare columns)
    held = act
    if ended is not None:
        caches = _continued_caches(ended, B, 2 * int(n.max()) + 3, scratch)
        if len(act) < B:
            caches = [{"k": c["k"][act], "v": c["v"][act]} for c in caches]
        h = model.backbone(lat_emb[act].unsqueeze(1), caches, offset=n[act] + 1)[:, -1]
    else:
        site_tokens = model.embed_sites(g, letters, elems, None)

        def recomputed(rows: Tensor, i: int) -> Tensor:
            """Output n + 1 + i of these crystals' whole sequences (the training layout)."""
            source = torch.cat(
                [start[rows], site_tokens[rows], lat_emb[rows].unsqueeze(1),
                 model.embed_coordinates(g[rows], letters[rows], elems[rows], coords[rows])],
                dim=1,
            )  # fmt: skip
            idx = model.sites_first_layout(n[rows], T)
            hs = model.backbone(
                source.gather(1, idx.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
            )
            return hs[torch.arange(len(rows), device=g.device), n[rows] + 1 + i]

        h = recomputed(act, 0)
    placement = None if thresholds is None else Placement(lattice[act], thresholds)
    for i in range(int(n.max())):
        ga, w, a = g[act], letters[act, i], elems[act, i]
        ctx = model._site_context(h, ga, w, lat_emb[act])
        x, _, _ = model.coordinates(ctx, ga, w, a, draw=drawer, score=False)
        if placement is not None:
            x, tried = _place(model, placement, drawer, _Drawn(a, x, ctx), ga, w, tries)
            site_redraws[act] += tried.clamp(min=0)
            dead[act[tried < 0]] = True
            placement.add(ga, w, a, x)
        coords[act, i] = x
        more = (n[act] > i + 1) & ~dead[act]  # placed all its sites, or condemned: it leaves
        if not bool(more.any()):
            break
        act, h, x = act[more], h[more], x[more]
        if placement is not None:
            placement.keep(more)
        if caches is not None:
            if len(act) < 0.75 * len(held):
                kept = torch.isin(held, act)
                for c in caches:
                    c["k"], c["v"] = c["k"][kept], c["v"][kept]
                held = act
            slot = torch.searchsorted(held, act)  # both ascending
            emb = torch.zeros(len(held), 1, h.shape[-1], device=g.device)
            emb[slot] = model.embed_coordinates(
                g[act], letters[act, i : i + 1], elems[act, i : i + 1], x.unsqueeze(1)
            )
            h = model.backbone(emb, caches, offset=n[held] + 2 + i)[slot, -1]
        else:
            h = recomputed(act, i + 1)
    return lattice, list(coords.transpose(0, 1))


def _draw_lattice(model, ctx: Tensor, g: Tensor, n_atoms: Tensor | None) -> Tensor:
    """A lattice per crystal from the flow of its crystal system given the context (lengths
    per atom with the lattice last: ``n_atoms``)."""
    return model.lattice.sample(ctx, model.sym.crystal_system[g], n_atoms)


def _sample_lattice(model, h_end, g, sites_w) -> Tensor:
    """Lattice last: P(L | g, all sites), scaled by the atoms placed."""
    sym = model.sym
    n_atoms = torch.zeros_like(g)
    for w in sites_w:  # the end letter (PAD) has multiplicity 0
        n_atoms = n_atoms + sym.multiplicity[g, w].long()
    return _draw_lattice(model, model.lattice_context(h_end, g), g, n_atoms.clamp(min=1))


def _to_crystals(g, sites_w, sites_a, sites_x, lattice, pad) -> list[WyckoffCrystal]:
    tables = get_tables()
    W = torch.stack(sites_w, 1).cpu().numpy() if sites_w else np.zeros((len(g), 0), int)
    A = torch.stack(sites_a, 1).cpu().numpy() if sites_a else np.zeros((len(g), 0), int)
    X = torch.stack(sites_x, 1).cpu().double().numpy() if sites_x else np.zeros((len(g), 0, 3))
    L = lattice.cpu().double().numpy()
    out = []
    for i, gi in enumerate(g.cpu().tolist()):
        keep = W[i] != pad
        system = CRYSTAL_SYSTEMS[int(tables.crystal_system[gi])]
        # re-project in float64 so fixed coordinates are exact (1/3, not float32's 0.33333334)
        coords = np.array(
            [tables.project(gi, int(w), x) for w, x in zip(W[i][keep], X[i][keep], strict=True)]
        )
        coords = coords.reshape(-1, 3)
        out.append(
            WyckoffCrystal(
                spacegroup=gi,
                wyckoff=W[i][keep].astype(np.int16),
                species=A[i][keep].astype(np.int16),
                coords=coords,
                lattice=reduce_lattice_parameters(system, L[i]),
                symprec=None,
            )
        )
    return out
