"""Structures and OpenMM systems for ALA2 and BPTI (SYSTEMS.md sections 3 and 4)."""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import SHARED

from bgexp.targets import structures as st
from bgexp.targets.structures import ForceFieldError, StructureError

BPTI_FILE = SHARED / "data" / "5PTI.cif.gz"
BPTI_N_ATOMS = 892
BPTI_DISULFIDES = [(5, 55), (14, 38), (30, 51)]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _index(topology) -> dict[tuple[str, str], int]:
    return {(a.residue.name, a.name): a.index for a in topology.atoms()}


def _phi_psi(topology, positions) -> tuple[float, float]:
    md = pytest.importorskip("mdtraj")
    traj = md.Trajectory(np.asarray(positions)[None], md.Topology.from_openmm(topology))
    phi = float(np.degrees(md.compute_phi(traj)[1][0, 0]))
    psi = float(np.degrees(md.compute_psi(traj)[1][0, 0]))
    return phi, psi


def _corn_is_clockwise(n, ca, c, cb, ha) -> bool:
    """CORN rule, independent of the determinant: looking at CA with HA towards the viewer, do
    CO -> R -> N run clockwise? (L amino acids: yes.)"""
    w = (ha - ca) / np.linalg.norm(ha - ca)  # towards the viewer
    u = np.cross(w, [1.0, 0.0, 0.0])
    if np.linalg.norm(u) < 1e-6:
        u = np.cross(w, [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(w, u)  # (u, v, w) right-handed: seen from +w, angles increase counterclockwise
    ang = {k: np.degrees(np.arctan2(np.dot(x - ca, v), np.dot(x - ca, u))) for k, x in
           (("C", c), ("R", cb), ("N", n))}
    step1 = (ang["R"] - ang["C"]) % 360.0
    step2 = (ang["N"] - ang["R"]) % 360.0
    return step1 > 180.0 and step2 > 180.0  # each step turns by -120 deg: clockwise


def _raw_bpti_fixer():
    from pdbfixer import PDBFixer

    data = (Path(st.__file__).parent / "data" / "5PTI.cif.gz").read_bytes()
    return PDBFixer(pdbxfile=io.StringIO(gzip.decompress(data).decode()))


def _write_gapped_pdb(path: Path, remove_resid: str = "25") -> str:
    """5PTI chain A without residue `remove_resid` (numbering kept) as PDB with SEQRES records,
    which is what pdbfixer aligns against to find missing residues. Returns the removed name."""
    from openmm import app

    fixer = _raw_bpti_fixer()
    fixer.removeHeterogens(keepWater=False)
    chain = next(fixer.topology.chains())
    sequence = [r.name for r in chain.residues()]
    gone = [r for r in chain.residues() if r.id == remove_resid]
    assert len(gone) == 1
    modeller = app.Modeller(fixer.topology, fixer.positions)
    modeller.delete(list(gone[0].atoms()) + [a for a in modeller.topology.atoms()
                                            if a.element is not None and a.element.symbol in ("H", "D")])
    buf = io.StringIO()
    app.PDBFile.writeFile(modeller.topology, modeller.positions, buf, keepIds=True)
    seqres = [f"SEQRES {k + 1:>3} {chain.id} {len(sequence):>4}  " + " ".join(sequence[i:i + 13])
              for k, i in enumerate(range(0, len(sequence), 13))]
    path.write_text("\n".join(seqres) + "\n" + buf.getvalue())
    return gone[0].name


# ---------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------

def test_import_does_not_load_openmm():
    code = ("import sys, bgexp.targets.structures; "
            "print(any(m == 'openmm' or m.startswith(('openmm.', 'pdbfixer')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# ALA2 (SYSTEMS.md section 3)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ala2():
    top, pos = st.build_alanine_dipeptide()
    system = st.create_system(top)
    e0 = st.potential_energy(system, pos)
    pos_min = st.minimize(system, top, pos)
    return {"top": top, "pos": pos, "system": system, "e0": e0, "pos_min": pos_min,
            "e_min": st.potential_energy(system, pos_min)}


def test_ala2_topology(ala2):
    top, pos = ala2["top"], ala2["pos"]
    assert top.getNumAtoms() == 22 and pos.shape == (22, 3) and pos.dtype == np.float64
    assert [r.name for r in top.residues()] == ["ACE", "ALA", "NME"]
    assert top.getNumBonds() == 21  # a tree: 22 atoms, no rings
    n_h = sum(a.element.symbol == "H" for a in top.atoms())
    assert n_h == 12


def test_ala2_geometry_and_torsions():
    top, pos = st.build_alanine_dipeptide(phi=-80.0, psi=80.0)
    phi, psi = _phi_psi(top, pos)
    assert phi == pytest.approx(-80.0, abs=1e-3) and psi == pytest.approx(80.0, abs=1e-3)
    lengths = np.array([np.linalg.norm(pos[a.index] - pos[b.index]) for a, b in top.bonds()])
    assert lengths.min() > 0.1 - 1e-9 and lengths.max() < 0.154
    # no clashes between atoms that are not bonded
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(len(pos))
    assert d.min() >= 0.1 - 1e-9


def test_nerf_places_atoms_with_the_given_internal_coordinates():
    """The numpy face of bgexp.geometry.nerf: d bonded to c, angle(b, c, d), torsion(a, b, c, d) in degrees."""
    import torch

    from bgexp.geometry import bond_angles, dihedrals

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b, c = rng.normal(size=(3, 3))
        bond, angle, torsion = 0.1 + rng.random(), 10 + 160 * rng.random(), -179 + 358 * rng.random()
        d = st.nerf(a, b, c, bond, angle, torsion)
        assert d.shape == (3,) and d.dtype == np.float64
        assert np.linalg.norm(d - c) == pytest.approx(bond, abs=1e-12)
        t = [torch.from_numpy(v) for v in (a, b, c, d)]
        assert np.degrees(float(bond_angles(t[1], t[2], t[3]))) == pytest.approx(angle, abs=1e-9)
        assert np.degrees(float(dihedrals(*t))) == pytest.approx(torsion, abs=1e-9)


def test_ala2_is_l_alanine(ala2):
    for pos in (ala2["pos"], ala2["pos_min"]):
        idx = _index(ala2["top"])
        n, ca, c, cb, ha = (pos[idx[("ALA", k)]] for k in ("N", "CA", "C", "CB", "HA"))
        assert st.chirality_volume(n, ca, c, cb) > 0
        assert _corn_is_clockwise(n, ca, c, cb, ha)
        # the mirror image is D: both tests flip
        m = np.array([1.0, 1.0, -1.0])
        assert st.chirality_volume(n * m, ca * m, c * m, cb * m) < 0
        assert not _corn_is_clockwise(n * m, ca * m, c * m, cb * m, ha * m)


def test_ala2_system(ala2):
    import openmm

    system = ala2["system"]
    names = [f.__class__.__name__ for f in system.getForces()]
    assert "GBSAOBCForce" in names
    assert system.getNumConstraints() == 0
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nb.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    assert system.getNumParticles() == 22


def test_ala2_minimised_in_c7eq(ala2):
    assert np.isfinite(ala2["e0"]) and np.isfinite(ala2["e_min"])
    assert ala2["e_min"] < ala2["e0"]
    phi, psi = _phi_psi(ala2["top"], ala2["pos_min"])
    assert -180.0 < phi < -40.0, phi  # C7eq basin (phi < 0, upper left of the Ramachandran plot)
    assert 100.0 < psi <= 180.0, psi


def test_forcefield_mismatch_names_residue(ala2):
    with pytest.raises(ForceFieldError, match=r"ACE 1 \(chain A\).*tip3p\.xml|tip3p\.xml.*ACE 1"):
        st.create_system(ala2["top"], ("tip3p.xml",))
    with pytest.raises(ForceFieldError, match=r"no_such_forcefield\.xml"):
        st.create_system(ala2["top"], ("no_such_forcefield.xml",))


# ---------------------------------------------------------------------------------------------
# BPTI (SYSTEMS.md section 4)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bpti_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bpti_cache")


@pytest.fixture(scope="session")
def bpti(bpti_cache):
    """5PTI from the packaged file, prepared and minimised once, cached."""
    t = time.perf_counter()
    prep = st.prepare_protein("5PTI", cache_dir=bpti_cache)
    prep_time = time.perf_counter() - t
    return prep, prep_time


def test_bpti_prepared(bpti):
    prep, prep_time = bpti
    print(f"BPTI preparation (fixer + system + minimisation + cache) took {prep_time:.1f} s")
    assert prep.topology.getNumAtoms() == BPTI_N_ATOMS
    assert prep.positions.shape == (BPTI_N_ATOMS, 3)
    assert prep.system.getNumParticles() == BPTI_N_ATOMS
    assert st.disulfide_bonds(prep.topology) == BPTI_DISULFIDES
    assert prep.pdb_path is not None and prep.pdb_path.is_file()
    assert prep.system_xml_path is not None and prep.system_xml_path.is_file()
    assert prep.forcefield_files == st.DEFAULT_FORCEFIELD
    assert [c for c in prep.topology.chains() if len(list(c.residues())) > 0].__len__() == 1
    assert prep.topology.getNumResidues() == 58
    assert {r.name for r in prep.topology.residues()}.isdisjoint({"PO4", "HOH", "DOD", "UNX"})
    energy = st.potential_energy(prep.system, prep.positions)
    print(f"BPTI minimised energy: {energy:.1f} kJ/mol")
    assert np.isfinite(energy) and energy < 0


def test_bpti_second_call_hits_cache(bpti, bpti_cache):
    prep, _ = bpti
    t = time.perf_counter()
    again = st.prepare_protein("5PTI", cache_dir=bpti_cache)
    elapsed = time.perf_counter() - t
    assert again.from_cache and not prep.from_cache
    assert again.pdb_path == prep.pdb_path
    np.testing.assert_array_equal(again.positions, prep.positions)
    assert st.disulfide_bonds(again.topology) == BPTI_DISULFIDES
    assert elapsed < 2.0, elapsed


def test_bpti_from_shared_path(bpti, bpti_cache):
    if not BPTI_FILE.is_file():
        pytest.skip(f"{BPTI_FILE} not present (the shared data folder is not checked out here)")
    prep, _ = bpti
    # same contents as the packaged file -> same cache entry
    from_path = st.prepare_protein(BPTI_FILE, cache_dir=bpti_cache)
    assert from_path.from_cache and from_path.pdb_path == prep.pdb_path
    np.testing.assert_array_equal(from_path.positions, prep.positions)
    # and prepared from the path without cache (not minimised): same atoms, reproducible
    fresh = st.prepare_protein(str(BPTI_FILE), minimize=False)
    assert fresh.topology.getNumAtoms() == BPTI_N_ATOMS
    assert st.disulfide_bonds(fresh.topology) == BPTI_DISULFIDES
    assert fresh.pdb_path is None and fresh.system_xml_path is None
    assert [a.name for a in fresh.topology.atoms()] == [a.name for a in prep.topology.atoms()]


def test_bpti_hydrogens_are_all_added():
    raw = _raw_bpti_fixer()
    protein = [a for a in raw.topology.atoms() if a.residue.chain.index == 0]
    from openmm import unit

    raw_h = np.array([raw.positions[a.index].value_in_unit(unit.nanometer) for a in protein
                      if a.element.symbol in ("H", "D")])
    n_raw_d = sum(a.element.symbol == "D" for a in protein)
    n_raw_heavy = sum(a.element.symbol not in ("H", "D") for a in protein)
    assert n_raw_d > 0  # the neutron model has deuterium
    prep = st.prepare_protein("5PTI", minimize=False)
    elements = [a.element.symbol for a in prep.topology.atoms()]
    assert "D" not in elements
    n_h = elements.count("H")
    assert n_h == BPTI_N_ATOMS - n_raw_heavy == 438
    # the added hydrogens are new atoms: none sits where an input H or D was
    h_pos = prep.positions[[i for i, e in enumerate(elements) if e == "H"]]
    d = np.linalg.norm(h_pos[:, None] - raw_h[None], axis=-1).min(axis=1)
    assert (d > 1e-4).all(), (d < 1e-4).sum()
    # heavy atoms are kept where they were
    assert sum(e != "H" for e in elements) == n_raw_heavy
    # reproducible: pdbfixer's random starting points are seeded
    again = st.prepare_protein("5PTI", minimize=False)
    np.testing.assert_array_equal(again.positions, prep.positions)


def test_damaged_cache_is_regenerated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("damaged_cache")
    first = st.prepare_protein("5PTI", cache_dir=cache, minimize=False)
    first.system_xml_path.write_text("<System this is not valid")
    with pytest.warns(UserWarning, match="damaged"):
        second = st.prepare_protein("5PTI", cache_dir=cache, minimize=False)
    assert not second.from_cache and second.system.getNumParticles() == BPTI_N_ATOMS
    np.testing.assert_array_equal(second.positions, first.positions)
    # a truncated PDB (atom counts disagree) is also regenerated
    lines = first.pdb_path.read_text().splitlines()
    first.pdb_path.write_text("\n".join(lines[:100]) + "\nEND\n")
    with pytest.warns(UserWarning, match="atom counts"):
        third = st.prepare_protein("5PTI", cache_dir=cache, minimize=False)
    assert third.topology.getNumAtoms() == BPTI_N_ATOMS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert st.prepare_protein("5PTI", cache_dir=cache, minimize=False).from_cache


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_internal_gap_raises_and_can_be_modelled(tmp_path):
    path = tmp_path / "bpti_gap.pdb"
    name = _write_gapped_pdb(path, "25")
    with pytest.raises(StructureError, match=rf"chain A: 1 missing residue\(s\) {name} \(residue number 25\)"):
        st.prepare_protein(path, minimize=False)
    with pytest.raises(StructureError, match=re.escape(str(path))):
        st.prepare_protein(path, minimize=False)
    fixed = st.prepare_protein(path, minimize=False, allow_missing_residues=True)
    assert fixed.topology.getNumAtoms() == BPTI_N_ATOMS
    assert [int(r.id) for r in fixed.topology.residues()] == list(range(1, 59))


def test_terminal_missing_residues_are_dropped(tmp_path):
    """Residues missing at a chain terminus (here: the first two) are not modelled."""
    from openmm import app

    fixer = _raw_bpti_fixer()
    fixer.removeHeterogens(keepWater=False)
    chain = next(fixer.topology.chains())
    sequence = [r.name for r in chain.residues()]
    modeller = app.Modeller(fixer.topology, fixer.positions)
    modeller.delete([a for r in modeller.topology.residues() if r.id in ("1", "2") for a in r.atoms()])
    path = tmp_path / "bpti_nterm.pdb"
    buf = io.StringIO()
    app.PDBFile.writeFile(modeller.topology, modeller.positions, buf, keepIds=True)
    seqres = [f"SEQRES {k + 1:>3} A {len(sequence):>4}  " + " ".join(sequence[i:i + 13])
              for k, i in enumerate(range(0, len(sequence), 13))]
    path.write_text("\n".join(seqres) + "\n" + buf.getvalue())
    prep = st.prepare_protein(path, minimize=False)
    assert [int(r.id) for r in prep.topology.residues()][:2] == [3, 4]
    assert prep.topology.getNumResidues() == 56


def test_unknown_ligand_kept_raises(tmp_path):
    with pytest.raises(ForceFieldError, match=r"PO4 70 \(chain B\).*unknown ligand"):
        st.prepare_protein("5PTI", remove_heterogens=False, minimize=False)


def test_pdb_id_without_network(monkeypatch, tmp_path):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append((url, kwargs.get("timeout")))
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cache = tmp_path / "empty_cache"
    with pytest.raises(StructureError, match=r"PDB id 1ABC could not be fetched.*local path"):
        st.prepare_protein("1ABC", cache_dir=cache, timeout=3)
    assert len(calls) == 1 and "1ABC" in calls[0][0] and calls[0][1] == 3
    assert list(cache.iterdir()) == []
    # the packaged entry needs no network at all
    assert st.prepare_protein("5pti", minimize=False).topology.getNumAtoms() == BPTI_N_ATOMS
    assert len(calls) == 1


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no_such_structure.pdb"
    with pytest.raises(StructureError, match=re.escape(str(missing))):
        st.prepare_protein(missing)
    bad = tmp_path / "structure.xyz"
    bad.write_text("1\n\nC 0 0 0\n")
    with pytest.raises(StructureError, match=r"structure\.xyz.*unknown format"):
        st.prepare_protein(bad)
