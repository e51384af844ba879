"""Bistable dimer in a box of repulsive particles (Boltzmann Generators, Noe et al., Science 2019).

Definition: ../shared/SYSTEMS.md, section 1 (the published code's form). 2D, 38 particles,
x = [x0, y0, x1, y1, x2, y2, ...] in R^76; particles 0 and 1 form the dimer. Reduced units,
reference kT = 1; at relative temperature T the reduced energy is u = U / T with

    U = U_rep + U_restraint + U_dimer + U_box
    U_rep       = eps * sum_{i<j, (i,j) != (0,1)} (rm / r_ij)^12             eps = 1, rm = 1.1
    U_restraint = k_d * [(x0 + x1)^2 + y0^2 + y1^2]                          k_d = 20
    U_dimer     = -0.5 s - 25 s^2 + 10 s^4,  s = 2 (d - 1.5),  d = |r0 - r1|
    U_box       = sum over all 76 coordinates c of 2 k_box max(0, |c| - l)^2 l = 3, k_box = 100

The box term is counted once (the published TensorFlow energy adds it twice). Observable: the
dimer distance d; states: closed (d < 1.5) and open (d >= 1.5).

`relabel_solvent=True` declares the 36 solvent particles interchangeable: training data are
relabelled onto a reference lattice and flow samples outside the canonical region get weight zero
(bgexp/targets/permutations.py); the energy, the observables and the references are unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from bgexp.targets.base import Reference, ReferenceValue, Target, load_reference_file
from bgexp.targets.permutations import ParticleRelabelling, square_lattice

REFERENCE_FILE = "dimer.json"
# the energy and state parameters the shipped reference (scripts/reference_dimer.py) was computed with
log = logging.getLogger(__name__)

REFERENCE_PARAMETERS = {"eps": 1.0, "rm": 1.1, "k_dimer": 20.0, "box_half_length": 3.0, "k_box": 100.0,
                        "d_transition": 1.5}


def solvent_relabelling(box_half_length: float = 3.0) -> ParticleRelabelling:
    """The 36 solvent particles relabelled onto a 6 x 6 square lattice filling the box (spacing
    1.05 x box / 6, as in Noe et al. 2019: 1.05 times the unit grid of the 6 x 6 box), the dimer's
    two particles kept (bgexp/targets/permutations.py for the density argument)."""
    sites = np.zeros((DimerTarget.n_particles, DimerTarget.n_dims))
    sites[2:] = square_lattice(6, 1.05 * 2.0 * box_half_length / 6.0)
    return ParticleRelabelling([list(range(2, DimerTarget.n_particles))], sites, DimerTarget.n_dims)


class DimerTarget(Target):
    """The 76-dimensional dimer-in-solvent energy, batched and differentiable (torch)."""

    n_particles = 38
    n_dims = 2

    def __init__(
        self,
        temperature: float = 1.0,
        eps: float = 1.0,
        rm: float = 1.1,
        k_dimer: float = 20.0,
        box_half_length: float = 3.0,
        k_box: float = 100.0,
        d_transition: float = 1.5,
        relabel_solvent: bool = False,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.dim = self.n_particles * self.n_dims
        self.temperature = float(temperature)
        self.eps, self.rm, self.k_dimer = float(eps), float(rm), float(k_dimer)
        self.box_half_length, self.k_box = float(box_half_length), float(k_box)
        self.d_transition = float(d_transition)
        i, j = torch.triu_indices(self.n_particles, self.n_particles, offset=1)
        keep = ~((i == 0) & (j == 1))
        self.register_buffer("pair_i", i[keep], persistent=False)
        self.register_buffer("pair_j", j[keep], persistent=False)
        self.observables = {"dimer_distance": self.dimer_distance}
        self.states = {"closed": self.is_closed, "open": self.is_open}
        self.reference = self._load_reference()
        if relabel_solvent:
            self.relabelling = solvent_relabelling(self.box_half_length)

    # observables and states -------------------------------------------------------------
    def dimer_distance(self, x: Tensor) -> Tensor:
        r = x.reshape(x.shape[0], self.n_particles, self.n_dims)
        return torch.linalg.norm(r[:, 0] - r[:, 1], dim=-1)

    def is_closed(self, x: Tensor) -> Tensor:
        return self.dimer_distance(x) < self.d_transition

    def is_open(self, x: Tensor) -> Tensor:
        return self.dimer_distance(x) >= self.d_transition

    # energy terms (reduced units at reference kT = 1) -----------------------------------
    def repulsion(self, x: Tensor) -> Tensor:
        r = x.reshape(x.shape[0], self.n_particles, self.n_dims)
        diff = r[:, self.pair_i] - r[:, self.pair_j]
        q = self.rm**2 / (diff**2).sum(-1)
        q3 = q * q * q  # (rm/r)^12 as q3 * q3: several times faster than a power
        return self.eps * (q3 * q3).sum(-1)

    def restraint(self, x: Tensor) -> Tensor:
        x0, y0, x1, y1 = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
        return self.k_dimer * ((x0 + x1) ** 2 + y0**2 + y1**2)

    def double_well(self, x: Tensor) -> Tensor:
        s = 2.0 * (self.dimer_distance(x) - self.d_transition)
        return -0.5 * s - 25.0 * s**2 + 10.0 * s**4

    def box(self, x: Tensor) -> Tensor:
        excess = torch.clamp(x.abs() - self.box_half_length, min=0.0)
        return (2.0 * self.k_box * excess**2).sum(-1)

    def potential(self, x: Tensor) -> Tensor:
        """U(x) at the reference kT = 1 (no temperature scaling)."""
        self.check_input(x)
        return self.repulsion(x) + self.restraint(x) + self.double_well(x) + self.box(x)

    def energy(self, x: Tensor) -> Tensor:
        """Reduced energy u = U / T."""
        return self.potential(x) / self.temperature

    # data generation ---------------------------------------------------------------------
    def initial_configurations(
        self, state: str, n: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Dimer on the x axis at d = 0.94 (closed) or 2.06 (open); solvent on a 6 x 6 lattice
        with a wider gap around y = 0 for the dimer; a small random jitter per configuration."""
        if state not in self.states:
            raise ValueError(f"unknown state {state!r}; the dimer has {sorted(self.states)}")
        d = 0.94 if state == "closed" else 2.06
        xs = torch.linspace(-2.5, 2.5, 6)
        ys = torch.tensor([-2.9, -1.9, -0.95, 0.95, 1.9, 2.9])
        gx, gy = torch.meshgrid(xs, ys, indexing="xy")
        solvent = torch.stack([gx.flatten(), gy.flatten()], -1)
        dimer = torch.tensor([[-d / 2, 0.0], [d / 2, 0.0]])
        x0 = torch.cat([dimer, solvent]).flatten()
        noise = 0.02 * torch.randn(n, self.dim, generator=generator)
        noise[:, :4] = 0.0
        return x0.unsqueeze(0) + noise

    def _load_reference(self) -> Reference | None:
        """The shipped reference at this temperature, only for the system it was computed for
        (`REFERENCE_PARAMETERS`): a modified dimer or box has no reference (None), never a wrong one."""
        changed = {k: getattr(self, k) for k, v in REFERENCE_PARAMETERS.items() if getattr(self, k) != v}
        if changed:
            log.info("no reference free energies for this dimer: %s differ from the reference system %s",
                     changed, REFERENCE_PARAMETERS)
            return None
        data = load_reference_file(REFERENCE_FILE)
        if data is None:
            return None
        key = f"{self.temperature:g}"
        entry = data.get("temperatures", {}).get(key)
        if entry is None:
            return None
        source = data.get("source", "")
        delta_f = {
            name: ReferenceValue(
                value=v["value"], ci_low=v.get("ci_low"), ci_high=v.get("ci_high"), source=source
            )
            for name, v in entry.get("delta_f", {}).items()
        }
        profiles = entry.get("profiles", {})
        return Reference(delta_f=delta_f, profiles=profiles, source=source)
