"""Flow matching for continuous flows, with equivariant optimal-transport alignment.

Flow matching (Lipman et al., ICLR 2023; Tong et al., TMLR 2024) trains the vector field v(t, x) of a
continuous flow by regression instead of maximum likelihood, with no ODE solve in training. Pair
a prior sample x0 ~ p_Z with a data sample x1 ~ rho, interpolate

    x_t = (1 - t) x0 + t x1 + sigma eps,    t ~ U(0, 1),  eps ~ N(0, I) (mean-free for particles),

and regress the field onto the conditional velocity u_t = x1 - x0:

    L_FM = E_{t, x0, x1, eps} mean_i (v_i(t, x_t) - u_{t,i})^2.

Its minimiser is the marginal field whose flow carries p_Z at t = 0 to rho at t = 1, which is the
direction of `EquivariantCNF.forward`; the likelihood for reweighting still comes from the ODE with
the divergence, at evaluation only.

Equivariant alignment (Klein, Kraemer, Noe, "Equivariant flow matching", NeurIPS 2023): when the
target is invariant under rotations and permutations of identical particles, g x1 is as good a data
sample as x1 for any such g. Replacing x1 by the g that brings it closest to x0 shortens and
straightens the paths, so the learned field needs fewer function evaluations. Per pair we minimise
|x0 - g x1|^2 over g = (R, P) by alternating a Hungarian assignment of particles (the best P for
the current R) and Kabsch's rotation (the best R for that P) for `alignment_iterations` rounds
(no round increases the cost), from several starting rotations (none, and those aligning the
principal axes of x1 with those of x0), keeping the best. Options:

- `alignment`: "none", "rotation" (Kabsch only), "permutation" (Hungarian only) or "equivariant"
  (both, alternating);
- `batch_ot`: first re-pair the batch by a Hungarian assignment on the squared distances
  |x0_a - x1_b|^2 (minibatch OT, Tong et al.). The paper's equivariant OT uses the aligned distance
  in this cost, which needs B^2 alignments per batch; we align only the chosen pairs (B
  alignments), an approximation that keeps a training step cheap.

The assignments run in scipy (`linear_sum_assignment`) on detached CPU copies; they choose the
pairing and do not enter the gradient.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from bgexp.flows.base import ContinuousFlow
from bgexp.geometry import optimal_rotation
from bgexp.training.losses import BoltzmannGenerator

ALIGNMENTS = ("none", "rotation", "permutation", "equivariant")


def _mean_free(x: Tensor, n: int, d: int) -> Tensor:
    """Flattened configurations [B, n d] with each centre of mass removed."""
    xyz = x.reshape(x.shape[0], n, d)
    return (xyz - xyz.mean(1, keepdim=True)).reshape(x.shape)


def match_batch(x0: Tensor, x1: Tensor) -> Tensor:
    """The permutation pi of the batch minimising sum_a |x0_a - x1_pi(a)|^2 (minibatch OT); returns x1[pi]."""
    cost = torch.cdist(x0.detach().double().cpu(), x1.detach().double().cpu()) ** 2
    _, columns = linear_sum_assignment(cost.numpy())
    return x1[torch.as_tensor(columns, device=x1.device)]


def _assign_particles(x0: Tensor, x1: Tensor) -> Tensor:
    """Per sample, the particle order of x1 [B, n, d] closest to x0 (Hungarian on pair distances)."""
    cost = (torch.cdist(x0.detach().double().cpu(), x1.detach().double().cpu()) ** 2).numpy()
    order = np.stack([linear_sum_assignment(c)[1] for c in cost])
    index = torch.as_tensor(order, device=x1.device)[..., None].expand_as(x1)
    return torch.gather(x1, 1, index)


def _principal_axis_starts(p0: Tensor, p1: Tensor) -> list[Tensor]:
    """Starting rotations [B, d, d] that map the principal axes of each x1 onto those of its x0,
    one per choice of axis signs with determinant +1 (2^(d-1) of them)."""
    d = p0.shape[-1]
    _, e0 = torch.linalg.eigh(p0.transpose(1, 2) @ p0)
    _, e1 = torch.linalg.eigh(p1.transpose(1, 2) @ p1)
    starts = []
    for code in range(2**d):
        signs = torch.tensor([-1.0 if code >> k & 1 else 1.0 for k in range(d)], dtype=p0.dtype, device=p0.device)
        rot = e0 @ torch.diag(signs) @ e1.transpose(1, 2)
        rot = torch.where(torch.linalg.det(rot)[:, None, None] > 0, rot, torch.full_like(rot, float("nan")))
        starts.append(rot)
    return starts


def _cost(p0: Tensor, p1: Tensor) -> Tensor:
    return ((p0 - p1) ** 2).sum((1, 2))


def align_to(x0: Tensor, x1: Tensor, n_particles: int, spatial_dim: int, alignment: str = "equivariant",
             iterations: int = 3) -> Tensor:
    """g x1 for the g in the chosen group closest to x0, per pair (module docstring).

    x0, x1: flattened mean-free configurations [B, n d]. Returns a tensor of the shape of x1; its
    rows are rotated and/or permuted copies of the rows of x1, so every pairwise distance of a
    configuration is unchanged, and no row is farther from its x0 than before.

    "equivariant" alternates assignment and rotation from several starts (no rotation, and the
    rotations that align the principal axes of x1 with those of x0, one per sign choice), and
    keeps the best result of each pair: alternation from no rotation alone stalls in local
    minima when x1 is x0 rotated by a large angle.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if alignment == "none":
        return x1
    if iterations < 1:
        raise ValueError(f"alignment needs iterations >= 1, got {iterations}")
    b = x0.shape[0]
    p0 = x0.reshape(b, n_particles, spatial_dim)
    p1 = x1.reshape(b, n_particles, spatial_dim)
    if alignment == "permutation":
        return _assign_particles(p0, p1).reshape(x1.shape)
    if alignment == "rotation":
        return (p1 @ optimal_rotation(p1.detach(), p0.detach()).transpose(1, 2)).reshape(x1.shape)
    best, best_cost = p1, _cost(p0, p1).detach()
    identity = torch.eye(spatial_dim, dtype=p1.dtype, device=p1.device).expand(b, -1, -1)
    for start in [identity, *_principal_axis_starts(p0.detach(), p1.detach())]:
        valid = torch.isfinite(start).all(-1).all(-1)
        if not valid.any():
            continue
        current = p1 @ torch.where(valid[:, None, None], start, identity).transpose(1, 2)
        for _ in range(iterations):
            current = _assign_particles(p0, current)
            current = current @ optimal_rotation(current.detach(), p0.detach()).transpose(1, 2)
        cost = torch.where(valid, _cost(p0, current).detach(), torch.full_like(best_cost, float("inf")))
        better = cost < best_cost
        best = torch.where(better[:, None, None], current, best)
        best_cost = torch.where(better, cost, best_cost)
    return best.reshape(x1.shape)


class FlowMatchingLoss:
    """L_FM = mean (v(t, x_t) - (x1 - x0))^2 on prior/data pairs (module docstring).

    sigma: the width of the Gaussian path around the straight line (0 gives the rectified path);
    alignment, batch_ot, alignment_iterations: the optimal-transport pairing. Works with any flow
    that exposes its field as `velocity(t, x)` (the continuous flows); for particle flows the noise
    is made mean-free like the prior and the data.
    """

    needs_data = True
    force_weight = 0.0

    def __init__(self, sigma: float = 0.01, alignment: str = "none", batch_ot: bool = False,
                 alignment_iterations: int = 3):
        if sigma < 0:
            raise ValueError(f"flow matching needs sigma >= 0, got {sigma}")
        if alignment not in ALIGNMENTS:
            raise ValueError(f"loss.alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if alignment_iterations < 1:
            raise ValueError(f"loss.alignment_iterations must be >= 1, got {alignment_iterations}")
        self.sigma, self.alignment, self.batch_ot = float(sigma), alignment, bool(batch_ot)
        self.alignment_iterations = int(alignment_iterations)

    @staticmethod
    def _particles(bg: "BoltzmannGenerator") -> tuple[int | None, int | None]:
        """(particles, spatial dimension) of the target's space; (None, None) when it has no particles."""
        space = bg.target.space
        return space.particles, space.spatial_dim

    def pairs(self, bg: "BoltzmannGenerator", x1: Tensor) -> tuple[Tensor, Tensor]:
        """Prior samples x0 and the data x1, re-paired and aligned as configured."""
        x0 = bg.prior.sample(x1.shape[0], generator=bg.latent_generator).to(x1)
        n, d = self._particles(bg)
        if n is not None:  # the data live on the mean-free subspace, like the prior
            x1 = _mean_free(x1, n, d)
        if self.batch_ot:
            x1 = match_batch(x0, x1)
        if self.alignment != "none":
            if n is None:
                raise ValueError(f"loss.alignment={self.alignment!r} needs a particle system (n_particles, "
                                 f"spatial_dim); {type(bg.target).__name__} is none: use alignment=none")
            x1 = align_to(x0, x1, n, d, self.alignment, self.alignment_iterations)
        return x0, x1

    def noise(self, bg: "BoltzmannGenerator", like: Tensor) -> Tensor:
        eps = torch.randn(like.shape, generator=bg.latent_generator, device=like.device, dtype=like.dtype)
        n, d = self._particles(bg)
        if n is not None:
            eps = _mean_free(eps, n, d)
        return eps

    def __call__(self, bg: "BoltzmannGenerator", x: Tensor | None, step: int,
                 forces: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        if x is None:
            raise ValueError("flow matching needs data batches")
        if not isinstance(bg.flow, ContinuousFlow):
            raise ValueError(f"flow matching needs a continuous flow with a vector field (velocity(t, x)); "
                             f"{type(bg.flow).__name__} has none: use loss=nll, kl or joint")
        x0, x1 = self.pairs(bg, x)
        t = torch.rand(x.shape[0], generator=bg.latent_generator, device=x.device, dtype=x.dtype)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        if self.sigma > 0:
            xt = xt + self.sigma * self.noise(bg, x)
        target = x1 - x0
        loss = ((bg.flow.velocity(t, xt) - target) ** 2).mean()
        return loss, {"flow_matching": float(loss.detach()), "flow_matching/path_length": float(target.detach().norm(dim=-1).mean())}


__all__ = ["FlowMatchingLoss", "align_to", "match_batch", "ALIGNMENTS"]
