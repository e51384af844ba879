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

**Rigid-body flow.** `RigidBodyFlow` acts on configurations of N rigid molecules, x [B, 7N],
molecule-major (c_x, c_y, c_z, q_w, q_x, q_y, q_z): centres c in an orthorhombic periodic box with
edge lengths L and unit quaternions q (q ~ -q), i.e. on (T^3 x S^3)^N. Densities are w.r.t. Lebesgue
measure on the box times the volume of S^3 per molecule. It alternates couplings, each conditioned
by a permutation-equivariant `MoleculeTransformer` (self-attention over the molecule axis, no
positional encoding, zero-initialised head):

    RotationCoupling:       q_i <- ConvexRotation(q_i; theta_i(c)),  c unchanged,
                            log|det| = sum_i (tangent-space log-det of ConvexRotation);
    TranslationCoupling(a): c_{i,a} <- L_a/(2 pi) (F_i(2 pi c_{i,a}/L_a - pi) + pi), F_i a smooth
                            circular ramp mixture (bgexp/flows/torus.py) conditioned on the other
                            two axes (sin, cos) and R(q) of all molecules,
                            log|det| = sum_i log F_i'.

Conditioners see only periodic functions of c and only R(q) (even in q), so the flow is periodic
in c, commutes with q_i -> -q_i and with permutations of the molecules (Köhler et al. 2023;
targeted free-energy perturbation with such maps: Wirnsberger et al. 2020). The forward direction
is closed form in every layer; the inverse uses root finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgexp.flows.base import Flow, SequentialFlow
from bgexp.flows.torus import CircularMixtureParams, smooth_circular_forward, smooth_circular_inverse
from bgexp.geometry import wrap_into_box
from bgexp.quaternions import conjugate, multiply, normalize, tangent_basis, to_matrix

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


# ---------------------------------------------------------------------------------------------------
# Rigid-body flow on (T^3 x S^3)^N
# ---------------------------------------------------------------------------------------------------

MOLECULE_FEATURES = 7  # c_x, c_y, c_z, q_w, q_x, q_y, q_z
UNIT_TOLERANCE = 1e-3  # accepted | |q| - 1 | of input quaternions


class _SelfAttentionLayer(nn.Module):
    """One post-norm transformer layer over the molecule axis of h [B, N, D]:

        h <- LayerNorm(h + MHA(h)),    h <- LayerNorm(h + W_2 SiLU(W_1 h + b_1) + b_2),

    MHA(h) = W_o concat_heads(softmax(Q K^T / sqrt(d)) V), Q = h W_q + b_q, K = h W_k, V = h W_v + b_v.
    The key projection has no bias: a key bias adds Q_i . b_k to every score of query i, a constant
    per row that the softmax cancels, so it would be a parameter without effect (and without
    gradient). No positional encoding and no mask: every operation is either per molecule or a
    softmax-weighted sum over all molecules, so the layer commutes with permutations of the molecules.
    """

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = int(n_heads), int(hidden) // int(n_heads)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm_attention = nn.LayerNorm(hidden)
        self.feed_forward = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
        self.norm_feed_forward = nn.LayerNorm(hidden)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-2, -3)  # [B, H, N, d]

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        attended = (weights @ v).transpose(-2, -3).flatten(-2)  # [B, N, D]
        h = self.norm_attention(h + self.out(attended))
        return self.norm_feed_forward(h + self.feed_forward(h))


class MoleculeTransformer(nn.Module):
    """A permutation-equivariant conditioner over molecules: [B, N, in_features] -> [B, N, out_features].

    Per-molecule embedding Linear -> SiLU -> Linear (width `hidden`), then `n_layers` self-attention
    layers over the molecule axis (`_SelfAttentionLayer`: multi-head attention with `n_heads`
    heads, residual + LayerNorm, then a per-molecule SiLU MLP of width 2 hidden, residual +
    LayerNorm), then a per-molecule linear head. Without positional encodings the network is
    equivariant: f(P h) = P f(h) for every permutation P of the molecules, so a coupling
    conditioned by it treats identical molecules identically. The head's weight and bias start at
    zero, so the output is exactly 0 at initialisation (each coupling starts at its raw = 0 map,
    the identity or near it) while the gradient w.r.t. the head is non-zero. Smooth activations
    only (SiLU, softmax, LayerNorm), so the flows are C-infinity in their inputs.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, n_heads: int = 4, n_layers: int = 2):
        super().__init__()
        for name, value, low in (("in_features", in_features, 1), ("out_features", out_features, 1),
                                 ("hidden", hidden, 1), ("n_heads", n_heads, 1), ("n_layers", n_layers, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by n_heads ({n_heads})")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.embed = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(_SelfAttentionLayer(hidden, n_heads) for _ in range(int(n_layers)))
        self.head = nn.Linear(hidden, out_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise ValueError(f"MoleculeTransformer expects features of shape [batch, n_molecules, "
                             f"{self.in_features}], got {tuple(features.shape)}")
        h = self.embed(features)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _as_box(box) -> Tensor:
    """Edge lengths [3] (float64) of an orthorhombic box from a number (cubic) or three numbers."""
    lengths = torch.as_tensor(box, dtype=torch.float64).flatten()
    if lengths.numel() == 1:
        lengths = lengths.expand(3).clone()
    if lengths.shape != (3,) or not bool(torch.isfinite(lengths).all()) or not bool((lengths > 0).all()):
        raise ValueError(f"box must be three positive edge lengths (or one, for a cube), got {box!r}")
    return lengths


def _parse_axis(axis) -> int:
    names = {"x": 0, "y": 1, "z": 2}
    a = names.get(axis, axis) if isinstance(axis, str) else axis
    if a not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1, 2 or 'x', 'y', 'z', got {axis!r}")
    return int(a)


def _periodic_features(c: Tensor, box: Tensor) -> Tensor:
    """(sin, cos)(2 pi c_a / L_a) for the axes of c [..., A]: [..., 2 A], invariant under c_a -> c_a + L_a."""
    angle = (2.0 * math.pi) * c / box
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def split_configuration(owner, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """(c wrapped into [0, L) [B, N, 3], q [B, N, 4]) of x [B, 7N] after checking its shape, that it is
    finite and that | |q| - 1 | <= 1e-3; `owner` has `n_molecules`, `dim` and `box` (errors name its class)."""
    n, kind = owner.n_molecules, type(owner).__name__
    if x.dim() != 2 or x.shape[-1] != owner.dim:
        raise ValueError(f"{kind}(n_molecules={n}) expects {name} of shape [batch, 7N] = [batch, {owner.dim}] "
                         f"(per molecule c_x, c_y, c_z, q_w, q_x, q_y, q_z), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{kind} expects a floating point {name}, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{kind} got non-finite values in {name}")
    molecules = x.reshape(x.shape[0], n, MOLECULE_FEATURES)
    c, q = molecules[..., :3], molecules[..., 3:]
    deviation = (q.detach().norm(dim=-1) - 1.0).abs()
    bad = ~(deviation <= UNIT_TOLERANCE)
    if bool(bad.any()):
        sample, molecule = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{kind} expects unit quaternions in {name} (| |q| - 1 | <= {UNIT_TOLERANCE}): "
                         f"{int(bad.sum())} are not, e.g. molecule {molecule} of sample {sample} has "
                         f"|q| = {float(q[sample, molecule].detach().norm()):.6g}")
    return wrap_into_box(c, owner.box.to(x.dtype)), q


class _RigidBodyLayer(Flow):  # noqa: D101 - see RigidBodyFlow
    """Shared plumbing: configurations x [B, 7N] as centres c [B, N, 3] and quaternions q [B, N, 4]."""

    def __init__(self, n_molecules: int, box, anchor: bool = False):
        super().__init__()
        if int(n_molecules) != n_molecules or n_molecules < 1:
            raise ValueError(f"n_molecules must be an integer >= 1, got {n_molecules}")
        self.n_molecules = int(n_molecules)
        self.dim = MOLECULE_FEATURES * self.n_molecules
        self.register_buffer("box", _as_box(box))
        self.anchor = bool(anchor)

    def relative(self, c: Tensor) -> Tensor:
        """Centres as the conditioners see them: relative to molecule 0 (wrapped) with an anchor,
        else as they are."""
        if not self.anchor:
            return c
        return wrap_into_box(c - c[:, :1], self.box.to(c.dtype))

    def split(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        return split_configuration(self, x, name)

    @staticmethod
    def join(c: Tensor, q: Tensor) -> Tensor:
        return torch.cat([c, q], dim=-1).flatten(-2)

    def _conditioner_input(self, features: Tensor) -> Tensor:
        return features.to(self.conditioner.head.weight.dtype)


class RotationCoupling(_RigidBodyLayer):
    """q_i <- ConvexRotation(q_i; theta_i), theta = conditioner(features of all centres); c unchanged.

    Features per molecule: (sin, cos)(2 pi c_{i,a} / L_a), a = x, y, z (6 numbers, periodic in the
    box), through a `MoleculeTransformer` to theta_i [N, ConvexRotation(n_components).n_params].
    Bijection: the centres pass through unchanged (after wrapping into the box), so the parameters
    theta are known from the output as well, and for fixed theta each q_i -> Phi_i(q_i) is a
    diffeomorphism of S^3 commuting with q -> -q (module docstring); the Jacobian in the chart
    (c, tangent coordinates of every q_i) is block triangular with identity blocks for c, so

        log|det| = sum_i log|det dPhi_i|_{T S^3}|     (ConvexRotation's tangent-space log-det).

    `forward` is the closed form; `inverse` inverts each Phi_i by ConvexRotation.inverse (root
    finding with implicit gradients) with the same theta. Raw theta = 0 (the zero-initialised
    head) gives |Phi_i(q) - q| <= 2 K init_weight (= 4e-3 for K = 2).
    """

    def __init__(self, n_molecules: int, box, n_components: int = 2, anchor: bool = False, **transformer_kwargs):
        super().__init__(n_molecules, box, anchor)
        self.rotation = ConvexRotation(n_components)
        self.conditioner = MoleculeTransformer(6, self.rotation.n_params, **transformer_kwargs)

    def _transform(self, x: Tensor, closed_form: bool, name: str) -> tuple[Tensor, Tensor]:
        c, q = self.split(x, name)
        features = _periodic_features(self.relative(c), self.box.to(x.dtype))
        theta = self.conditioner(self._conditioner_input(features)).to(x.dtype)
        q_out, logdet = (self.rotation.forward if closed_form else self.rotation.inverse)(q, theta)
        return self.join(c, q_out), logdet.sum(-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, True, "z")

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, False, "x")


class TranslationCoupling(_RigidBodyLayer):
    """c_{i,a} <- L_a/(2 pi) (F_i(2 pi c_{i,a}/L_a - pi) + pi) along one axis a; the rest unchanged.

    F_i is the smooth circular ramp mixture of bgexp/flows/torus.py on angles in [-pi, pi)
    (`smooth_circular_forward`: theta' = wrap(2 pi M((theta + pi)/2 pi) - pi + shift) with
    M(u) = c u + (1 - c) sum_k w_k R_k(u), M' >= c >= min_slope > 0), whose raw parameters
    [N, 4K + 2] come from a `MoleculeTransformer` on, per molecule, (sin, cos)(2 pi c_{i,b}/L_b) of
    the two other axes b != a and the nine entries of R(q_i) (13 numbers; R(-q) = R(q), so the
    layer commutes with q -> -q). c is first wrapped into [0, L) (c - L floor(c/L), derivative 1),
    so theta = 2 pi c_a / L_a - pi lies in [-pi, pi) and the output lies in [0, L_a).

    Bijection: the conditioner never sees coordinate a of any molecule, so its output is the same
    before and after the layer; for fixed parameters u -> M(u) is an increasing degree-one
    diffeomorphism of the circle (torus.py), hence each c_{i,a} -> c'_{i,a} is a diffeomorphism
    of the periodic interval [0, L_a). The Jacobian is triangular with diagonal
    dc'/dc = (L_a / 2 pi) F_i' (2 pi / L_a) = M_i'(u_i): the scale factors cancel and

        log|det| = sum_i log M_i'((theta_i + pi) / 2 pi).

    `forward` is the closed form; `inverse` uses `smooth_circular_inverse` (bisection-safeguarded
    Newton in float64, implicit gradients).

    Initialisation: at raw = 0, torus.py's mixture has floor c = (1 + min_slope)/2 and K evenly
    spread ramps, whose sum is not exactly linear (for K = 4 it moves angles by up to 0.01 rad, and
    by 0.28 rad for K = 2). A fixed (untrained) offset on the raw floor logit makes raw = 0 give
    the floor `init_floor` (default 0.9), so the zero-initialised head gives a map within
    (1 - init_floor)/(1 - (1 + min_slope)/2) of that deviation: nearer the identity, with the full
    range c in (min_slope, 1) still reachable.
    """

    def __init__(self, n_molecules: int, box, axis, n_components: int = 4, min_slope: float = 0.05,
                 init_floor: float = 0.9, anchor: bool = False, **transformer_kwargs):
        super().__init__(n_molecules, box, anchor)
        self.axis = _parse_axis(axis)
        self.others = [b for b in range(3) if b != self.axis]
        if int(n_components) != n_components or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {n_components}")
        if not 0.0 < min_slope < 1.0:
            raise ValueError(f"min_slope must be in (0, 1), got {min_slope}")
        if not min_slope < init_floor < 1.0:
            raise ValueError(f"init_floor must be in (min_slope, 1) = ({min_slope}, 1), got {init_floor}")
        self.n_components, self.min_slope, self.init_floor = int(n_components), float(min_slope), float(init_floor)
        n_raw = 4 * self.n_components + 2
        offset = torch.zeros(n_raw, dtype=torch.float64)
        fraction = (init_floor - min_slope) / (1.0 - min_slope)
        offset[4 * self.n_components] = math.log(fraction / (1.0 - fraction))  # sigmoid(offset) = fraction
        self.register_buffer("raw_offset", offset)
        self.conditioner = MoleculeTransformer(4 + 9, n_raw, **transformer_kwargs)

    def extra_repr(self) -> str:
        return (f"axis={'xyz'[self.axis]}, n_components={self.n_components}, min_slope={self.min_slope}, "
                f"init_floor={self.init_floor}")

    def _transform(self, x: Tensor, closed_form: bool, name: str) -> tuple[Tensor, Tensor]:
        c, q = self.split(x, name)
        box = self.box.to(x.dtype)
        rel = self.relative(c)
        rotation = to_matrix(q).flatten(-2)  # [B, N, 9], even in q
        features = torch.cat([_periodic_features(rel[..., self.others], box[self.others]), rotation], dim=-1)
        raw = self.conditioner(self._conditioner_input(features)).to(x.dtype) + self.raw_offset.to(x.dtype)
        params = CircularMixtureParams.from_raw(raw, self.n_components, self.min_slope)
        length, a = box[self.axis], self.axis
        theta = (2.0 * math.pi) * rel[..., a] / length - math.pi
        theta_out, logdet = (smooth_circular_forward if closed_form else smooth_circular_inverse)(theta, params)
        moved = length / (2.0 * math.pi) * (theta_out + math.pi)
        if self.anchor:  # molecule 0 stays; the others move relative to it
            moved = torch.cat([rel[:, :1, a], moved[:, 1:]], dim=1) + c[:, :1, a]
            logdet = logdet[:, 1:]
        c_axis = wrap_into_box(moved, length)
        c_out = torch.cat([c[..., :a], c_axis[..., None], c[..., a + 1:]], dim=-1)
        return self.join(c_out, q), logdet.sum(-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, True, "z")

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, False, "x")


class RigidBodyFlow(SequentialFlow):
    """A flow on (T^3 x S^3)^N, N rigid molecules in an orthorhombic periodic box (Köhler et al. 2023).

    x [B, 7N], molecule-major: (c_x, c_y, c_z, q_w, q_x, q_y, q_z) per molecule, c periodic with
    edge lengths `box` (nm), q a unit quaternion (q ~ -q). `n_blocks` times
    [RotationCoupling, TranslationCoupling(x), TranslationCoupling(y), TranslationCoupling(z)],
    each conditioned by its own `MoleculeTransformer(hidden, n_heads, n_layers)`. A composition of
    bijections is a bijection and log-dets add (w.r.t. Lebesgue measure on the box times the
    volume of S^3 per molecule). Every layer is permutation-equivariant in the molecules, commutes
    with q_i -> -q_i and is periodic in c, and so is the flow.

    `forward` (z -> x) is the closed form in every layer: differentiable to all orders in the inputs
    and parameters (use it to map samples of one thermodynamic state onto another, targeted FEP).
    `inverse` (x -> z) uses root finding in every layer (exact first derivatives; for evaluation).
    Inputs: c anywhere (wrapped), | |q| - 1 | <= 1e-3; outputs: c in [0, L), q unit (to rounding).

    `anchor=True` makes the flow equivariant under translating the whole system, F(x + t) = F(x) + t
    (with the log-det invariant): the conditioners see centres relative to molecule 0, the
    translation couplings move every other molecule relative to molecule 0, and molecule 0's centre
    is never changed (each layer stays triangular; permutation equivariance then holds among
    molecules 1..N-1). Needed when the energy is translation invariant and the samples fix the
    overall position (MD with the centre-of-mass motion removed): a map that is not equivariant
    learns to move the overall position on that slice, and estimators from the slice are biased
    (bgexp/training/tfep.py).
    """

    def __init__(self, n_molecules: int, box, n_blocks: int = 2, n_components_rotation: int = 2,
                 n_components_translation: int = 4, hidden: int = 64, n_heads: int = 4, n_layers: int = 2,
                 anchor: bool = False):
        if int(n_blocks) != n_blocks or n_blocks < 1:
            raise ValueError(f"n_blocks must be an integer >= 1, got {n_blocks}")
        kwargs = dict(hidden=hidden, n_heads=n_heads, n_layers=n_layers)
        layers: list[Flow] = []
        for _ in range(int(n_blocks)):
            layers.append(RotationCoupling(n_molecules, box, n_components_rotation, anchor=anchor, **kwargs))
            layers += [TranslationCoupling(n_molecules, box, axis, n_components_translation, anchor=anchor, **kwargs)
                       for axis in range(3)]
        super().__init__(layers)
        self.n_molecules = int(n_molecules)
        self.register_buffer("box", _as_box(box))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        split_configuration(self, z, "z")
        return super().forward(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        split_configuration(self, x, "x")
        return super().inverse(x)


__all__ = ["ConvexRotation", "ConvexRotationParams", "MoleculeTransformer", "RigidBodyFlow", "RotationCoupling",
           "RotationInversionError", "TranslationCoupling", "convex_potential", "n_rotation_params",
           "solve_gradient_equation", "wrap_into_box"]
