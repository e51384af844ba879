"""The target contract: what a Boltzmann generator samples.

A target has a dimension `dim`, a reduced energy `energy(x) -> [batch]` in units of kT
(u = U / kT, differentiable in x), named `observables` (x -> [batch] float), named `states`
(x -> [batch] bool) between which free-energy differences are reported, optional `reference`
values with their source, and the means to make sampling data (`initial_configurations`, used by
the samplers in `bgexp.targets.md`). Every target also has a `space` (`bgexp.spaces.Space`: the
features a flow acts on), `surfaces` and `distributions` (empty unless the target lists some) and
`close()` (a no-op unless the target owns processes).

Optional abilities are declared by what a target has, and checked with the runtime-checkable
Protocols below (`isinstance(target, ExactSampler)`), never with hasattr: `MolecularTarget`,
`EnergyScale`, `RigidBodyTarget`, `ExactSampler`, `QuadratureTarget`, `ParticleSystem`,
`Closable`. Code that cannot go on without an ability calls `require(target, Protocol, what_for)`,
which raises `MissingAbilityError` naming the ability, its missing members and what needed it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from bgexp.spaces import Space
from bgexp.targets.permutations import ParticleRelabelling

Observable = Callable[[Tensor], Tensor]


@dataclass
class ReferenceValue:
    """A reference number with its uncertainty and where it comes from."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    source: str = ""


@dataclass
class Reference:
    """Reference results for a target at one temperature."""

    delta_f: dict[str, ReferenceValue] = field(default_factory=dict)
    profiles: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    source: str = ""
    # 2-D histograms: name -> {"observables": [a, b], "x_edges", "y_edges", "p" (probabilities)}
    surfaces: dict[str, dict] = field(default_factory=dict)


def load_reference_file(name: str) -> dict | None:
    """Read `bgexp/targets/references/<name>` shipped with the package; None when absent."""
    path = resources.files("bgexp.targets") / "references" / name
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class Target(nn.Module):
    """Base class of all targets; subclasses implement `energy` and fill the dictionaries.

    `surfaces`: name -> (observable a, observable b, (lo, hi) of a, (lo, hi) of b), the 2-D
    free-energy surfaces drawn and compared with `reference.surfaces` at evaluation (the
    Ramachandran plot). `distributions`: name -> x -> [batch, k] float, multi-valued observables
    whose pooled values are compared with the data's (all pair distances of a particle system).
    """

    dim: int
    temperature: float
    # interchangeable particles relabelled to a canonical order (bgexp/targets/permutations.py):
    # training data are relabelled, flow samples outside the canonical region get weight zero
    relabelling: ParticleRelabelling | None = None

    def __init__(self) -> None:
        super().__init__()
        self.observables: dict[str, Observable] = {}
        self.states: dict[str, Observable] = {}
        self.reference: Reference | None = None
        self.surfaces: dict[str, tuple[str, str, tuple[float, float], tuple[float, float]]] = {}
        self.distributions: dict[str, Observable] = {}

    @property
    def space(self) -> Space:
        """The space of the configurations the flow produces: a plain `Space(dim)` unless a target
        says more (particles, circular features, rigid bodies in a box)."""
        return Space(int(self.dim))

    def close(self) -> None:
        """Release what the target owns (worker processes); a no-op for targets in torch."""

    def energy(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects configurations of shape [batch, {self.dim}], "
                f"got {tuple(x.shape)}"
            )

    def initial_configurations(
        self, state: str, n: int, generator: torch.Generator | None = None
    ) -> Tensor:  # pragma: no cover - interface
        """n starting configurations inside `state` for MC/MD data generation."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate its own data")

    def state_of(self, x: Tensor) -> Tensor:
        """Index of the state each configuration is in (-1 where none), following `states` order."""
        out = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for k, fn in enumerate(self.states.values()):
            out = torch.where((out < 0) & fn(x), torch.full_like(out, k), out)
        return out


# ---------------------------------------------------------------------------------------------
# optional abilities: runtime-checkable Protocols (isinstance checks the members are present and,
# for methods, not None; a subclass blocks an inherited method by setting it to None)


@runtime_checkable
class MolecularTarget(Protocol):
    """A molecule (or molecules) with an OpenMM `system` and `topology`: x holds the flattened atom
    positions in nm, x in R^{3 n_atoms}; `positions` [n_atoms, 3] is the starting structure, `kbt`
    kT in kJ/mol (u = U / kbt), `mdtraj_topology()` the topology for trajectories and internal
    coordinates. Needed by internal-coordinate flows, MD data generation and trajectory output.
    Who has it: every `OpenMMTarget` (AlanineDipeptide, BPTI, IceTarget)."""

    topology: Any
    system: Any
    kbt: float
    positions: np.ndarray
    n_atoms: int

    def mdtraj_topology(self) -> Any: ...


@runtime_checkable
class EnergyScale(Protocol):
    """A target whose reduced energy is a physical energy divided by `kbt` (kT in kJ/mol), so that
    physical energies and forces (MD files store kJ/mol and kJ/mol/nm) can be reduced: u = U / kbt,
    f = F / kbt. Who has it: every `OpenMMTarget`, and any target that sets `kbt`."""

    kbt: float


@runtime_checkable
class RigidBodyTarget(Protocol):
    """`n_molecules` rigid molecules in an orthorhombic periodic box `box` (edge lengths, nm): besides
    atom positions, configurations have a rigid-body form x_r [B, rigid_dim = 7 n_molecules] (per
    molecule the centre of mass and a unit quaternion). `to_rigid(positions)` and
    `from_rigid(x_r)` convert, `rigid_energy(x_r)` is the reduced energy of the rigid form, and
    `random_translation(x_r, generator)` shifts each configuration as a whole by a uniform vector in
    the box (the energy is translation invariant). Needed by the rigid-body flows and targeted FEP.
    Who has it: IceTarget."""

    n_molecules: int
    box: Tensor
    rigid_dim: int

    def to_rigid(self, positions: Tensor) -> Tensor: ...

    def from_rigid(self, x: Tensor) -> Tensor: ...

    def rigid_energy(self, x: Tensor) -> Tensor: ...

    def random_translation(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


@runtime_checkable
class ExactSampler(Protocol):
    """`sample(n, generator=None) -> [n, dim]`: independent samples of exactly the target's
    Boltzmann density (training data without MC/MD, `data.generate.method: exact`).
    Who has it: TorusMixture (rejection sampling from the uniform density on the torus)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


@runtime_checkable
class QuadratureTarget(Protocol):
    """A normalised density on a grid: `quadrature(n_points) -> (grid [n], log p [n, n], cell area)`
    with sum(exp(log p)) * cell = 1, for the exact KL(target || flow) by the midpoint rule,
    KL = sum_ij p_ij (log p_ij - log q_ij) cell. Who has it: TorusMixture (2-D, on the torus)."""

    def quadrature(self, n_points: int | None = None) -> tuple[Tensor, Tensor, float]: ...


@runtime_checkable
class ParticleSystem(Protocol):
    """`n_particles` interchangeable particles in `spatial_dim` dimensions, x = [B, n_particles *
    spatial_dim], with an energy invariant under translations (and rotations, permutations):
    `remove_com(x)` projects onto the mean-free subspace the mean-free prior and the equivariant
    flows live on. (Named ParticleSystem because `bgexp.targets.particles.ParticleTarget` is the
    base class of these targets.) Who has it: DoubleWell4, LennardJones (every ParticleTarget)."""

    n_particles: int
    spatial_dim: int

    def remove_com(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Closable(Protocol):
    """`close()` releases what the object owns (OpenMM worker processes). Who has it: every
    `Target` (a no-op by default); the Protocol also covers duck-typed targets outside the hierarchy."""

    def close(self) -> None: ...


ABILITIES: tuple[type, ...] = (MolecularTarget, EnergyScale, RigidBodyTarget, ExactSampler, QuadratureTarget,
                               ParticleSystem, Closable)


class MissingAbilityError(TypeError):
    """A target lacks an optional ability (a Protocol of this module) that a feature needs."""


def protocol_members(protocol: type) -> list[str]:
    """The attribute and method names a Protocol of this module declares."""
    names = list(vars(protocol).get("__annotations__", {}))
    names += [k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_")]
    return names


def abilities(target: Any) -> list[str]:
    """Names of the optional abilities (Protocols in ABILITIES) the target has."""
    return [p.__name__ for p in ABILITIES if isinstance(target, p)]


def require(target: Any, protocol: type, what_for: str) -> Any:
    """`target` itself if it has the ability `protocol`; else MissingAbilityError naming the ability,
    the members the target lacks and `what_for` (the feature or config field that needs it)."""
    if isinstance(target, protocol):
        return target
    missing = [m for m in protocol_members(protocol) if getattr(target, m, None) is None]
    raise MissingAbilityError(
        f"{what_for} needs a target with the ability {protocol.__name__} "
        f"({', '.join(protocol_members(protocol))}); {type(target).__name__} lacks {', '.join(missing) or 'it'}"
    )
