"""The flow contract shared by every bijection in bgexp.

A flow maps latent points z to configurations x and back:

    forward(z) -> (x, log|det dx/dz|)
    inverse(x) -> (z, log|det dz/dx|)

Both log-determinants have shape [batch]. `dim` is the width of z; a flow whose x has another
width (a coordinate transform that removes rigid-body motion, R^{3N-6} -> R^{3N}) also sets
`dim_out`; `out_dim(flow)` reads either. Every flow keeps this contract however it is built
(couplings, ODEs, root finding), so that flows compose (`SequentialFlow`) and invert
(`InverseFlow`) without knowing each other's internals (compare zuko's Transform).
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class Flow(nn.Module):
    """A bijection with log-determinants in both directions."""

    dim: int

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def check_input(self, t: Tensor, name: str = "input", width: int | None = None) -> None:
        """Fail with a message naming the expected shape when `t` is not [batch, width] (default:
        [batch, dim], the z side)."""
        width = self.dim if width is None else int(width)
        if t.dim() != 2 or t.shape[-1] != width:
            raise ValueError(
                f"{type(self).__name__} expects {name} of shape [batch, {width}], "
                f"got {tuple(t.shape)}"
            )


def out_dim(flow: Flow) -> int:
    """The width of the flow's x side (`dim_out` where the flow changes width, else `dim`)."""
    return int(getattr(flow, "dim_out", flow.dim))


class SequentialFlow(Flow):
    """Composition f_K o ... o f_1; log-dets add up: log|det J| = sum_k log|det J_k|."""

    def __init__(self, layers: Iterable[Flow]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("SequentialFlow needs at least one layer")
        for k in range(1, len(self.layers)):
            before, after = out_dim(self.layers[k - 1]), self.layers[k].dim
            if before != after:
                raise ValueError(
                    f"SequentialFlow layers disagree on dim: layer {k - 1} "
                    f"({type(self.layers[k - 1]).__name__}) outputs {before}, layer {k} "
                    f"({type(self.layers[k]).__name__}) expects {after}"
                )
        self.dim = self.layers[0].dim
        self.dim_out = out_dim(self.layers[-1])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(z, "z")
        logdet = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, ld = layer.forward(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x, "x", self.dim_out)
        logdet = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        return x, logdet


class InverseFlow(Flow):
    """The inverse of a flow: swaps forward and inverse."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow
        self.dim = out_dim(flow)
        self.dim_out = flow.dim

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.forward(x)


class AffineStandardization(Flow):
    """Fixed elementwise affine map x = mean + std * z (a diagonal whitening).

    log|det dx/dz| = sum_i log std_i. `mean` and `std` are buffers (saved in checkpoints, not
    trained); `fit(x)` sets them from data.
    """

    def __init__(self, dim: int, mean: Tensor | None = None, std: Tensor | None = None):
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.clone())
        self.register_buffer("std", torch.ones(dim) if std is None else std.clone())

    @torch.no_grad()
    def fit(self, x: Tensor, min_std: float = 1e-6) -> "AffineStandardization":
        self.check_input(x, "data")
        if x.shape[0] < 2:
            raise ValueError("AffineStandardization.fit needs at least 2 samples")
        self.mean.copy_(x.mean(0).to(self.mean))
        self.std.copy_(x.std(0).clamp_min(min_std).to(self.std))
        return self

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(z, "z")
        logdet = torch.log(self.std).sum().to(z).expand(z.shape[0])
        return self.mean.to(z) + self.std.to(z) * z, logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x, "x")
        logdet = -torch.log(self.std).sum().to(x).expand(x.shape[0])
        return (x - self.mean.to(x)) / self.std.to(x), logdet


@runtime_checkable
class ContinuousFlow(Protocol):
    """A flow defined by an ODE dx/dt = v(t, x) (a continuous normalizing flow, Chen et al.,
    NeurIPS 2018): `velocity(t, x) -> [B, D]` is the bare vector field (what flow matching trains,
    Lipman et al., ICLR 2023), `transport(z)` the map F(z) without its log-determinant (one solve of
    the bare field), `nfe` the number of field evaluations of the last solve (the cost evaluation
    reports per sample). Who has it: EquivariantCNF."""

    nfe: int

    def velocity(self, t: Tensor | float, x: Tensor) -> Tensor: ...

    def transport(self, z: Tensor) -> Tensor: ...
