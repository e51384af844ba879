"""What is sampled: one module per system, plus samplers for reference data (md.py)."""

from bgexp.targets.base import (
    Closable,
    EnergyScale,
    ExactSampler,
    MissingAbilityError,
    MolecularTarget,
    ParticleSystem,
    QuadratureTarget,
    Reference,
    ReferenceValue,
    RigidBodyTarget,
    Target,
    require,
)
from bgexp.targets.dimer import DimerTarget
from bgexp.targets.particles import DoubleWell4, LennardJones, ParticleTarget
from bgexp.targets.torus import TorusMixture

__all__ = ["Target", "Reference", "ReferenceValue", "DimerTarget", "TorusMixture", "ParticleTarget", "DoubleWell4",
           "LennardJones", "MolecularTarget", "EnergyScale", "RigidBodyTarget", "ExactSampler", "QuadratureTarget",
           "ParticleSystem", "Closable", "MissingAbilityError", "require"]
