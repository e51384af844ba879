"""Elementwise transforms: the bijections of one feature that a coupling applies given parameters.

Contract (compare zuko's univariate transforms): an `ElementwiseTransform` maps x [B, n] with
parameters params [B, n, P] (P >= `n_params`; a transform reads the first `n_params` of each row)
to

    forward(x, params) -> (y, log|dy/dx|)      inverse(y, params) -> (x, log|dx/dy|)

both log-dets elementwise [B, n]. `circular = True` marks a diffeomorphism of the circle
[-pi, pi) onto itself (it may only act on angle features). `param_major` records the layout of
this transform's block in a conditioner's output (see bgexp/flows/coupling.py): parameter-major
[P, n] (True) or feature-major [n, P] (False). Transforms hold no trainable parameters; they
carry hyper-parameters only, so a coupling's state_dict is its conditioner's.

Here: `Affine` (Real NVP's bounded affine map) and `Inverse` (swap the directions of any
elementwise transform). The rational-quadratic splines live in bgexp/flows/splines.py
(`RQSpline`, `CircularRQSpline`), the smooth ramp mixtures in bgexp/flows/torus.py (`SmoothRamps`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ElementwiseTransform(nn.Module):
    """Base class (module docstring): `n_params`, `circular`, `param_major`, forward and inverse."""

    n_params: int = 0
    circular: bool = False
    param_major: bool = False

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class Affine(ElementwiseTransform):
    """y = x exp(s) + t with a bounded log-scale s = b tanh(s_raw / b) (Dinh et al., "Density
    estimation using Real NVP", ICLR 2017):  log|dy/dx| = s.

    Parameters per feature: (t, s_raw), in parameter-major layout (all shifts, then all raw
    log-scales: the layout of RealNVP checkpoints). s_raw = 0 and t = 0 give the identity; one
    layer never scales by more than exp(+-b).
    """

    n_params = 2
    param_major = True

    def __init__(self, max_log_scale: float = 3.0):
        super().__init__()
        if not max_log_scale > 0:
            raise ValueError(f"max_log_scale must be positive, got {max_log_scale}")
        self.max_log_scale = float(max_log_scale)

    def extra_repr(self) -> str:
        return f"max_log_scale={self.max_log_scale}"

    def _shift_and_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        b = self.max_log_scale
        return params[..., 0], b * torch.tanh(params[..., 1] / b)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_and_log_scale(params)
        return x * torch.exp(log_scale) + shift, log_scale

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_and_log_scale(params)
        return (y - shift) * torch.exp(-log_scale), -log_scale


class Inverse(ElementwiseTransform):
    """The inverse of an elementwise transform: forward and inverse swapped, same parameters."""

    def __init__(self, transform: ElementwiseTransform):
        super().__init__()
        self.transform = transform
        self.n_params = transform.n_params
        self.circular = transform.circular
        self.param_major = transform.param_major

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, params)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.forward(y, params)


__all__ = ["Affine", "ElementwiseTransform", "Inverse"]
