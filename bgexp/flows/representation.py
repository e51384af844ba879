"""Representation layers of a flow recipe: factories from one space to the next.

A flow config lists `layers` from the target's side toward the latent side, then the `transform`
and the `prior` (conf/flow/*.yaml). The builder (bgexp/training/assemble.py) calls each factory as

    layer, latent_space = factory(space, data=data, topology=topology, **hyperparameters)

with the current space, the training data expressed in it (float64, or None when a checkpoint will
provide the fitted buffers) and the molecular topology where the target has one. `layer` is a Flow
whose x side is `space` (forward: latent -> x), `latent_space` its z side; the builder carries the
data one layer further by `layer.inverse`. So a torus space (torsions left circular) reaches the
transform and the prior, which take their circular mask from it.

    internal_coordinates   Cartesian x (3N) <-> mixed internal/whitened Cartesian features (3N - 6)
                           (Noe et al., Science 2019); torsions are the circular features
    bounded_torsions       circular features squeezed onto the real line: t = pi tanh(y / pi)
    standardization        x = mean + std * y fitted on the data (circular features untouched)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from bgexp.flows.base import AffineStandardization, Flow
from bgexp.flows.coordinates import BoundedTorsions, MixedCoordinates, ZMatrix
from bgexp.spaces import Space, SpaceError


def internal_coordinates(space: Space, data: torch.Tensor | None = None, topology: Any = None,
                         cartesian: str | Sequence[int] = "backbone", whiten: bool = True) -> tuple[Flow, Space]:
    """The mixed internal/Cartesian representation of a molecule.

    `cartesian` is an mdtraj selection string (e.g. "backbone", "name N or name CA or name C") or a
    list of atom indices; all other atoms get internal coordinates from a Z-matrix built from the
    topology's bonds. With `whiten`, the Cartesian block is whitened by PCA on `data`."""
    if topology is None:
        raise SpaceError("internal_coordinates needs a molecular target with a topology (use a flow "
                         "recipe without internal coordinates)")
    import mdtraj

    md_top = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
    if isinstance(cartesian, str):
        try:
            atoms = md_top.select(cartesian)
        except Exception as err:
            raise SpaceError(f"cartesian={cartesian!r} is not a valid mdtraj selection: {err}") from err
    else:
        atoms = np.asarray(list(cartesian), dtype=int)
    if len(atoms) < 3:
        raise SpaceError(f"cartesian={cartesian!r} selects {len(atoms)} atoms; at least 3 are needed to fix "
                         f"the rigid-body frame")
    coordinates = MixedCoordinates(ZMatrix.from_topology(md_top, cartesian=atoms), whiten=bool(whiten))
    if coordinates.dim_out != space.dim:
        raise SpaceError(f"internal_coordinates: the topology has {coordinates.dim_out // 3} atoms, the space is "
                         f"{space.describe()}")
    if data is not None:
        coordinates.fit(data.double())
    return coordinates, space.with_dim(coordinates.dim, circular=coordinates.circular)


def bounded_torsions(space: Space, data: torch.Tensor | None = None, topology: Any = None) -> tuple[Flow, Space]:
    """Squeeze the circular features onto the real line (one preimage per configuration, so log q is
    exact for a transform on R^d; bgexp.flows.coordinates.BoundedTorsions)."""
    return BoundedTorsions(space.circular_mask()), space.with_circular(None)


def standardization(space: Space, data: torch.Tensor | None = None, topology: Any = None) -> tuple[Flow, Space]:
    """x = mean + std * y with mean and std of the data (in the training precision); circular features
    keep mean 0 and std 1 (a shift or scale would leave the circle)."""
    layer = AffineStandardization(space.dim)
    if data is not None:
        with torch.no_grad():
            layer.fit(data.to(torch.get_default_dtype()))
    if space.has_circular:
        mask = space.circular_mask()
        layer.mean[mask] = 0.0
        layer.std[mask] = 1.0
    return layer, space


__all__ = ["internal_coordinates", "bounded_torsions", "standardization"]
