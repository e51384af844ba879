"""Particle benchmark targets: DW4, LJ13 and LJ55 (Equivariant Flows, Köhler, Klein & Noé, ICML 2020).

Definitions: ../shared/SYSTEMS.md, section 2. Reduced units, reference kT = 1; at relative
temperature T the reduced energy is u = U / T. Configurations are flattened, x in R^{n d} ordered
[x_0, y_0, (z_0,) x_1, y_1, ...], d_ij = |x_i - x_j|.

    DW4   (n = 4, d = 2):  U = sum_{i<j} a (d_ij - d0)^4 + b (d_ij - d0)^2
                           a = 0.9, b = -4, d0 = 4
    LJ-n  (n = 13 or 55, d = 3):
                           U = eps sum_{i<j} [(rm/d_ij)^12 - 2 (rm/d_ij)^6] + (k/2) sum_i |x_i - x_com|^2
                           eps = 1, rm = 1, k = 1 (the 0.5 * sum_i |x_i - x_com|^2 oscillator)

The LJ sum runs over unordered pairs i < j. Some later code sums over ordered pairs, which doubles
the LJ term: say so wherever an energy is compared with a paper (SYSTEMS.md section 2).

Both energies are invariant under rotations, reflections, translations and permutations of the
particles (E(n) x S_n); flows work on the mean-free subspace (centre of mass at the origin) with a
mean-free Gaussian prior. The translation invariance means a Metropolis chain's centre of mass
random-walks: `sample_reference` removes it from every kept sample. `states` holds one state,
"all" (always true), so that `bgexp.targets.md.sample_states(target, states=["all"], ...)` -- the
data module's `generate.method: mc` path -- runs unconfined chains; that path does not remove the
centre of mass (use `remove_com` on its output, or `sample_reference`).

Observables: "mean_distance" (mean over the n(n-1)/2 pair distances); `pair_distances(x)` gives all
of them for distance histograms. SYSTEMS.md gives no reference numbers for these systems, so
`reference` is None.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bgexp.spaces import Space
from bgexp.targets.base import Target
from bgexp.targets.md import metropolis

ALL_STATE = "all"


class ParticleTarget(Target):
    """n identical particles in d dimensions with a pairwise-distance energy; x is [batch, n * d]."""

    def __init__(self, n_particles: int, spatial_dim: int, temperature: float = 1.0):
        super().__init__()
        if int(n_particles) < 2 or int(spatial_dim) < 1:
            raise ValueError(f"need n_particles >= 2 and spatial_dim >= 1, got {n_particles}, {spatial_dim}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.n_particles, self.spatial_dim = int(n_particles), int(spatial_dim)
        self.n_dims = self.spatial_dim
        self.dim = self.n_particles * self.spatial_dim
        self.temperature = float(temperature)
        i, j = torch.triu_indices(self.n_particles, self.n_particles, offset=1)
        self.register_buffer("pair_i", i, persistent=False)
        self.register_buffer("pair_j", j, persistent=False)
        self.observables = {"mean_distance": self.mean_distance}
        # multi-valued observables: evaluation compares their pooled histograms with the data's
        self.distributions = {"pair_distance": self.pair_distances}
        self.states = {ALL_STATE: self.is_anywhere}
        self.reference = None

    @property
    def space(self) -> Space:
        """n_particles points in R^spatial_dim (the mean-free prior and equivariant flows need both)."""
        return Space(self.dim, particles=self.n_particles, spatial_dim=self.spatial_dim)

    @property
    def n_pairs(self) -> int:
        return self.n_particles * (self.n_particles - 1) // 2

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects configurations of shape [batch, {self.dim}] "
                f"({self.n_particles} particles x {self.spatial_dim} dimensions, flattened), got {shape}"
            )

    # geometry ----------------------------------------------------------------------------
    def as_particles(self, x: Tensor) -> Tensor:
        """[batch, n * d] -> [batch, n, d]."""
        self.check_input(x)
        return x.reshape(x.shape[0], self.n_particles, self.spatial_dim)

    def remove_com(self, x: Tensor) -> Tensor:
        """Project onto the mean-free subspace: subtract each configuration's centre of mass."""
        r = self.as_particles(x)
        return (r - r.mean(1, keepdim=True)).reshape(x.shape)

    def centre_of_mass(self, x: Tensor) -> Tensor:
        """[batch, d]."""
        return self.as_particles(x).mean(1)

    def pair_distances(self, x: Tensor) -> Tensor:
        """All d_ij for i < j, [batch, n (n - 1) / 2] (row-major order of torch.triu_indices)."""
        r = self.as_particles(x)
        diff = r[:, self.pair_i] - r[:, self.pair_j]
        return torch.sqrt((diff**2).sum(-1))

    def mean_distance(self, x: Tensor) -> Tensor:
        return self.pair_distances(x).mean(-1)

    def is_anywhere(self, x: Tensor) -> Tensor:
        """The single state "all": true for every configuration."""
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    # energy ------------------------------------------------------------------------------
    def potential(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        """U(x) at the reference kT = 1."""
        raise NotImplementedError

    def energy(self, x: Tensor) -> Tensor:
        """Reduced energy u = U / T, [batch]."""
        return self.potential(x) / self.temperature

    # data generation -----------------------------------------------------------------------
    def low_energy_configuration(self, dtype: torch.dtype = torch.float64) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def initial_configurations(
        self, state: str, n: int, generator: torch.Generator | None = None, jitter: float = 0.05
    ) -> Tensor:
        """n mean-free starting configurations for MC: a low-energy arrangement
        (`low_energy_configuration`) plus Gaussian jitter of `jitter` length units, recentred."""
        if state not in self.states:
            raise ValueError(f"unknown state {state!r}; {type(self).__name__} has {list(self.states)}")
        x0 = self.low_energy_configuration(torch.float32).reshape(1, self.dim)
        x = x0 + jitter * torch.randn(n, self.dim, generator=generator)
        return self.remove_com(x)


class DoubleWell4(ParticleTarget):
    """DW4 (SYSTEMS.md section 2): 4 particles in 2D, U = sum_{i<j} 0.9 (d_ij - 4)^4 - 4 (d_ij - 4)^2.

    Each pair term has minima at d = 4 -+ sqrt(20/9) (2.509 and 5.491), value -40/9, and a barrier
    of 40/9 kT at d = 4.
    """

    def __init__(self, temperature: float = 1.0, a: float = 0.9, b: float = -4.0, d0: float = 4.0,
                 n_particles: int = 4, spatial_dim: int = 2):
        super().__init__(n_particles, spatial_dim, temperature)
        self.a, self.b, self.d0 = float(a), float(b), float(d0)

    def potential(self, x: Tensor) -> Tensor:
        s = self.pair_distances(x) - self.d0
        s2 = s * s
        return (self.a * s2 * s2 + self.b * s2).sum(-1)

    def low_energy_configuration(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """A square with side 4 - sqrt(-b / (2 a)) (the inner pair minimum), centred; [n, d]."""
        if self.n_particles != 4 or self.spatial_dim != 2:
            return _lattice_points(self.n_particles, self.spatial_dim, 2.5, dtype)
        side = self.d0 - math.sqrt(-self.b / (2 * self.a)) if self.a > 0 and self.b < 0 else 2.5
        square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=dtype) * side
        return square - square.mean(0)


class LennardJones(ParticleTarget):
    """LJ13 / LJ55 (SYSTEMS.md section 2): n particles in 3D,
    U = eps sum_{i<j} [(rm/d_ij)^12 - 2 (rm/d_ij)^6] + (k/2) sum_i |x_i - x_com|^2,
    eps = 1, rm = 1, k = 1 (the 0.5 * sum_i |x_i - x_com|^2 term of SYSTEMS.md). Unordered pairs:
    the LJ term is half of what ordered-pair code (sum over i != j) reports.
    """

    def __init__(self, n_particles: int = 13, temperature: float = 1.0, eps: float = 1.0, rm: float = 1.0,
                 oscillator: float = 1.0, spatial_dim: int = 3):
        super().__init__(n_particles, spatial_dim, temperature)
        self.eps, self.rm, self.oscillator = float(eps), float(rm), float(oscillator)

    def lennard_jones(self, x: Tensor) -> Tensor:
        r = self.as_particles(x)
        diff = r[:, self.pair_i] - r[:, self.pair_j]
        q = self.rm**2 / (diff**2).sum(-1)
        q3 = q * q * q  # (rm/d)^6
        return self.eps * (q3 * q3 - 2.0 * q3).sum(-1)

    def harmonic(self, x: Tensor) -> Tensor:
        r = self.as_particles(x)
        return 0.5 * self.oscillator * ((r - r.mean(1, keepdim=True)) ** 2).sum((1, 2))

    def potential(self, x: Tensor) -> Tensor:
        return self.lennard_jones(x) + self.harmonic(x)

    def low_energy_configuration(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The n points of an fcc lattice (nearest-neighbour distance rm) closest to a lattice
        site, centred: for 13 and 55 closed shells (cuboctahedra), close to the icosahedral
        minima; [n, 3]."""
        if self.spatial_dim != 3:
            return _lattice_points(self.n_particles, self.spatial_dim, self.rm, dtype)
        m = math.ceil(self.n_particles ** (1 / 3)) + 2
        sites = [p for p in itertools.product(range(-m, m + 1), repeat=3) if sum(p) % 2 == 0]
        pts = torch.tensor(sites, dtype=torch.float64) * (self.rm / math.sqrt(2.0))
        order = sorted(range(len(sites)), key=lambda k: (round(float((pts[k] ** 2).sum()), 9), sites[k]))
        chosen = pts[order[: self.n_particles]]
        return (chosen - chosen.mean(0)).to(dtype)


def _lattice_points(n: int, d: int, spacing: float, dtype: torch.dtype) -> Tensor:
    """n points of a simple cubic lattice in d dimensions nearest the origin, centred; [n, d]."""
    m = math.ceil(n ** (1 / d))
    sites = sorted(itertools.product(range(-m, m + 1), repeat=d), key=lambda p: (sum(c * c for c in p), p))
    pts = torch.tensor(sites[:n], dtype=torch.float64) * spacing
    return (pts - pts.mean(0)).to(dtype)


# reference data ----------------------------------------------------------------------------
@dataclass
class ReferenceSamples:
    x: Tensor  # [n_kept * n_chains, dim], mean-free
    energies: Tensor  # [n_kept * n_chains], reduced
    acceptance: float  # mean acceptance after burn-in
    step_size: Tensor  # [n_chains], the frozen per-chain step sizes


def sample_reference(
    target: ParticleTarget,
    n_chains: int,
    n_steps: int,
    burn_in: int,
    thin: int,
    step_size: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> ReferenceSamples:
    """Equilibrium samples of a particle target by long unconfined Metropolis chains
    (`bgexp.targets.md.metropolis`, all coordinates moved at once, step size adapted during
    burn-in), started from `initial_configurations("all", ...)`. The centre of mass is removed from
    every kept sample (the energy is translation invariant, so this is exact)."""
    generator = torch.Generator().manual_seed(int(seed))
    x0 = target.initial_configurations(ALL_STATE, int(n_chains), generator)
    result = metropolis(target.energy, x0, n_steps=int(n_steps), step_size=float(step_size),
                        burn_in=int(burn_in), thin=int(thin), generator=generator,
                        progress=progress, desc=f"MC reference ({type(target).__name__})")
    x = target.remove_com(result.samples.reshape(-1, target.dim))
    return ReferenceSamples(x=x, energies=result.energies.reshape(-1), acceptance=result.acceptance,
                            step_size=result.step_size)
