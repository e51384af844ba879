"""E(n)-equivariant continuous normalizing flows (Köhler, Klein, Noé, "Equivariant Flows", ICML 2020).

A CNF transports z ~ p_Z by the ODE dx/dt = v(t, x) from t = 0 to t = 1; the log-density changes
by the divergence of the field (Chen et al. 2018, "instantaneous change of variables"):

    x(1) = z + int_0^1 v(t, x(t)) dt,    log|det dx(1)/dz| = int_0^1 div v(t, x(t)) dt.

Both are integrated together as one augmented state [x, Delta] with dDelta/dt = div v; the inverse
integrates the same ODE from t = 1 to t = 0, which yields log|det dz/dx| = -int div v directly.

Equivariance: v(t, R x + b) = R v(t, x) for every rotation or reflection R and translation b, and
v(t, P x) = P v(t, x) for every permutation P of identical particles. Then the flow commutes with
these maps, and with an invariant prior (the mean-free normal) the density is invariant. Two
fields:

- `PairwiseField`: v_i = sum_{j != i} (x_i - x_j) phi(|x_i - x_j|, t) / (n - 1), the field of the
  paper (the gradient of an invariant pair potential when phi is a derivative); phi is an MLP on
  Gaussian radial features of the distance and t.
- `EGNNField`: layers of an E(n)-equivariant graph network (Satorras, Hoogeboom, Welling 2021):
  m_ij = phi_e(h_i, h_j, |x_i - x_j|^2), x_i <- x_i + sum_j (x_i - x_j) phi_x(m_ij) / ((n - 1)(1 + |x_i - x_j|)),
  h_i <- h_i + phi_h(h_i, sum_j m_ij) (not after the last layer); node features start as an
  embedding of t (the particles are identical); v = x_L - x_0.

Both outputs have their mean over particles removed, and both depend on x only through differences
x_i - x_j, so v is translation invariant: its Jacobian J annihilates the centre-of-mass directions
and maps into the mean-free subspace, J = P J P with P the projector onto it. Hence the trace of J
over all n d coordinates equals its trace on the (n - 1) d dimensional subspace where the flow
lives, and the log-density is exact on that subspace (tests compare it with a brute-force Jacobian
in an orthonormal basis of the subspace).

Divergence: `exact` = tr(J) from the full Jacobian of every sample (torch.func.vmap over
jacrev: one vectorised reverse pass per output coordinate), or `hutchinson` = eps^T J eps with
Rademacher eps (E[eps eps^T] = I, so unbiased), eps drawn anew for every solve and held fixed
within it (the integrand must be one smooth function of t for the ODE solver).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from bgexp.flows._space import as_space
from bgexp.flows.base import Flow
from bgexp.flows.integrators import ODEIntegrator
from bgexp.flows.nn import mlp
from bgexp.spaces import Space, SpaceError

DIVERGENCES = ("exact", "hutchinson")


def _particle_count(n_particles: int | None, spatial_dim: int, dim: int | None) -> int:
    """n from n_particles, or from the flattened width dim = n d (what build_model passes)."""
    if n_particles is None:
        if dim is None or int(dim) % int(spatial_dim):
            raise ValueError(f"give n_particles, or dim divisible by spatial_dim={spatial_dim} (got dim={dim})")
        n_particles = int(dim) // int(spatial_dim)
    if dim is not None and int(dim) != int(n_particles) * int(spatial_dim):
        raise ValueError(f"dim={dim} does not match {n_particles} particles x {spatial_dim} dimensions")
    return int(n_particles)


def _pairs(x: Tensor, n: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Differences x_i - x_j [B, n, n, d], squared distances [B, n, n, 1], off-diagonal mask [n, n, 1]."""
    xyz = x.reshape(x.shape[0], n, d)
    diff = xyz[:, :, None, :] - xyz[:, None, :, :]
    sq = (diff**2).sum(-1, keepdim=True)
    mask = (1.0 - torch.eye(n, dtype=x.dtype, device=x.device))[..., None]
    return diff, sq, mask


def _time_column(t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """t as a [batch, 1] column: a scalar time (an ODE solve) or one time per sample [batch] (flow matching)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1, 1)
    if t.shape[0] not in (1, batch):
        raise ValueError(f"the field needs one time or one per sample ({batch}), got {t.shape[0]}")
    return t.expand(batch, 1)


def _remove_mean(v: Tensor, n: int, d: int) -> Tensor:
    xyz = v.reshape(v.shape[0], n, d)
    return (xyz - xyz.mean(1, keepdim=True)).reshape(v.shape)


class PairwiseField(nn.Module):
    """v_i = sum_{j != i} (x_i - x_j) phi(|x_i - x_j|, t) / (n - 1) (module docstring)."""

    def __init__(self, n_particles: int, spatial_dim: int, hidden: Sequence[int] = (64, 64), n_rbf: int = 32,
                 max_distance: float = 6.0, activation: str = "silu"):
        super().__init__()
        self.n, self.d = int(n_particles), int(spatial_dim)
        self.register_buffer("centres", torch.linspace(0.0, float(max_distance), int(n_rbf)))
        self.width = float(max_distance) / (int(n_rbf) - 1)
        self.phi = mlp(int(n_rbf) + 1, 1, hidden, activation, zero_last=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        diff, sq, mask = _pairs(x, self.n, self.d)
        r = torch.sqrt(sq + 1e-12)
        rbf = torch.exp(-0.5 * ((r - self.centres.to(x)) / self.width) ** 2)
        tt = _time_column(t, x.shape[0], x)[:, None, None, :].expand(*rbf.shape[:-1], 1)
        weight = self.phi(torch.cat([rbf, tt], -1)) * mask
        v = (diff * weight).sum(2) / (self.n - 1)
        return _remove_mean(v.reshape(x.shape), self.n, self.d)


class EGNNField(nn.Module):
    """An E(n)-equivariant graph network as the vector field (module docstring)."""

    def __init__(self, n_particles: int, spatial_dim: int, hidden: int = 64, n_layers: int = 3,
                 activation: str = "silu"):
        super().__init__()
        self.n, self.d, self.hidden = int(n_particles), int(spatial_dim), int(hidden)
        self.time_embedding = mlp(1, self.hidden, (self.hidden,), activation, zero_last=False)
        self.edge = nn.ModuleList(mlp(2 * self.hidden + 1, self.hidden, (self.hidden,), activation, False)
                                  for _ in range(n_layers))
        self.coord = nn.ModuleList(mlp(self.hidden, 1, (self.hidden,), activation, False) for _ in range(n_layers))
        # the node features after the last layer are never read: no update there, so that every
        # parameter reaches the output (the adjoint method requires it)
        self.node = nn.ModuleList(mlp(2 * self.hidden, self.hidden, (self.hidden,), activation, False)
                                  for _ in range(n_layers - 1))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        b, n, d = x.shape[0], self.n, self.d
        tt = _time_column(t, b, x)[:, None, :].expand(b, n, 1)
        h = self.time_embedding(tt)
        pos = x.reshape(b, n, d)
        start = pos
        for layer, (edge, coord) in enumerate(zip(self.edge, self.coord)):
            diff, sq, mask = _pairs(pos.reshape(b, n * d), n, d)
            hi = h[:, :, None, :].expand(b, n, n, self.hidden)
            hj = h[:, None, :, :].expand(b, n, n, self.hidden)
            m = edge(torch.cat([hi, hj, sq], -1)) * mask
            scale = coord(m) / ((n - 1) * (1.0 + torch.sqrt(sq + 1e-12)))
            pos = pos + (diff * scale * mask).sum(2)
            if layer < len(self.node):
                h = h + self.node[layer](torch.cat([h, m.sum(2)], -1))
        return _remove_mean((pos - start).reshape(b, n * d), n, d)


class AugmentedField(nn.Module):
    """The ODE of a CNF solve: d[x, Delta]/dt = [v(t, x), div v(t, x)] as a module (the adjoint
    method differentiates it in its parameters, those of the vector field). `noise` is the
    Hutchinson probe of this solve (None: exact divergence)."""

    def __init__(self, cnf: "EquivariantCNF", noise: Tensor | None):
        super().__init__()
        self.field = cnf.field
        self.noise = noise
        self.chunk_size = cnf.divergence_chunk

    def exact(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        def single(xi: Tensor) -> tuple[Tensor, Tensor]:
            v = self.field(t, xi[None])[0]
            return v, v

        jac, v = torch.func.vmap(torch.func.jacrev(single, has_aux=True), chunk_size=self.chunk_size)(x)
        return v, jac.diagonal(dim1=-2, dim2=-1).sum(-1)

    def hutchinson(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        v, vjp = torch.func.vjp(lambda y: self.field(t, y), x)
        (eps_j,) = vjp(self.noise)
        return v, (eps_j * self.noise).sum(-1)

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        y = state[:, :-1]
        v, div = self.exact(t, y) if self.noise is None else self.hutchinson(t, y)
        return torch.cat([v, div[:, None]], -1)


class EquivariantCNF(Flow):
    """A CNF with an equivariant field on n particles in d dimensions (module docstring).

    `forward(z)` integrates t: 0 -> 1, `inverse(x)` t: 1 -> 0; both return log|det| of their
    direction. `nfe` holds the field evaluations of the last solve (each also computes the
    divergence). `velocity(t, x)` is the bare field (flow matching trains it without a solve).

    divergence: "exact" or "hutchinson" in training mode; eval_divergence: the one used in eval
    mode (sampling and log q for reweighting; None = the same), so a model trained with
    Hutchinson's estimator is still evaluated with exact log-densities.
    sensitivity: "autograd" backpropagates through the solver's operations (memory grows with the
    number of steps); "adjoint" solves the adjoint ODE backwards in time (Chen et al. 2018, through
    torchdyn's adjoint), with memory independent of the steps and gradients exact up to the
    solver tolerance.
    divergence_chunk: samples per vectorised Jacobian in the exact divergence (None: the whole
    batch at once); bounds the memory of the exact divergence, which grows as batch x (n d)^2 x
    the field's pair features (LJ55 needs it).
    Give the particles as `n_particles` (or `dim` = n d) and `spatial_dim` (default 3), or as a
    particle `space` (`bgexp.spaces.Space`; `equivariant_cnf(space, ...)` is the factory).
    """

    def __init__(self, n_particles: int | None = None, spatial_dim: int | None = None, field: str = "egnn", hidden: int = 64,
                 n_layers: int = 3, divergence: str = "exact", solver: str = "dopri5", atol: float = 1e-5,
                 rtol: float = 1e-5, steps: int = 20, max_nfe: int = 100_000, dim: int | None = None,
                 eval_divergence: str | None = None, sensitivity: str = "autograd",
                 divergence_chunk: int | None = None, space: Space | None = None):
        super().__init__()
        if space is not None:
            n_particles, spatial_dim = particles_of(space, "EquivariantCNF", n_particles, spatial_dim, dim)
            dim = None
        spatial_dim = 3 if spatial_dim is None else spatial_dim
        n_particles = _particle_count(n_particles, spatial_dim, dim)
        self.n_particles, self.spatial_dim = n_particles, int(spatial_dim)
        self.dim = self.n_particles * self.spatial_dim
        for name, value in (("divergence", divergence), ("eval_divergence", eval_divergence or divergence)):
            if value not in DIVERGENCES:
                raise ValueError(f"{name} must be one of {DIVERGENCES}, got {value!r}")
        if field == "egnn":
            if int(n_layers) < 1:
                raise ValueError(f"the EGNN field needs n_layers >= 1, got {n_layers}")
            self.field = EGNNField(n_particles, spatial_dim, hidden, n_layers)
        elif field == "pairwise":
            self.field = PairwiseField(n_particles, spatial_dim, (hidden, hidden))
        else:
            raise ValueError(f"field must be 'egnn' or 'pairwise', got {field!r}")
        if divergence_chunk is not None and int(divergence_chunk) < 1:
            raise ValueError(f"divergence_chunk must be >= 1 or None, got {divergence_chunk}")
        self.divergence_chunk = None if divergence_chunk is None else int(divergence_chunk)
        self.divergence = divergence
        self.eval_divergence = eval_divergence or divergence
        self.integrator = ODEIntegrator(solver, atol=atol, rtol=rtol, steps=steps, max_nfe=max_nfe,
                                        sensitivity=sensitivity)
        self.nfe = 0

    # ---------------------------------------------------------------- the field and its divergence

    def velocity(self, t: Tensor | float, x: Tensor) -> Tensor:
        """v(t, x) [B, D] for one time or one time per sample [B]."""
        return self.field(t, x)

    def exact_divergence(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """v(t, x) [B, D] and tr(dv/dx) [B] from the full per-sample Jacobian."""
        return AugmentedField(self, None).exact(t, x)

    def hutchinson_divergence(self, t: Tensor, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """v(t, x) and eps^T (dv/dx) eps for the given noise eps [B, D]."""
        return AugmentedField(self, noise).hutchinson(t, x)

    def active_divergence(self) -> str:
        return self.divergence if self.training else self.eval_divergence

    def _solve(self, x: Tensor, t0: float, t1: float) -> tuple[Tensor, Tensor]:
        self.check_input(x, "input")
        noise = None
        if self.active_divergence() == "hutchinson":  # Rademacher, new for every solve, fixed within it
            noise = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
        state = torch.cat([x, x.new_zeros(x.shape[0], 1)], -1)
        out = self.integrator.integrate(AugmentedField(self, noise), state, t0, t1)
        self.nfe = self.integrator.nfe
        return out[:, :-1], out[:, -1]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve(z, 0.0, 1.0)

    def transport(self, z: Tensor) -> Tensor:
        """x = F(z) without the log-determinant: a solve of the bare field dx/dt = v(t, x), no
        divergence (D times cheaper than `forward` with the exact one), for where only the samples
        matter."""
        self.check_input(z, "input")
        out = self.integrator.integrate(lambda t, x: self.field(t, x), z, 0.0, 1.0)
        self.nfe = self.integrator.nfe
        return out

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve(x, 1.0, 0.0)

    def extra_repr(self) -> str:
        return (f"n_particles={self.n_particles}, spatial_dim={self.spatial_dim}, divergence={self.divergence}, "
                f"eval_divergence={self.eval_divergence}, solver={self.integrator.solver}, "
                f"sensitivity={self.integrator.sensitivity}")


def particles_of(space: Space, family: str, n_particles: int | None = None, spatial_dim: int | None = None,
                 dim: int | None = None) -> tuple[int, int]:
    """(particles, spatial_dim) of a particle space, checked against what is given; SpaceError for a
    space that is not one, or that disagrees."""
    space = as_space(space, family)
    if not space.is_particles:
        raise SpaceError(f"{family} expects a particle space (particles x spatial_dim), got {space.describe()}")
    if space.has_circular or space.is_rigid_bodies:
        raise SpaceError(f"{family} expects particles in R^spatial_dim without circular features or rigid "
                         f"bodies, got {space.describe()}")
    for name, given, actual in (("n_particles", n_particles, space.particles), ("spatial_dim", spatial_dim,
                                                                               space.spatial_dim),
                                ("dim", dim, space.dim)):
        if given is not None and int(given) != actual:
            raise SpaceError(f"{family} expects {name}={given}, but the space has {name}={actual} "
                             f"({space.describe()})")
    return int(space.particles), int(space.spatial_dim)


def equivariant_cnf(space: Space, spatial_dim: int | None = None, field: str = "egnn", hidden: int = 64,
                    n_layers: int = 3, divergence: str = "exact", solver: str = "dopri5", atol: float = 1e-5,
                    rtol: float = 1e-5, steps: int = 20, max_nfe: int = 100_000, eval_divergence: str | None = None,
                    sensitivity: str = "autograd", divergence_chunk: int | None = None) -> EquivariantCNF:
    """EquivariantCNF on a particle space: particles and spatial_dim from the space (`spatial_dim`,
    if given, must match it); SpaceError on a non-particle space."""
    return EquivariantCNF(spatial_dim=spatial_dim, field=field, hidden=hidden, n_layers=n_layers,
                          divergence=divergence, solver=solver, atol=atol, rtol=rtol, steps=steps, max_nfe=max_nfe,
                          eval_divergence=eval_divergence, sensitivity=sensitivity,
                          divergence_chunk=divergence_chunk, space=space)


def subspace_basis(n_particles: int, spatial_dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An orthonormal basis [n d, (n - 1) d] of the mean-free subspace (for tests and diagnostics)."""
    n, d = n_particles, spatial_dim
    centring = torch.eye(n, dtype=dtype) - 1.0 / n
    q, _ = torch.linalg.qr(centring[:, : n - 1])
    return torch.kron(q.contiguous(), torch.eye(d, dtype=dtype))


__all__ = ["EquivariantCNF", "AugmentedField", "EGNNField", "PairwiseField", "equivariant_cnf", "particles_of",
           "subspace_basis", "DIVERGENCES"]
