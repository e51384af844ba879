"""Ice XI with rigid TIP4P/Ew water (SYSTEMS.md section 5): energies against a direct OpenMM
evaluation, rigid-body coordinates, the change-of-variables volume element, genice2 structures.

The reference structures belong to another project: they are read from ../shared/reference/ice
(never copied into the repository); tests that need them skip when the folder is absent.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")
from openmm import app, unit  # noqa: E402

from helpers import SHARED  # noqa: E402

from bgexp.quaternions import canonical, conjugate, multiply, normalize, random_unit, tangent_basis  # noqa: E402
from bgexp.targets.ice import (  # noqa: E402
    CUTOFF_MARGIN,
    TIP4PEW,
    IceStructure,
    IceTarget,
    atoms_to_rigid,
    build_ice,
    ice_system,
    load_ice_json,
    rigid_to_atoms,
)
from bgexp.targets.openmm import kbt_kj_per_mol  # noqa: E402

REF_DIR = SHARED / "reference" / "ice"
ENERGY_FILES = ["model-iceXI_T250_N16.json", "model-iceXI_T100_N16.json", "model-iceXI_T50_N16.json",
                "model-iceXI_T250_N128.json"]


def ref_path(name: str):
    path = REF_DIR / name
    if not path.is_file():
        pytest.skip(f"reference ice structure {path} is absent (another project's data, read from "
                    f"../shared/reference/ice and never copied into this repository)")
    return path


def direct_energy(name: str) -> tuple[float, float]:
    """Potential energy (kJ/mol) of a reference file, built independently of bgexp: ForceField
    tip4pew.xml + createSystem with the SYSTEMS.md settings + a CPU Context (1 thread). Returns
    (with M recomputed from O, H1, H2 as in MD, with the file's M positions)."""
    data = json.loads(ref_path(name).read_text())
    pos = np.asarray(data["positions"], dtype=np.float64)
    box = np.asarray(data["box"], dtype=np.float64)
    cutoff = float(data["nonbondedCutoff"])
    # O, H1, H2 only; OpenMM's Modeller adds the M sites from the force field's template
    top = app.Topology()
    chain = top.addChain()
    ohh = []
    for k in range(len(pos) // 4):
        res = top.addResidue("HOH", chain)
        atoms = [top.addAtom(name, app.element.oxygen if name == "O" else app.element.hydrogen, res)
                 for name in ("O", "H1", "H2")]
        top.addBond(atoms[0], atoms[1])
        top.addBond(atoms[0], atoms[2])
        ohh.extend(pos[4 * k : 4 * k + 3])
    top.setPeriodicBoxVectors(box * unit.nanometer)
    forcefield = app.ForceField("tip4pew.xml")
    modeller = app.Modeller(top, np.asarray(ohh) * unit.nanometer)
    modeller.addExtraParticles(forcefield)
    assert modeller.topology.getNumAtoms() == len(pos)  # O, H1, H2, M per molecule, in the file's order
    system = forcefield.createSystem(
        modeller.topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer, rigidWater=True,
        switchDistance=0.9 * cutoff * unit.nanometer, useDispersionCorrection=True, ewaldErrorTolerance=1e-4)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
    context.setPositions(pos)
    e_file_m = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    context.computeVirtualSites()
    e = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return e, e_file_m


def min_image_molecules(a: torch.Tensor, b: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """a [n, 4, 3] moved per molecule by whole box vectors so that its O is nearest to b's O."""
    shift = torch.round((a[:, :1] - b[:, :1]) / box) * box
    return a - shift


def random_rigid(batch: int, n: int, box: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    com = torch.rand(batch, n, 3, generator=g, dtype=torch.float64) * box
    q = random_unit((batch, n), generator=g, dtype=torch.float64)
    return com, q


# ---------------------------------------------------------------------------------------------
# energies of the reference structures
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ENERGY_FILES)
def test_reference_energy_matches_direct_openmm(name, record_property):
    structure = load_ice_json(ref_path(name))
    assert structure.temperature is not None
    with IceTarget(structure, structure.temperature, n_workers=1) as target:
        x = torch.from_numpy(structure.positions.reshape(1, -1))
        u = target.energy(x)
        e_bridge = float(u[0]) * kbt_kj_per_mol(structure.temperature)
    e_direct, e_file_m = direct_energy(name)
    diff = e_bridge - e_direct
    n = structure.n_molecules
    print(f"\n{name}: IceTarget {e_bridge:.6f} kJ/mol, direct OpenMM {e_direct:.6f} kJ/mol, "
          f"difference {diff:.3e}; per molecule {e_bridge / n:.4f}; (file's M positions: {e_file_m:.6f})")
    record_property("energy_bridge_kj_mol", e_bridge)
    record_property("energy_direct_kj_mol", e_direct)
    assert math.isfinite(e_bridge)
    assert abs(diff) <= 1e-4 + 1e-6 * abs(e_direct)


def test_structure_file_fields():
    s = load_ice_json(ref_path("model-iceXI_T250_N16.json"))
    assert s.positions.shape == (16, 4, 3) and s.n_molecules == 16
    np.testing.assert_allclose(s.box, [0.89846, 0.77808, 0.73358])
    assert s.cutoff == pytest.approx(0.36678) and s.temperature == 250.0
    s128 = load_ice_json(ref_path("model-iceXI_T250_N128.json"))
    assert s128.positions.shape == (128, 4, 3) and s128.cutoff == pytest.approx(0.73357)


def test_system_settings_and_masses():
    s = build_ice()
    _, system = ice_system(s)
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nb.getNonbondedMethod() == openmm.NonbondedForce.PME
    assert nb.getCutoffDistance().value_in_unit(unit.nanometer) == pytest.approx(s.cutoff)
    assert nb.getSwitchingDistance().value_in_unit(unit.nanometer) == pytest.approx(0.9 * s.cutoff)
    assert nb.getUseSwitchingFunction() and nb.getUseDispersionCorrection()
    assert nb.getEwaldErrorTolerance() == pytest.approx(1e-4)
    assert system.getNumConstraints() == 3 * s.n_molecules  # rigid water
    assert all(system.isVirtualSite(4 * i + 3) for i in range(s.n_molecules))
    masses = [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(4)]
    np.testing.assert_allclose(masses[:3], TIP4PEW.masses, rtol=0, atol=1e-12)
    assert masses[3] == 0.0
    # the body's M is exactly OpenMM's virtual site
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    moved = s.positions.copy()
    moved[:, 3] += 0.01  # garbage M, recomputed by OpenMM
    context.setPositions(moved.reshape(-1, 3))
    context.computeVirtualSites()
    vs = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    np.testing.assert_allclose(vs.reshape(-1, 4, 3)[:, 3], s.positions[:, 3], rtol=0, atol=1e-12)


def test_energy_ignores_m_and_rigid_gradient_matches_finite_differences():
    s = load_ice_json(ref_path("model-iceXI_T250_N16.json"))
    with IceTarget(s, 250.0, platform="Reference", n_workers=0) as target:
        x = torch.from_numpy(s.positions.reshape(1, -1)).clone().requires_grad_(True)
        u = target.energy(x)
        (grad,) = torch.autograd.grad(u.sum(), x)
        assert torch.all(grad.reshape(16, 4, 3)[:, 3] == 0)
        x_bad_m = x.detach().reshape(16, 4, 3).clone()
        x_bad_m[:, 3] += 0.005
        assert float(target.energy(x_bad_m.reshape(1, -1))) == pytest.approx(float(u.detach()), abs=1e-9)

        com, q = atoms_to_rigid(torch.from_numpy(s.positions)[None], box=target.box)
        com, q = com.requires_grad_(True), q.requires_grad_(True)
        u0 = target.energy_rigid(com, q)
        g_com, g_q = torch.autograd.grad(u0.sum(), (com, q))
        gen = torch.Generator().manual_seed(3)
        d_com = torch.randn(com.shape, generator=gen, dtype=torch.float64)
        d_u = torch.randn(1, 16, 3, generator=gen, dtype=torch.float64)
        d_q = (tangent_basis(q.detach()) @ d_u[..., None])[..., 0]  # tangent to S^3
        h = 1e-5
        with torch.no_grad():
            up = target.energy_rigid(com + h * d_com, normalize(q + h * d_q))
            um = target.energy_rigid(com - h * d_com, normalize(q - h * d_q))
        fd = float(up - um) / (2 * h)
        analytic = float((g_com * d_com).sum() + (g_q * d_q).sum())
        print(f"\ndirectional derivative of u(com, q): autograd {analytic:.6f}, finite difference {fd:.6f}")
        assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# rigid-body coordinates
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ENERGY_FILES)
def test_rigid_reconstruction_of_reference(name):
    s = load_ice_json(ref_path(name))
    pos = torch.from_numpy(s.positions)
    box = torch.from_numpy(s.box)
    com, q = atoms_to_rigid(pos[None], box=box)
    assert bool(((com >= 0) & (com < box)).all()) and bool((q[..., 0] >= 0).all())
    rec = min_image_molecules(rigid_to_atoms(com, q)[0], pos, box)
    err = (rec - pos).norm(dim=-1)
    oh = (pos[:, 1:3] - pos[:, :1]).norm(dim=-1)
    om = (pos[:, 3] - pos[:, 0]).norm(dim=-1)
    print(f"\n{name}: reconstruction error O,H {float(err[:, :3].max()):.2e} nm, M {float(err[:, 3].max()):.2e} nm; "
          f"file geometry: max |OH - 0.09572| {float((oh - 0.09572).abs().max()):.2e}, "
          f"max |OM - 0.0125| {float((om - 0.0125).abs().max()):.2e} nm")
    assert float(err.max()) < 1e-5


def test_rigid_roundtrip_and_double_cover():
    box = torch.tensor([0.89846, 0.77808, 0.73358], dtype=torch.float64)
    com, q = random_rigid(8, 16, box)
    pos = rigid_to_atoms(com, q)
    assert pos.shape == (8, 16, 4, 3)
    com2, q2 = atoms_to_rigid(pos, box=box)
    assert float((com2 - com).abs().max()) < 1e-10
    assert float((q2 - canonical(q)).abs().max()) < 1e-10
    assert float((rigid_to_atoms(com, -q) - pos).abs().max()) < 1e-15
    # no box: nothing wrapped
    com3, q3 = atoms_to_rigid(pos + 3 * box, box=None)
    assert float((com3 - com - 3 * box).abs().max()) < 1e-10 and float((q3 - q2).abs().max()) < 1e-10
    # molecules broken across the boundary (H wrapped separately) and coms outside the box
    broken = pos.clone()
    broken[:, ::2, 1] += box
    broken[:, 1::3, 2] -= 2 * box
    broken[:, ::5] += torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64) * box
    com4, q4 = atoms_to_rigid(broken, box=box)
    assert float((com4 - com).abs().max()) < 1e-10 and float((q4 - q2).abs().max()) < 1e-10
    # the body: TIP4P/Ew geometry, centre of mass at the origin, principal axes
    b = torch.from_numpy(TIP4PEW.body)
    oh = (b[1:3] - b[0]).norm(dim=-1)
    assert torch.allclose(oh, torch.full((2,), 0.09572, dtype=torch.float64), atol=1e-15, rtol=0)
    cos = float(((b[1] - b[0]) @ (b[2] - b[0])) / (oh[0] * oh[1]))
    assert math.degrees(math.acos(cos)) == pytest.approx(104.52, abs=1e-10)
    assert TIP4PEW.om == pytest.approx(0.0125, abs=1e-10)
    m = torch.from_numpy(TIP4PEW.masses)
    assert float((m[:, None] * b[:3]).sum(0).abs().max()) < 1e-16


def test_volume_element_is_constant():
    """sqrt(det J^T J) of (com, u) -> (O, H1, H2) at 50 random (com, q) equals the closed form."""
    box = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    com, q = random_rigid(1, 50, box, seed=1)
    masses = torch.from_numpy(TIP4PEW.masses).repeat_interleave(3)
    plain, weighted = [], []
    for k in range(50):
        c0, q0 = com[0, k], q[0, k]
        basis = tangent_basis(q0)  # [4, 3], orthonormal chart q(u) = (q + T u) / |q + T u|

        def sites(v):
            qq = normalize(q0 + basis @ v[3:])
            return rigid_to_atoms((c0 + v[:3])[None, None], qq[None, None])[0, 0, :3].reshape(9)

        jac = torch.autograd.functional.jacobian(sites, torch.zeros(6, dtype=torch.float64))  # [9, 6]
        plain.append(float(torch.linalg.det(jac.T @ jac).sqrt()))
        weighted.append(float(torch.linalg.det(jac.T @ (masses[:, None] * jac)).sqrt()))
        if k == 0:
            assert torch.allclose((jac.T @ jac)[:3, :3], 3 * torch.eye(3, dtype=torch.float64), atol=1e-14)
    plain, weighted = np.array(plain), np.array(weighted)
    c_plain, c_weighted = TIP4PEW.volume_element(), TIP4PEW.volume_element(mass_weighted=True)
    print(f"\nvolume element: closed form {c_plain:.12g} nm^3 (numerical spread {np.ptp(plain):.1e}); "
          f"mass-weighted {c_weighted:.12g} amu^1.5 nm^3 (spread {np.ptp(weighted):.1e})")
    assert np.abs(plain - c_plain).max() < 1e-8 and np.abs(plain / c_plain - 1).max() < 1e-8
    assert np.abs(weighted - c_weighted).max() < 1e-8 and np.abs(weighted / c_weighted - 1).max() < 1e-8


# ---------------------------------------------------------------------------------------------
# genice2 structures
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rep,n,n_ref", [((1, 1, 1), 16, 16), ((2, 2, 2), 128, 128)])
def test_build_ice(rep, n, n_ref):
    s = build_ice("11", rep)
    assert s.n_molecules == n and s.positions.shape == (n, 4, 3)
    assert s.cutoff == pytest.approx(s.box.min() / 2 - CUTOFF_MARGIN, abs=1e-12)
    info = s.info
    print(f"\nbuild_ice {rep}: {s.source}; shifts from genice2 (nm) {info['max_shift_nm']}; genice2 |OM| "
          f"{info['genice2_om_nm']:.5f} nm, max |OH - 0.09572| {info['genice2_max_dev_oh_nm']:.1e} nm")
    assert info["max_shift_nm"]["O"] < 1e-12 and info["max_shift_nm"]["H"] < 1e-12
    com, q = atoms_to_rigid(torch.from_numpy(s.positions)[None], box=torch.from_numpy(s.box))
    assert float((rigid_to_atoms(com, q)[0].numpy() - s.positions).__abs__().max()) < 1e-12  # exact TIP4P/Ew bodies

    ref_names = [f"model-iceXI_T250_N{n_ref}.json"] + (["model-iceXI_T50_N16.json"] if n == 16 else [])
    refs = {name: load_ice_json(ref_path(name)) for name in ref_names}
    for name, ref in refs.items():
        np.testing.assert_allclose(s.box, ref.box, rtol=0, atol=1e-4)
        assert s.cutoff == pytest.approx(ref.cutoff, abs=1e-9)
    kbt = kbt_kj_per_mol(250.0)
    with IceTarget(s, 250.0, n_workers=0) as target:
        u_built = float(target.energy(torch.from_numpy(s.positions.reshape(1, -1)))[0])
    assert math.isfinite(u_built)
    per_mol = u_built * kbt / n
    for name, ref in refs.items():
        with IceTarget(ref, 250.0, n_workers=0) as target:
            ref_per_mol = float(target.energy(torch.from_numpy(ref.positions.reshape(1, -1)))[0]) * kbt / n
        gap = ref_per_mol - per_mol
        print(f"  energy per molecule: built {per_mol:.4f} kJ/mol, {name} {ref_per_mol:.4f} kJ/mol, "
              f"gap {gap:.3f} kJ/mol = {gap / kbt_kj_per_mol(ref.temperature):.2f} kT({ref.temperature:g} K)")
        # the lattice is the cold limit: the sampled structure sits higher by about the equipartition
        # value 3 kT per molecule (6 rigid-body degrees of freedom, harmonic)
        assert 0 < gap < 4.5 * kbt_kj_per_mol(ref.temperature)
        if ref.temperature <= 50:
            assert abs(gap) < 0.03 * abs(ref_per_mol)


def test_built_ice_has_the_reference_proton_order():
    """Same ice XI as the reference: every built molecule has a reference molecule within thermal
    displacement, oriented the same way up to the labels H1 <-> H2 (a 180 deg turn about e2)."""
    ref = load_ice_json(ref_path("model-iceXI_T50_N16.json"))
    s = build_ice()
    box = torch.from_numpy(ref.box)
    cr, qr = atoms_to_rigid(torch.from_numpy(ref.positions)[None], box=box)
    cb, qb = atoms_to_rigid(torch.from_numpy(s.positions)[None], box=box)
    d = cb[0][:, None] - cr[0][None]
    d = d - torch.round(d / box) * box
    dist, j = d.norm(dim=-1).min(1)
    assert len(set(j.tolist())) == 16 and float(dist.max()) < 0.04
    flip = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64).expand(16, 4)
    angles = []
    for qq in (qb[0], multiply(qb[0], flip)):
        rel = multiply(conjugate(qr[0][j]), qq)
        angles.append(2 * torch.arccos(rel[:, 0].abs().clamp(max=1.0)))
    angle = torch.minimum(*angles)
    assert math.degrees(float(angle.max())) < 15.0


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_errors(tmp_path):
    box = np.array([0.9, 0.8, 0.7])
    good = np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match=r"\[n_molecules, 4, 3\]"):
        IceStructure(np.zeros((2, 3, 3)), box, 0.3)
    with pytest.raises(ValueError, match="3 positive edge lengths"):
        IceStructure(good, [0.9, 0.8], 0.3)
    with pytest.raises(ValueError, match="cutoff"):
        IceStructure(good, box, 0.36)
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"positions": good.reshape(-1, 3).tolist()}))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['box', 'nonbondedCutoff'\]"):
        load_ice_json(path)
    path.write_text(json.dumps({"positions": good.reshape(-1, 3).tolist(), "nonbondedCutoff": 0.3,
                                "box": [[0.9, 0.1, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 0.7]]}))
    with pytest.raises(ValueError, match="orthorhombic"):
        load_ice_json(path)
    path.write_text(json.dumps({"positions": good.reshape(-1, 3).tolist()[:7], "nonbondedCutoff": 0.3,
                                "box": box.tolist()}))
    with pytest.raises(ValueError, match=r"\[4 n_molecules, 3\]"):
        load_ice_json(path)
    com = torch.zeros(1, 2, 3, dtype=torch.float64)
    q = torch.zeros(1, 2, 4, dtype=torch.float64)
    q[..., 0] = 1
    with pytest.raises(ValueError, match=r"com of shape \[batch, n_molecules, 3\]"):
        rigid_to_atoms(com[0], q)
    with pytest.raises(ValueError, match=r"q of shape \[batch, n_molecules, 4\]"):
        rigid_to_atoms(com, q[..., :3])
    with pytest.raises(ValueError, match="unit quaternions"):
        rigid_to_atoms(com, 2 * q)
    with pytest.raises(ValueError, match=r"\[batch, n_molecules, 4, 3\]"):
        atoms_to_rigid(torch.zeros(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="box"):
        atoms_to_rigid(torch.zeros(1, 2, 4, 3, dtype=torch.float64), box=[1.0, 1.0])
    with pytest.raises(ValueError, match="rep"):
        build_ice("11", (1, 0, 1))
    with pytest.raises(ValueError, match="no lattice"):
        build_ice("no_such_ice_phase")
    s = build_ice()
    with IceTarget(s, 250.0, n_workers=0) as target:
        assert target.rigid_dim == 7 * 16 and target.dim == 16 * 12 and target.n_molecules == 16
        with pytest.raises(ValueError, match=r"\[batch, 192\]"):
            target.energy(torch.zeros(1, 190, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"\[batch, 16, 3\]"):
            target.energy_rigid(com, q)


def test_random_translation_moves_the_whole_crystal_and_keeps_the_energy():
    """A global shift (periodic) leaves every relative position and the energy unchanged, and the
    shifts are uniform in the box (the MD frames then sample the translation-invariant density)."""
    structure = build_ice("11", (1, 1, 1))
    with IceTarget(structure, 250.0, n_workers=0) as target:
        x = target.to_rigid(torch.as_tensor(structure.positions, dtype=torch.float64).reshape(1, -1)).repeat(400, 1)
        shifted = target.random_translation(x, torch.Generator().manual_seed(0))
        com, q = target.split_rigid(shifted)
        com0, q0 = target.split_rigid(x)
        assert torch.equal(q, q0)
        assert ((com >= 0) & (com < target.box)).all()
        delta = torch.remainder(com - com0, target.box)  # the same shift for every molecule of a sample
        spread = torch.remainder(delta - delta[:, :1] + target.box / 2, target.box) - target.box / 2
        assert spread.abs().max() < 1e-12
        assert torch.allclose(delta[:, 0].mean(0) / target.box, torch.full((3,), 0.5, dtype=torch.float64), atol=0.05)
        u0, u1 = target.rigid_energy(x[:5]), target.rigid_energy(shifted[:5])
        # PME on a fixed grid is translation invariant only up to its discretisation error
        # (measured: up to 0.01 kT of -475 kT at Ewald tolerance 1e-4)
        assert torch.allclose(u0, u1, atol=0.05, rtol=0)
        assert not torch.allclose(x, shifted)
