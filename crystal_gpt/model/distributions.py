"""The model's distributions, apart from the network that predicts their parameters.

Coordinates: a mixture of von Mises distributions on [0, 1) (angle 2 pi x), its density and the
draw the sampler makes. Lattice: the change of variables between a conventional cell
(a, b, c, alpha, beta, gamma) and the flow's standardised free features, log(length / N^(1/3))
and logit(angle / 180 deg), with its log-Jacobian; which parameters are free and what the tied
ones equal is the table ``LATTICE_FREE_PARAMS`` / ``LATTICE_TIES`` of ``data.symmetry``.
Space group: the smoothed training histogram that initialises P(g).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions.transforms import (
    AffineTransform,
    CatTransform,
    ComposeTransform,
    ExpTransform,
    SigmoidTransform,
)

from crystal_gpt.data.symmetry import (
    CRYSTAL_SYSTEMS,
    LATTICE_FREE_PARAMS,
    LATTICE_PARAMS,
    LATTICE_TIES,
    get_tables,
)

NUM_ELEMENTS = 119  # index 0 = no element (end of sequence), 1..118 = atomic number
# free lattice parameters per crystal system index
LATTICE_DIMS = tuple(len(LATTICE_FREE_PARAMS[system]) for system in CRYSTAL_SYSTEMS)
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------- coordinates
def _mixture_parameters(params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """params (..., 3K) -> mixture logits, means, concentrations (softplus + 1e-3): the one
    reading of the coordinate heads' output, for the density and the draw alike."""
    logits, mu, raw_kappa = params.chunk(3, dim=-1)
    return logits, mu, F.softplus(raw_kappa) + 1e-3


def von_mises_mixture_logpdf(x: Tensor, params: Tensor) -> Tensor:
    """log density on [0, 1) of the mixture at fractional coordinates x: the angle's density
    kappa cos(2 pi x - mu) - log(2 pi I0(kappa)) plus log 2 pi for the change of variables,
    written with the scaled Bessel function (log I0(k) = log i0e(k) + k: one kernel, exact
    for any kappa) instead of ``VonMises.log_prob``'s polynomial pieces (~40 small operations
    per call, which bound a GPU training step)."""
    logits, mu, kappa = _mixture_parameters(params)
    theta = (2 * math.pi * x).unsqueeze(-1)
    comp = kappa * (torch.cos(theta - mu) - 1.0) - torch.log(torch.special.i0e(kappa))
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + comp, dim=-1)


def von_mises_mixture_sample(params: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A draw in [0, 1) from the mixture that ``von_mises_mixture_logpdf`` scores, component and
    angle both from the seeded ``generator`` (torch's VonMises.sample takes the global RNG, and
    its rejection loop cost ~0.6 ms per call, a large part of sampling time)."""
    logits, mu, kappa = _mixture_parameters(params)
    probs = torch.softmax(logits.float(), dim=-1)
    comp = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    comp = comp.view((*probs.shape[:-1], 1))
    m = mu.gather(-1, comp).squeeze(-1)
    k = kappa.gather(-1, comp).squeeze(-1)
    theta = von_mises_sample(m, k, generator)
    return torch.remainder(theta / (2 * math.pi), 1.0).float()


def von_mises_sample(
    loc: Tensor, kappa: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Angles from von Mises(loc, kappa) by Best & Fisher's (1979) wrapped-Cauchy rejection in
    float64, only the draws not yet accepted redrawn each round (acceptance >= ~66% for every
    kappa, so a handful of rounds). The uniforms come from ``generator``; the arithmetic is
    numpy's (a few small arrays: torch's per-operation cost would dominate). float64 result."""
    k = kappa.detach().cpu().double().reshape(-1).numpy()
    tau = 1 + np.sqrt(1 + 4 * k * k)
    rho = (tau - np.sqrt(2 * tau)) / (2 * k)
    r = np.where(k < 1e-5, 1 / k + k, (1 + rho * rho) / (2 * rho))  # Taylor for tiny kappa
    out = np.empty_like(k)
    todo = np.arange(k.size)
    while todo.size:
        u = torch.rand((3, todo.size), dtype=torch.float64, generator=generator).numpy()
        rt, kt = r[todo], k[todo]
        z = np.cos(math.pi * u[0])
        f = (1 + rt * z) / (rt + z)
        c = kt * (rt - f)
        with np.errstate(divide="ignore"):  # u = 0 exactly: log(inf), accepted
            ok = (c * (2 - c) > u[1]) | (np.log(c / u[1]) + 1 - c >= 0)
        angle = np.sign(u[2] - 0.5) * np.arccos(np.clip(f, -1.0, 1.0))
        out[todo[ok]] = angle[ok]
        todo = todo[~ok]
    theta = torch.from_numpy(out).view(kappa.shape).to(loc.device)
    return theta + loc.detach().double()


# ---------------------------------------------------------------- lattice
# By crystal-system index: which of (a, b, c, alpha, beta, gamma) are free, and what a parameter
# that is not free equals (NaN: the length a; else the fixed angle in degrees).
LATTICE_USED = torch.tensor(
    [[name in LATTICE_FREE_PARAMS[system] for name in LATTICE_PARAMS] for system in CRYSTAL_SYSTEMS]
)
_FILL = torch.tensor(
    [
        [float("nan") if tie in (None, "a") else tie for tie in LATTICE_TIES[system]]
        for system in CRYSTAL_SYSTEMS
    ]
)


def lattice_used(system: Tensor) -> Tensor:
    return LATTICE_USED.to(system.device)[system].float()


def lattice_transform(num_atoms: Tensor) -> CatTransform:
    """The change of variables (a, b, c, alpha, beta, gamma) -> (log(length / N^(1/3)),
    logit(angle / 180)) as torch transforms: inverse and log-Jacobian come with it."""
    shift = -torch.log(num_atoms.float()).unsqueeze(-1) / 3
    lengths = ComposeTransform([ExpTransform().inv, AffineTransform(shift, 1.0)])
    angles = ComposeTransform([AffineTransform(0.0, 1 / 180.0), SigmoidTransform().inv])
    return CatTransform([lengths, angles], dim=-1, lengths=[3, 3])


def lattice_features(lattice: Tensor, system: Tensor, num_atoms: Tensor) -> tuple[Tensor, Tensor]:
    """Flow features of full lattices and the log-Jacobian over the free parameters (angles
    kept 1e-6 of their range inside (0, 180) so the logit stays finite)."""
    eps = 180.0 * 1e-6
    lattice = torch.cat([lattice[:, :3], lattice[:, 3:].clamp(eps, 180.0 - eps)], dim=-1)
    t = lattice_transform(num_atoms)
    z = t(lattice)
    logdet = (t.log_abs_det_jacobian(lattice, z) * lattice_used(system)).sum(-1)
    return z, logdet


LATTICE_EMBED_DIM = 10


def lattice_embedding_features(lattice: Tensor) -> Tensor:
    """What a site's heads see of a lattice (lattice first): log lengths, cosines of the
    angles, log(volume)/3 and the lengths over volume^(1/3) (the cell's shape)."""
    lengths = lattice[:, :3].clamp(min=1e-3)
    cos = torch.cos(torch.deg2rad(lattice[:, 3:]))
    ca, cb, cg = cos.unbind(-1)
    det = 1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg
    log_v3 = (torch.log(lengths).sum(-1) + 0.5 * torch.log(det.clamp(min=1e-6))) / 3
    return torch.cat(
        [torch.log(lengths), cos, log_v3.unsqueeze(-1), lengths / log_v3.exp().unsqueeze(-1)], -1
    )


def pack_free(z: Tensor, system: Tensor, n: int) -> Tensor:
    """Select the free columns (same count n for every row) in order."""
    used = LATTICE_USED.to(z.device)[system]
    return z[used].view(-1, n)


def unpack_free(zs: Tensor, system: Tensor) -> Tensor:
    """Inverse of ``pack_free``: (B, n) free columns -> (B, 6), zeros elsewhere."""
    out = torch.zeros(len(zs), 6, device=zs.device, dtype=zs.dtype)
    used = LATTICE_USED.to(zs.device)[system]
    out[used] = zs.reshape(-1)
    return out


def lattice_from_features(z: Tensor, system: Tensor, num_atoms: Tensor) -> Tensor:
    """Inverse of the feature map: free features (B, 6) -> full (a, b, c, alpha, beta, gamma),
    the parameters the crystal system ties filled in from ``LATTICE_TIES``."""
    params = lattice_transform(num_atoms).inv(z)
    used = LATTICE_USED.to(z.device)[system]
    fill = _FILL.to(device=z.device, dtype=params.dtype)[system]
    fill = torch.where(fill.isnan(), params[:, :1].expand_as(fill), fill)
    return torch.where(used, params, fill)


def lattice_statistics(data, per_atom: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and std of the lattice features per crystal system (7, 6), from training data.

    ``data`` has ``.lattice`` (N, 6), ``.g`` (N,) and ``.num_atoms`` (N,). Systems with fewer
    than 10 crystals use the statistics of all crystals. ``per_atom=False``: lengths not scaled
    by the atom count (the lattice-first model, which draws the lattice before the atoms).
    """
    system = torch.as_tensor(get_tables().crystal_system.astype("int64"))[torch.as_tensor(data.g)]
    num_atoms = torch.as_tensor(data.num_atoms)
    z, _ = lattice_features(
        torch.as_tensor(data.lattice, dtype=torch.float32),
        system,
        num_atoms if per_atom else torch.ones_like(num_atoms),
    )
    mean = z.mean(0).expand(7, 6).clone()
    std = z.std(0).clamp(min=1e-2).expand(7, 6).clone() if len(z) > 1 else torch.ones(7, 6)
    for s in range(7):
        sel = system == s
        if int(sel.sum()) >= 10:
            mean[s] = z[sel].mean(0)
            std[s] = z[sel].std(0).clamp(min=1e-2)
    return mean, std


# ---------------------------------------------------------------- space group
def element_count_histogram(species: np.ndarray, size: int) -> Tensor:
    """How many training crystals have 0, 1, 2, ... distinct elements (``species``: (N, T)
    atomic numbers, 0 = padding): the prior the sampler can draw each crystal's count from."""
    a = np.asarray(species)
    distinct = np.array([len(set(row[row > 0].tolist())) for row in a], dtype=np.int64)
    return torch.bincount(torch.as_tensor(distinct), minlength=size)[:size].float()


def spacegroup_prior(g: np.ndarray | Tensor, smoothing: float = 0.5) -> Tensor:
    """Log-frequencies of the training space groups (add-``smoothing``): the maximum-likelihood
    P(g) without conditions, a starting point a single logit vector would take thousands of
    optimiser steps to reach."""
    counts = torch.bincount(torch.as_tensor(np.asarray(g), dtype=torch.long), minlength=231)
    counts = counts[:231].float()
    counts[1:] += smoothing
    counts[0] = 0.0
    logp = torch.log(counts / counts.sum())
    logp[0] = 0.0  # index 0 is not a group; masked out in g_logprob
    return logp
