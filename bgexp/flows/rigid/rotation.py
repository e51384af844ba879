"""Conditional rotation transforms on S^3/{+-1} (Köhler, Invernizzi, de Haan, Noé, "Rigid Body Flows
for Sampling Molecular Crystal Structures", ICML 2023).

Rotations are unit quaternions up to sign (bgexp/quaternions.py), so a flow on orientations must be
a diffeomorphism of S^3 that commutes with q -> -q. The transforms here are *conditional*: every
parameter comes from a raw tensor p [..., P] produced by a conditioner network (for instance from
the positions of the rigid bodies), and the module holds no trainable parameters of its own.

**Convex potential.** On R^4, with K components,

    phi(x) = 1/2 |L x|^2 + sum_{k=1..K} w_k 1/2 ||A_k x||_4^2,       ||y||_4^2 = (sum_m y_m^4)^(1/2),

where L and A_k are lower-triangular 4 x 4 with positive diagonals (softplus + min_diag, so both are
invertible) and w_k >= 0 (softplus). Each term is the square of a norm of a linear image of x, hence
convex, even (phi(-x) = phi(x)) and 2-homogeneous (phi(t x) = t^2 phi(x)); the first term is a
positive definite quadratic, so phi is strictly (indeed strongly) convex. With y = A_k x,
s = sum_m y_m^4 > 0 (A_k invertible, x != 0) and u = y^3 / s^(1/2) (elementwise cube),

    g(x) = grad phi(x) = L^T L x + sum_k w_k A_k^T u_k,
    H(x) = hess phi(x) = L^T L + sum_k w_k A_k^T [3 diag(y_k^2) - 2 u_k u_k^T] A_k / s_k^(1/2),

smooth on R^4 minus the origin. H is positive definite (H >= L^T L) and the bracket is positive
semi-definite with eigenvalues <= 3 s^(1/2) (y_m^2 <= s^(1/2)). g is odd and 1-homogeneous
(g(t x) = t g(x) for t > 0), H is even and 0-homogeneous, and H(x) x = g(x) (Euler).

**The map.** Phi(q) = g(q) / |g(q)|. Why it is a diffeomorphism of S^3: the level set
S_c = {phi = c} (c > 0) of a 2-homogeneous strictly convex function is a smooth closed strictly
convex hypersurface (grad phi != 0 on it, x . g(x) = 2 c > 0) with positive definite second
fundamental form (H restricted to its tangent spaces, over |g|), so its Gauss map x -> g(x)/|g(x)|
is a diffeomorphism S_c -> S^3 (Hadamard's theorem on ovaloids). The radial projection
q -> q / (2 phi(q) / c)^(1/2) from S^3 onto S_c is a diffeomorphism (every ray meets S_c once,
transversally, since x . g = 2 c > 0), and g / |g| is constant along rays (1-homogeneity of g), so
Phi restricted to S^3 is the composition of the two: a diffeomorphism of S^3. Oddness of g gives
Phi(-q) = -Phi(q), so Phi is well defined on rotations S^3/{+-1}.

Optionally the result is left-multiplied by a conditioned unit quaternion r, q -> r * q (an
isometry of S^3 with log-det 0 that also commutes with the sign flip), r = normalize(raw_r + (1, 0, 0, 0)).

**Log-determinant.** On R^4 minus 0, dPhi = (I - n n^T) H / |g| with n = g/|g|. With orthonormal bases
E_in = tangent_basis(q) of T_q S^3 and E_out = tangent_basis(n) of T_n S^3 (E_out^T n = 0),

    log|det dPhi|_{T_q S^3}| = log|det(E_out^T H(q) E_in)| - 3 log|g(q)|,

the log-density change w.r.t. the Riemannian volume of S^3 (the uniform measure up to a constant).

**Raw parameters.** p = [L (10) | w (K) | A_1 ... A_K (10 each) | r (4, when `rotation`)], so
P = 10 + 11 K (+ 4). A triangle's 10 entries fill the lower triangle row by row
(torch.tril_indices(4, 4) order); diagonal entries map through softplus(raw + c) + min_diag with c
such that raw = 0 gives 1, off-diagonals are raw. w_k = softplus(raw + log(expm1(init_weight))),
so raw = 0 gives w_k = init_weight. All-zero raw parameters give L = A_k = I, r = 1 and
g(q) = q + sum_k w_k q^3 / ||q||_4^2 with |q^3| / ||q||_4^2 <= max_m |q_m| <= 1, hence
|Phi(q) - q| <= 2 K init_weight on S^3: the identity up to that bound (a smooth non-negative weight
cannot vanish at raw = 0 with a non-zero derivative, so an exact identity would freeze w).

**Inverse.** Given n (after undoing r), Phi(x / |x|) = n for the x with g(x) = n, the unique
minimiser of the strongly convex F(x) = phi(x) - n . x. `solve_gradient_equation` finds it in
float64 by damped Newton (step -H^{-1}(g - n), backtracking on F with the Armijo rule) from the
minimiser of F on the ray through n, x_0 = n / (2 phi(n)). Every iterate has F(x) <= F(x_0) < 0 = F(0),
so it stays away from the origin where H is discontinuous. It stops when
|g(x) - n| <= tol max(1, ||H(x)||_F |x|) (tol = 1e-12: relative to the size of the terms of g,
which is 1e-12 absolute for moderate parameters), then takes one more full Newton step (quadratic
convergence: the root to rounding level even where H is ill-conditioned), and raises
`RotationInversionError` on non-finite inputs or parameters, when the line search fails (30
halvings without decrease: impossible for a consistent g and H), or after `max_iter` iterations.
Gradients follow the implicit function theorem, not the iterations: with x* the root (no graph) and H* = H(x*) (no graph),

    x = x* - H*^{-1} (g(x*; theta) - n)

has the value x* (up to one more Newton correction, below tol) and the exact first derivatives
dx/dn = H*^{-1} and dx/dtheta = -H*^{-1} dg/dtheta. The code subtracts the detached residual from
g(x*) - n, so the returned value is exactly the float64 root (rounded to the input dtype: for
float32 inputs a float32 evaluation of g(x*) - n would only add rounding noise, amplified by
H^{-1}) and the derivatives are the same. Then q = x / |x| and the inverse log-det is minus
the forward log-det at q (differentiable through q and theta). Second derivatives through the root
are not exact (they miss the curvature terms), as in bgexp/flows/torus.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgexp.quaternions import conjugate, multiply, normalize, tangent_basis

_TRIL = torch.tril_indices(4, 4)  # [2, 10], row by row
_N_TRI = 10


def _triangle_selection() -> tuple[Tensor, Tensor]:
    """The one-hot [10, 16] map from the 10 lower-triangle entries to a flat 4 x 4 matrix, and the
    bool mask [10] of diagonal entries."""
    select = torch.zeros(_N_TRI, 16, dtype=torch.float64)
    select[torch.arange(_N_TRI), _TRIL[0] * 4 + _TRIL[1]] = 1.0
    return select, _TRIL[0] == _TRIL[1]


_SELECT, _IS_DIAG = _triangle_selection()


def _lower_triangular(raw: Tensor, min_diag: float) -> Tensor:
    """Lower-triangular [..., 4, 4] from raw [..., 10]: diagonal softplus(raw + c) + min_diag (1 at
    raw = 0), off-diagonal raw."""
    shift = math.log(math.expm1(1.0 - min_diag))
    diag_mask = _IS_DIAG.to(raw.device)
    entries = torch.where(diag_mask, F.softplus(raw + shift) + min_diag, raw)
    flat = entries @ _SELECT.to(dtype=raw.dtype, device=raw.device)
    return flat.reshape(*raw.shape[:-1], 4, 4)


def n_rotation_params(n_components: int, rotation: bool = True) -> int:
    """P = 10 + 11 K (+ 4 for the left multiplication)."""
    return _N_TRI + (1 + _N_TRI) * int(n_components) + (4 if rotation else 0)


@dataclass
class ConvexRotationParams:
    """Constrained parameters: L [..., 4, 4], w [..., K], A [..., K, 4, 4], r [..., 4] or None."""

    chol: Tensor
    weights: Tensor
    mixers: Tensor
    rotation: Tensor | None

    @property
    def n_components(self) -> int:
        return int(self.weights.shape[-1])

    @classmethod
    def from_raw(cls, raw: Tensor, n_components: int, rotation: bool = True, min_diag: float = 0.1,
                 init_weight: float = 1e-3) -> "ConvexRotationParams":
        """From unconstrained raw [..., P] (module docstring: layout, and raw = 0 near the identity)."""
        k = int(n_components)
        expected = n_rotation_params(k, rotation)
        if raw.shape[-1] != expected:
            raise ValueError(f"a {k}-component convex rotation{' with left multiplication' if rotation else ''} "
                             f"needs raw parameters of shape [..., {expected}], got {tuple(raw.shape)}")
        chol = _lower_triangular(raw[..., :_N_TRI], min_diag)
        weights = F.softplus(raw[..., _N_TRI:_N_TRI + k] + math.log(math.expm1(init_weight)))
        mix_raw = raw[..., _N_TRI + k:_N_TRI + k + _N_TRI * k].reshape(*raw.shape[:-1], k, _N_TRI)
        mixers = _lower_triangular(mix_raw, min_diag)
        r = None
        if rotation:
            one = torch.zeros(4, dtype=raw.dtype, device=raw.device)
            one[0] = 1.0
            r = normalize(raw[..., -4:] + one)
        return cls(chol, weights, mixers, r)

    def detached(self, dtype: torch.dtype = torch.float64) -> "ConvexRotationParams":
        """A copy without autograd graph in `dtype` (for the root finder)."""
        def cast(t):
            return None if t is None else t.detach().to(dtype)
        return ConvexRotationParams(cast(self.chol), cast(self.weights), cast(self.mixers), cast(self.rotation))

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.chol, self.weights, self.mixers, self.rotation)
                   if t is not None)


def convex_potential(x: Tensor, params: ConvexRotationParams | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """phi(x) [...], its gradient g(x) [..., 4] and Hessian H(x) [..., 4, 4] (module docstring), for
    x [..., 4] != 0 broadcast against the parameters. `params` is a `ConvexRotationParams` or a raw
    tensor [..., 10 + 11 K] (no left multiplication; K read from the width; default settings)."""
    if not isinstance(params, ConvexRotationParams):
        width = params.shape[-1]
        if (width - _N_TRI) % (1 + _N_TRI) != 0 or width < _N_TRI:
            raise ValueError(f"raw potential parameters must have shape [..., 10 + 11 K], got {tuple(params.shape)}")
        params = ConvexRotationParams.from_raw(params, (width - _N_TRI) // (1 + _N_TRI), rotation=False)
    chol, w, mix = params.chol, params.weights, params.mixers
    lx = (chol @ x[..., None])[..., 0]
    phi = 0.5 * (lx * lx).sum(-1)
    grad = (chol.transpose(-1, -2) @ lx[..., None])[..., 0]
    hess = chol.transpose(-1, -2) @ chol
    if params.n_components:
        y = (mix @ x[..., None, :, None])[..., 0]          # [..., K, 4]
        y2 = y * y
        root = (y2 * y2).sum(-1).sqrt()                    # s^(1/2) = ||y||_4^2, [..., K]
        u = y2 * y / root[..., None]
        phi = phi + 0.5 * (w * root).sum(-1)
        grad = grad + (w[..., None] * (mix.transpose(-1, -2) @ u[..., None])[..., 0]).sum(-2)
        inner = (3.0 * torch.diag_embed(y2) - 2.0 * u[..., :, None] * u[..., None, :]) / root[..., None, None]
        hess = hess + (w[..., None, None] * (mix.transpose(-1, -2) @ inner @ mix)).sum(-3)
    return phi, grad, hess


class RotationInversionError(RuntimeError):
    """The inverse of a convex rotation did not converge (non-finite parameters or inputs, or too
    few iterations)."""


@torch.no_grad()
def solve_gradient_equation(n: Tensor, params: ConvexRotationParams, tol: float = 1e-12,
                            max_iter: int = 50, max_halvings: int = 30) -> tuple[Tensor, Tensor]:
    """x [..., 4] with g(x) = n, in float64, by damped Newton (module docstring), and the number of
    Newton steps each element took [...]. Raises `RotationInversionError`, never hangs."""
    p = params.detached(torch.float64)
    n = n.detach().double()
    if not (torch.isfinite(n).all() and p.all_finite()):
        raise RotationInversionError("non-finite inputs or transform parameters in the inverse of a convex rotation")
    phi_n, _, _ = convex_potential(n, p)
    x = n / (2.0 * phi_n[..., None])  # minimiser of F(t n) = t^2 phi(n) - t |n|^2 for |n| = 1
    x = x * (n * n).sum(-1, keepdim=True)  # exact for any |n| > 0
    iterations = torch.zeros(n.shape[:-1], dtype=torch.long, device=n.device)
    converged = torch.zeros(n.shape[:-1], dtype=torch.bool, device=n.device)
    residual_norm = None
    for _ in range(max_iter + 1):
        phi, g, hess = convex_potential(x, p)
        residual = g - n
        residual_norm = residual.norm(dim=-1)
        scale = (hess.flatten(-2).norm(dim=-1) * x.norm(dim=-1)).clamp_min(1.0)
        if not torch.isfinite(residual_norm).all():
            raise RotationInversionError("the inverse of a convex rotation produced non-finite iterates")
        converged = residual_norm <= tol * scale
        if converged.all():
            # one more full Newton step (not counted): inside the quadratic region it takes the root
            # to rounding level, which matters where H is ill-conditioned (x error ~ H^{-1} residual)
            polished = x - torch.linalg.solve(hess, residual[..., None])[..., 0]
            return torch.where(torch.isfinite(polished), polished, x), iterations
        if int(iterations.max()) >= max_iter:
            break
        step = -torch.linalg.solve(hess, residual[..., None])[..., 0]
        objective = phi - (n * x).sum(-1)
        slope = (residual * step).sum(-1)  # -(Newton decrement)^2 < 0
        # Armijo backtracking; the slack of a few ulps of F lets full steps through near the root,
        # where the decrease of F is below rounding
        slack = 64.0 * torch.finfo(torch.float64).eps * objective.abs()
        t = torch.ones_like(objective)
        pending = ~converged
        for _ in range(max_halvings):
            trial = x + t[..., None] * step
            phi_trial, _, _ = convex_potential(trial, p)
            accept = phi_trial - (n * trial).sum(-1) <= objective + 1e-4 * t * slope + slack
            pending = pending & ~accept
            if not pending.any():
                break
            t = torch.where(pending, 0.5 * t, t)
        if pending.any():  # a Newton direction of a convex F always descends: something is broken
            raise RotationInversionError(
                f"the line search in the inverse of a convex rotation failed for {int(pending.sum())} of "
                f"{pending.numel()} values (largest residual {float(residual_norm.max()):.3g})")
        x = torch.where(converged[..., None], x, x + t[..., None] * step)
        iterations = iterations + (~converged).long()
    left = int((~converged).sum())
    raise RotationInversionError(
        f"the inverse of a convex rotation did not converge in {max_iter} Newton iterations "
        f"({left} of {converged.numel()} values left, largest residual {float(residual_norm.max()):.3g})")


class ConvexRotation(nn.Module):
    """The conditional diffeomorphism q -> r * g(q)/|g(q)| of S^3/{+-1} (module docstring).

    No trainable parameters: `forward(q, params)` and `inverse(q_out, params)` take unit quaternions
    [..., 4] and raw parameters [..., n_params] with the same leading shape (from a conditioner
    whose zero-initialised last layer gives a map within 2 K init_weight of the identity), and
    return the transformed quaternions and log|det| [...] w.r.t. the volume of S^3.
    """

    def __init__(self, n_components: int = 2, rotation: bool = True, min_diag: float = 0.1,
                 init_weight: float = 1e-3, tol: float = 1e-12, max_iter: int = 50):
        super().__init__()
        if int(n_components) != n_components or n_components < 0:
            raise ValueError(f"n_components must be an integer >= 0, got {n_components}")
        if not 0.0 < min_diag < 1.0:
            raise ValueError(f"min_diag must be in (0, 1), got {min_diag}")
        if not init_weight > 0.0:
            raise ValueError(f"init_weight must be > 0, got {init_weight}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.n_components, self.rotation = int(n_components), bool(rotation)
        self.min_diag, self.init_weight = float(min_diag), float(init_weight)
        self.tol, self.max_iter = float(tol), int(max_iter)

    @property
    def n_params(self) -> int:
        """P = 10 + 11 K + 4 (without the left multiplication: 10 + 11 K)."""
        return n_rotation_params(self.n_components, self.rotation)

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, rotation={self.rotation}, min_diag={self.min_diag}, "
                f"init_weight={self.init_weight}")

    def _check(self, q: Tensor, params: Tensor, name: str) -> None:
        if q.dim() < 1 or q.shape[-1] != 4:
            raise ValueError(f"ConvexRotation expects {name} of shape [..., 4], got {tuple(q.shape)}")
        expected = (*q.shape[:-1], self.n_params)
        if tuple(params.shape) != expected:
            raise ValueError(f"ConvexRotation(n_components={self.n_components}) expects params of shape "
                             f"{list(expected)} (the leading shape of {name}, then n_params={self.n_params}), "
                             f"got {tuple(params.shape)}")

    def params(self, raw: Tensor) -> ConvexRotationParams:
        """The constrained parameters of raw [..., n_params]."""
        return ConvexRotationParams.from_raw(raw, self.n_components, self.rotation, self.min_diag, self.init_weight)

    @staticmethod
    def _phi(q: Tensor, p: ConvexRotationParams) -> tuple[Tensor, Tensor]:
        """Phi(q) = g/|g| and log|det dPhi| on tangent spaces (without r)."""
        _, g, hess = convex_potential(q, p)
        norm = g.norm(dim=-1)
        n = g / norm[..., None]
        reduced = tangent_basis(n).transpose(-1, -2) @ hess @ tangent_basis(q)
        logdet = torch.linalg.slogdet(reduced).logabsdet - 3.0 * torch.log(norm)
        return n, logdet

    def forward(self, q: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """(r * Phi(q), log|det|) for unit q [..., 4]."""
        self._check(q, params, "q")
        p = self.params(params.to(q.dtype))
        n, logdet = self._phi(q, p)
        if p.rotation is not None:
            n = multiply(p.rotation, n)
        return n, logdet

    def inverse(self, q_out: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """(q, log|det dq/dq_out|) with forward(q) = q_out, by root finding with implicit gradients."""
        self._check(q_out, params, "q_out")
        p = self.params(params.to(q_out.dtype))
        n = q_out if p.rotation is None else multiply(conjugate(p.rotation), q_out)
        x_root, _ = solve_gradient_equation(n, p, self.tol, self.max_iter)
        x_root = x_root.to(q_out.dtype)
        _, g, hess = convex_potential(x_root, p)
        residual = g - n
        # value: the float64 root (the residual is <= tol there; in float32 it would only add rounding
        # noise amplified by H^{-1}); first derivatives: exact, by the implicit function theorem
        correction = torch.linalg.solve(hess.detach(), (residual - residual.detach())[..., None])[..., 0]
        q = normalize(x_root - correction)
        _, logdet = self._phi(q, p)
        return q, -logdet


__all__ = ["ConvexRotation", "ConvexRotationParams", "RotationInversionError", "convex_potential", "n_rotation_params",
           "solve_gradient_equation"]
