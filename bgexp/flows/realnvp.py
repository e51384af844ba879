"""RealNVP affine couplings (Dinh et al. 2017), as used by Boltzmann Generators (Noe et al. 2019).

A coupling splits x into a conditioning part x_a (kept) and a transformed part x_b:

    y_a = x_a,    y_b = x_b * exp(s(x_a)) + t(x_a),    log|det dy/dx| = sum_i s_i(x_a).

The log-scale is bounded, s = b * tanh(s_raw / b), so that one layer can never scale by more than
exp(+-b); the last layer of each conditioner starts at zero, so every coupling starts as the
identity. `RealNVP` is a preset: a stack of couplings whose masks alternate.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from bgexp.flows.base import Flow, SequentialFlow

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def mlp(n_in: int, n_out: int, hidden: Sequence[int], activation: str, zero_last: bool) -> nn.Sequential:
    """A dense network n_in -> hidden... -> n_out; `zero_last` zeroes the output layer."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
        width = int(h)
    last = nn.Linear(width, n_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class AffineCoupling(Flow):
    """One affine coupling layer; `mask[i]` is True where coordinate i conditions (is kept)."""

    def __init__(
        self,
        mask: Tensor,
        hidden: Sequence[int] = (128, 128),
        activation: str = "tanh",
        max_log_scale: float = 3.0,
    ):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise ValueError("coupling mask must be 1-D with both kept and transformed entries")
        if max_log_scale <= 0:
            raise ValueError(f"max_log_scale must be positive, got {max_log_scale}")
        self.dim = int(mask.numel())
        self.register_buffer("kept", torch.nonzero(mask).flatten())
        self.register_buffer("changed", torch.nonzero(~mask).flatten())
        self.max_log_scale = float(max_log_scale)
        n_kept, n_changed = len(self.kept), len(self.changed)
        self.net = mlp(n_kept, 2 * n_changed, hidden, activation, zero_last=True)

    def _shift_and_log_scale(self, x_kept: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(x_kept).chunk(2, dim=-1)
        b = self.max_log_scale
        return shift, b * torch.tanh(raw / b)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(z, "z")
        shift, log_scale = self._shift_and_log_scale(z[:, self.kept])
        x = z.clone()
        x[:, self.changed] = z[:, self.changed] * torch.exp(log_scale) + shift
        return x, log_scale.sum(-1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x, "x")
        shift, log_scale = self._shift_and_log_scale(x[:, self.kept])
        z = x.clone()
        z[:, self.changed] = (x[:, self.changed] - shift) * torch.exp(-log_scale)
        return z, -log_scale.sum(-1)


def coupling_masks(dim: int, n_couplings: int, split: str = "half", seed: int = 0) -> list[Tensor]:
    """Alternating masks: `half` keeps the first then the second half of the coordinates;
    `alternate` keeps even then odd indices; `random` draws a new random half (fixed by `seed`)
    for every pair of couplings, the second of the pair keeping the complement."""
    if dim < 2:
        raise ValueError(f"couplings need dim >= 2, got {dim}")
    idx = torch.arange(dim)
    if split == "half":
        bases = [idx < dim // 2]
    elif split == "alternate":
        bases = [idx % 2 == 0]
    elif split == "random":
        g = torch.Generator().manual_seed(seed)
        bases = []
        for _ in range((n_couplings + 1) // 2):
            base = torch.zeros(dim, dtype=torch.bool)
            base[torch.randperm(dim, generator=g)[: dim // 2]] = True
            bases.append(base)
    else:
        raise ValueError(f"unknown split {split!r}; choose 'half', 'alternate' or 'random'")
    return [bases[(k // 2) % len(bases)] if k % 2 == 0 else ~bases[(k // 2) % len(bases)]
            for k in range(n_couplings)]


class RealNVP(SequentialFlow):
    """A stack of `n_couplings` affine couplings with alternating masks (a zuko-style preset)."""

    def __init__(
        self,
        dim: int,
        n_couplings: int = 8,
        hidden: Sequence[int] = (200, 200, 200),
        activation: str = "tanh",
        max_log_scale: float = 3.0,
        split: str = "half",
    ):
        if n_couplings < 1:
            raise ValueError(f"n_couplings must be >= 1, got {n_couplings}")
        super().__init__(
            AffineCoupling(mask, hidden, activation, max_log_scale)
            for mask in coupling_masks(int(dim), int(n_couplings), split)
        )
