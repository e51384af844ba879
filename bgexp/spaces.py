"""The space a flow acts on: a leaf description that targets produce and flows and priors consume.

A `Space` says how wide a configuration vector is and what its features are:
- `dim`: the width of a flat configuration x [batch, dim];
- `circular`: which features are angles on the circle [-pi, pi) (None: none are);
- `particles`, `spatial_dim`: x is `particles` points in R^spatial_dim, flattened (particle
  systems: the mean-free prior and the equivariant flows need both);
- `molecules`, `box`: x is `molecules` rigid bodies (centre of mass and unit quaternion, 7 numbers
  each) in an orthorhombic periodic box with edge lengths `box` (rigid-body flows need both).

Flows and targets never import each other; both import this module, which imports nothing of
bgexp. A representation layer (internal coordinates, standardization, bounded torsions) maps one
space to the next (`with_circular`, `with_dim`), so the last space of a flow recipe tells the
transform and the prior which features are circular.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


class SpaceError(ValueError):
    """A space is inconsistent, or a flow or prior cannot act on the space it is given."""


@dataclass(frozen=True)
class Space:
    dim: int
    circular: tuple[bool, ...] | None = None
    particles: int | None = None
    spatial_dim: int | None = None
    molecules: int | None = None
    box: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if int(self.dim) < 1:
            raise SpaceError(f"a space needs dim >= 1, got {self.dim}")
        if self.circular is not None:
            mask = tuple(bool(c) for c in self.circular)
            if len(mask) != self.dim:
                raise SpaceError(f"circular mask of length {len(mask)} for a space of dim {self.dim}")
            object.__setattr__(self, "circular", mask if any(mask) else None)
        if (self.particles is None) != (self.spatial_dim is None):
            raise SpaceError("a particle space needs both `particles` and `spatial_dim`")
        if self.particles is not None and self.particles * self.spatial_dim != self.dim:
            raise SpaceError(f"{self.particles} particles x {self.spatial_dim} dimensions != dim {self.dim}")
        if self.box is not None:
            object.__setattr__(self, "box", tuple(float(b) for b in self.box))
            if any(b <= 0 for b in self.box):
                raise SpaceError(f"box edges must be > 0, got {self.box}")
        if self.molecules is not None and self.box is None:
            raise SpaceError("a rigid-body space needs the periodic `box`")

    # derived views -------------------------------------------------------------------------
    @property
    def has_circular(self) -> bool:
        return self.circular is not None

    @property
    def is_particles(self) -> bool:
        return self.particles is not None

    @property
    def is_rigid_bodies(self) -> bool:
        return self.molecules is not None

    def circular_mask(self) -> torch.Tensor:
        """The circular features as a bool tensor [dim] (all False when none is circular)."""
        if self.circular is None:
            return torch.zeros(self.dim, dtype=torch.bool)
        return torch.tensor(self.circular, dtype=torch.bool)

    # the spaces a representation layer maps to ----------------------------------------------
    def with_dim(self, dim: int, circular: Sequence[bool] | torch.Tensor | None = None) -> "Space":
        """A plain space of width `dim` (particle and rigid-body structure do not survive a change
        of representation), with the given circular features."""
        return Space(int(dim), _mask_tuple(circular))

    def with_circular(self, circular: Sequence[bool] | torch.Tensor | None) -> "Space":
        """The same space with another circular mask."""
        return replace(self, circular=_mask_tuple(circular))

    def describe(self) -> str:
        parts = [f"dim {self.dim}"]
        if self.circular is not None:
            parts.append(f"{sum(self.circular)} circular")
        if self.particles is not None:
            parts.append(f"{self.particles} particles x {self.spatial_dim}")
        if self.molecules is not None:
            parts.append(f"{self.molecules} rigid molecules in box {list(self.box)}")
        return ", ".join(parts)


def _mask_tuple(circular) -> tuple[bool, ...] | None:
    if circular is None:
        return None
    if isinstance(circular, torch.Tensor):
        circular = circular.tolist()
    return tuple(bool(c) for c in circular)


__all__ = ["Space", "SpaceError"]
