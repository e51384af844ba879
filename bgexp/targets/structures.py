"""Molecular structures and OpenMM systems for the molecular targets.

Definitions: ../shared/SYSTEMS.md, section 3 (alanine dipeptide, ALA2) and section 4 (BPTI).

- ALA2 (section 3): capped alanine ACE-ALA-NME, 22 atoms, Amber99SB-ILDN with OBC implicit solvent
  (`amber99sbildn.xml` + `amber99_obc.xml`, OpenMM's native GBSAOBCForce), no cutoff, no
  constraints. `build_alanine_dipeptide` builds it from this module's own table of ideal internal
  coordinates (bond lengths, angles, torsions) with the NeRF construction, in the C7eq basin
  (phi = -80 deg, psi = +150 deg, both omega = 180 deg; see PSI_C7EQ for why not psi = +80) and
  with an L alanine.
- BPTI (section 4): PDB entry 5PTI (joint X-ray/neutron model with deuterium, heavy water,
  phosphate and alternate locations). `prepare_protein` removes heterogens and water, deletes all
  H and D atoms, adds missing heavy atoms and hydrogens at pH 7 with pdbfixer (892 atoms,
  disulfides 5-55, 14-38, 30-51), builds the same force field with no cutoff, minimises and caches
  the result. The entry ships as package data (``bgexp/targets/data/5PTI.cif.gz``) so that it
  works offline; other PDB ids are downloaded from the RCSB.

Lengths are in nm and energies in kJ/mol throughout this module (the targets turn them into
reduced units). OpenMM and pdbfixer are imported inside the functions, so importing this module
is cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from bgexp import geometry
from bgexp.atomic import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    import openmm
    from openmm import app

DEFAULT_FORCEFIELD = ("amber99sbildn.xml", "amber99_obc.xml")
RCSB_URL = "https://files.rcsb.org/download/{id}.cif.gz"
_CACHE_VERSION = 1  # bump when the preparation changes, so that old cache files are not reused
_PDB_ID = re.compile(r"^[0-9][A-Za-z0-9]{3}$")
_STRUCTURE_SUFFIXES = {".pdb": "pdb", ".ent": "pdb", ".cif": "cif", ".mmcif": "cif", ".pdbx": "cif"}


class StructureError(ValueError):
    """A structure cannot be read, fetched or prepared (the message names the file, id or residues)."""


class ForceFieldError(ValueError):
    """The force field cannot parametrise a topology (the message names residues and force-field files)."""


# ---------------------------------------------------------------------------------------------
# alanine dipeptide from ideal internal coordinates (SYSTEMS.md section 3)
# ---------------------------------------------------------------------------------------------

# Ideal geometry (nm, degrees): standard values for peptides (sp3 angles ~109.5, sp2 ~120).
_BOND = {
    "C-H": 0.109, "N-H": 0.101, "C=O": 0.123, "C-N": 0.133,  # peptide C-N
    "N-CA": 0.146, "CA-C": 0.152, "CA-CB": 0.153, "CH3-C": 0.152, "N-CH3": 0.146,
}
_ANGLE = {
    "tet": 109.5,  # any sp3 centre
    "CA-C-N": 116.2, "O=C-N": 123.0, "CA-C=O": 120.8,  # carbonyl carbon (sums to 360)
    "C-N-CA": 121.7, "C-N-H": 119.0,  # amide nitrogen (H-N-CA then 119.3)
    "N-CA-C": 111.0,
}
# Starting backbone torsions (deg). Amber99SB-ILDN + OBC has no local minimum at the vacuum C7eq
# geometry (phi -83, psi +73): minimising from psi = +70..+90 slides into alpha_R (psi ~ -14).
# Starting at psi = 150 stays in the C7eq basin (phi < 0, psi > 100) and ends near (-74, +155).
PHI_C7EQ, PSI_C7EQ, OMEGA = -80.0, 150.0, 180.0

# The 22 atoms in the order of OpenMM's amber99sbildn.xml templates ACE, ALA, NME.
_ALA2_RESIDUES = (
    ("ACE", ("HH31", "CH3", "HH32", "HH33", "C", "O")),
    ("ALA", ("N", "H", "CA", "HA", "CB", "HB1", "HB2", "HB3", "C", "O")),
    ("NME", ("N", "H", "CH3", "HH31", "HH32", "HH33")),
)
_ALA2_BONDS = (
    ("ACE:CH3", "ACE:HH31"), ("ACE:CH3", "ACE:HH32"), ("ACE:CH3", "ACE:HH33"),
    ("ACE:CH3", "ACE:C"), ("ACE:C", "ACE:O"), ("ACE:C", "ALA:N"),
    ("ALA:N", "ALA:H"), ("ALA:N", "ALA:CA"), ("ALA:CA", "ALA:HA"), ("ALA:CA", "ALA:CB"),
    ("ALA:CB", "ALA:HB1"), ("ALA:CB", "ALA:HB2"), ("ALA:CB", "ALA:HB3"),
    ("ALA:CA", "ALA:C"), ("ALA:C", "ALA:O"), ("ALA:C", "NME:N"),
    ("NME:N", "NME:H"), ("NME:N", "NME:CH3"),
    ("NME:CH3", "NME:HH31"), ("NME:CH3", "NME:HH32"), ("NME:CH3", "NME:HH33"),
)


def _zmatrix(phi: float, psi: float) -> list[tuple[str, str, str, str, float, float, float]]:
    """(atom, bonded to, angle with, torsion with, bond nm, angle deg, torsion deg); the atom is
    placed so that angle(angle_ref, bonded, atom) and torsion(torsion_ref, angle_ref, bonded, atom)
    take the given values. The first three atoms are placed specially (see `_nerf_place_all`)."""
    b, a = _BOND, _ANGLE
    # Around CA, looking along N -> CA, the substituents C, CB, HA sit 120 deg apart. With
    # torsion(C_ace, N, CA, C) = phi, an L residue has CB at phi - 120 and HA at phi + 120 (see
    # `chirality_volume`; checked against the CORN rule in the tests).
    return [
        ("ACE:CH3", "", "", "", 0.0, 0.0, 0.0),
        ("ACE:C", "ACE:CH3", "", "", b["CH3-C"], 0.0, 0.0),
        ("ALA:N", "ACE:C", "ACE:CH3", "", b["C-N"], a["CA-C-N"], 0.0),
        ("ALA:CA", "ALA:N", "ACE:C", "ACE:CH3", b["N-CA"], a["C-N-CA"], OMEGA),
        ("ACE:O", "ACE:C", "ALA:N", "ALA:CA", b["C=O"], a["O=C-N"], 0.0),  # trans peptide: O anti to H
        ("ALA:H", "ALA:N", "ACE:C", "ACE:CH3", b["N-H"], a["C-N-H"], 0.0),
        ("ALA:C", "ALA:CA", "ALA:N", "ACE:C", b["CA-C"], a["N-CA-C"], phi),
        ("ALA:CB", "ALA:CA", "ALA:N", "ACE:C", b["CA-CB"], a["tet"], phi - 120.0),
        ("ALA:HA", "ALA:CA", "ALA:N", "ACE:C", b["C-H"], a["tet"], phi + 120.0),
        ("NME:N", "ALA:C", "ALA:CA", "ALA:N", b["C-N"], a["CA-C-N"], psi),
        ("ALA:O", "ALA:C", "ALA:CA", "ALA:N", b["C=O"], a["CA-C=O"], psi + 180.0),
        ("NME:CH3", "NME:N", "ALA:C", "ALA:CA", b["N-CH3"], a["C-N-CA"], OMEGA),
        ("NME:H", "NME:N", "ALA:C", "ALA:CA", b["N-H"], a["C-N-H"], 0.0),
        # methyl hydrogens, staggered
        ("ACE:HH31", "ACE:CH3", "ACE:C", "ALA:N", b["C-H"], a["tet"], 0.0),
        ("ACE:HH32", "ACE:CH3", "ACE:C", "ALA:N", b["C-H"], a["tet"], 120.0),
        ("ACE:HH33", "ACE:CH3", "ACE:C", "ALA:N", b["C-H"], a["tet"], -120.0),
        ("ALA:HB1", "ALA:CB", "ALA:CA", "ALA:N", b["C-H"], a["tet"], 60.0),
        ("ALA:HB2", "ALA:CB", "ALA:CA", "ALA:N", b["C-H"], a["tet"], 180.0),
        ("ALA:HB3", "ALA:CB", "ALA:CA", "ALA:N", b["C-H"], a["tet"], -60.0),
        ("NME:HH31", "NME:CH3", "NME:N", "ALA:C", b["C-H"], a["tet"], 180.0),
        ("NME:HH32", "NME:CH3", "NME:N", "ALA:C", b["C-H"], a["tet"], 60.0),
        ("NME:HH33", "NME:CH3", "NME:N", "ALA:C", b["C-H"], a["tet"], -60.0),
    ]


def nerf(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float,
         torsion_deg: float) -> np.ndarray:
    """`bgexp.geometry.nerf` on numpy points (float64) with angles in degrees: the position d with
    |c d| = bond, angle(b, c, d) = angle_deg and torsion(a, b, c, d) = torsion_deg."""
    def f64(v) -> torch.Tensor:
        return torch.as_tensor(np.asarray(v, dtype=np.float64))

    return geometry.nerf(f64(c), f64(b), f64(a), f64(bond), f64(np.radians(angle_deg)),
                         f64(np.radians(torsion_deg))).numpy()


def _nerf_place_all(zmat) -> dict[str, np.ndarray]:
    xyz: dict[str, np.ndarray] = {}
    for k, (name, bonded, ang_ref, tor_ref, bond, angle, torsion) in enumerate(zmat):
        if k == 0:
            xyz[name] = np.zeros(3)
        elif k == 1:
            xyz[name] = xyz[bonded] + np.array([bond, 0.0, 0.0])
        elif k == 2:  # in the xy plane
            dummy = xyz[ang_ref] + np.array([0.0, 1.0, 0.0])
            xyz[name] = nerf(dummy, xyz[ang_ref], xyz[bonded], bond, angle, 180.0)
        else:
            xyz[name] = nerf(xyz[tor_ref], xyz[ang_ref], xyz[bonded], bond, angle, torsion)
    return xyz


def chirality_volume(n: np.ndarray, ca: np.ndarray, c: np.ndarray, cb: np.ndarray) -> float:
    """Signed volume det[C - CA, CB - CA, N - CA]; positive for an L amino acid.

    CORN rule: with HA pointing at the viewer, CO -> R -> N run clockwise for L (equivalently L-Ala
    is S). Put CA at the origin, HA along +z and the three others below the xy plane at azimuths
    90 deg (C), -30 deg (CB), -150 deg (N), i.e. clockwise seen from +z: the determinant is then
    sqrt(3) h + (sqrt(3)/2) h > 0 for the (positive) depth h of the three below the plane.
    """
    return float(np.linalg.det(np.stack([c - ca, cb - ca, n - ca])))


def build_alanine_dipeptide(phi: float = PHI_C7EQ, psi: float = PSI_C7EQ) -> tuple["app.Topology", np.ndarray]:
    """Capped alanine ACE-ALA-NME (22 atoms, L-alanine) from ideal internal coordinates.

    Returns the OpenMM Topology (names of amber99sbildn.xml's ACE/ALA/NME templates, all bonds)
    and the positions in nm, float64 [22, 3]; the backbone torsions phi and psi are in degrees
    (default: the C7eq basin)."""
    from openmm import app

    xyz = _nerf_place_all(_zmatrix(phi, psi))
    top = app.Topology()
    chain = top.addChain("A")
    atoms, positions = {}, []
    for i, (resname, names) in enumerate(_ALA2_RESIDUES):
        res = top.addResidue(resname, chain, id=str(i + 1))
        for name in names:
            element = app.element.hydrogen if name.startswith("H") else app.element.get_by_symbol(name[0])
            atoms[f"{resname}:{name}"] = top.addAtom(name, element, res)
            positions.append(xyz[f"{resname}:{name}"])
    for a, b in _ALA2_BONDS:
        top.addBond(atoms[a], atoms[b])
    pos = np.asarray(positions, dtype=np.float64)
    vol = chirality_volume(xyz["ALA:N"], xyz["ALA:CA"], xyz["ALA:C"], xyz["ALA:CB"])
    if not vol > 0:  # pragma: no cover - guards the geometry table above
        raise RuntimeError(f"built a D-alanine (chirality volume {vol:.3g} nm^3); the z-matrix is wrong")
    return top, pos


# ---------------------------------------------------------------------------------------------
# systems, energies, minimisation
# ---------------------------------------------------------------------------------------------

def _load_forcefield(forcefield_files: Sequence[str]):
    from openmm import app

    files = tuple(forcefield_files)
    if not files:
        raise ForceFieldError("no force-field files given")
    try:
        return app.ForceField(*files)
    except Exception as exc:  # missing file, broken XML
        raise ForceFieldError(f"cannot load the force-field files {', '.join(files)}: {exc}") from exc


def _describe_residues(residues, limit: int = 8) -> str:
    items = [f"{r.name} {r.id} (chain {r.chain.id})" for r in residues[:limit]]
    if len(residues) > limit:
        items.append(f"... and {len(residues) - limit} more")
    return ", ".join(items)


def create_system(topology: "app.Topology", forcefield_files: Sequence[str] = DEFAULT_FORCEFIELD,
                  **options: Any) -> "openmm.System":
    """An OpenMM System for `topology` with no cutoff, no constraints and flexible water by
    default (SYSTEMS.md sections 3 and 4); `options` go to ForceField.createSystem. A residue that
    no template of the force field matches raises ForceFieldError naming it and the files."""
    from openmm import app

    files = tuple(forcefield_files)
    ff = _load_forcefield(files)
    kwargs = {"nonbondedMethod": app.NoCutoff, "constraints": None, "rigidWater": False}
    kwargs.update(options)
    try:
        return ff.createSystem(topology, **kwargs)
    except ValueError as exc:
        try:
            unmatched = ff.getUnmatchedResidues(topology)
        except Exception:  # pragma: no cover
            unmatched = []
        if unmatched:
            names = sorted({r.name for r in unmatched})
            raise ForceFieldError(
                f"no template in the force-field files {', '.join(files)} matches residue(s) "
                f"{_describe_residues(unmatched)} (residue names: {', '.join(names)}): an unknown ligand, "
                f"nonstandard residue or incomplete residue that this force field cannot parametrize; "
                f"remove it (e.g. remove_heterogens=True) or add force-field files for it. "
                f"OpenMM said: {exc}") from exc
        raise ForceFieldError(f"the force-field files {', '.join(files)} cannot parametrize the "
                              f"topology ({topology.getNumAtoms()} atoms): {exc}") from exc


def _as_nm_array(positions) -> np.ndarray:
    from openmm import unit

    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.nanometer)
    arr = np.array([[float(v) for v in p] for p in positions]) if not isinstance(positions, np.ndarray) \
        else np.asarray(positions, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"positions must be [n_atoms, 3], got shape {arr.shape}")
    return arr


def _context(system: "openmm.System", positions: np.ndarray):
    import openmm
    from openmm import unit

    if system.getNumParticles() != len(positions):
        raise ValueError(f"system has {system.getNumParticles()} particles but {len(positions)} positions were given")
    integrator = openmm.VerletIntegrator(0.001)
    try:
        platform = openmm.Platform.getPlatformByName("CPU")
        context = openmm.Context(system, integrator, platform)
    except Exception:
        integrator = openmm.VerletIntegrator(0.001)
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(unit.Quantity(positions, unit.nanometer))
    return context, integrator


def potential_energy(system: "openmm.System", positions) -> float:
    """Potential energy in kJ/mol (CPU platform, Reference as fallback); positions in nm."""
    from openmm import unit

    context, _ = _context(system, _as_nm_array(positions))
    try:
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    finally:
        del context


def _run_minimizer(system, positions, tolerance: float, max_iterations: int) -> np.ndarray:
    import openmm
    from openmm import unit

    context, _ = _context(system, _as_nm_array(positions))
    try:
        openmm.LocalEnergyMinimizer.minimize(
            context, tolerance * unit.kilojoule_per_mole / unit.nanometer, int(max_iterations))
        state = context.getState(getPositions=True)
        return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    finally:
        del context


def minimize(system: "openmm.System", topology: "app.Topology", positions, tolerance: float = 10.0,
             max_iterations: int = 0) -> np.ndarray:
    """L-BFGS energy minimisation (OpenMM LocalEnergyMinimizer) until the RMS force is below
    `tolerance` kJ/mol/nm or after `max_iterations` (0: no limit). Returns positions in nm [N, 3]."""
    pos = _as_nm_array(positions)
    if topology.getNumAtoms() != len(pos):
        raise ValueError(f"topology has {topology.getNumAtoms()} atoms but {len(pos)} positions were given")
    return _run_minimizer(system, pos, tolerance, max_iterations)


# ---------------------------------------------------------------------------------------------
# proteins from PDB files or ids (SYSTEMS.md section 4)
# ---------------------------------------------------------------------------------------------

@dataclass
class PreparedStructure:
    """A prepared protein: hydrogens added, parametrised, (optionally) minimised."""

    topology: "app.Topology"
    positions: np.ndarray  # nm, [N, 3]
    system: "openmm.System"
    pdb_path: Path | None  # the cached prepared PDB (None without a cache dir)
    system_xml_path: Path | None  # the cached serialized System (None without a cache dir)
    source: str
    forcefield_files: tuple[str, ...]
    from_cache: bool = False

    @property
    def n_atoms(self) -> int:
        return self.topology.getNumAtoms()


@dataclass
class _RawStructure:
    text: str  # decompressed file contents
    fmt: str  # "pdb" or "cif"
    label: str  # for file names and messages
    origin: str  # where it came from, for messages


def _fmt_from_name(name: str) -> tuple[str | None, bool]:
    lower = name.lower()
    gz = lower.endswith(".gz")
    if gz:
        lower = lower[:-3]
    return _STRUCTURE_SUFFIXES.get(Path(lower).suffix), gz


def _decode(data: bytes, gz: bool, where: str) -> str:
    try:
        if gz or data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return data.decode("utf-8", errors="replace")
    except (OSError, EOFError) as exc:
        raise StructureError(f"cannot decompress {where}: {exc}") from exc


def _packaged_structure(pdb_id: str) -> bytes | None:
    from importlib import resources

    try:
        res = resources.files("bgexp.targets").joinpath("data", f"{pdb_id}.cif.gz")
        return res.read_bytes() if res.is_file() else None
    except (FileNotFoundError, ModuleNotFoundError, OSError):  # pragma: no cover
        return None


def _fetch_pdb_id(pdb_id: str, cache_dir: Path | None, timeout: float) -> _RawStructure:
    import http.client
    import urllib.error
    import urllib.request

    pdb_id = pdb_id.upper()
    data = _packaged_structure(pdb_id)
    if data is not None:
        return _RawStructure(_decode(data, True, f"packaged {pdb_id}.cif.gz"), "cif", pdb_id,
                             f"PDB id {pdb_id} (packaged file bgexp/targets/data/{pdb_id}.cif.gz)")
    if cache_dir is not None:
        for name in (f"{pdb_id}.cif.gz", f"{pdb_id}.cif", f"{pdb_id}.pdb.gz", f"{pdb_id}.pdb"):
            path = cache_dir / name
            if path.is_file():
                fmt, gz = _fmt_from_name(name)
                return _RawStructure(_decode(path.read_bytes(), gz, str(path)), fmt, pdb_id,
                                     f"PDB id {pdb_id} (cached file {path})")
    url = RCSB_URL.format(id=pdb_id)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError, ValueError) as exc:
        raise StructureError(
            f"PDB id {pdb_id} could not be fetched from {url} ({exc}); it is not packaged with bgexp "
            f"and not in the cache dir {cache_dir}. Give a local path to a .pdb/.cif(.gz) file instead.") from exc
    text = _decode(data, True, f"download of PDB id {pdb_id} from {url}")
    if "_atom_site" not in text:
        raise StructureError(f"the download of PDB id {pdb_id} from {url} is not an mmCIF file with atoms")
    if cache_dir is not None:
        atomic_write(cache_dir / f"{pdb_id}.cif.gz", gzip.compress(text.encode()))
    return _RawStructure(text, "cif", pdb_id, f"PDB id {pdb_id} (downloaded from {url})")


def _read_source(source: str | os.PathLike, cache_dir: Path | None, timeout: float) -> _RawStructure:
    s = os.fspath(source)
    path = Path(s).expanduser()
    if _PDB_ID.match(s) and not path.exists():
        return _fetch_pdb_id(s, cache_dir, timeout)
    fmt, gz = _fmt_from_name(path.name)
    if not path.is_file():
        raise StructureError(f"structure file {s} does not exist (nor is it a 4-character PDB id)")
    if fmt is None:
        raise StructureError(f"structure file {s}: unknown format; expected .pdb, .ent, .cif, .mmcif or "
                             f".pdbx, optionally gzipped (.gz)")
    label = path.name[: -len(".gz")] if gz else path.name
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(label).stem) or "structure"
    return _RawStructure(_decode(path.read_bytes(), gz, f"structure file {s}"), fmt, label, f"file {s}")


def _is_hydrogen_like(atom) -> bool:
    if atom.element is not None:
        return atom.element.symbol in ("H", "D")
    # no element given: decide by name (H*, D* but not e.g. a heavy atom named like a residue)
    return atom.name[:1].upper() in ("H", "D")


def _delete_hydrogens(fixer) -> int:
    from openmm import app

    doomed = [a for a in fixer.topology.atoms() if _is_hydrogen_like(a)]
    if doomed:
        modeller = app.Modeller(fixer.topology, fixer.positions)
        modeller.delete(doomed)
        fixer.topology, fixer.positions = modeller.topology, modeller.positions
    return len(doomed)


def _rename_heavy_water(fixer) -> None:
    # heavy water (DOD) becomes water once its D atoms are gone
    for res in fixer.topology.residues():
        if res.name == "DOD":
            res.name = "HOH"


def _handle_missing_residues(fixer, allow: bool, origin: str) -> None:
    fixer.findMissingResidues()
    chains = list(fixer.topology.chains())
    internal = {}
    for key, names in list(fixer.missingResidues.items()):
        chain_index, res_index = key
        residues = list(chains[chain_index].residues())
        if res_index == 0 or res_index >= len(residues):
            del fixer.missingResidues[key]  # terminal: dropped
        else:
            internal[key] = names
    if internal and not allow:
        parts = []
        for (chain_index, res_index), names in sorted(internal.items()):
            chain = chains[chain_index]
            residues = list(chain.residues())
            before, after = residues[res_index - 1], residues[res_index]
            try:
                first = int(before.id) + 1
                where = f"residue number(s) {first}-{first + len(names) - 1}" if len(names) > 1 \
                    else f"residue number {first}"
            except ValueError:
                where = "residue numbers unknown"
            parts.append(f"chain {chain.id}: {len(names)} missing residue(s) {' '.join(names)} ({where}) "
                         f"between {before.name} {before.id} and {after.name} {after.id}")
        raise StructureError(f"{origin} has internal gaps (missing residues not at a chain terminus): "
                             + "; ".join(parts) + ". Pass allow_missing_residues=True to model them.")


@contextmanager
def _seeded_python_random(seed: int):
    """pdbfixer and Modeller.addHydrogens start new atoms from `random` positions: seed the global
    generator for reproducible preparations and restore its state afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _prepare_with_pdbfixer(raw: _RawStructure, ph: float, remove_heterogens: bool,
                           allow_missing_residues: bool, seed: int = 0):
    # pdbfixer and OpenMM's Modeller relax the atoms they add with a Context on the default
    # platform; the multi-threaded CPU platform does not sum forces in a fixed order, so the
    # prepared structure would differ from run to run. The Reference platform is deterministic.
    previous = os.environ.get("OPENMM_DEFAULT_PLATFORM")
    os.environ["OPENMM_DEFAULT_PLATFORM"] = "Reference"
    try:
        with _seeded_python_random(seed):
            return _prepare_with_pdbfixer_unseeded(raw, ph, remove_heterogens, allow_missing_residues, seed)
    finally:
        if previous is None:
            os.environ.pop("OPENMM_DEFAULT_PLATFORM", None)
        else:
            os.environ["OPENMM_DEFAULT_PLATFORM"] = previous


def _prepare_with_pdbfixer_unseeded(raw: _RawStructure, ph: float, remove_heterogens: bool,
                                    allow_missing_residues: bool, seed: int):
    from pdbfixer import PDBFixer

    try:
        if raw.fmt == "cif":
            fixer = PDBFixer(pdbxfile=io.StringIO(raw.text))
        else:
            fixer = PDBFixer(pdbfile=io.StringIO(raw.text))
    except Exception as exc:
        raise StructureError(f"cannot read {raw.origin} as {raw.fmt.upper()}: {exc}") from exc
    if fixer.topology.getNumAtoms() == 0:
        raise StructureError(f"{raw.origin} contains no atoms")
    if remove_heterogens:
        fixer.removeHeterogens(keepWater=False)
    _delete_hydrogens(fixer)
    _rename_heavy_water(fixer)
    try:
        _handle_missing_residues(fixer, allow_missing_residues, raw.origin)
        fixer.findNonstandardResidues()
        fixer.replaceNonstandardResidues()
        fixer.findMissingAtoms()
        fixer.addMissingAtoms(seed=seed)
        fixer.addMissingHydrogens(ph)
    except StructureError:
        raise
    except Exception as exc:
        raise StructureError(f"pdbfixer failed on {raw.origin}: {exc}") from exc
    _ensure_disulfides(fixer.topology, _as_nm_array(fixer.positions))
    return fixer.topology, _as_nm_array(fixer.positions)


def _ensure_disulfides(topology, positions: np.ndarray, cutoff: float = 0.25) -> None:
    """Bond every pair of CYS SG atoms closer than `cutoff` nm that is not bonded yet (pdbfixer
    usually keeps the file's disulfides; this is a safety net). Each SG gets at most one partner."""
    sg = [a for a in topology.atoms() if a.residue.name in ("CYS", "CYX") and a.name == "SG"]
    bonded = set()
    for a, b in topology.bonds():
        if a.name == "SG" and b.name == "SG":
            bonded.update((a.index, b.index))
    free = [a for a in sg if a.index not in bonded]
    for i, a in enumerate(free):
        if a.index in bonded:
            continue
        best, best_d = None, cutoff
        for b in free[i + 1:]:
            if b.index in bonded:
                continue
            d = float(np.linalg.norm(positions[a.index] - positions[b.index]))
            if d < best_d:
                best, best_d = b, d
        if best is not None:
            topology.addBond(a, best)
            bonded.update((a.index, best.index))


def disulfide_bonds(topology: "app.Topology") -> list[tuple[int, int]]:
    """Residue-number pairs (sorted) of the CYS SG-SG bonds in `topology`."""
    pairs = []
    for a, b in topology.bonds():
        if a.name == "SG" and b.name == "SG":
            pairs.append(tuple(sorted((int(a.residue.id), int(b.residue.id)))))
    return sorted(pairs)


def _cache_key(raw: _RawStructure, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(raw.text.encode())
    h.update(json.dumps({**settings, "version": _CACHE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:12]


def _write_pdb(topology, positions: np.ndarray) -> str:
    from openmm import app, unit

    buf = io.StringIO()
    app.PDBFile.writeFile(topology, unit.Quantity(positions, unit.nanometer), buf, keepIds=True)
    return buf.getvalue()


def _load_cache(pdb_path: Path, xml_path: Path):
    """(topology, positions, system) from the cache files; raises on any inconsistency."""
    import openmm
    from openmm import app

    pdb = app.PDBFile(str(pdb_path))
    positions = _as_nm_array(pdb.positions)
    system = openmm.XmlSerializer.deserialize(xml_path.read_text())
    if not isinstance(system, openmm.System):
        raise ValueError(f"{xml_path} does not hold an OpenMM System")
    n_top, n_sys = pdb.topology.getNumAtoms(), system.getNumParticles()
    if n_top == 0 or n_top != n_sys or len(positions) != n_top:
        raise ValueError(f"atom counts disagree: {n_top} in {pdb_path.name}, {n_sys} particles in {xml_path.name}")
    if not np.isfinite(positions).all():
        raise ValueError(f"non-finite positions in {pdb_path.name}")
    return pdb.topology, positions, system


def prepare_protein(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    ph: float = 7.0,
    remove_heterogens: bool = True,
    allow_missing_residues: bool = False,
    forcefield_files: Sequence[str] = DEFAULT_FORCEFIELD,
    minimize: bool = True,
    timeout: float = 20,
    tolerance: float = 10.0,
    max_iterations: int = 0,
    seed: int = 0,
) -> PreparedStructure:
    """Prepare a protein as in SYSTEMS.md section 4 and parametrise it.

    `source`: a local .pdb/.ent/.cif (optionally .gz) file or a 4-character PDB id; an id is looked
    up in the package data (bgexp/targets/data/<ID>.cif.gz), then in `cache_dir`, and only then
    downloaded from the RCSB (`timeout` seconds). Preparation (pdbfixer): remove heterogens and
    water (if `remove_heterogens`), delete every H and D atom, drop terminal missing residues
    (internal gaps raise StructureError unless `allow_missing_residues`, then they are modelled),
    replace nonstandard residues, add missing heavy atoms and hydrogens at `ph` (with
    `remove_heterogens=False`, heavy water DOD, stripped of its D atoms, is renamed HOH; ligands
    the force field cannot parametrize, e.g. PO4, raise ForceFieldError). Disulfide SG-SG bonds
    are kept from the file (and any unbonded CYS SG pair closer than 0.25 nm is bonded). Then the System
    (`create_system`, no cutoff, no constraints) and, if `minimize`, a local energy minimisation
    (`tolerance` kJ/mol/nm, `max_iterations`, 0 = until converged). pdbfixer places new atoms
    from random starting points; `seed` makes this reproducible (Python's global `random` state is
    restored afterwards).

    With `cache_dir`, the prepared PDB and the serialized System are written there (atomically),
    named by a hash of the input contents and all settings; a later call with the same input and
    settings loads them instead (and a damaged cache file is regenerated with a warning). With a
    cache, the returned topology and positions are those read back from the cached PDB, so the
    first and later calls return identical data.
    """
    ff_files = tuple(forcefield_files)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    raw = _read_source(source, cache, timeout)
    src = os.fspath(source)
    settings = {"ph": float(ph), "remove_heterogens": bool(remove_heterogens),
                "allow_missing_residues": bool(allow_missing_residues), "forcefield_files": list(ff_files),
                "minimize": bool(minimize), "tolerance": float(tolerance), "max_iterations": int(max_iterations), "seed": int(seed)}
    pdb_path = xml_path = None
    if cache is not None:
        key = _cache_key(raw, settings)
        pdb_path = cache / f"{raw.label}-{key}.pdb"
        xml_path = cache / f"{raw.label}-{key}.system.xml"
        if pdb_path.exists() or xml_path.exists():
            try:
                topology, positions, system = _load_cache(pdb_path, xml_path)
                return PreparedStructure(topology, positions, system, pdb_path, xml_path, src, ff_files,
                                         from_cache=True)
            except Exception as exc:
                warnings.warn(f"cache files {pdb_path.name} / {xml_path.name} in {cache} for {raw.origin} are "
                              f"damaged or incomplete ({exc}); preparing the structure again", stacklevel=2)

    topology, positions = _prepare_with_pdbfixer(raw, ph, remove_heterogens, allow_missing_residues, seed)
    system = create_system(topology, ff_files)
    if minimize:
        positions = _run_minimizer(system, positions, tolerance, max_iterations)
    if not np.isfinite(positions).all():  # pragma: no cover
        raise StructureError(f"non-finite positions after preparing {raw.origin}")
    if cache is None:
        return PreparedStructure(topology, positions, system, None, None, src, ff_files)

    import openmm

    atomic_write(pdb_path, _write_pdb(topology, positions))
    atomic_write(xml_path, openmm.XmlSerializer.serialize(system))
    topology, positions, system = _load_cache(pdb_path, xml_path)
    return PreparedStructure(topology, positions, system, pdb_path, xml_path, src, ff_files)


__all__ = [
    "StructureError", "ForceFieldError", "PreparedStructure", "DEFAULT_FORCEFIELD",
    "build_alanine_dipeptide", "chirality_volume", "nerf", "create_system", "minimize",
    "potential_energy", "prepare_protein", "disulfide_bonds",
]
