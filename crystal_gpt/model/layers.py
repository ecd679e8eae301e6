"""The transformer's building blocks: the Wyckoff tables as tensors (with the letter mask),
periodic coordinate features, the causal attention block, small MLPs."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crystal_gpt.data.symmetry import (
    get_tables,
    lattice_points,
    lowest_next_letter,
    onto_position,
)
from crystal_gpt.model.distributions import NUM_ELEMENTS


class SymmetryTensors(nn.Module):
    """The Wyckoff tables as buffers (they move with the model to GPU)."""

    def __init__(self) -> None:
        super().__init__()
        t = get_tables()
        L = t.max_letters
        self.max_letters = L
        self.pad = L  # letter index of "end of sequence"
        mult = torch.zeros(231, L + 1)
        mult[:, :L] = torch.as_tensor(t.multiplicity, dtype=torch.float32)
        dof = torch.zeros(231, L + 1, dtype=torch.long)
        dof[:, :L] = torch.as_tensor(t.dof.astype("int64"))
        free = torch.zeros(231, L + 1, 3, dtype=torch.bool)
        free[:, :L] = torch.as_tensor(t.free_mask)
        self.register_buffer("num_letters", torch.as_tensor(t.num_letters.astype("int64")), False)
        self.register_buffer("multiplicity", mult, False)
        self.register_buffer("dof", dof, False)
        self.register_buffer("free_mask", free, False)
        self.register_buffer("proj_rot", torch.as_tensor(t.proj_rot, dtype=torch.float32), False)
        self.register_buffer(
            "proj_trans", torch.as_tensor(t.proj_trans, dtype=torch.float32), False
        )
        self.register_buffer(
            "crystal_system", torch.as_tensor(t.crystal_system.astype("int64")).clamp(min=0), False
        )
        points = torch.tensor([1.0] + [float(lattice_points(g)) for g in range(1, 231)])
        self.register_buffer("lattice_points", points, False)

    def site_features(self, g: Tensor, w: Tensor) -> Tensor:
        """What a Wyckoff position is, for embeddings (..., 5): log multiplicity, degrees of
        freedom, which coordinates are free."""
        return torch.cat(
            [
                torch.log(self.multiplicity[g, w].clamp(min=1)).unsqueeze(-1),
                self.dof[g, w].float().unsqueeze(-1),
                self.free_mask[g, w].float(),
            ],
            dim=-1,
        )

    def project(self, g: Tensor, w: Tensor, x: Tensor) -> Tensor:
        """Coordinates (B, 3) onto Wyckoff positions (g, w) through their first operation."""
        return torch.remainder(onto_position(self.proj_rot[g, w], self.proj_trans[g, w], x), 1.0)

    def letter_mask(self, g: Tensor, prev_w: Tensor | None, first: Tensor) -> Tensor:
        """Legal next letters (..., L+1) given the group, the previous letter and whether this is
        the first site: letters of the group, never decreasing, a zero-freedom letter not twice;
        the end (PAD) is legal except before the first site, and absorbing after it."""
        L = self.max_letters
        letters = torch.arange(L + 1, device=g.device)
        in_group = letters < self.num_letters[g].unsqueeze(-1)
        if prev_w is None:
            prev_w = torch.zeros_like(g)
        prev_dof = self.dof[g, prev_w.clamp(max=L)]
        lower = torch.where(first, 0, lowest_next_letter(prev_w, prev_dof))
        legal = in_group & (letters >= lower.unsqueeze(-1))
        ended = (~first) & (prev_w == self.pad)
        is_pad = letters == self.pad
        legal = torch.where(
            ended.unsqueeze(-1), is_pad.expand_as(legal), legal | (is_pad & ~first.unsqueeze(-1))
        )
        return legal


def fourier(x: Tensor, freqs: int) -> Tensor:
    """Periodic features of fractional coordinates: sin/cos(2 pi k x), k = 1..freqs."""
    k = torch.arange(1, freqs + 1, device=x.device, dtype=x.dtype)
    ang = 2 * math.pi * x.unsqueeze(-1) * k
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)


class Block(nn.Module):
    """Pre-norm causal self-attention block (SDPA kernel: fastest on CPU in our measurements)."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.dropout = dropout

    def forward(
        self, x: Tensor, cache: dict | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """``cache``: keys and values of the earlier tokens, extended in place (incremental
        decoding). ``lengths`` (B,): a ragged cache, one new token per row written at its own
        column ``lengths[b]`` of preallocated keys and values, attending to columns <= it, so
        rows with sequences of different lengths advance in one call (sampling: no dropout)."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        drop = self.dropout if self.training else 0.0
        if lengths is not None:
            if cache is None or T != 1:
                raise ValueError("a ragged cache takes one token per row")
            rows = torch.arange(B, device=x.device)
            cache["k"][rows, :, lengths] = k[:, :, 0]
            cache["v"][rows, :, lengths] = v[:, :, 0]
            width = int(lengths.max()) + 1  # columns beyond every row's are not read
            k, v = cache["k"][:, :, :width], cache["v"][:, :, :width]
            unread = torch.arange(width, device=x.device) > lengths.unsqueeze(1)
            # one query per row: written out, a third faster than SDPA with a mask on CPU
            scores = (q @ k.transpose(-1, -2)) * (D // self.heads) ** -0.5
            y = torch.softmax(scores.masked_fill(unread[:, None, None, :], float("-inf")), -1) @ v
        else:
            if cache is not None:  # incremental decoding: append this step's keys and values
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
            causal = cache is None or T > 1
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=drop)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, D)), drop, self.training)
        return x + F.dropout(self.ff(self.ln2(x)), drop, self.training)


COMPOSITION_DIM = NUM_ELEMENTS + 1


def composition_features(counts: Tensor) -> Tensor:
    """(B, 119) atoms per primitive cell -> element fractions and log(atoms per cell)."""
    total = counts.sum(-1, keepdim=True).clamp(min=1)
    return torch.cat([counts / total, torch.log(total)], dim=-1)


@functools.cache
def _element_features() -> np.ndarray:
    import warnings

    from pymatgen.core.periodic_table import Element

    rows = [np.zeros(14)]
    for z in range(1, NUM_ELEMENTS):
        el = Element.from_Z(z)
        with warnings.catch_warnings():  # "no data" for the heaviest elements: 0 is fine
            warnings.simplefilter("ignore")
            mendeleev = float(el.mendeleev_no or 0)
            chi = el.X if el.X == el.X else 0.0  # NaN without a Pauling electronegativity
        radius = el.atomic_radius or el.average_ionic_radius or 1.5
        states = el.common_oxidation_states or (0,)
        block = ["s", "p", "d", "f"].index(el.block) if el.block in "spdf" else 0
        rows.append(
            np.array(
                [
                    el.group,
                    el.row,
                    chi,
                    float(chi != 0.0),
                    float(radius),
                    math.log(float(el.atomic_mass)),
                    mendeleev,
                    max(states),
                    min(states),
                    float(el.is_metal),
                    *np.eye(4)[block],
                ],
                dtype=float,
            )
        )
    table = np.stack(rows)
    mean, std = table[1:].mean(0), table[1:].std(0) + 1e-6
    table = (table - mean) / std
    table[0] = 0.0
    return table


def element_feature_table() -> Tensor:
    """(119, 14) standardised chemistry of each element (group, period, Pauling
    electronegativity, radius, log mass, Mendeleev number, extreme common oxidation states,
    metal, block): what lets the element head share evidence between similar elements."""
    return torch.as_tensor(_element_features(), dtype=torch.float32)


@functools.cache
def _charge_table() -> np.ndarray:
    from pymatgen.core.periodic_table import Element

    from crystal_gpt.data.chemistry import oxidation_table

    states, real, metal = oxidation_table()
    out = np.zeros((NUM_ELEMENTS, 4))
    for z in range(1, NUM_ELEMENTS):
        if not real[z].any():  # no oxidation state (noble gases): carries no charge
            continue
        known = states[z][real[z]]
        common = Element.from_Z(z).common_oxidation_states or tuple(known.tolist())
        anion = [s for s in common if s < 0]
        cation = [s for s in common if s > 0]
        # the typical ion: a nonmetal's most negative common state, else the lowest positive
        typical = min(anion) if anion and not metal[z] else min(cation or common)
        out[z] = typical, known.min(), known.max(), float(not metal[z])
    return out


def charge_table() -> Tensor:
    """(119, 4) per element: its typical oxidation state, the lowest and highest state of the
    SMACT table, and 1 for a non-metal. Summed over a crystal's sites (times multiplicity)
    these say how far the atoms placed so far are from a neutral composition, which the model
    would otherwise have to add up across tokens by attention."""
    return torch.as_tensor(_charge_table(), dtype=torch.float32)


CHARGE_FEATURES = 7


def charge_features(totals: Tensor) -> Tensor:
    """(..., 5) running sums (typical charge, lowest charge, highest charge, non-metal atoms,
    atoms) -> (..., 7) scale-free features: charges and non-metals per atom, whether zero lies
    within reach of the states, and the sign and size of the typical charge."""
    typical, low, high, nonmetal, atoms = totals.unbind(-1)
    n = atoms.clamp(min=1.0)
    return torch.stack(
        [
            typical / n,
            low / n,
            high / n,
            nonmetal / n,
            ((low <= 0) & (high >= 0)).float(),
            torch.tanh(typical / 2),
            (typical == 0).float(),
        ],
        dim=-1,
    )


VOLUME_FEATURES = 12
_FILL_CENTRES = torch.linspace(0.0, 2.2, VOLUME_FEATURES - 1)


def volume_features(fill: Tensor) -> Tensor:
    """(...) fractions of a cell's volume taken by atoms -> (..., 12): radial bumps 0.2 apart
    from 0 to 2.2, and the fraction itself clipped at 4. A finished mp_20 training cell is
    filled 0.40-1.33 (99.8% of them, by the fitted atom volumes); the bumps also cover the
    partial fills of earlier sites and the over-filled cells a candidate element would make."""
    f = fill.float().unsqueeze(-1)
    bumps = torch.exp(-(((f - _FILL_CENTRES.to(f.device)) / 0.2) ** 2))
    return torch.cat([bumps, f.clamp(max=4.0)], -1)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
