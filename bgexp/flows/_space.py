"""The `space=` argument of flow and prior factories, as a `bgexp.spaces.Space`.

`hydra.utils.instantiate(node, space=space)` turns a dataclass keyword argument into a config
(Hydra treats dataclass instances in kwargs as structured configs), so a factory may receive the
space as a mapping of its fields; it is rebuilt (and re-validated) here.
"""

from __future__ import annotations

from collections.abc import Mapping

from bgexp.spaces import Space, SpaceError

_FIELDS = ("dim", "circular", "particles", "spatial_dim", "molecules", "box")


def as_space(space, family: str) -> Space:
    """`space` as a Space (a Space, or a mapping of Space fields); SpaceError otherwise."""
    if isinstance(space, Space):
        return space
    if isinstance(space, Mapping) and "dim" in space:
        unknown = sorted(set(space) - set(_FIELDS))
        if unknown:
            raise SpaceError(f"{family} got a space with unknown fields {unknown}; a Space has {list(_FIELDS)}")
        return Space(**{k: space[k] for k in _FIELDS if k in space})
    raise SpaceError(f"{family} expects `space` to be a bgexp.spaces.Space, got {type(space).__name__}")


def dim_from(owner: str, dim: int | None, space) -> int:
    """The width of a flow or prior given as `dim`, as a `space`, or both (then they must agree)."""
    if space is None:
        if dim is None:
            raise ValueError(f"{owner} needs `dim` or `space`")
        return int(dim)
    space = as_space(space, owner)
    if dim is not None and int(dim) != space.dim:
        raise SpaceError(f"{owner}: dim={dim} does not match the space ({space.describe()})")
    return space.dim
