"""P(L | context): the lattice's conditional normalizing flow, its density and its draws.

The lattice has only the free parameters of its crystal system (``LATTICE_FREE_PARAMS``):
log(length / N^(1/3)) and logit(angle / 180 deg), standardised with training statistics, go
through a conditional neural spline flow (zuko), one per number of free parameters. The density
is reported in Angstrom and degrees (the change of variables' Jacobians included), and sampling
runs the same flow backwards, so what ``log_prob`` scores is what ``sample`` draws.
"""

from __future__ import annotations

import torch
import zuko
from torch import Tensor, nn

from crystal_gpt.model.distributions import (
    LATTICE_DIMS,
    lattice_features,
    lattice_from_features,
    lattice_used,
    pack_free,
    unpack_free,
)


class LatticeFlow(nn.Module):
    """One NSF per number of free lattice parameters, conditioned on a d-vector context.

    ``per_atom``: lengths are divided by N^(1/3) before the flow (the lattice is drawn last,
    when the atom count is known); without it (lattice first) they are modelled as they are.
    """

    def __init__(self, context: int, transforms: int, hidden: int, per_atom: bool) -> None:
        super().__init__()
        self.per_atom = per_atom
        self.flows = nn.ModuleDict(
            {
                str(n): zuko.flows.NSF(
                    features=n,
                    context=context,
                    transforms=transforms,
                    hidden_features=[hidden, hidden],
                )
                for n in sorted(set(LATTICE_DIMS))
            }
        )
        # standardisation of the transformed parameters per crystal system, set from training
        self.register_buffer("mean", torch.zeros(7, 6))
        self.register_buffer("std", torch.ones(7, 6))

    def scale(self, num_atoms: Tensor | None, like: Tensor) -> Tensor:
        """The atom counts lengths are scaled by (ones when not ``per_atom``, or not known)."""
        if num_atoms is None:
            return torch.ones_like(like)
        return num_atoms if self.per_atom else torch.ones_like(num_atoms)

    def standardise(
        self, lattice: Tensor, system: Tensor, num_atoms: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Full (a,b,c,al,be,ga) -> standardised free parameters (B, 6, zero-padded) and
        log|det d(standardised)/d(free params)| (B,)."""
        z, logdet = lattice_features(lattice, system, self.scale(num_atoms, system))
        std = self.std[system]
        z = (z - self.mean[system]) / std
        used = lattice_used(system)
        return z * used, logdet - (torch.log(std) * used).sum(-1)

    def log_prob(
        self, ctx: Tensor, lattice: Tensor, system: Tensor, num_atoms: Tensor, noise: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Log density of the lattices (Jacobians included) and, if asked, their base noise
        ((B, 6), zero-padded; independent standard normals when lattices follow the model)."""
        z, logdet = self.standardise(lattice, system, num_atoms)
        dims = torch.as_tensor(LATTICE_DIMS, device=system.device)[system]
        lp = torch.zeros(len(system), device=system.device)
        eps = torch.zeros(len(system), 6, device=system.device)
        for n, flow in self.flows.items():
            sel = dims == int(n)
            if sel.any():
                zs = pack_free(z[sel], system[sel], int(n))
                dist = flow(ctx[sel])
                lp[sel] = dist.log_prob(zs)
                if noise:
                    eps[sel, : int(n)] = dist.transform(zs)
        return lp + logdet, eps

    def sample(self, ctx: Tensor, system: Tensor, num_atoms: Tensor | None) -> Tensor:
        """One lattice per context, (B, 6) in Angstrom and degrees."""
        dims = torch.as_tensor(LATTICE_DIMS, device=system.device)[system]
        z = torch.zeros(len(system), 6, device=system.device)
        for n, flow in self.flows.items():
            sel = dims == int(n)
            if sel.any():
                z[sel] = unpack_free(flow(ctx[sel]).sample(), system[sel])
        z = z * self.std[system] + self.mean[system]
        return lattice_from_features(z, system, self.scale(num_atoms, system))
