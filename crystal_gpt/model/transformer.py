"""The symmetry-aware causal transformer and its exact likelihood.

    P(crystal) = P(g) * prod_i P(W_i | .) P(A_i | W_i, .) P(X_i | W_i, A_i, .) * P(L | g, all sites)

Token 0 carries the space group (and any conditions); token i (1..n) carries site i. The output
at token k predicts site k+1 (or the end, W = PAD) and, at the last token, the lattice. With
``lattice_first`` the order is P(g) P(L | g) prod P(site_i | L, ...): the lattice is drawn from
token 0's inputs, then added to token 0 and to every site's heads. Wyckoff
letters are masked to the legal, ordered letters of the group; atom types to real elements (and,
for a repeated letter, to the canonical non-decreasing order); coordinates are mixtures of von
Mises distributions over the free coordinates only, predicted x, then y | x, then z | x, y.
The lattice is a conditional normalizing flow over the crystal system's free parameters
(``model.lattice.LatticeFlow``: its density and its draws), given a context from the last
token (lattice last) or token 0 (lattice first).

Conditions: every condition is an encoder mapping its value to a d_model vector; their sum
enters token 0 and the space-group prior, so every later choice sees it. ``ModelConfig.
conditions`` names scalar (or vector) ones, e.g. a band gap or the pressure: standardised by the
training data's mean and std, a learnt "absent" vector standing in for a missing value (NaN, not
given) or, in training, for a value hidden by ``condition_dropout``; the composition of the CSP
variant is one more encoder. A model trained with dropout is both P(crystal | y) and P(crystal),
and classifier-free guidance (``guided``) mixes the two for the discrete choices.
Building blocks (tables as tensors, attention block, features) live in ``model.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crystal_gpt.data.chemistry import balanced_candidates
from crystal_gpt.data.geometry import cell_volume
from crystal_gpt.data.symmetry import (
    lowest_next_element,
)
from crystal_gpt.model.config import (
    ModelConfig,
    per_crystal_conditions,
    unknown_condition_message,
)
from crystal_gpt.model.distributions import (
    LATTICE_EMBED_DIM,
    NUM_ELEMENTS,
    lattice_embedding_features,
    von_mises_mixture_logpdf,
)
from crystal_gpt.model.lattice import LatticeFlow
from crystal_gpt.model.layers import (
    CHARGE_FEATURES,
    COMPOSITION_DIM,
    VOLUME_FEATURES,
    Block,
    SymmetryTensors,
    charge_features,
    charge_table,
    composition_features,
    element_feature_table,
    fourier,
    mlp,
    volume_features,
)

PARTS = ("g", "W", "A", "X", "L")
# parameter names of earlier checkpoints -> present names
_RENAMED = {
    "out_w": "emb_chosen_letter",
    "out_a": "emb_chosen_element",
    "flows": "lattice.flows",
    "lat_mean": "lattice.mean",
    "lat_std": "lattice.std",
}


VOLUME_SCALE = 20.0  # Angstrom^3 per atom: fitted volumes per atom / this ~ 0.25-2.75


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance of logits: log p(.|y)^s p(.)^(1-s), renormalised by the caller's
    softmax; scale 1 is the conditional model, 0 the unconditional one."""
    return uncond + scale * (cond - uncond)


def _before_each(after: Tensor) -> Tensor:
    """(B, T, ...) running sums after each site -> (B, T+1, ...) before each step (0 first)."""
    return torch.cat([torch.zeros_like(after[:, :1]), after], 1)


def site_volume(fill: Tensor, volume: Tensor) -> Tensor:
    """(B, T+1, 2) what each step's element head reads: the fill before the site (0 before the
    first; ``fill`` (B, T) is after each site) and the cell volume (B,)."""
    before = _before_each(fill)
    return torch.stack([before, volume.unsqueeze(1).expand_as(before)], -1)


def _present_name(key: str) -> str:
    module, dot, rest = key.partition(".")
    return _RENAMED.get(module, module) + dot + rest


class Drawer(Protocol):
    """How the sampler draws a categorical (temperature, top-p) and a von Mises mixture."""

    def categorical(self, logits: Tensor) -> Tensor: ...

    def von_mises(self, params: Tensor) -> Tensor: ...


@dataclass
class SiteStep:
    """One site's element and coordinates, their log-probabilities and the distributions."""

    a: Tensor  # (B,) atomic numbers
    x: Tensor  # (B, 3) coordinates on the Wyckoff position
    lp_a: Tensor | None  # (B,); None when drawn without scores
    lp_x: Tensor | None  # (B,) free coordinates only; None when drawn without scores
    a_logits: Tensor  # (B, 119) masked
    x_params: Tensor | None  # (B, 3, 3K) mixture parameters of x, y | x, z | x, y
    ctx: Tensor  # (B, d) what the element and coordinate heads saw


class CrystalGPT(nn.Module):
    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ModelConfig()
        # a run-time choice, not part of the model: bf16 for the blocks when training on a GPU
        self.autocast_dtype: torch.dtype | None = None
        d = c.d_model
        self.sym = SymmetryTensors()
        L1 = self.sym.max_letters + 1
        self.g_prior = nn.Parameter(torch.zeros(231))  # logits of P(g) without conditions
        conditioned = bool(c.conditions) or c.condition_on_composition
        self.g_prior_cond = nn.Linear(d, 231) if conditioned else None
        self.cond_encoders = nn.ModuleDict({k: mlp(n, d, d) for k, n in c.conditions.items()})
        # one learnt vector per condition for "not given" (missing, dropped, unconditional)
        self.cond_absent = nn.Parameter(torch.zeros(len(c.conditions), d))
        # mean and std of each condition in the training data (set by training)
        self.register_buffer(
            "condition_stats", torch.tensor([[0.0, 1.0]] * len(c.conditions)).reshape(-1, 2)
        )
        self.comp_encoder = mlp(COMPOSITION_DIM, d, d) if c.condition_on_composition else None
        self.emb_g = nn.Embedding(231, d)
        self.emb_gw = nn.Embedding(231 * L1, d)
        self.emb_letter = nn.Embedding(L1, d)
        self.emb_wfeat = nn.Linear(5, d)  # log multiplicity, dof, free mask (3)
        self.emb_elem = nn.Embedding(NUM_ELEMENTS, d)
        self.emb_coord = nn.Linear(3 * 2 * c.fourier_freqs, d)
        # sites first: site tokens, the lattice token and a coordinate token per site
        self.emb_pos = nn.Embedding(2 * c.max_sites + 2 if c.sites_first else c.max_sites + 1, d)
        self.blocks = nn.ModuleList(
            Block(d, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head_w = nn.Linear(d, L1)
        self.emb_chosen_letter = nn.Embedding(231 * L1, d)  # fed to the A and X heads
        self.head_a = mlp(d, d, NUM_ELEMENTS)
        self.emb_chosen_element = nn.Embedding(NUM_ELEMENTS, d)  # fed to the X heads
        K = c.coord_mixtures
        self.head_x = nn.ModuleList(mlp(d + j * 2 * c.fourier_freqs, d, 3 * K) for j in range(3))
        self.lattice_ctx = mlp(2 * d, d, d)
        # lattice first: the drawn lattice enters token 0 and every site's heads
        self.emb_lattice = (
            mlp(LATTICE_EMBED_DIM, d, d) if c.lattice_first or c.sites_first else None
        )
        # sites first: what marks a coordinate token (its site's letter and element again)
        self.coord_token = nn.Parameter(torch.zeros(d)) if c.sites_first else None
        if c.element_features:
            self.register_buffer("element_table", element_feature_table())
            self.emb_elem_feat = mlp(self.element_table.shape[1], d, d)
            self.head_a_feat = nn.Linear(d, d)
        else:
            self.emb_elem_feat = None
        if c.charge_features:
            self.register_buffer("charge_table", charge_table())
            self.emb_charge = nn.Linear(CHARGE_FEATURES, d)
        else:
            self.emb_charge = None
        self.head_a_charge = nn.Linear(d, CHARGE_FEATURES) if c.charge_candidates else None
        self.lattice_volume = None
        if c.volume_features:
            # volume per atom of each element (Angstrom^3), fitted to the training cells
            self.register_buffer("element_volume", torch.zeros(NUM_ELEMENTS))
        if c.volume_features and c.sites_first:
            # sites first: the lattice's context carries the fitted volume of the sites' atoms
            self.lattice_volume = nn.Linear(VOLUME_FEATURES, d)
            self.emb_volume = None
        elif c.volume_features:
            self.emb_volume = nn.Linear(VOLUME_FEATURES, d)
            self.head_a_volume = nn.Linear(d, VOLUME_FEATURES)
        else:
            self.emb_volume = None
        if c.balance_features:  # whether the composition so far is charge-balanced
            self.emb_balance = nn.Embedding(2, d)
            self.head_a_balance = nn.Linear(d, 1)
        else:
            self.emb_balance = self.head_a_balance = None
        # P(L | context): drawn last, its lengths are per atom (N^(1/3)); drawn first, as they are
        self.lattice = LatticeFlow(d, c.flow_transforms, c.flow_hidden, not c.lattice_first)
        # what the training data covered (set by training): the sampler stays inside it unless
        # told otherwise; defaults (all elements, any size) for checkpoints that predate them
        self.register_buffer("seen_elements", torch.ones(NUM_ELEMENTS, dtype=torch.bool))
        self.register_buffer("atoms_range", torch.tensor([1, 10**6]))  # per primitive cell
        # shortest distance (Angstrom) seen for each element pair in training, 0 if never seen:
        # the sampler's distance rule (``sampling.placement``) is a fraction of it
        self.register_buffer("pair_min_distance", torch.zeros(NUM_ELEMENTS, NUM_ELEMENTS))
        # training crystals with 0, 1, 2, ... distinct elements (all zero: not recorded): the
        # sampler's default prior on the number of elements (``sampling.sample_crystals``)
        self.register_buffer("element_counts", torch.zeros(c.max_sites + 1))

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """load_state_dict that accepts checkpoints written before the training-range and
        pair-distance buffers, and before the chosen-letter / chosen-element embeddings had
        their present names."""
        state = {_present_name(k): v for k, v in state.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = set(missing) - {
            "seen_elements",
            "atoms_range",
            "pair_min_distance",
            "element_counts",
            *(() if self.config.conditions else ("cond_absent", "condition_stats")),
        }
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not fit the model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )

    def set_training_range(self, species: np.ndarray, g: np.ndarray, num_atoms: np.ndarray) -> None:
        """Record the elements and atoms per primitive cell of the training crystals (the
        shortest pair distances are ``pair_min_distance``, set from ``data.geometry``)."""
        seen = torch.zeros(NUM_ELEMENTS, dtype=torch.bool)
        seen[torch.as_tensor(np.unique(species).astype(np.int64))] = True
        seen[0] = False
        per_prim = np.asarray(num_atoms) / self.sym.lattice_points[torch.as_tensor(g)].cpu().numpy()
        self.seen_elements.copy_(seen)
        self.atoms_range.copy_(torch.tensor([int(per_prim.min()), int(per_prim.max())]))

    # ---------------------------------------------------------------- embeddings
    def _gw_index(self, g: Tensor, w: Tensor) -> Tensor:
        return g * (self.sym.max_letters + 1) + w

    def condition_vector(
        self,
        g: Tensor | None,
        conditions: dict[str, Tensor | float] | None,
        composition: Tensor | None = None,
        size: int | None = None,
    ) -> Tensor | None:
        """Sum of the condition encodings (B, d); ``composition`` (B, 119) counts per primitive
        cell. A condition not given, or NaN, is absent (the model's unconditional part); in
        training each is also hidden with probability ``condition_dropout``, and all together
        with ``condition_dropout_all``."""
        c = self.config
        conditions = conditions or {}
        unknown = set(conditions) - set(c.conditions)
        if unknown:
            raise ValueError(unknown_condition_message(sorted(unknown), list(c.conditions)))
        if not c.conditions and not c.condition_on_composition:
            return None
        B = next(
            (len(t) for t in (g, composition) if t is not None),
            size if size is not None else 1,
        )
        device = self.cond_absent.device
        out = torch.zeros(B, c.d_model, device=device)
        dropping = self.training and (c.condition_dropout > 0 or c.condition_dropout_all > 0)
        if dropping:
            drop_all = torch.rand(B, device=device) < c.condition_dropout_all
        for i, (name, enc) in enumerate(self.cond_encoders.items()):
            dim = c.conditions[name]
            value = conditions.get(name)
            v = torch.full((B, dim), float("nan"), device=device)
            if value is not None:
                v = torch.as_tensor(value, dtype=torch.float32, device=device)
                v = v.reshape(-1, dim).expand(B, dim) if v.numel() == dim else v.reshape(B, dim)
            present = torch.isfinite(v).all(-1)
            if dropping:
                dropped = drop_all | (torch.rand(B, device=device) < c.condition_dropout)
                present = present & ~dropped
            mean, std = self.condition_stats[i]
            z = (torch.nan_to_num(v) - mean) / std
            out = out + torch.where(present.unsqueeze(-1), enc(z), self.cond_absent[i])
        if self.comp_encoder is not None:
            if composition is None:
                raise ValueError(
                    "this model predicts structures for a given composition: pass composition="
                    " (CLI: --composition)"
                )
            out = out + self.comp_encoder(composition_features(composition))
        return out

    def set_condition_stats(self, values: dict[str, np.ndarray]) -> None:
        """Standardise each condition by its training values (NaN = missing, ignored)."""
        for i, name in enumerate(self.config.conditions):
            v = np.asarray(values[name], dtype=float)
            v = v[np.isfinite(v)]
            mean = float(v.mean()) if len(v) else 0.0
            std = float(v.std()) if len(v) > 1 else 1.0
            self.condition_stats[i] = torch.tensor([mean, std if std > 1e-8 else 1.0])

    def _multiplicities(self, g: Tensor, w: Tensor, real: Tensor) -> Tensor:
        """Atoms of each site (B, n) in the conventional cell; 0 where not ``real``."""
        gb = g.unsqueeze(-1).expand_as(w)
        return torch.where(real, self.sym.multiplicity[gb, w.clamp(max=self.sym.pad)], 0.0)

    def composition_counts(self, g: Tensor, w: Tensor, a: Tensor, n: Tensor) -> Tensor:
        """Atoms per primitive cell of each element (B, 119), read off the site sequence."""
        steps = torch.arange(w.shape[1], device=w.device)
        real = steps.unsqueeze(0) < n.unsqueeze(1)
        mult = self._multiplicities(g, w, real)
        counts = torch.zeros(len(g), NUM_ELEMENTS, device=w.device)
        counts.scatter_add_(1, torch.where(real, a, 0), mult)
        return counts / self.sym.lattice_points[g].unsqueeze(-1)

    def embed_sites(
        self,
        g: Tensor,
        w: Tensor,
        a: Tensor,
        x: Tensor | None,
        charge: Tensor | None = None,
        fill: Tensor | None = None,
        balanced: Tensor | None = None,
    ) -> Tensor:
        """Embedding of sites (B, n) -> (B, n, d). ``charge``: the running charge totals
        after each site (``charge_totals``); by default summed from these sites alone, which is
        right for a whole sequence (training) but not for a continuation (the sampler).
        ``fill`` (B, n): the fraction of the cell filled after each site (``volume_fill``),
        needed by models with ``volume_features``. ``balanced`` (B, n) bool: whether the
        composition is balanced after each site (``balance_inputs``); by default from these
        sites alone, like ``charge``."""
        emb = self._site_identity(g, w, a)
        if x is not None:  # sites first: the site tokens carry no coordinates
            emb = emb + self.emb_coord(fourier(x, self.config.fourier_freqs))
        if self.emb_charge is not None:
            if charge is None:
                charge = self.charge_totals(g, w, a)
            emb = emb + self.emb_charge(charge_features(charge))
        if self.emb_volume is not None:
            if fill is None:
                raise ValueError("a model with volume_features needs the cell's running fill")
            emb = emb + self.emb_volume(volume_features(fill))
        if self.emb_balance is not None:
            if balanced is None:
                balanced = self.balance_inputs(g, w, a)[1]
            emb = emb + self.emb_balance(balanced.long())
        return emb

    def _site_identity(self, g: Tensor, w: Tensor, a: Tensor) -> Tensor:
        """A site's letter (in its group) and element (B, n) -> (B, n, d)."""
        gb = g.unsqueeze(-1).expand_as(w)
        feats = self.sym.site_features(gb, w)
        return (
            self.emb_gw(self._gw_index(gb, w))
            + self.emb_letter(w)
            + self.emb_wfeat(feats)
            + self.element_embedding(a)
        )

    def embed_coordinates(self, g: Tensor, w: Tensor, a: Tensor, x: Tensor) -> Tensor:
        """Sites first: the coordinate tokens (B, n) -> (B, n, d), a site's letter, element and
        coordinates, marked as coordinate tokens."""
        return (
            self._site_identity(g, w, a)
            + self.emb_coord(fourier(x, self.config.fourier_freqs))
            + self.coord_token
        )

    def balance_candidates(self, g: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        """(R, 119) bool: whether each element on a site of letter w (R,) would leave the atoms
        ``counts`` (R, 119, conventional cell, before the site) charge-balanced
        (``data.chemistry.balanced_candidates``, cached by composition)."""
        mult = self.sym.multiplicity[g, w.clamp(max=self.sym.pad)].long().tolist()
        c = counts.long().cpu().numpy()
        rows, cols = np.nonzero(c)
        starts = np.searchsorted(rows, np.arange(len(c) + 1))
        out = np.zeros((len(c), NUM_ELEMENTS), dtype=bool)
        for i in range(len(c)):
            zs = cols[starts[i] : starts[i + 1]]
            key = tuple(zip(zs.tolist(), c[i, zs].tolist(), strict=True))
            out[i] = balanced_candidates(key, mult[i])
        return torch.as_tensor(out, device=counts.device)

    def balance_inputs(self, g: Tensor, w: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Of a whole site sequence (B, T), padding being element 0: the candidates' balance
        at each real site (S, 119), real sites in (crystal, site) order, and whether the
        composition is balanced after each site (B, T) (False on padding)."""
        real = a > 0
        mult = self._multiplicities(g, w, real).long()
        atoms = torch.zeros(*a.shape, NUM_ELEMENTS, dtype=torch.long, device=a.device)
        atoms.scatter_(2, a.unsqueeze(-1), mult.unsqueeze(-1))
        before = atoms.cumsum(1) - atoms
        gb = g.unsqueeze(-1).expand_as(w)
        cand = self.balance_candidates(gb[real], w[real], before[real])
        balanced = torch.zeros_like(real)
        balanced[real] = cand.gather(1, a[real].unsqueeze(1)).squeeze(1)
        return cand, balanced

    def volume_fill(
        self, g: Tensor, w: Tensor, a: Tensor, volume: Tensor, before: Tensor | None = None
    ) -> Tensor:
        """(B, n) fraction of each cell's ``volume`` (B,) taken by the atoms of sites (B, n)
        up to and including each one (fitted volume per atom times multiplicity; padding,
        element 0, adds nothing); ``before`` (B,): the fraction of the sites already placed."""
        mult = self._multiplicities(g, w, a > 0)
        fill = (mult * self.element_volume[a]).cumsum(1) / volume.unsqueeze(1)
        return fill if before is None else fill + before.unsqueeze(1)

    def sites_lattice_context(self, h_end: Tensor, g: Tensor, w: Tensor, a: Tensor) -> Tensor:
        """Sites first: the lattice flow's context from the output at the end of the sites
        (B, d), plus with ``volume_features`` the fitted volume per atom of the sites (w, a
        (B, n); padding adds nothing): attention averages over the sites, it does not sum
        their volumes, and the cell's size follows from that sum."""
        ctx = self.lattice_context(h_end, g)
        if self.lattice_volume is None:
            return ctx
        mult = self._multiplicities(g, w, a > 0)
        per_atom = (mult * self.element_volume[a]).sum(1) / mult.sum(1).clamp(min=1)
        return ctx + self.lattice_volume(volume_features(per_atom / VOLUME_SCALE))

    def charge_totals(
        self, g: Tensor, w: Tensor, a: Tensor, before: Tensor | None = None
    ) -> Tensor:
        """(B, n, 5) running sums over sites (B, n), times multiplicity, of the typical, lowest
        and highest oxidation states, non-metal atoms and atoms (padding, element 0, adds
        nothing); ``before`` (B, 5): the totals of the sites already placed."""
        mult = self._multiplicities(g, w, a > 0)
        per_site = torch.cat([self.charge_table[a], torch.ones_like(mult).unsqueeze(-1)], -1)
        totals = (per_site * mult.unsqueeze(-1)).cumsum(1)
        return totals if before is None else totals + before.unsqueeze(1)

    def element_embedding(self, a: Tensor) -> Tensor:
        e = self.emb_elem(a)
        if self.emb_elem_feat is not None:
            e = e + self.emb_elem_feat(self.element_table[a])
        return e

    def start_token(self, g: Tensor, cond: Tensor | None) -> Tensor:
        """Token 0 before the lattice: the group and the conditions (B, 1, d)."""
        h = self.emb_g(g)
        return (h if cond is None else h + cond).unsqueeze(1)

    def lattice_embedding(self, lattice: Tensor) -> Tensor | None:
        """Lattice first: the (drawn or given) lattice as a d-vector; None with lattice last."""
        if self.emb_lattice is None:
            return None
        return self.emb_lattice(lattice_embedding_features(lattice))

    def first_lattice_context(self, start: Tensor, g: Tensor) -> Tensor:
        """Lattice first: the flow's context is token 0 before the lattice (group, conditions)."""
        return self.lattice_context(start[:, 0], g)

    def backbone(
        self, h: Tensor, caches: list[dict] | None = None, offset: int | Tensor = 0
    ) -> Tensor:
        """The transformer blocks. With ``autocast_dtype`` (bf16 training) only these run in
        reduced precision: the heads, the von Mises densities (a mean off by bf16's 1/128 is
        far outside a sharp peak) and the lattice flow see float32 states. ``offset`` (B,)
        tensor: one token per row at its own position, into ragged caches (``Block``)."""
        T = h.shape[1]
        lengths = offset if isinstance(offset, Tensor) else None
        if lengths is not None:
            h = h + self.emb_pos(lengths).unsqueeze(1)
        else:
            h = h + self.emb_pos(torch.arange(offset, offset + T, device=h.device))
        dtype = self.autocast_dtype
        with torch.autocast(h.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for i, block in enumerate(self.blocks):
                h = block(h, None if caches is None else caches[i], lengths)
            h = self.ln_f(h)
        return h.float()

    # ---------------------------------------------------------------- per-part terms
    def g_logits(self, cond: Tensor | None, guide: tuple[Tensor, float] | None = None) -> Tensor:
        """Logits of P(g | conditions); ``guide`` = (the unconditional condition vector, scale)."""
        if cond is None or self.g_prior_cond is None:
            return self.g_prior
        logits = self.g_prior + self._g_offset(cond)
        if guide is not None:
            logits = guided(logits, self.g_prior + self._g_offset(guide[0]), guide[1])
        return logits

    def _g_offset(self, cond: Tensor) -> Tensor:
        """The conditions' term of P(g | conditions); with ``g_marginal_histogram`` measured
        from the all-absent vector, so that P(g | nothing given) is ``g_prior`` itself."""
        if not self.config.g_marginal_histogram:
            return self.g_prior_cond(cond)
        return F.linear(cond - self.cond_absent.sum(0), self.g_prior_cond.weight)

    def g_logprob(self, g: Tensor, cond: Tensor | None) -> Tensor:
        logits = self.g_logits(cond)
        logits = logits.masked_fill(torch.arange(231, device=g.device) == 0, float("-inf"))
        lp = F.log_softmax(logits, dim=-1)
        return lp.gather(-1, g.unsqueeze(-1)).squeeze(-1) if lp.dim() > 1 else lp[g]

    def w_logits(
        self,
        h: Tensor,
        g: Tensor,
        prev_w: Tensor,
        first: Tensor,
        guide: tuple[Tensor, float] | None = None,
    ) -> Tensor:
        """Masked letter logits; ``guide`` = (the unconditional stream's h, scale)."""
        mask = self.sym.letter_mask(g, prev_w, first)
        logits = self.head_w(h)
        if guide is not None:
            logits = guided(logits, self.head_w(guide[0]), guide[1])
        return logits.masked_fill(~mask, float("-inf"))

    def coordinate_input(self, ctx: Tensor, a: Tensor) -> Tensor:
        """What every coordinate head reads besides the earlier coordinates: the site context
        and the chosen element (computed once per site, not once per coordinate)."""
        inp = ctx + self.emb_chosen_element(a)
        if self.emb_elem_feat is not None:
            inp = inp + self.emb_elem_feat(self.element_table[a])
        return inp

    def x_params(self, inp: Tensor, x_prev: Tensor, j: int) -> Tensor:
        """Mixture parameters of coordinate j given ``coordinate_input`` and coordinates < j."""
        if j:
            inp = torch.cat([inp, fourier(x_prev[..., :j], self.config.fourier_freqs)], dim=-1)
        return self.head_x[j](inp)

    def site_content(
        self,
        h: Tensor,
        g: Tensor,
        w: Tensor,
        prev_w: Tensor,
        prev_a: Tensor,
        first: Tensor,
        *,
        a: Tensor | None = None,
        x: Tensor | None = None,
        allowed: Tensor | None = None,
        draw: Drawer | None = None,
        lattice: Tensor | None = None,
        guide: tuple[Tensor, float] | None = None,
        score: bool = True,
        volume: Tensor | None = None,
        charge: Tensor | None = None,
        balance: Tensor | None = None,
        place: bool = True,
    ) -> SiteStep:
        """The element and coordinates of a site whose letter is w: the one site step that
        teacher-forced training (``a``, ``x`` given) and the sampler (``draw`` given) share.

        Coordinates go x, then y | x, then z | x, y; only free ones are drawn, and the drawn
        vector is projected onto the Wyckoff position after each draw, so every head sees the
        exact earlier coordinates (fixed and tied ones included), as in training.
        ``lattice``: the lattice embedding (lattice first), given to the heads directly.
        ``guide`` = (the unconditional stream's h, scale): guided element logits (sampling).
        ``score=False`` (the sampler): draw only, without the log-probabilities and with each
        coordinate head run on the rows where that coordinate is free.
        ``volume`` (B, 2): the cell's fill before this site and its volume (``volume_features``);
        ``charge`` (B, 5): the running charge totals before this site (``charge_candidates``).
        ``balance`` (B, 119) bool: which elements would leave the composition balanced
        (``balance_candidates``; ``balance_features``). ``place=False`` (sites first): the
        element only; ``x`` comes back as zeros, ``lp_x`` as None.
        """
        # elements: real ones, non-decreasing along a repeated letter (the canonical order)
        ctx = self._site_context(h, g, w, lattice)
        z = torch.arange(NUM_ELEMENTS, device=h.device)
        floor = torch.where(first, 0, lowest_next_element(w, prev_w, prev_a))
        legal = (z > 0) & (z >= floor.unsqueeze(-1))
        if allowed is not None:
            legal = legal & allowed
        a_logits = self._element_logits(ctx, g, w, volume, charge, balance)
        if guide is not None:
            uctx = self._site_context(guide[0], g, w, lattice)
            uncond = self._element_logits(uctx, g, w, volume, charge, balance)
            a_logits = guided(a_logits, uncond, guide[1])
        a_logits = a_logits.masked_fill(~legal, float("-inf"))
        if a is None:
            if draw is None:
                raise ValueError("site_content needs either a and x or a drawer")
            a = draw.categorical(a_logits)
        lp_a = (
            F.log_softmax(a_logits, -1).gather(-1, a.unsqueeze(-1)).squeeze(-1) if score else None
        )
        if not place:
            return SiteStep(a, torch.zeros(len(g), 3, device=h.device), lp_a, None, a_logits,
                            None, ctx)  # fmt: skip
        x, lp_x, params = self.coordinates(ctx, g, w, a, x, draw, score=score)
        return SiteStep(a, x, lp_a, lp_x, a_logits, params, ctx)

    def _site_context(self, h: Tensor, g: Tensor, w: Tensor, lattice: Tensor | None) -> Tensor:
        ctx = h + self.emb_chosen_letter(self._gw_index(g, w))
        return ctx if lattice is None else ctx + lattice

    def _element_logits(
        self,
        ctx: Tensor,
        g: Tensor,
        w: Tensor,
        volume: Tensor | None = None,
        charge: Tensor | None = None,
        balance: Tensor | None = None,
    ) -> Tensor:
        a_logits = self.head_a(ctx)
        if self.emb_elem_feat is not None:  # similar elements get similar scores
            chem = self.emb_elem_feat(self.element_table)  # (119, d)
            a_logits = a_logits + self.head_a_feat(ctx) @ chem.T / chem.shape[1] ** 0.5
        # atoms a candidate element adds: the multiplicity of the site's letter
        mult = self.sym.multiplicity[g, w.clamp(max=self.sym.pad)].unsqueeze(-1)
        if self.emb_volume is not None:  # each candidate scored by the fill it would leave
            if volume is None:
                raise ValueError("a model with volume_features needs the cell's fill and volume")
            fill, cell = volume.unbind(-1)
            after = fill.unsqueeze(-1) + mult / cell.unsqueeze(-1) * self.element_volume
            a_logits = a_logits + torch.einsum(
                "bk,bek->be", self.head_a_volume(ctx), volume_features(after)
            )
        if self.head_a_charge is not None:  # ... and by the running charge it would leave
            if charge is None:
                raise ValueError("a model with charge_candidates needs the running charge")
            per_atom = torch.cat([self.charge_table, torch.ones_like(self.charge_table[:, :1])], -1)
            after = charge.unsqueeze(1) + mult.unsqueeze(-1) * per_atom  # (B, 119, 5)
            a_logits = a_logits + torch.einsum(
                "bk,bek->be", self.head_a_charge(ctx), charge_features(after)
            )
        if self.head_a_balance is not None:  # ... and by whether it would leave it balanced
            if balance is None:
                raise ValueError("a model with balance_features needs the candidates' balance")
            a_logits = a_logits + self.head_a_balance(ctx) * balance.float()
        return a_logits

    def coordinates(
        self,
        ctx: Tensor,
        g: Tensor,
        w: Tensor,
        a: Tensor,
        x: Tensor | None = None,
        draw: Drawer | None = None,
        *,
        score: bool = True,
        inp: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The coordinate half of ``site_content`` given its context and element: coordinates,
        their log density (free ones only) and the mixture parameters (n, 3, 3K). The distance
        rule's redraws call it alone (``x`` None: drawn; ``score=False``: no density, no
        parameters, heads only where the coordinate is free; ``inp``: ``coordinate_input``
        already computed)."""
        free = self.sym.free_mask[g, w]
        if inp is None:
            inp = self.coordinate_input(ctx, a)
        if x is None:  # drawn x, then y | x, then z | x, y, each head only where it is free
            if draw is None:
                raise ValueError("coordinates to draw need a drawer")
            x = self.sym.project(g, w, torch.zeros(len(g), 3, device=inp.device))
            for j in range(3):
                rows = free[:, j]
                if bool(rows.any()):
                    x = x.clone()
                    x[rows, j] = draw.von_mises(self.x_params(inp[rows], x[rows], j))
                    x = self.sym.project(g, w, x)
        if not score:
            return x, None, None
        lp_x = torch.zeros(len(g), device=inp.device)
        params = []
        for j in range(3):  # drawn or given coordinates scored alike
            p = self.x_params(inp, x, j)
            params.append(p)
            lp_x = lp_x + torch.where(free[:, j], von_mises_mixture_logpdf(x[:, j], p), 0.0)
        return x, lp_x, torch.stack(params, 1)

    def lattice_context(self, h_last: Tensor, g: Tensor) -> Tensor:
        return self.lattice_ctx(torch.cat([h_last, self.emb_g(g)], dim=-1))

    def lattice_logprob(self, ctx: Tensor, lattice: Tensor, g: Tensor, num_atoms: Tensor) -> Tensor:
        return self.lattice.log_prob(ctx, lattice, self.sym.crystal_system[g], num_atoms)[0]

    def lattice_noise(self, ctx: Tensor, lattice: Tensor, g: Tensor, num_atoms: Tensor) -> Tensor:
        """The lattice through its flow (``LatticeFlow.log_prob`` with ``noise``)."""
        system = self.sym.crystal_system[g]
        return self.lattice.log_prob(ctx, lattice, system, num_atoms, noise=True)[1]

    def forward(
        self,
        batch: dict[str, Tensor],
        conditions: dict[str, Tensor] | None = None,
        per_step: bool = False,
        distributions: bool = False,
    ) -> dict[str, Tensor]:
        """Exact log-likelihood per crystal and per part (g, W, A, X, L), in nats.

        ``per_step=True`` adds ``W_steps``, ``A_steps``, ``X_steps`` (B, T+1): the terms of each
        predicted site (the last valid step is the end of the sequence).
        ``distributions=True`` adds the conditionals themselves, for calibration tests:
        ``w_logits`` (B, T+1, L+1), and per real site in (crystal, site) order ``a_logits``,
        ``x_params`` (3 heads) and ``site_crystal``; ``lattice_noise``: the lattice mapped
        through its flow to the base distribution (standard normal under the model).
        ``conditions``: name -> values (B,) (NaN: absent); by default the batch's ``cond:`` keys.
        """
        g, w, a, x = batch["g"], batch["w"], batch["a"], batch["x"]
        n = batch["n"]
        if conditions is None:  # condition columns travel in the batch ("cond:<name>")
            conditions = {k[5:]: v for k, v in batch.items() if k.startswith("cond:")}
        B, T = w.shape  # T = max sites; position k >= n is padding
        comp = None
        if self.config.condition_on_composition:
            comp = self.composition_counts(g, w, a, n)
        cond = self.condition_vector(g, conditions, comp)
        if self.config.sites_first:
            return self._forward_sites_first(batch, cond, per_step, distributions)
        start = self.start_token(g, cond)
        lat_emb = self.lattice_embedding(batch["lattice"])
        if lat_emb is not None:
            lat_ctx = self.first_lattice_context(start, g)
            start = start + lat_emb.unsqueeze(1)
        fill = volume = None
        if self.emb_volume is not None:  # the cell's running fill, after each site
            volume = cell_volume(batch["lattice"]).float()
            fill = self.volume_fill(g, w, a, volume)
        charge = None
        if self.emb_charge is not None:  # the running charge, after each site
            charge = self.charge_totals(g, w, a)
        balance = balanced = None
        if self.emb_balance is not None:  # charge balance of the candidates and after each site
            balance, balanced = self.balance_inputs(g, w, a)
        h = torch.cat([start, self.embed_sites(g, w, a, x, charge, fill, balanced)], dim=1)
        h = self.backbone(h)  # (B, T+1, d): output k predicts site k+1
        # targets: sites 1..n, then the end
        w_t, a_t, prev_w, prev_a, first, gb, is_site, site_of = self._site_targets(g, w, a, n)
        x_t = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        w_logits, lp_w = self._letter_terms(h, gb, prev_w, first, w_t, n)

        hs, gs, ws = h[is_site], gb[is_site], w_t[is_site]
        step = self.site_content(
            hs,
            gs,
            ws,
            prev_w[is_site],
            prev_a[is_site],
            first[is_site],
            a=a_t[is_site],
            x=x_t[is_site],
            lattice=None if lat_emb is None else lat_emb[site_of],
            volume=None if fill is None else site_volume(fill, volume)[is_site],
            charge=None if charge is None else _before_each(charge)[is_site],
            balance=balance,
        )
        lp_a, lp_x = step.lp_a, step.lp_x

        if lat_emb is None:  # lattice last: its context is the output after the last site
            lat_ctx = self.lattice_context(h[torch.arange(B, device=g.device), n], g)
        out = {
            "g": self.g_logprob(g, cond),
            "W": lp_w.sum(1),
            "A": torch.zeros(B, device=g.device).index_add(0, site_of, lp_a),
            "X": torch.zeros(B, device=g.device).index_add(0, site_of, lp_x),
            "L": self.lattice_logprob(lat_ctx, batch["lattice"], g, batch["num_atoms"]),
        }
        out["total"] = sum(out[p] for p in PARTS)
        if per_step:
            out["W_steps"] = lp_w
            for key, val in (("A_steps", lp_a), ("X_steps", lp_x)):
                full = torch.zeros(B, T + 1, device=g.device)
                full[is_site] = val
                out[key] = full
        if distributions:
            out["w_logits"] = w_logits
            out["a_logits"], out["x_params"] = step.a_logits, step.x_params
            out["site_crystal"] = site_of
            out["lattice_noise"] = self.lattice_noise(
                lat_ctx, batch["lattice"], g, batch["num_atoms"]
            )
        return out

    def _site_targets(self, g: Tensor, w: Tensor, a: Tensor, n: Tensor) -> tuple[Tensor, ...]:
        """What outputs 0..T predict (B, T+1): letter (the end after the last site), element,
        the site before, whether it is the first, the group; which outputs predict a real site,
        and the crystal of each real site."""
        B, T = w.shape
        steps = torch.arange(T + 1, device=g.device)
        is_site = steps.unsqueeze(0) < n.unsqueeze(1)  # k < n predicts a real site
        w_t = torch.cat([w, torch.full_like(w[:, :1], self.sym.pad)], dim=1)
        w_t = torch.where(is_site, w_t, torch.full_like(w_t, self.sym.pad))
        a_t = torch.cat([a, torch.zeros_like(a[:, :1])], dim=1)
        prev_w = torch.cat([torch.zeros_like(w[:, :1]), w], dim=1)
        prev_a = torch.cat([torch.zeros_like(a[:, :1]), a], dim=1)
        first = (steps == 0).unsqueeze(0).expand(B, -1)
        gb = g.unsqueeze(1).expand(-1, T + 1)
        site_of = torch.arange(B, device=g.device).unsqueeze(1).expand(-1, T + 1)[is_site]
        return w_t, a_t, prev_w, prev_a, first, gb, is_site, site_of

    def _letter_terms(
        self, h: Tensor, gb: Tensor, prev_w: Tensor, first: Tensor, w_t: Tensor, n: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Letter logits of outputs 0..T and the log-probability of each target (0 past the
        end, output n)."""
        w_logits = self.w_logits(h, gb, prev_w, first)
        lp_w = F.log_softmax(w_logits, -1).gather(-1, w_t.unsqueeze(-1)).squeeze(-1)
        valid = torch.arange(h.shape[1], device=h.device).unsqueeze(0) <= n.unsqueeze(1)
        return w_logits, torch.where(valid, lp_w, torch.zeros_like(lp_w))

    def sites_first_layout(self, n: Tensor, T: int) -> Tensor:
        """Sites first: where each crystal's tokens come from (B, 2T+2) in the source
        [start, T site tokens, lattice token, T coordinate tokens]: its own n site tokens, then
        the lattice token, then its n coordinate tokens, then padding. Laid out per crystal, so
        a crystal's tokens never depend on the longest crystal of its batch."""
        t = torch.arange(2 * T + 2, device=n.device).unsqueeze(0)
        k = n.unsqueeze(1)
        idx = torch.where(t <= k, t, T + 1 + (t - k - 1))
        return idx.clamp(max=2 * T + 1)

    def _forward_sites_first(
        self, batch: dict[str, Tensor], cond: Tensor, per_step: bool, distributions: bool
    ) -> dict[str, Tensor]:
        """``forward`` for the order group, letters and elements, lattice, coordinates."""
        g, w, a, x, n = batch["g"], batch["w"], batch["a"], batch["x"], batch["n"]
        B, T = w.shape
        dev = g.device
        charge = self.charge_totals(g, w, a) if self.emb_charge is not None else None
        balance = balanced = None
        if self.emb_balance is not None:
            balance, balanced = self.balance_inputs(g, w, a)
        lat_emb = self.lattice_embedding(batch["lattice"])
        source = torch.cat(
            [
                self.start_token(g, cond),
                self.embed_sites(g, w, a, None, charge, None, balanced),
                lat_emb.unsqueeze(1),
                self.embed_coordinates(g, w, a, x),
            ],
            dim=1,
        )
        idx = self.sites_first_layout(n, T)
        h = self.backbone(source.gather(1, idx.unsqueeze(-1).expand(-1, -1, source.shape[-1])))
        # letters and elements: outputs 0..n, as with the lattice last
        hs = h[:, : T + 1]
        w_t, a_t, prev_w, prev_a, first, gb, is_site, site_of = self._site_targets(g, w, a, n)
        w_logits, lp_w = self._letter_terms(hs, gb, prev_w, first, w_t, n)
        step = self.site_content(
            hs[is_site],
            gb[is_site],
            w_t[is_site],
            prev_w[is_site],
            prev_a[is_site],
            first[is_site],
            a=a_t[is_site],
            charge=None if charge is None else _before_each(charge)[is_site],
            balance=balance,
            place=False,
        )
        # the lattice: from the output after the last site (the end), per atom
        lat_ctx = self.sites_lattice_context(h[torch.arange(B, device=dev), n], g, w, a)
        # coordinates of site i: from the output at n + i (the lattice token predicts site 1's)
        real = is_site[:, :T]
        hc = h.gather(1, (n.unsqueeze(1) + 1 + torch.arange(T, device=dev)).clamp(max=2 * T + 1)
                      .unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # fmt: skip
        gs = g.unsqueeze(1).expand(-1, T)[real]
        ctx = self._site_context(hc[real], gs, w[real], lat_emb[site_of])
        _, lp_x, params = self.coordinates(ctx, gs, w[real], a[real], x[real])
        out = {
            "g": self.g_logprob(g, cond),
            "W": lp_w.sum(1),
            "A": torch.zeros(B, device=dev).index_add(0, site_of, step.lp_a),
            "X": torch.zeros(B, device=dev).index_add(0, site_of, lp_x),
            "L": self.lattice_logprob(lat_ctx, batch["lattice"], g, batch["num_atoms"]),
        }
        out["total"] = sum(out[p] for p in PARTS)
        if per_step:
            out["W_steps"] = lp_w
            for key, val in (("A_steps", step.lp_a), ("X_steps", lp_x)):
                full = torch.zeros(B, T + 1, device=dev)
                full[is_site] = val
                out[key] = full
        if distributions:
            out["w_logits"] = w_logits
            out["a_logits"], out["x_params"] = step.a_logits, params
            out["site_crystal"] = site_of
            out["lattice_noise"] = self.lattice_noise(
                lat_ctx, batch["lattice"], g, batch["num_atoms"]
            )
        return out

    @torch.no_grad()
    def log_prob(
        self,
        structures: list,
        symprec: float = 0.01,
        batch_size: int = 256,
        conditions: dict | None = None,
    ) -> dict[str, Tensor]:
        """Exact log-likelihood (nats) of pymatgen Structures, per crystal: total and per part.

        Each structure is encoded (Wyckoff representation, ``symprec``) and scored in its
        canonical site order; ``per_atom`` divides by the atoms of the conventional cell.
        ``conditions``: name -> a value or one per structure (a conditioned model's
        log P(crystal | y); without them log P(crystal), its unconditional part).
        """
        from crystal_gpt.data.codec import encode

        crystals = [encode(s, symprec) for s in structures]
        return self.crystal_log_prob(crystals, batch_size, conditions)

    def crystal_log_prob(
        self, crystals: list, batch_size: int = 256, conditions: dict | None = None
    ) -> dict[str, Tensor]:
        """:meth:`log_prob` of WyckoffCrystals (already encoded, e.g. the sampler's)."""
        from crystal_gpt.data.batching import PaddedCrystals, bucketed_batches
        from crystal_gpt.data.cache import EncodedDataset

        data = PaddedCrystals(EncodedDataset.from_crystals(crystals), self.config.max_sites)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        keys = (*PARTS, "total")
        out = {k: torch.zeros(len(data)) for k in keys}
        with torch.no_grad():
            values = per_crystal_conditions(conditions, len(data))
            for idx in bucketed_batches(data.n, batch_size):
                res = self(data.batch(idx, device), {k: v[idx] for k, v in values.items()})
                for k in keys:
                    out[k][torch.as_tensor(idx)] = res[k].float().cpu()
        self.train(was_training)
        out["per_atom"] = out["total"] / torch.as_tensor(data.num_atoms, dtype=torch.float32)
        return out

    @classmethod
    def from_pretrained(cls, name_or_path: str = "mp_20", device: str = "cpu") -> CrystalGPT:
        """A bundled model by name (``crystal-gpt models``) or a checkpoint path."""
        from crystal_gpt.model.checkpoints import load_model

        return load_model(name_or_path, device)

    def sample(
        self,
        n: int,
        *,
        spacegroup: int | str | list[int | str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        elements: str | list[str] | None = None,
        exclude_elements: str | list[str] | None = None,
        composition=None,
        formula_units: int | None = None,
        num_atoms=None,
        wyckoff_template=None,
        chemsys=None,
        contains=None,
        allow_unseen: bool = False,
        conditions: dict | None = None,
        guidance: float = 1.0,
        num_elements: int | str | tuple[int, int] | None = "auto",
    ) -> list:
        """n new crystals as pymatgen Structures (conventional cells); ``spacegroup`` fixes the
        group (a number, a symbol such as 'Fm-3m', a crystal system, or a list of these);
        ``elements`` / ``exclude_elements`` restrict atom types ('Li,O' or a list);
        ``composition`` (e.g. 'Li4Fe4P4O16', per primitive cell), ``num_atoms`` (N or (low,
        high)) and ``wyckoff_template`` ('4a 4b') are met exactly; ``chemsys`` ('Li-Fe-P-O')
        gives exactly those elements, all present; ``contains`` ('O') these in every crystal,
        the others free; ``allow_unseen`` lifts the default
        restriction to the training data's elements and sizes; ``conditions`` (e.g.
        ``{"band_gap": 3.0}``) and ``guidance`` steer a conditioned model; ``num_elements``
        (3, '2-4', 'prior', 'model'; default 'auto') sets the number of distinct elements (see
        ``sampling.sample_crystals``, which gives the WyckoffCrystals)."""
        from crystal_gpt.data.codec import decode
        from crystal_gpt.sampling.sampler import sample_crystals

        crystals = sample_crystals(
            self,
            n,
            spacegroup=spacegroup,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            elements=elements,
            exclude_elements=exclude_elements,
            composition=composition,
            formula_units=formula_units,
            num_atoms=num_atoms,
            wyckoff_template=wyckoff_template,
            chemsys=chemsys,
            contains=contains,
            allow_unseen=allow_unseen,
            conditions=conditions,
            guidance=guidance,
            num_elements=num_elements,
        )
        return [decode(c) for c in crystals]

    def predict_structures(
        self, composition, k: int = 5, candidates: int = 40, **options: Any
    ) -> list:
        """Structure prediction (a composition-conditioned model): the k most probable distinct
        structures among ``candidates`` draws, most probable first, each with
        ``properties["draws"]`` and ``["log_prob"]`` (``evaluation.csp.predict_structures``;
        ``options``: temperature, seed, conditions, min_distance)."""
        from crystal_gpt.evaluation.csp import predict_structures

        return predict_structures(self, composition, k, candidates, **options)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
