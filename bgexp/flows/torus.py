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

**Couplings.** `SmoothRamps` is the mixture above as an elementwise transform of the circle
(bgexp/flows/transforms.py contract) that owns the analytic direction: with `analytic="forward"`
its forward is the closed form and its inverse the root finder, with `analytic="inverse"` the
other way round. `SmoothCoupling` is the one coupling (bgexp/flows/coupling.py) with it on the
transformed circular features (parameters from a conditioner that sees kept angles as cos, sin)
and an affine map y = x exp(s) + t, s bounded by tanh, on the other transformed features (inverted
with the ramps, so that one direction is closed form throughout); smooth activations only.
`SmoothTorusFlow` is the preset: couplings with alternating masks; `smooth_torus(space, ...)`
builds it for a `Space` (its circular mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bgexp.flows.base import SequentialFlow
from bgexp.flows.coupling import Coupling, dim_and_circular
from bgexp.flows.nn import SMOOTH_ACTIVATIONS, coupling_masks, mlp
from bgexp.flows.transforms import Affine, ElementwiseTransform, Inverse
from bgexp.geometry import wrap_angle
from bgexp.spaces import Space

TWO_PI = 2.0 * math.pi
ANALYTIC = ("inverse", "forward")
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


def _check_analytic(analytic: str) -> str:
    if analytic not in ANALYTIC:
        raise ValueError(f"analytic must be 'inverse' or 'forward', got {analytic!r}")
    return analytic


class SmoothRamps(ElementwiseTransform):
    """The K-ramp mixture with a circular shift as an elementwise transform of the circle [-pi, pi)
    (module docstring). Parameters per feature (feature-major): 4K + 2 raw numbers
    (`CircularMixtureParams.from_raw`). `analytic="forward"`: forward is the closed form
    `smooth_circular_forward`, inverse the root finder `smooth_circular_inverse`;
    `analytic="inverse"`: forward is the root finder and inverse the closed form."""

    circular = True

    def __init__(self, n_components: int = 8, min_slope: float = 0.05, analytic: str = "forward"):
        super().__init__()
        if int(n_components) != n_components or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {n_components}")
        if not 0.0 < min_slope < 1.0:
            raise ValueError(f"min_slope must be in (0, 1), got {min_slope}")
        self.n_components, self.min_slope = int(n_components), float(min_slope)
        self.analytic = _check_analytic(analytic)
        self.n_params = 4 * self.n_components + 2

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, min_slope={self.min_slope}, analytic={self.analytic}"

    def _call(self, theta: Tensor, params: Tensor, closed_form: bool) -> tuple[Tensor, Tensor]:
        p = CircularMixtureParams.from_raw(params[..., :self.n_params], self.n_components, self.min_slope)
        return (smooth_circular_forward if closed_form else smooth_circular_inverse)(theta, p)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(x, params, closed_form=self.analytic == "forward")

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(y, params, closed_form=self.analytic == "inverse")


class SmoothCoupling(Coupling):
    """One smooth coupling; `mask[i]` is True where feature i conditions (is kept).

    Transformed circular features (`circular[i]`) go through a K-ramp mixture with a circular shift
    (`SmoothRamps`); transformed linear features through y = x exp(s) + t with s = b tanh(s_raw / b)
    (`Affine`). The conditioner sees kept angles as (cos, sin). `analytic` names the direction with
    the closed form: "inverse" (x -> z: density, NLL and force matching exact to all orders;
    sampling by root finding) or "forward" (z -> x: sampling in closed form). Conditioner layout
    ("blocks"): 2 n_lin affine numbers (shifts, then log-scales), then 4K + 2 per circular feature.
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
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise ValueError("coupling mask must be 1-D with both kept and transformed entries")
        circular = circular_mask(circular, int(mask.numel()))
        if activation not in SMOOTH_ACTIVATIONS:
            raise ValueError(f"a smooth coupling needs a smooth activation ({', '.join(SMOOTH_ACTIVATIONS)}), "
                             f"got {activation!r}")
        ramps = SmoothRamps(n_components, min_slope, analytic)
        affine = Affine(max_log_scale)
        super().__init__(mask, partial(mlp, hidden=hidden, activation=activation, zero_last=True),
                         affine if analytic == "forward" else Inverse(affine),
                         circular=circular, circular_transform=ramps, layout="blocks")
        self.n_components, self.min_slope = ramps.n_components, ramps.min_slope
        self.max_log_scale, self.analytic = affine.max_log_scale, analytic
        self.n_circ_params = ramps.n_params


class SmoothTorusFlow(SequentialFlow):
    """A stack of `n_couplings` smooth couplings with alternating masks (a zuko-style preset).

    `circular` (bool, length dim) marks angle features in [-pi, pi); None means every feature is
    an angle (a flow on the torus T^dim). Pair it with `TorusPrior(dim, circular)`. Given a
    `space` instead, the width and the circular mask are the space's.
    """

    def __init__(
        self,
        dim: int | None = None,
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
        space: Space | None = None,
    ):
        dim, circular = dim_and_circular("SmoothTorusFlow", dim, circular, space, default_circular=True)
        if n_couplings < 1:
            raise ValueError(f"n_couplings must be >= 1, got {n_couplings}")
        super().__init__(
            SmoothCoupling(mask, circular, hidden, activation, n_components, min_slope, max_log_scale, analytic)
            for mask in coupling_masks(dim, int(n_couplings), split, seed)
        )
        self.register_buffer("circular", circular.clone())


def smooth_torus(space: Space, n_couplings: int = 6, hidden: Sequence[int] = (128, 128), activation: str = "silu",
                 n_components: int = 8, min_slope: float = 0.05, max_log_scale: float = 3.0, split: str = "alternate",
                 analytic: str = "inverse", seed: int = 0) -> SmoothTorusFlow:
    """SmoothTorusFlow on a space: ramp mixtures on its circular features, affine maps on the
    others (SpaceError for rigid bodies). A space without circular features is accepted (affine
    couplings only) but is a RealNVP in disguise."""
    return SmoothTorusFlow(n_couplings=n_couplings, hidden=hidden, activation=activation, n_components=n_components,
                           min_slope=min_slope, max_log_scale=max_log_scale, split=split, analytic=analytic,
                           seed=seed, space=space)


__all__ = ["CircularMixtureParams", "RootFindingError", "SmoothCoupling", "SmoothRamps", "SmoothTorusFlow",
           "circular_mixture", "invert_circular", "smooth_circular_forward", "smooth_circular_inverse",
           "smooth_step", "smooth_torus"]
