"""Rational-quadratic neural spline couplings (Durkan, Bekasov, Murray, Papamakarios 2019).

A monotone rational-quadratic (RQ) spline with K bins maps [left, right] onto [bottom, top]
through K + 1 knots (x_k, y_k) and positive derivatives d_k at the knots (Gregory & Delbourgo
1982). In bin k, with w_k = x_{k+1} - x_k, h_k = y_{k+1} - y_k, s_k = h_k / w_k and
xi = (x - x_k) / w_k in [0, 1] (Durkan et al., eqs. 4-6):

    g(x)  = y_k + h_k [s_k xi^2 + d_k xi (1 - xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)]
    g'(x) = s_k^2 [d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2]
            / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)]^2.

The inverse solves a xi^2 + b xi + c = 0 in the bin that holds y (appendix A), with
u = y - y_k and D = d_{k+1} + d_k - 2 s_k:

    a = h_k (s_k - d_k) + u D,   b = h_k d_k - u D,   c = -s_k u,
    xi = 2 c / (-b - sqrt(b^2 - 4 a c))            (the numerically stable root).

Widths and heights come from unnormalised parameters through softmax plus a minimum size,
derivatives through d = min_derivative + softplus(p + c0) with c0 = log(exp(1 - min_derivative) - 1),
so that p = 0 gives d = 1: all-zero parameters give uniform bins with unit derivatives, which on
a square domain is the identity. Three variants:

* `rational_quadratic_spline`: the plain spline on an interval (K + 1 free derivatives);
* `unconstrained_rq_spline`: on [-B, B] with identity tails outside and the boundary
  derivatives fixed to 1 (K - 1 free derivatives), so the map is C1 on the whole real line;
* `circular_rq_spline`: on [-pi, pi] with d_K = d_0 (K free derivatives), so that the spline
  glues into a C1 diffeomorphism of the circle (Rezende et al., "Normalizing flows on tori and
  spheres", ICML 2020); an optional rotation (phase shift) removes the fixed point at -pi.

`RQSpline` (identity tails) and `CircularRQSpline` (with a rotation) are the elementwise
transforms (bgexp/flows/transforms.py contract) that the one coupling (bgexp/flows/coupling.py)
applies with parameters from a dense conditioner of the kept features (angles fed as cos, sin);
its last layer starts at zero, so a fresh coupling is the identity. `SplineCoupling` is that
coupling, `NeuralSpline` a preset: a stack of couplings whose masks alternate, and
`neural_spline(space, ...)` builds it for a `Space` (circular splines on its angle features).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bgexp.flows.base import SequentialFlow
from bgexp.flows.coupling import Coupling, dim_and_circular
from bgexp.flows.nn import coupling_masks, mlp
from bgexp.flows.transforms import ElementwiseTransform
from bgexp.geometry import wrap_angle
from bgexp.spaces import Space

TWO_PI = 2.0 * math.pi


def _derivative_offset(min_derivative: float) -> float:
    """c0 with min_derivative + softplus(c0) = 1, so that a zero parameter gives derivative 1."""
    return math.log(math.expm1(1.0 - min_derivative))


def _positive_derivatives(unnormalised: Tensor, min_derivative: float) -> Tensor:
    return min_derivative + F.softplus(unnormalised + _derivative_offset(min_derivative))


def _knots(unnormalised: Tensor, lo: float, hi: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Knot positions [..., K + 1] from lo to hi and bin sizes [..., K] (softmax + minimum)."""
    n_bins = unnormalised.shape[-1]
    # softmax written out: torch.softmax over a short last dimension is ~5x slower on CPU
    e = torch.exp(unnormalised - unnormalised.detach().amax(dim=-1, keepdim=True))
    fractions = min_size + (1.0 - min_size * n_bins) * (e / e.sum(dim=-1, keepdim=True))
    inner = lo + (hi - lo) * torch.cumsum(fractions, dim=-1)[..., :-1]
    one = fractions[..., :1]  # (inner is empty for a single bin)
    knots = torch.cat([torch.full_like(one, lo), inner, torch.full_like(one, hi)], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _check_spline_args(widths: Tensor, heights: Tensor, n_derivatives: int, derivatives: Tensor,
                       min_bin_width: float, min_bin_height: float, min_derivative: float) -> int:
    n_bins = widths.shape[-1]
    if n_bins < 1 or heights.shape[-1] != n_bins:
        raise ValueError(
            f"widths and heights need the same number of bins K >= 1 in their last dimension, got "
            f"{widths.shape[-1]} and {heights.shape[-1]}"
        )
    if derivatives.shape[-1] != n_derivatives:
        raise ValueError(
            f"this spline with K={n_bins} bins needs {n_derivatives} derivative parameters in the last "
            f"dimension, got {derivatives.shape[-1]}"
        )
    if not (0.0 <= min_bin_width * n_bins < 1.0 and 0.0 <= min_bin_height * n_bins < 1.0):
        raise ValueError(
            f"min_bin_width and min_bin_height must be in [0, 1/K) = [0, {1.0 / n_bins:g}), got "
            f"{min_bin_width} and {min_bin_height}"
        )
    if not 0.0 < min_derivative < 1.0:
        raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative}")
    return n_bins


def _gather(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-1, index)[..., 0]


def _spline(inputs: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, inverse: bool,
            left: float, right: float, bottom: float, top: float,
            min_bin_width: float, min_bin_height: float) -> tuple[Tensor, Tensor]:
    """The RQ spline given positive knot derivatives [..., K + 1]; inputs clamped into range."""
    shape = torch.broadcast_shapes(inputs.shape, widths.shape[:-1], heights.shape[:-1], derivatives.shape[:-1])
    inputs = inputs.expand(shape)
    xs, ws = _knots(widths.expand(*shape, widths.shape[-1]), left, right, min_bin_width)
    ys, hs = _knots(heights.expand(*shape, heights.shape[-1]), bottom, top, min_bin_height)
    derivatives = derivatives.expand(*shape, derivatives.shape[-1])

    if inverse:
        inputs = inputs.clamp(bottom, top)
        search = ys
    else:
        inputs = inputs.clamp(left, right)
        search = xs
    # bin k holds knot_k <= v < knot_{k+1}: count the interior knots <= v
    index = torch.searchsorted(search[..., 1:-1].contiguous(), inputs[..., None].contiguous(), right=True)
    x_k, w_k = _gather(xs, index), _gather(ws, index)
    y_k, h_k = _gather(ys, index), _gather(hs, index)
    d_k, d_k1 = _gather(derivatives[..., :-1], index), _gather(derivatives[..., 1:], index)
    s_k = h_k / w_k
    curvature = d_k1 + d_k - 2.0 * s_k

    if inverse:
        u = inputs - y_k
        a = h_k * (s_k - d_k) + u * curvature
        b = h_k * d_k - u * curvature
        c = -s_k * u
        discriminant = (b.square() - 4.0 * a * c).clamp_min(0.0)
        xi = 2.0 * c / (-b - torch.sqrt(discriminant))
        outputs = x_k + xi * w_k
    else:
        xi = (inputs - x_k) / w_k
    t = xi * (1.0 - xi)
    denominator = s_k + curvature * t
    numerator = d_k1 * xi.square() + 2.0 * s_k * t + d_k * (1.0 - xi).square()
    logabsdet = 2.0 * torch.log(s_k) + torch.log(numerator) - 2.0 * torch.log(denominator)
    if inverse:
        return outputs, -logabsdet
    outputs = y_k + h_k * (s_k * xi.square() + d_k * t) / denominator
    return outputs, logabsdet


def rational_quadratic_spline(
    inputs: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    inverse: bool = False,
    left: float = -1.0,
    right: float = 1.0,
    bottom: float = -1.0,
    top: float = 1.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Monotone RQ spline [left, right] -> [bottom, top], elementwise (Durkan et al. 2019).

    `widths`, `heights`: unnormalised bin sizes [..., K] (softmax + minimum fraction);
    `derivatives`: unnormalised knot derivatives [..., K + 1], d = min_derivative + softplus(p + c0)
    (p = 0 gives d = 1). Parameters broadcast against `inputs` (leading dims). Inputs are expected
    inside the domain of the chosen direction and are clamped into it. Returns (outputs,
    logabsdet) with log|dg/dx| forward and log|dg^{-1}/dy| for `inverse`, both of the inputs' shape.
    """
    _check_spline_args(widths, heights, widths.shape[-1] + 1, derivatives,
                       min_bin_width, min_bin_height, min_derivative)
    if not (right > left and top > bottom):
        raise ValueError(f"need left < right and bottom < top, got [{left}, {right}] -> [{bottom}, {top}]")
    return _spline(inputs, widths, heights, _positive_derivatives(derivatives, min_derivative), inverse,
                   left, right, bottom, top, min_bin_width, min_bin_height)


def unconstrained_rq_spline(
    inputs: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    inverse: bool = False,
    bound: float = 5.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """RQ spline on [-B, B] -> [-B, B] with identity tails outside, a C1 bijection of the real line.

    `derivatives` holds the K - 1 interior knot derivatives [..., K - 1]; the boundary derivatives
    are fixed to 1 to match the slope of the tails. Outside [-B, B] the output is the input and
    the log-det is 0.
    """
    _check_spline_args(widths, heights, widths.shape[-1] - 1, derivatives,
                       min_bin_width, min_bin_height, min_derivative)
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"bound must be positive and finite, got {bound}")
    d = _positive_derivatives(derivatives, min_derivative)
    d = F.pad(d, (1, 1), value=1.0)
    inside = (inputs >= -bound) & (inputs <= bound)
    outputs, logabsdet = _spline(inputs, widths, heights, d, inverse, -bound, bound, -bound, bound,
                                 min_bin_width, min_bin_height)
    outputs = torch.where(inside, outputs, inputs)
    logabsdet = torch.where(inside, logabsdet, torch.zeros_like(logabsdet))
    return outputs, logabsdet


def circular_rq_spline(
    inputs: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    inverse: bool = False,
    shift: Tensor | None = None,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """RQ spline diffeomorphism of the circle [-pi, pi) (Rezende et al. 2020).

    `derivatives` holds K knot derivatives [..., K]; the derivative at +pi is set equal to the
    one at -pi, so the spline, which fixes both ends (g(-pi) = -pi, g(pi) = pi), is C1 across the
    seam when the ends are identified. Inputs are wrapped onto [-pi, pi) first; outputs lie in
    [-pi, pi). An optional `shift` (broadcast against the inputs) rotates afterwards,
    y = wrap(g(x) + shift), inverse x = g^{-1}(wrap(y - shift)); it does not change the log-det.
    """
    _check_spline_args(widths, heights, widths.shape[-1], derivatives,
                       min_bin_width, min_bin_height, min_derivative)
    d = _positive_derivatives(derivatives, min_derivative)
    d = torch.cat([d, d[..., :1]], dim=-1)
    inputs = wrap_angle(inputs)
    if inverse and shift is not None:
        inputs = wrap_angle(inputs - shift)
    outputs, logabsdet = _spline(inputs, widths, heights, d, inverse, -math.pi, math.pi, -math.pi, math.pi,
                                 min_bin_width, min_bin_height)
    if not inverse and shift is not None:
        outputs = outputs + shift
    return wrap_angle(outputs), logabsdet


class RQSpline(ElementwiseTransform):
    """`unconstrained_rq_spline` as an elementwise transform: K bins on [-bound, bound], identity
    tails. Parameters per feature (feature-major): K widths, K heights, K - 1 interior derivatives
    (`n_params` = 3K - 1); zeros give the identity."""

    def __init__(self, n_bins: int = 8, bound: float = 5.0):
        super().__init__()
        if int(n_bins) != n_bins or n_bins < 2:
            raise ValueError(f"n_bins must be an integer >= 2, got {n_bins}")
        if not (bound > 0 and math.isfinite(bound)):
            raise ValueError(f"bound must be positive and finite, got {bound}")
        self.n_bins, self.bound = int(n_bins), float(bound)
        self.n_params = 3 * self.n_bins - 1

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}, bound={self.bound}"

    def _call(self, x: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k = self.n_bins
        return unconstrained_rq_spline(x, p[..., :k], p[..., k:2 * k], p[..., 2 * k:3 * k - 1], inverse, self.bound)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(x, params, False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(y, params, True)


class CircularRQSpline(ElementwiseTransform):
    """`circular_rq_spline` with a conditioned rotation as an elementwise transform of the circle
    [-pi, pi). Parameters per feature (feature-major): K widths, K heights, K derivatives, the
    rotation (`n_params` = 3K + 1); zeros give the identity."""

    circular = True

    def __init__(self, n_bins: int = 8):
        super().__init__()
        if int(n_bins) != n_bins or n_bins < 2:
            raise ValueError(f"n_bins must be an integer >= 2, got {n_bins}")
        self.n_bins = int(n_bins)
        self.n_params = 3 * self.n_bins + 1

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}"

    def _call(self, x: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k = self.n_bins
        return circular_rq_spline(x, p[..., :k], p[..., k:2 * k], p[..., 2 * k:3 * k], inverse, shift=p[..., 3 * k])

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(x, params, False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(y, params, True)


class SplineCoupling(Coupling):
    """One RQ-spline coupling; `mask[i]` is True where coordinate i conditions (is kept).

        y_a = x_a,    y_b,i = g_i(x_b,i; theta_i(x_a)),    log|det dy/dx| = sum_i log g_i'(x_b,i).

    Non-circular transformed features use `RQSpline` on [-bound, bound] (identity tails); features
    marked in `circular` (bool, length dim) use `CircularRQSpline` with a conditioned rotation and
    must lie in [-pi, pi) (they are wrapped). Kept circular features enter the conditioner as
    (cos, sin), so the coupling is 2 pi-periodic in them. The conditioner outputs 3K + 1 numbers per
    transformed feature ("rows" layout): K widths, K heights, then K - 1 interior derivatives (the
    last 2 unused) or K derivatives and the rotation for circular features.
    """

    def __init__(
        self,
        mask: Tensor,
        hidden: Sequence[int] = (128, 128),
        activation: str = "silu",
        n_bins: int = 8,
        bound: float = 5.0,
        circular: Tensor | Sequence[bool] | None = None,
    ):
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise ValueError("coupling mask must be 1-D with both kept and transformed entries")
        linear = RQSpline(n_bins, bound)
        super().__init__(mask, partial(mlp, hidden=hidden, activation=activation, zero_last=True), linear,
                         circular=circular, circular_transform=CircularRQSpline(n_bins), layout="rows")
        self.n_bins, self.bound = linear.n_bins, linear.bound
        self.n_params = self.row_width


class NeuralSpline(SequentialFlow):
    """A stack of `n_couplings` RQ-spline couplings with alternating masks (a zuko-style preset).

    `circular` (bool, length dim) marks angle features in [-pi, pi); every coupling uses it. Give
    the width as `dim` (and `circular`) or as a `space` (its circular mask)."""

    def __init__(
        self,
        dim: int | None = None,
        n_couplings: int = 8,
        hidden: Sequence[int] = (128, 128),
        activation: str = "silu",
        n_bins: int = 8,
        bound: float = 5.0,
        split: str = "random",
        circular: Tensor | Sequence[bool] | None = None,
        seed: int = 0,
        space: Space | None = None,
    ):
        dim, circular = dim_and_circular("NeuralSpline", dim, circular, space, default_circular=False)
        if n_couplings < 1:
            raise ValueError(f"n_couplings must be >= 1, got {n_couplings}")
        super().__init__(
            SplineCoupling(mask, hidden, activation, n_bins, bound, circular)
            for mask in coupling_masks(dim, int(n_couplings), split, seed)
        )
        self.register_buffer("circular", circular.clone())


def neural_spline(space: Space, n_couplings: int = 8, hidden: Sequence[int] = (128, 128), activation: str = "silu",
                  n_bins: int = 8, bound: float = 5.0, split: str = "random", seed: int = 0) -> NeuralSpline:
    """NeuralSpline on a space: circular splines on its angle features, splines with identity tails
    on the others (SpaceError for rigid bodies)."""
    return NeuralSpline(n_couplings=n_couplings, hidden=hidden, activation=activation, n_bins=n_bins, bound=bound,
                        split=split, seed=seed, space=space)


__all__ = ["CircularRQSpline", "NeuralSpline", "RQSpline", "SplineCoupling", "circular_rq_spline", "neural_spline",
           "rational_quadratic_spline", "unconstrained_rq_spline"]
