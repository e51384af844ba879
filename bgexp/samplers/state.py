"""Particle states carried by the kernels, and the geometry of the space they move on.

A `ChainState` is a batch of configurations with the value and gradient of the log-density the
chain targets, plus per-particle auxiliary values (``aux``) that move with the particle through
accept/reject and resampling (the annealed SMC keeps log pi_0, log pi_1 and their gradients there,
so that changing the inverse temperature b or computing incremental weights needs no new
evaluation).

`SpaceGeometry` turns a `bgexp.spaces.Space` into the three operations the kernels need:
``project`` (onto the mean-free subspace of a particle system; identity otherwise), ``wrap``
(circular features into [-pi, pi)) and ``log_kernel`` (the log-density, up to a constant, of an
isotropic Gaussian displacement on that geometry: a wrapped normal on circular features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgexp.samplers.errors import UnsupportedSpaceError
from bgexp.spaces import Space

__all__ = ["ChainState", "SpaceGeometry", "check_space"]

_TWO_PI = 2.0 * math.pi
# wrapped-normal images summed on each side; exact to ~1e-10 relative for step sizes <= pi
_N_IMAGES = 4


@dataclass
class ChainState:
    """A batch of n configurations and the log-density the chain targets there.

    y: [n, d] configurations; log_prob: [n] float64, -inf where the density is not finite (such a
    point is never accepted as a proposal); grad: [n, d] gradient of log_prob w.r.t. y (zero where
    log_prob is -inf), or None when no gradient was asked for; aux: per-particle tensors (first
    dimension n) that travel with the particle.
    """

    y: Tensor
    log_prob: Tensor
    grad: Tensor | None
    aux: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: Tensor) -> "ChainState":
        """The particles at ``index`` (resampling)."""
        return ChainState(self.y[index], self.log_prob[index],
                          None if self.grad is None else self.grad[index],
                          {k: v[index] for k, v in self.aux.items()})

    def where(self, accept: Tensor, proposal: "ChainState") -> "ChainState":
        """Row-wise choice: the proposal's rows where ``accept`` [n] is True, else this state's."""

        def pick(new: Tensor | None, old: Tensor | None) -> Tensor | None:
            if new is None or old is None:
                return None
            mask = accept.view(-1, *([1] * (new.dim() - 1)))
            return torch.where(mask, new, old)

        return ChainState(pick(proposal.y, self.y), pick(proposal.log_prob, self.log_prob),
                          pick(proposal.grad, self.grad),
                          {k: pick(proposal.aux[k], v) for k, v in self.aux.items()})


def check_space(space: Space) -> None:
    """Raise `UnsupportedSpaceError` for a space the kernels cannot move on."""
    if not isinstance(space, Space):
        raise UnsupportedSpaceError(f"expected a bgexp.spaces.Space, got {type(space).__name__}")
    if space.is_rigid_bodies:
        raise UnsupportedSpaceError(
            f"rigid-body space ({space.describe()}): the kernels do not move on S^3 x periodic box; "
            "run the sampler in the flow's latent space instead, or use another kernel")
    if space.box is not None:
        raise UnsupportedSpaceError(f"periodic Cartesian box {list(space.box)} is not supported by the kernels")
    if space.is_particles and space.has_circular:
        raise UnsupportedSpaceError("a particle space with circular features is not supported (mean-free "
                                    "projection and wrapping do not commute)")


class SpaceGeometry:
    """Projection, wrapping and Gaussian displacement densities on a `Space` (see module doc)."""

    def __init__(self, space: Space):
        check_space(space)
        self.space = space
        self.dim = space.dim
        self.particles = space.particles
        self.spatial_dim = space.spatial_dim
        self.circular = space.circular_mask() if space.has_circular else None

    @property
    def has_circular(self) -> bool:
        return self.circular is not None

    def project(self, v: Tensor) -> Tensor:
        """Remove the centre of mass of each configuration (particle spaces); identity otherwise."""
        if self.particles is None:
            return v
        shaped = v.reshape(v.shape[0], self.particles, self.spatial_dim)
        return (shaped - shaped.mean(dim=1, keepdim=True)).reshape(v.shape)

    def wrap(self, y: Tensor) -> Tensor:
        """Circular features into [-pi, pi); the others unchanged."""
        if self.circular is None:
            return y
        mask = self.circular.to(y.device)
        wrapped = _wrap_angle(y)
        return torch.where(mask, wrapped, y)

    def prepare(self, y: Tensor) -> Tensor:
        """A configuration placed on the space: mean-free and wrapped."""
        return self.wrap(self.project(y))

    def log_kernel(self, diff: Tensor, step: float) -> Tensor:
        """log N(diff; 0, step^2 I) per row up to a constant that depends only on ``step``; on the
        circular features the wrapped normal sum_k N(diff + 2 pi k; 0, step^2) (k = -4..4).
        On a particle space ``diff`` is mean-free and the density is that on the mean-free
        subspace (the constant differs, the ratio of two such densities does not)."""
        sq = diff.pow(2) / (2.0 * step * step)
        if self.circular is None:
            return -sq.sum(dim=1).double()
        mask = self.circular.to(diff.device)
        lin = -(sq * (~mask)).sum(dim=1)
        d = _wrap_angle(diff[:, mask]).double()
        k = torch.arange(-_N_IMAGES, _N_IMAGES + 1, device=diff.device, dtype=torch.float64) * _TWO_PI
        circ = torch.logsumexp(-(d.unsqueeze(-1) + k).pow(2) / (2.0 * step * step), dim=-1).sum(dim=1)
        return lin.double() + circ


def _wrap_angle(a: Tensor) -> Tensor:
    w = torch.remainder(a + math.pi, _TWO_PI) - math.pi
    return torch.where(w >= math.pi, w - _TWO_PI, w)
