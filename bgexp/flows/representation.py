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
    pca_whitening          x = mean + V diag(sqrt(lambda)) y, PCA of the data covariance (circular
                           features untouched; the revised dimer recipe of Noe et al. 2019)
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

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


class PCAWhitening(Flow):
    """Fixed linear whitening of the non-circular features by principal components:

        x_L = mean + V diag(sqrt(lambda)) y_L,        y_L = diag(1/sqrt(lambda)) V^T (x_L - mean),

    where L are the non-circular features, V the eigenvectors and lambda the eigenvalues of the
    covariance of the data on L (eigenvalues floored at `min_variance`, so the map stays invertible
    when the data are rank deficient, e.g. mean-free particle coordinates); every dimension is kept.
    Circular features pass through unchanged (a rotation mixing an angle with other features would
    leave the circle). The Jacobian is constant:

        forward (y -> x):  log|det dx/dy| = sum_k 0.5 log lambda_k,   inverse: the negative.

    `mean`, `eigvecs`, `scale` (= sqrt(lambda)) and the index buffer `linear` are buffers: saved in
    checkpoints, not trained; identity until `fit`.
    """

    def __init__(self, dim: int, circular: Sequence[bool] | Tensor | None = None):
        super().__init__()
        self.dim = int(dim)
        mask = torch.zeros(self.dim, dtype=torch.bool) if circular is None else torch.as_tensor(circular).bool()
        if mask.shape != (self.dim,):
            raise ValueError(f"PCAWhitening: circular mask of shape {tuple(mask.shape)} for dim {self.dim}")
        linear = torch.nonzero(~mask).flatten()
        n = int(linear.numel())
        self.register_buffer("linear", linear)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("eigvecs", torch.eye(n))
        self.register_buffer("scale", torch.ones(n))

    @property
    def all_linear(self) -> bool:
        return int(self.linear.numel()) == self.dim

    @torch.no_grad()
    def fit(self, x: Tensor, min_variance: float = 1e-8) -> "PCAWhitening":
        """Set mean, eigenvectors and sqrt(eigenvalues) from data x [n, dim] (computed in float64,
        stored in the buffers' dtype). Eigenvalues below `min_variance` are floored there, with a
        warning. Eigenvectors are sorted by decreasing variance, each signed so that its
        largest-magnitude entry is positive (a deterministic fit)."""
        self.check_input(x, "data")
        if x.shape[0] < 2:
            raise ValueError("PCAWhitening.fit needs at least 2 samples")
        if not min_variance > 0:
            raise ValueError(f"PCAWhitening: min_variance must be > 0, got {min_variance}")
        if self.linear.numel() == 0:
            return self
        data = x.detach().to(torch.float64)[:, self.linear.to(x.device)]
        if not torch.isfinite(data).all():
            raise ValueError("PCAWhitening.fit: the data hold non-finite values")
        cov = torch.atleast_2d(torch.cov(data.T))
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.flip(1)
        top = evecs.abs().argmax(0)
        evecs = evecs * torch.where(evecs[top, torch.arange(evecs.shape[1])] < 0, -1.0, 1.0)
        n_small = int((evals < min_variance).sum())
        if n_small:
            warnings.warn(f"PCAWhitening.fit: {n_small} of {len(evals)} variances are below min_variance="
                          f"{min_variance:g} (rank-deficient data); they are floored there",
                          RuntimeWarning, stacklevel=2)
        self.mean.copy_(data.mean(0).to(self.mean))
        self.eigvecs.copy_(evecs.to(self.eigvecs))
        self.scale.copy_(evals.clamp_min(min_variance).sqrt().to(self.scale))
        return self

    def _logdet(self, ref: Tensor) -> Tensor:
        return torch.log(self.scale.to(torch.float64)).sum().to(ref).expand(ref.shape[0])

    def _with_block(self, t: Tensor, block: Tensor) -> Tensor:
        """t with its non-circular features replaced by `block`."""
        if self.all_linear:
            return block
        return t.index_copy(1, self.linear, block)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(z, "z")
        y = z[:, self.linear] if not self.all_linear else z
        x = self.mean.to(z) + (y * self.scale.to(z)) @ self.eigvecs.to(z).T
        return self._with_block(z, x), self._logdet(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x, "x")
        block = x[:, self.linear] if not self.all_linear else x
        y = ((block - self.mean.to(x)) @ self.eigvecs.to(x)) / self.scale.to(x)
        return self._with_block(x, y), -self._logdet(x)


def pca_whitening(space: Space, data: torch.Tensor | None = None, topology: Any = None,
                  min_variance: float = 1e-8) -> tuple[Flow, Space]:
    """x = mean + V diag(sqrt(lambda)) y by PCA of the data covariance (PCAWhitening), fitted in
    float64; circular features are left untouched, as standardization leaves them. The next space
    is a plain space of the same width (the particle structure does not survive the mixing)."""
    if space.is_rigid_bodies:
        raise SpaceError(f"pca_whitening cannot act on a rigid-body space ({space.describe()}): box "
                         f"coordinates and quaternions are not linear features")
    layer = PCAWhitening(space.dim, space.circular_mask())
    if data is not None:
        layer.fit(data, min_variance=min_variance)
    return layer, space.with_dim(space.dim, circular=space.circular)


__all__ = ["internal_coordinates", "bounded_torsions", "standardization", "pca_whitening", "PCAWhitening"]
