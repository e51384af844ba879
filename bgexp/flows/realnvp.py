"""RealNVP affine couplings (Dinh et al. 2017), as used by Boltzmann Generators (Noe et al. 2019).

A coupling splits x into a conditioning part x_a (kept) and a transformed part x_b:

    y_a = x_a,    y_b = x_b * exp(s(x_a)) + t(x_a),    log|det dy/dx| = sum_i s_i(x_a).

The log-scale is bounded, s = b * tanh(s_raw / b), so that one layer can never scale by more than
exp(+-b); the last layer of each conditioner starts at zero, so every coupling starts as the
identity. Built from the one coupling (bgexp/flows/coupling.py) with the `Affine` elementwise
transform; `RealNVP` is a preset: a stack of couplings whose masks alternate, and `realnvp(space,
...)` builds it for a `Space` (Euclidean features only).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor

from bgexp.flows._space import as_space, dim_from
from bgexp.flows.base import SequentialFlow
from bgexp.flows.coupling import Coupling
from bgexp.flows.nn import ACTIVATIONS, coupling_masks, mlp  # noqa: F401 - mlp, coupling_masks: old import path
from bgexp.flows.transforms import Affine
from bgexp.spaces import Space, SpaceError


class AffineCoupling(Coupling):
    """One affine coupling layer; `mask[i]` is True where coordinate i conditions (is kept)."""

    def __init__(
        self,
        mask: Tensor,
        hidden: Sequence[int] = (128, 128),
        activation: str = "tanh",
        max_log_scale: float = 3.0,
    ):
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise ValueError("coupling mask must be 1-D with both kept and transformed entries")
        transform = Affine(max_log_scale)
        super().__init__(mask, partial(mlp, hidden=hidden, activation=activation, zero_last=True), transform)
        self.max_log_scale = transform.max_log_scale


def _euclidean_dim(family: str, dim: int | None, space: Space | None) -> int:
    """The width of a family that acts on R^dim: from `dim`, or from a space without angles or
    rigid bodies (SpaceError otherwise)."""
    width = dim_from(family, dim, space)
    if space is None:
        return width
    space = as_space(space, family)
    if space.has_circular:
        raise SpaceError(f"{family} acts on R^dim and expects a space without circular features; got "
                         f"{space.describe()} (use NeuralSpline or SmoothTorusFlow for angles)")
    if space.is_rigid_bodies:
        raise SpaceError(f"{family} acts on R^dim and expects a space without rigid bodies; got {space.describe()} "
                         f"(use bgexp.flows.rigid.rigid_body_flow)")
    return space.dim


class RealNVP(SequentialFlow):
    """A stack of `n_couplings` affine couplings with alternating masks (a zuko-style preset).

    Give the width as `dim` or as a `space` (a Euclidean `bgexp.spaces.Space`)."""

    def __init__(
        self,
        dim: int | None = None,
        n_couplings: int = 8,
        hidden: Sequence[int] = (200, 200, 200),
        activation: str = "tanh",
        max_log_scale: float = 3.0,
        split: str = "half",
        space: Space | None = None,
    ):
        dim = _euclidean_dim("RealNVP", dim, space)
        if n_couplings < 1:
            raise ValueError(f"n_couplings must be >= 1, got {n_couplings}")
        super().__init__(
            AffineCoupling(mask, hidden, activation, max_log_scale)
            for mask in coupling_masks(dim, int(n_couplings), split)
        )


def realnvp(space: Space, n_couplings: int = 8, hidden: Sequence[int] = (200, 200, 200), activation: str = "tanh",
            max_log_scale: float = 3.0, split: str = "half") -> RealNVP:
    """RealNVP on a Euclidean space (SpaceError for circular features or rigid bodies)."""
    return RealNVP(n_couplings=n_couplings, hidden=hidden, activation=activation, max_log_scale=max_log_scale,
                   split=split, space=space)


__all__ = ["AffineCoupling", "RealNVP", "realnvp"]
