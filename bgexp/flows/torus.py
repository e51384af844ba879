"""Smooth flows on the torus (Köhler, Krämer, Noé, "Smooth Normalizing Flows", NeurIPS 2021).

Spline flows are only C1 (their second derivative jumps at the knots), so the score of their
density, grad log q, and any force derived from it are discontinuous. The transforms here are
C-infinity, which makes force matching (fitting grad log q to MD forces) well posed.

**Smooth step.** From the bump rho(t) = exp(-alpha / t^beta) (t > 0; 0 otherwise), which is
C-infinity with every derivative vanishing at t = 0, the smooth step on [0, 1] is

    sigma(t) = rho(t) / (rho(t) + rho(1 - t)) = sigmoid(alpha [(1 - t)^-beta - t^-beta]),
    sigma'(t) = sigma (1 - sigma) alpha beta [t^-(beta+1) + (1 - t)^-(beta+1)],

with sigma = 0 for t <= 0 and 1 for t >= 1; every derivative vanishes at both ends, so sigma is
C-infinity on the whole line (paper, section 4).

**Smooth ramp on the circle.** A ramp with slope a >= 1 and centre b in [0, 1), s(x) =
sigma(a (x - b) + 1/2), climbs from 0 to 1 on the window [b - 1/(2a), b + 1/(2a)] of length
1/a <= 1. Wrapped onto the unit circle (sum over the translates x + n), its derivative is a
smooth periodic bump of unit mass; on x in [0, 1] only n in {-1, 0, 1} contribute (a >= 1), so

    R(x) = sum_{n=-1..1} [sigma(a (x - b + n) + 1/2) - sigma(a (n - b) + 1/2)],   R(0) = 0, R(1) = 1,

and R(x + 1) = R(x) + 1: R is a C-infinity degree-one map of the circle.

**Mixture.** With K ramps (weights w_k, softmax) and a floor c in (c_min, 1) on the slope,

    F(x) = c x + (1 - c) sum_k w_k R_k(x),     F'(x) = c + (1 - c) sum_k w_k R_k'(x) >= c > 0,

a C-infinity diffeomorphism of the circle with F(0) = 0 (paper, Eq. 9: mixtures of ramps, with
the identity mixed in to bound the derivative away from zero). On angles theta in [-pi, pi):
x = (theta + pi) / 2 pi, theta' = wrap(2 pi F(x) - pi + shift) (a circular shift removes the fixed
point), log|d theta'/d theta| = log F'(x).

**Inverse.** F has no closed-form inverse. `invert_circular` finds the root of F(x) = y on
[0, 1] in float64 by Newton's method safeguarded by bisection: every iterate stays inside a
bracket that shrinks each step, and a Newton step that leaves it, or does not halve the step of two
iterations ago, is replaced by bisection (Numerical Recipes' rtsafe rule, which breaks 2-cycles).
Near the root convergence is quadratic (F' >= c); it stops at |F(x) - y| <= 1e-12.
Gradients through the inverse follow the implicit function
theorem, not the iterations: with x* the root (no graph),

    x = x* - (F(x*; theta) - y) / F'(x*; theta)

has the value x* (up to one more Newton correction) and the exact first derivatives
dx/dy = 1 / F'(x*) and dx/dtheta = -(dF/dtheta) / F'(x*). This is exact for training by reverse
KL (which needs first derivatives of the samples) and for log-dets. Second derivatives through
the root-finding direction omit the curvature term F'' (dx/dtheta)^2 / F', so force matching
(which differentiates grad log q) must run through the closed-form direction: by default
(`analytic="inverse"`) the closed form maps data to latent space, so log q(x), its score and the
NLL/force-matching losses are exact to all orders, and sampling uses the root finder.

**Couplings.** `SmoothCoupling` keeps the masked features and transforms the others: circular
features by the mixture above (parameters from a conditioner that sees kept angles as cos, sin),
other features by an affine map y = x exp(s) + t with s bounded by tanh; smooth activations only.
`SmoothTorusFlow` is the preset: couplings with alternating masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bgexp.flows.base import Flow, SequentialFlow
from bgexp.flows.realnvp import coupling_masks, mlp
from bgexp.geometry import wrap_angle

TWO_PI = 2.0 * math.pi
SMOOTH_ACTIVATIONS = ("tanh", "silu", "gelu", "softplus")
_T_EPS = 1e-6  # sigma is evaluated on [eps, 1 - eps]; outside, it equals 0 or 1 to exp(-alpha 1e6)


def smooth_step(t: Tensor, alpha: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """sigma(t) and sigma'(t) of the module docstring (0 below t = 0, 1 above t = 1)."""
    tc = t.clamp(_T_EPS, 1.0 - _T_EPS)
    s = alpha * ((1.0 - tc).pow(-beta) - tc.pow(-beta))
    value = torch.sigmoid(s)
    # sigma (1 - sigma) underflows to 0 where the power term is large: the product is 0, never NaN
    slope = (value * torch.sigmoid(-s)) * (alpha * beta) * (tc.pow(-beta - 1.0) + (1.0 - tc).pow(-beta - 1.0))
    inside = (t > _T_EPS) & (t < 1.0 - _T_EPS)
    value = torch.where(inside, value, (t >= 1.0 - _T_EPS).to(value))
    slope = torch.where(inside, slope, torch.zeros_like(slope))
    return value, slope


@dataclass
class CircularMixtureParams:
    """Constrained parameters of ramp mixtures, each [..., K] (c and shift [...]): weights w
    (softmax), slopes a = 1 + softplus, centres b in [0, 1), shapes alpha, floor c, shift."""

    weights: Tensor
    a: Tensor
    b: Tensor
    alpha: Tensor
    c: Tensor
    shift: Tensor
    beta: float = 1.0

    @classmethod
    def from_raw(cls, raw: Tensor, n_components: int, min_slope: float = 0.05,
                 min_alpha: float = 0.3, beta: float = 1.0) -> "CircularMixtureParams":
        """From unconstrained [..., 4K + 2]; all-zero raw gives K equal ramps spread evenly."""
        k = n_components
        if raw.shape[-1] != 4 * k + 2:
            raise ValueError(f"a {k}-component ramp mixture needs {4 * k + 2} raw parameters, got {raw.shape[-1]}")
        offsets = torch.arange(k, dtype=raw.dtype, device=raw.device) / k
        return cls(
            weights=torch.softmax(raw[..., :k], dim=-1),
            a=1.0 + F.softplus(raw[..., k:2 * k]),
            b=torch.remainder(raw[..., 2 * k:3 * k] + offsets, 1.0),
            alpha=min_alpha + F.softplus(raw[..., 3 * k:4 * k] + math.log(math.expm1(1.0))),
            c=min_slope + (1.0 - min_slope) * torch.sigmoid(raw[..., 4 * k]),
            shift=raw[..., 4 * k + 1],
            beta=float(beta),
        )

    def detached(self, dtype: torch.dtype = torch.float64) -> "CircularMixtureParams":
        """A copy without autograd graph in `dtype` (for the root finder)."""
        return CircularMixtureParams(*(t.detach().to(dtype) for t in
                                       (self.weights, self.a, self.b, self.alpha, self.c, self.shift)), self.beta)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.weights, self.a, self.b, self.alpha, self.c, self.shift))


def circular_mixture(x: Tensor, p: CircularMixtureParams) -> tuple[Tensor, Tensor]:
    """F(x) and F'(x) on the unit circle, x in [0, 1] [...]; parameters broadcast as [..., K]."""
    xs = x.unsqueeze(-1)
    value = slope = torch.zeros((), dtype=x.dtype, device=x.device)
    for n in (-1.0, 0.0, 1.0):
        s_x, ds_x = smooth_step(p.a * (xs - p.b + n) + 0.5, p.alpha, p.beta)
        s_0, _ = smooth_step(p.a * (n - p.b) + 0.5, p.alpha, p.beta)
        value = value + s_x - s_0
        slope = slope + p.a * ds_x
    value = p.c * x + (1.0 - p.c) * (p.weights * value).sum(-1)
    slope = p.c + (1.0 - p.c) * (p.weights * slope).sum(-1)
    return value, slope


def _circle_coordinate(theta: Tensor) -> Tensor:
    return (wrap_angle(theta) + math.pi) / TWO_PI


def smooth_circular_forward(theta: Tensor, p: CircularMixtureParams) -> tuple[Tensor, Tensor]:
    """theta' = wrap(2 pi F((theta + pi) / 2 pi) - pi + shift) and log F' (elementwise)."""
    value, slope = circular_mixture(_circle_coordinate(theta), p)
    return wrap_angle(TWO_PI * value - math.pi + p.shift), torch.log(slope)


class RootFindingError(RuntimeError):
    """The root finder did not converge (non-finite parameters or inputs)."""


@torch.no_grad()
def invert_circular(y: Tensor, p: CircularMixtureParams, tol: float = 1e-12, max_iter: int = 100) -> Tensor:
    """x in [0, 1] with F(x) = y, in float64, by bisection-safeguarded Newton (module docstring)."""
    q = p.detached(torch.float64)
    y = y.detach().double()
    if not (torch.isfinite(y).all() and q.all_finite()):
        raise RootFindingError("non-finite inputs or transform parameters in the inverse of a smooth circular map")
    lo, hi = torch.zeros_like(y), torch.ones_like(y)
    x = y.clone()
    converged = torch.zeros_like(y, dtype=torch.bool)
    step_before_last = step_last = torch.ones_like(y)
    for _ in range(max_iter):
        f, slope = circular_mixture(x, q)
        residual = f - y
        converged = converged | (residual.abs() <= tol) | (hi - lo <= tol)
        if converged.all():
            return x
        above = residual > 0
        hi = torch.where(above, x, hi)
        lo = torch.where(above, lo, x)
        newton = x - residual / slope
        # Newton inside the bracket and at least halving the step of two iterations ago
        # (Numerical Recipes' rtsafe rule, which stops 2-cycles); bisection otherwise
        fast = (newton > lo) & (newton < hi) & ((newton - x).abs() < 0.5 * step_before_last)
        update = torch.where(fast, newton, 0.5 * (lo + hi))
        step_before_last, step_last = step_last, (update - x).abs()
        x = torch.where(converged, x, update)
    raise RootFindingError(f"smooth circular inverse did not converge in {max_iter} iterations "
                           f"({int((~converged).sum())} of {converged.numel()} values left)")


def smooth_circular_inverse(theta: Tensor, p: CircularMixtureParams) -> tuple[Tensor, Tensor]:
    """The inverse map theta' -> theta and log|d theta / d theta'| = -log F'(x), with implicit
    gradients (module docstring)."""
    y = _circle_coordinate(theta - p.shift)
    x_root = invert_circular(y, p).to(y)
    value, slope = circular_mixture(x_root, p)
    x = x_root - (value - y) / slope  # exact first derivatives by the implicit function theorem
    _, slope = circular_mixture(x, p)
    return wrap_angle(TWO_PI * x - math.pi), -torch.log(slope)


def circular_mask(circular: Tensor | Sequence[bool] | None, dim: int) -> Tensor:
    """The bool mask of angle features (None: every feature is an angle), checked against dim."""
    mask = torch.ones(dim, dtype=torch.bool) if circular is None else torch.as_tensor(circular, dtype=torch.bool)
    if mask.shape != (dim,):
        raise ValueError(f"circular must be a bool mask of length dim={dim}, got shape {tuple(mask.shape)}")
    return mask


class SmoothCoupling(Flow):
    """One smooth coupling; `mask[i]` is True where feature i conditions (is kept).

    Transformed circular features (`circular[i]`) go through a K-ramp mixture with a circular shift
    (see the module docstring); transformed linear features through y = x exp(s) + t with
    s = b tanh(s_raw / b). The conditioner sees kept angles as (cos, sin). `analytic` names the
    direction with the closed form: "inverse" (x -> z: density, NLL and force matching exact to all
    orders; sampling by root finding) or "forward" (z -> x: sampling in closed form).
    """

    def __init__(
        self,
        mask: Tensor | Sequence[bool],
        circular: Tensor | Sequence[bool] | None = None,
        hidden: Sequence[int] = (128, 128),
        activation: str = "silu",
        n_components: int = 8,
        min_slope: float = 0.05,
        max_log_scale: float = 3.0,
        analytic: str = "inverse",
    ):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise ValueError("coupling mask must be 1-D with both kept and transformed entries")
        self.dim = int(mask.numel())
        circular = circular_mask(circular, self.dim)
        if activation not in SMOOTH_ACTIVATIONS:
            raise ValueError(f"a smooth coupling needs a smooth activation ({', '.join(SMOOTH_ACTIVATIONS)}), "
                             f"got {activation!r}")
        if int(n_components) != n_components or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {n_components}")
        if not 0.0 < min_slope < 1.0:
            raise ValueError(f"min_slope must be in (0, 1), got {min_slope}")
        if analytic not in ("inverse", "forward"):
            raise ValueError(f"analytic must be 'inverse' or 'forward', got {analytic!r}")
        self.n_components, self.min_slope = int(n_components), float(min_slope)
        self.max_log_scale, self.analytic = float(max_log_scale), analytic
        self.register_buffer("mask", mask.clone())
        self.register_buffer("circular", circular.clone())
        changed = ~mask
        self.register_buffer("kept_linear", torch.nonzero(mask & ~circular).flatten())
        self.register_buffer("kept_circular", torch.nonzero(mask & circular).flatten())
        self.register_buffer("changed_linear", torch.nonzero(changed & ~circular).flatten())
        self.register_buffer("changed_circular", torch.nonzero(changed & circular).flatten())
        self.n_circ_params = 4 * self.n_components + 2
        n_in = len(self.kept_linear) + 2 * len(self.kept_circular)
        n_out = 2 * len(self.changed_linear) + self.n_circ_params * len(self.changed_circular)
        self.net = mlp(n_in, n_out, hidden, activation, zero_last=True)

    def _conditioner(self, x: Tensor) -> tuple[Tensor, Tensor, CircularMixtureParams | None]:
        angles = x[:, self.kept_circular]
        out = self.net(torch.cat([x[:, self.kept_linear], torch.cos(angles), torch.sin(angles)], dim=-1))
        n_lin = len(self.changed_linear)
        shift, raw_scale = out[:, :n_lin], out[:, n_lin:2 * n_lin]
        log_scale = self.max_log_scale * torch.tanh(raw_scale / self.max_log_scale)
        params = None
        if len(self.changed_circular):
            raw = out[:, 2 * n_lin:].reshape(x.shape[0], len(self.changed_circular), self.n_circ_params)
            params = CircularMixtureParams.from_raw(raw, self.n_components, self.min_slope)
        return shift, log_scale, params

    def _transform(self, x: Tensor, closed_form: bool) -> tuple[Tensor, Tensor]:
        """The closed-form map (closed_form=True) or its inverse, with the log-det of that map."""
        shift, log_scale, params = self._conditioner(x)
        pieces = []
        logdet = x.new_zeros(x.shape[0])
        if len(self.changed_linear):
            v = x[:, self.changed_linear]
            if closed_form:
                pieces.append((self.changed_linear, v * torch.exp(log_scale) + shift))
                logdet = logdet + log_scale.sum(-1)
            else:
                pieces.append((self.changed_linear, (v - shift) * torch.exp(-log_scale)))
                logdet = logdet - log_scale.sum(-1)
        if params is not None:
            theta = x[:, self.changed_circular]
            out, ld = (smooth_circular_forward if closed_form else smooth_circular_inverse)(theta, params)
            pieces.append((self.changed_circular, out))
            logdet = logdet + ld.sum(-1)
        y = x.clone()
        for index, values in pieces:
            y = y.index_copy(1, index, values.to(y))
        return y, logdet

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(z, "z")
        return self._transform(z, closed_form=self.analytic == "forward")

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x, "x")
        return self._transform(x, closed_form=self.analytic == "inverse")


class SmoothTorusFlow(SequentialFlow):
    """A stack of `n_couplings` smooth couplings with alternating masks (a zuko-style preset).

    `circular` (bool, length dim) marks angle features in [-pi, pi); None means every feature is
    an angle (a flow on the torus T^dim). Pair it with `TorusPrior(dim, circular)`.
    """

    def __init__(
        self,
        dim: int,
        n_couplings: int = 6,
        hidden: Sequence[int] = (128, 128),
        activation: str = "silu",
        n_components: int = 8,
        min_slope: float = 0.05,
        max_log_scale: float = 3.0,
        split: str = "alternate",
        circular: Tensor | Sequence[bool] | None = None,
        analytic: str = "inverse",
        seed: int = 0,
    ):
        if n_couplings < 1:
            raise ValueError(f"n_couplings must be >= 1, got {n_couplings}")
        dim = int(dim)
        circular = circular_mask(circular, dim)
        super().__init__(
            SmoothCoupling(mask, circular, hidden, activation, n_components, min_slope, max_log_scale, analytic)
            for mask in coupling_masks(dim, int(n_couplings), split, seed)
        )
        self.register_buffer("circular", circular.clone())
