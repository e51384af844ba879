"""Canonical labels for interchangeable particles: relabelling by optimal assignment to reference sites.

A system of N particles with a group G of k identical particles (the dimer's 36 solvent
particles) has an energy invariant under the k! permutations P of G: u(Px) = u(x), so the
Boltzmann density mu ~ exp(-u) has k! identical copies. Training data sample a few of them; a
flow fitted to such data must learn a density with k! modes it has never seen. Boltzmann
generators (Noe, Olsson, Koehler, Wu, Science 2019) remove the symmetry by relabelling: the
particles of G are matched to k fixed reference sites s_1..s_k by the assignment that minimises
sum_j |r_{pi(j)} - s_j|^2 (the Hungarian algorithm; scipy.optimize.linear_sum_assignment), and
particle label j is given to the particle on site j.

The density argument (what a flow trained on relabelled data is a density of):
- The canonical region R = {x : the identity is the optimal assignment} is a fundamental domain:
  the sets P R over the k! permutations tile configuration space (up to the measure-zero set of
  ties), and the relabelling C maps every x to the one representative of its orbit in R.
- C is a measure-preserving rearrangement of mu onto R: if X ~ mu, C(X) has density
  mu_R(x) = k! mu(x) 1_R(x) (each of the k! copies of a configuration is folded onto one point, all
  with the same energy). Energies are unchanged by C; a permuted copy of x maps to C(x) too.
- A flow q trained on relabelled data approximates mu_R. Importance sampling against mu_R,
      w(x) = exp(-u(x)) 1_R(x) / q(x),
  gives E_{mu_R}[f] = E_mu[f] for every permutation-invariant observable f (the dimer distance, the
  states, the energy) without bias, since mu_R and mu agree on such f. The constant k! cancels in
  self-normalised weights and in every ratio of normalisers (free-energy differences).
- A flow sample outside R (q cannot follow the cut at R's boundary exactly) gets weight zero:
  1_R(x) = 0. Dropping 1_R instead would target the union of R and pieces of its neighbouring
  copies, which over-weights configurations near R's boundary (a bias, not only noise). Samples
  outside R are counted and reported, never silently dropped; their share is the price of a flow
  that spills over the boundary.

`ParticleRelabelling` holds the groups and their sites; targets that declare one expose it as
`Target.relabelling` (None when a target has no interchangeable particles or does not use it).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


class RelabellingError(ValueError):
    """Groups or reference sites that do not describe interchangeable particles of the system."""


class ParticleRelabelling:
    """Canonical relabelling of groups of identical particles (module docstring).

    groups: lists of particle indices, each a group of interchangeable particles (disjoint);
    sites: [n_particles, spatial_dim] reference positions; only the rows of grouped particles
    are used (site j of a group is the reference position of the group's j-th label);
    spatial_dim: coordinates per particle (x is [batch, n_particles * spatial_dim], particle-major).
    """

    def __init__(self, groups: list[list[int]], sites: Tensor | np.ndarray, spatial_dim: int):
        sites = np.asarray(sites, dtype=np.float64)
        if sites.ndim != 2 or sites.shape[1] != spatial_dim:
            raise RelabellingError(f"reference sites must have shape [n_particles, {spatial_dim}], got {sites.shape}")
        n_particles = sites.shape[0]
        seen: set[int] = set()
        self.groups: list[np.ndarray] = []
        for group in groups:
            idx = np.asarray(list(group), dtype=np.int64)
            if idx.size < 2:
                raise RelabellingError(f"a group of interchangeable particles needs at least 2 members, got {list(idx)}")
            if idx.min() < 0 or idx.max() >= n_particles:
                raise RelabellingError(f"group {list(idx)} names particles outside 0..{n_particles - 1}")
            if seen & set(idx.tolist()) or len(set(idx.tolist())) != idx.size:
                raise RelabellingError("groups of interchangeable particles must be disjoint, without repeats")
            seen |= set(idx.tolist())
            self.groups.append(idx)
        if not self.groups:
            raise RelabellingError("no group of interchangeable particles given")
        self.sites = sites
        self.n_particles, self.spatial_dim = n_particles, int(spatial_dim)

    def _positions(self, x: Tensor) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.n_particles * self.spatial_dim:
            raise RelabellingError(f"x must have shape [batch, {self.n_particles * self.spatial_dim}], "
                                   f"got {tuple(x.shape)}")
        return x.detach().double().cpu().numpy().reshape(x.shape[0], self.n_particles, self.spatial_dim)

    def permutation(self, x: Tensor) -> np.ndarray:
        """[batch, n_particles] int: new particle j is old particle perm[:, j] (identity outside the
        groups); within a group, the particle nearest in the optimal assignment to site j gets label j."""
        r = self._positions(x)
        perm = np.tile(np.arange(self.n_particles), (r.shape[0], 1))
        for idx in self.groups:
            sites = self.sites[idx]  # [k, d]
            for b in range(r.shape[0]):
                pos = r[b, idx]  # [k, d]
                cost = ((pos[:, None, :] - sites[None, :, :]) ** 2).sum(-1)  # particle i to site j
                rows, cols = linear_sum_assignment(cost)
                order = np.empty_like(cols)
                order[cols] = rows  # site j holds particle rows[cols == j]
                perm[b, idx] = idx[order]
        return perm

    def canonicalize(self, x: Tensor) -> Tensor:
        """x with the particles of every group relabelled to their canonical order (same dtype,
        device and energy)."""
        return self.permute(x, self.permutation(x))

    def permute(self, v: Tensor, perm: np.ndarray) -> Tensor:
        """Per-particle vectors v [batch, n_particles * spatial_dim] (positions, forces) reordered by
        `perm` (from `permutation`): new particle j is old particle perm[:, j]."""
        index = torch.as_tensor(perm, device=v.device)
        r = v.reshape(v.shape[0], self.n_particles, self.spatial_dim)
        return torch.gather(r, 1, index[..., None].expand(-1, -1, self.spatial_dim)).reshape(v.shape)

    def in_canonical_region(self, x: Tensor) -> Tensor:
        """[batch] bool: x is its own canonical representative (x in R)."""
        perm = self.permutation(x)
        return torch.as_tensor((perm == np.arange(self.n_particles)).all(axis=1), device=x.device)


def square_lattice(n_per_side: int, spacing: float, spatial_dim: int = 2) -> np.ndarray:
    """[n_per_side ** spatial_dim, spatial_dim] sites of a square (cubic) lattice centred at the origin."""
    axis = (np.arange(n_per_side) - (n_per_side - 1) / 2.0) * spacing
    grids = np.meshgrid(*([axis] * spatial_dim), indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=-1)


__all__ = ["ParticleRelabelling", "RelabellingError", "square_lattice"]
