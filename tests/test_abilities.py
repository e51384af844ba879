"""Declared abilities of targets (bgexp.targets.base): every target has the runtime-checkable
Protocols it should and none it should not, its `space`, the no-op defaults of `Target`, and
`require` names the missing ability and what needed it."""

from __future__ import annotations

import pytest

from bgexp.spaces import Space
from bgexp.targets.base import (
    ABILITIES,
    Closable,
    EnergyScale,
    ExactSampler,
    MissingAbilityError,
    MolecularTarget,
    ParticleSystem,
    QuadratureTarget,
    RigidBodyTarget,
    Target,
    abilities,
    require,
)
from bgexp.targets.dimer import DimerTarget
from bgexp.targets.particles import DoubleWell4, LennardJones
from bgexp.targets.torus import TorusMixture


def _has(target) -> set[str]:
    return set(abilities(target))


@pytest.mark.parametrize(
    "make, expected",
    [
        (DimerTarget, {"Closable"}),
        (DoubleWell4, {"ParticleSystem", "Closable"}),
        (lambda: LennardJones(n_particles=4), {"ParticleSystem", "Closable"}),
        (lambda: TorusMixture(quadrature_points=32), {"ExactSampler", "QuadratureTarget", "Closable"}),
    ],
    ids=["dimer", "dw4", "lj", "torus"],
)
def test_torch_targets_declare_exactly_their_abilities(make, expected):
    assert _has(make()) == expected


def test_spaces_of_the_torch_targets():
    assert DimerTarget().space == Space(76)
    assert DoubleWell4().space == Space(8, particles=4, spatial_dim=2)
    assert LennardJones(n_particles=13).space == Space(39, particles=13, spatial_dim=3)
    torus = TorusMixture(quadrature_points=32).space
    assert torus.dim == 2 and torus.circular == (True, True)


def test_target_defaults_are_no_ops():
    class Bare(Target):
        dim, temperature = 3, 1.0

        def energy(self, x):
            return x.pow(2).sum(-1)

    t = Bare()
    assert t.surfaces == {} and t.distributions == {}
    assert t.space == Space(3) and not t.space.has_circular
    t.close()  # nothing to release
    assert _has(t) == {"Closable"}
    # dictionaries are per instance, not shared through the class
    t.surfaces["s"] = ("a", "b", (0, 1), (0, 1))
    assert Bare().surfaces == {}


def test_a_method_set_to_none_blocks_the_ability():
    class NoSampler(TorusMixture):
        sample = None

    assert not isinstance(NoSampler(quadrature_points=32), ExactSampler)
    assert isinstance(NoSampler(quadrature_points=32), QuadratureTarget)


def test_duck_typed_objects_outside_the_hierarchy():
    class Harmonic:  # like the targeted-FEP tests: a plain object with kbt and an energy
        kbt = 2.5

        def energy(self, x):
            return x.pow(2).sum(-1)

    h = Harmonic()
    assert isinstance(h, EnergyScale)
    assert not isinstance(h, Closable) and not isinstance(h, MolecularTarget)


def test_require_returns_the_target_or_names_what_is_missing():
    torus = TorusMixture(quadrature_points=32)
    assert require(torus, ExactSampler, "data.generate.method=exact") is torus
    with pytest.raises(MissingAbilityError) as err:
        require(DimerTarget(), ExactSampler, "data.generate.method=exact")
    message = str(err.value)
    assert "ExactSampler" in message and "data.generate.method=exact" in message
    assert "DimerTarget" in message and "sample" in message
    assert isinstance(err.value, TypeError)
    with pytest.raises(MissingAbilityError, match=r"RigidBodyTarget.*DoubleWell4 lacks n_molecules, box, rigid_dim"):
        require(DoubleWell4(), RigidBodyTarget, "tfep random_translations")
    with pytest.raises(MissingAbilityError, match="n_particles"):
        require(DimerTarget(), ParticleSystem, "flow.alignment")


def test_every_ability_is_documented():
    for protocol in ABILITIES:
        assert "Who has it" in (protocol.__doc__ or ""), protocol.__name__


# --- OpenMM targets: built cheaply (in-process bridge, never opened) -------------------------------


def test_alanine_dipeptide_is_molecular():
    pytest.importorskip("openmm")
    from bgexp.targets.peptides import AlanineDipeptide

    target = AlanineDipeptide(n_workers=0)
    try:
        assert _has(target) == {"MolecularTarget", "EnergyScale", "Closable"}
        assert target.space == Space(target.dim) and target.surfaces  # the Ramachandran plot
        assert target.distributions == {}
    finally:
        target.close()


def test_ice_is_molecular_and_rigid():
    pytest.importorskip("openmm")
    pytest.importorskip("genice2")
    from bgexp.targets.ice import IceTarget, build_ice

    structure = build_ice("11", (1, 1, 1))
    target = IceTarget(structure, 250.0, n_workers=0)
    try:
        assert _has(target) == {"MolecularTarget", "EnergyScale", "RigidBodyTarget", "Closable"}
        space = target.space
        assert space.dim == target.rigid_dim == 7 * target.n_molecules
        assert space.molecules == target.n_molecules and space.box == tuple(target.box.tolist())
        assert space.is_rigid_bodies and not space.is_particles
    finally:
        target.close()

