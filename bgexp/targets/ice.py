"""Ice XI with rigid TIP4P/Ew water (SYSTEMS.md section 5) and rigid-body coordinates.

System (SYSTEMS.md section 5): OpenMM's ``tip4pew.xml``, rigid water, PME with the cutoff of the
structure, switching from 0.9 x cutoff, long-range dispersion correction, Ewald error tolerance
1e-4, fixed orthorhombic box (NVT). Lengths in nm, energies in kJ/mol (the target reports reduced
energies u = U / (k_B T), k_B T = R T).

Structures
----------
`IceStructure` holds positions [n, 4, 3] (sites O, H1, H2, M), the box edges [3] and the cutoff.
`load_ice_json` reads the reference files (keys ``positions``, ``box``, ``nonbondedCutoff``);
`build_ice` builds a structure with genice2 (the lattice plugin ``phase``, replicated ``rep``
times, water model ``tip4p``): genice2's waters have O-H = 0.09572 nm and H-O-H = 104.52 deg
exactly (TIP4P and TIP4P/Ew share them), but its M site is TIP4P's (0.015 nm from O). The built
waters are re-fitted onto the TIP4P/Ew body (`atoms_to_rigid` then `rigid_to_atoms`), which keeps
O and H (they move by ~1e-16 nm) and puts M at the TIP4P/Ew site, 0.0125 nm from O (a shift of
0.0025 nm along the bisector). The shifts are recorded in ``structure.info``. The cutoff is half
the shortest box edge minus ``CUTOFF_MARGIN`` = 1e-5 nm, as in the reference files
(0.73358 / 2 - 1e-5 = 0.36678 nm for N = 16, 1.46716 / 2 - 1e-5 = 0.73357 nm for N = 128).

The M site
----------
In tip4pew.xml, M is a massless virtual site (``average3``): M = w_O O + w_H (H1 + H2) with
w_O = 0.786646558, w_H = 0.106676721, so |OM| = 2 w_H |OH| cos(52.26 deg) = 0.0125000000323 nm.
The body frame below places M by these same weights, so `rigid_to_atoms` produces exactly the M
that OpenMM computes. The energy bridge calls ``Context.computeVirtualSites()`` after setting the
positions: the M entries of a configuration are *recomputed from O, H1, H2* and ignored, and
the bridge returns zero force on them (OpenMM's ``getForces`` reports, for a virtual site, its
own undistributed force *in addition to* having distributed it onto O, H1, H2; passing it on
would count it twice once M depends on the inputs, e.g. through `rigid_to_atoms`).

Rigid-body coordinates
----------------------
A molecule is (c, q): the centre of mass c in R^3 and a unit quaternion q in S^3 (R(q) from
`bgexp.quaternions.to_matrix`; q and -q are the same rotation). Its sites are

    x_a = c + R(q) b_a,    a in {O, H1, H2, M},

with the body coordinates b_a of `RigidWater`: the centre of mass of O, H1, H2 at the origin
(masses of tip4pew.xml's atom types, O 15.99943, H 1.007947, which equal OpenMM's element
masses; M is massless) and the principal axes as body axes, sorted by increasing moment:
e1 along H2 -> H1 (I1 ~ 0.00615 amu nm^2), e2 along the bisector from O towards the H
(I2 ~ 0.01155), e3 = e1 x e2 normal to the plane (I3 = I1 + I2, planar body).

`atoms_to_rigid` inverts it: molecules are made whole (H1, H2, M moved to the minimum image of O),
c is the mass-weighted centre of O, H1, H2 (wrapped into [0, L) per axis), and R is the
mass-weighted Kabsch fit min_R sum_a m_a |R b_a - (x_a - c)|^2 (`bgexp.geometry.optimal_rotation`
on sqrt(m)-scaled points), q = `from_matrix`(R) with w >= 0 (canonical).

Change of variables (per molecule)
----------------------------------
The image of (c, q) -> x = (O, H1, H2) in R^9 is 6-dimensional. Take the orthonormal chart of S^3
at q, q(u) = (q + T u) / |q + T u| with T = `tangent_basis`(q) = [q*i, q*j, q*k], so dq = T du =
q * (0, du). Since dq = (1/2) q * (0, omega) for a body-frame angular velocity omega, omega = 2 du
and dR = R [omega]_x, hence

    dx_a = dc + R (omega x b_a) = dc - 2 R [b_a]_x du,    J_a = [ I_3 | -2 R [b_a]_x ]  (3 x 6).

Unweighted metric, G = J^T J = sum_a J_a^T J_a (a over O, H1, H2):

    G = [[ 3 I_3,              -2 R [s]_x ],      s = sum_a b_a,
         [ 2 [s]_x R^T,   4 sum_a (|b_a|^2 I_3 - b_a b_a^T) ]]

(using [b]_x^T [b]_x = |b|^2 I - b b^T). The Schur complement of the 3 I_3 block is
4 (I_0 - (|s|^2 I - s s^T) / 3) = 4 I_cen, with I_cen = sum_a (|r_a|^2 I - r_a r_a^T) the unit-mass
("geometric") inertia tensor of O, H1, H2 about their centroid (r_a = b_a - s/3; parallel-axis
theorem). R drops out (R^T R = I), so

    sqrt(det J^T J) = sqrt(27 * 64 * det I_cen) = 8 * 3^(3/2) * sqrt(det I_cen),

a constant: `RigidWater.volume_element()` (0.0249595 nm^3 for TIP4P/Ew). With the mass metric
G_m = J^T diag(m) J the off-diagonal block is -2 R [sum_a m_a b_a]_x = 0 (centre of mass at the
origin) and the rotation block is 4 diag(I1, I2, I3), so

    sqrt(det J^T diag(m) J) = M^(3/2) * 8 * sqrt(I1 I2 I3),   M = m_O + 2 m_H,

`RigidWater.volume_element(mass_weighted=True)`. Both are independent of c and q.

Consequence: the rigid-body configuration measure (the Hausdorff measure on the 6-dim image, or
its mass-weighted version, which is what integrating out the momenta of a rigid body gives) is
a constant times Lebesgue(c) x uniform(S^3). The Boltzmann density in (c, q) coordinates is thus

    p(c, q) proportional to exp(-u(x(c, q)))    w.r.t. Lebesgue(c) x uniform surface measure(S^3),

with a constant factor per molecule (log-det = n log C). It cancels in free-energy differences
between temperatures of the same system (same n, same body). The two-to-one cover q ~ -q adds a
further constant log 2 per molecule (the integral over S^3 counts every rotation twice), which
cancels as well.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from bgexp.geometry import as_box, optimal_rotation, wrap_into_box
from bgexp.quaternions import from_matrix, to_matrix
from bgexp.spaces import Space
from bgexp.targets.openmm import OpenMMTarget, openmm_energy

SITE_NAMES = ("O", "H1", "H2", "M")
FORCEFIELD_FILE = "tip4pew.xml"
# TIP4P/Ew geometry (Horn et al. 2004): O-H 0.09572 nm, H-O-H 104.52 deg, O-M 0.0125 nm on the bisector.
TIP4PEW_OH = 0.09572
TIP4PEW_HOH_DEG = 104.52
TIP4PEW_OM = 0.0125
# OpenMM tip4pew.xml: the virtual site M = w_O O + w_H (H1 + H2) (|OM| = 0.0125000000323 nm)
TIP4PEW_M_WEIGHTS = (0.786646558, 0.106676721, 0.106676721)
# masses of tip4pew.xml's atom types (amu); equal to openmm.app.element oxygen / hydrogen masses
MASS_O = 15.99943
MASS_H = 1.007947
# cutoff = min(box) / 2 - CUTOFF_MARGIN, as in the reference files (0.36678 nm, 0.73357 nm)
CUTOFF_MARGIN = 1e-5
SWITCH_FRACTION = 0.9
EWALD_ERROR_TOLERANCE = 1e-4
JSON_KEYS = ("positions", "box", "nonbondedCutoff")


# ---------------------------------------------------------------------------------------------
# structures
# ---------------------------------------------------------------------------------------------

@dataclass
class IceStructure:
    """Water positions [n_molecules, 4, 3] (nm; sites O, H1, H2, M), orthorhombic box edges [3]
    (nm), nonbonded cutoff (nm), and provenance: `source`, `temperature` (kelvin, of the state the
    positions were sampled from, if any) and free-form `info`."""

    positions: np.ndarray
    box: np.ndarray
    cutoff: float
    source: str = ""
    temperature: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pos = np.asarray(self.positions, dtype=np.float64)
        if pos.ndim != 3 or pos.shape[1:] != (4, 3) or pos.shape[0] == 0:
            raise ValueError(f"IceStructure expects positions of shape [n_molecules, 4, 3] (sites O, H1, H2, M; "
                             f"nm) with n_molecules >= 1, got {pos.shape}")
        if not np.isfinite(pos).all():
            raise ValueError("IceStructure: the positions contain non-finite values")
        box = np.asarray(self.box, dtype=np.float64)
        if box.shape != (3,) or not np.isfinite(box).all() or not (box > 0).all():
            raise ValueError(f"IceStructure expects the box as 3 positive edge lengths (nm) of an orthorhombic "
                             f"cell, got {box.tolist() if box.size <= 9 else box.shape}")
        cutoff = float(self.cutoff)
        if not 0 < cutoff < box.min() / 2:
            raise ValueError(f"IceStructure: the cutoff must lie in (0, min(box) / 2) = (0, {box.min() / 2:g}) nm "
                             f"(PME with the minimum-image convention), got {cutoff:g}")
        self.positions, self.box, self.cutoff = pos, box, cutoff

    @property
    def n_molecules(self) -> int:
        return self.positions.shape[0]


def cutoff_for_box(box: Sequence[float]) -> float:
    """Half the shortest box edge minus `CUTOFF_MARGIN` (nm), the convention of the reference files."""
    return float(np.min(np.asarray(box, dtype=np.float64))) / 2 - CUTOFF_MARGIN


def _box_edges(box: Any, where: str) -> np.ndarray:
    """Edge lengths [3] of an orthorhombic box given as [3] or a diagonal 3 x 3 matrix (rows = vectors)."""
    try:
        arr = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: 'box' must be 3 edge lengths or a 3 x 3 matrix of numbers (nm)") from exc
    if arr.shape == (3,):
        return arr
    if arr.shape == (3, 3):
        off = arr - np.diag(np.diag(arr))
        if np.abs(off).max() > 1e-9:
            raise ValueError(f"{where}: only orthorhombic boxes are supported (diagonal box matrix), got {arr.tolist()}")
        return np.diag(arr).copy()
    raise ValueError(f"{where}: 'box' must be 3 edge lengths or a 3 x 3 matrix (nm), got shape {arr.shape}")


def load_ice_json(path: str | os.PathLike) -> IceStructure:
    """Read a structure file in the reference format (keys 'positions' [4 n x 3] nm in the site order
    O, H1, H2, M; 'box' 3 x 3 nm; 'nonbondedCutoff' nm; optional 'water_type' (must be tip4pew)
    and 'rigidWater' (must be true)). The temperature is taken from a 'temperature' key or from
    '_T<kelvin>_' in the file name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {list(JSON_KEYS)}, got {type(data).__name__}")
    missing = [k for k in JSON_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; an ice structure file needs {list(JSON_KEYS)} "
                         f"(positions [4 n, 3] nm in the order O, H1, H2, M; box 3 x 3 nm; cutoff nm)")
    water = data.get("water_type", "tip4pew")
    if str(water).lower() != "tip4pew":
        raise ValueError(f"{path}: water_type is {water!r}; only 'tip4pew' is supported")
    if data.get("rigidWater", True) is not True:
        raise ValueError(f"{path}: rigidWater is {data['rigidWater']!r}; the ice target uses rigid water")
    pos = np.asarray(data["positions"], dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] % 4:
        raise ValueError(f"{path}: 'positions' must have shape [4 n_molecules, 3] (sites O, H1, H2, M), "
                         f"got {pos.shape}")
    temperature = data.get("temperature")
    if temperature is None:
        match = re.search(r"_T(\d+(?:\.\d+)?)_", path.name)
        temperature = float(match.group(1)) if match else None
    return IceStructure(pos.reshape(-1, 4, 3), _box_edges(data["box"], str(path)), float(data["nonbondedCutoff"]),
                        source=str(path), temperature=None if temperature is None else float(temperature))


@contextmanager
def _quiet_seeded(seed: int):
    """Seed numpy's and Python's global generators (genice2 uses them) and silence logging at
    WARNING and below (genice2 logs to the root logger); restore all three afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    previous = logging.root.manager.disable
    np.random.seed(seed)
    random.seed(seed)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        np.random.set_state(np_state)
        random.setstate(py_state)


def genice_sites(phase: str = "11", rep: Sequence[int] = (1, 1, 1), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """genice2's TIP4P waters [n, 4, 3] (nm; O, H1, H2, M with |OM| = 0.015 nm) and cell matrix [3, 3]
    (rows = cell vectors, nm), through its Python API; the same as
    ``genice2 PHASE --rep R1 R2 R3 --water tip4p --seed SEED`` with full precision."""
    rep = tuple(int(r) for r in rep)
    if len(rep) != 3 or min(rep) < 1:
        raise ValueError(f"build_ice: rep must be three positive integers, got {rep}")
    try:
        from genice2.genice import GenIce
        from genice2.plugin import safe_import
    except ImportError as exc:  # pragma: no cover - genice2 is a dependency
        raise ImportError("building ice structures needs genice2 (pip install genice2)") from exc
    with _quiet_seeded(seed):
        try:
            lattice = safe_import("lattice", str(phase)).Lattice()
        except (AssertionError, ImportError, ModuleNotFoundError) as exc:
            raise ValueError(f"genice2 has no lattice {phase!r} (see `genice2 -h` for the list)") from exc
        ice = GenIce(lattice, signature="bgexp.targets.ice", reshape=np.diag(rep))
        water = safe_import("molecule", "tip4p").Molecule()
        formatter = safe_import("format", "raw").Format(stage=[7])
        out = ice.generate_ice(formatter=formatter, water=water, depol="strict")
    mols = [m for m in out["mols"] if list(m.atomnames) == ["OW", "HW1", "HW2", "MW"]]
    if len(mols) != 1 or len(out["mols"]) != 1:
        raise ValueError(f"genice2 lattice {phase!r} gave molecules other than water; only pure ice is supported")
    return np.asarray(mols[0].positions, dtype=np.float64), np.asarray(ice.repcell.mat, dtype=np.float64)


def build_ice(phase: str = "11", rep: Sequence[int] = (1, 1, 1), seed: int = 0) -> IceStructure:
    """An ice structure from genice2 (lattice `phase`, `rep` unit cells per axis; `seed` matters for
    proton-disordered phases only) with rigid TIP4P/Ew waters and the cutoff `cutoff_for_box`.

    genice2's O and H are kept (the TIP4P/Ew body is fitted to them); M is placed at the TIP4P/Ew
    site; centres of mass are wrapped into the box. ``info`` records the genice2 version and the
    largest shift of O, H and M from genice2's output (nm) and genice2's geometry deviations."""
    from importlib.metadata import version

    sites, cell = genice_sites(phase, rep, seed)
    box = _box_edges(cell, f"genice2 lattice {phase!r}")
    if (box <= 0).any():
        raise ValueError(f"genice2 lattice {phase!r} has a degenerate cell {cell.tolist()}")
    pos = torch.from_numpy(sites)[None]
    box_t = torch.from_numpy(box)
    com, q = atoms_to_rigid(pos, box=box_t, wrap=True)
    rebuilt = rigid_to_atoms(com, q)[0]
    # compare with genice2's sites after moving each rebuilt molecule back by whole box vectors
    shift = torch.round((rebuilt[:, :1] - pos[0][:, :1]) / box_t) * box_t
    delta = (rebuilt - shift - pos[0]).norm(dim=-1)
    oh = np.linalg.norm(sites[:, 1:3] - sites[:, :1], axis=-1)
    v1, v2 = sites[:, 1] - sites[:, 0], sites[:, 2] - sites[:, 0]
    hoh = np.degrees(np.arccos((v1 * v2).sum(-1) / np.linalg.norm(v1, axis=-1) / np.linalg.norm(v2, axis=-1)))
    info = {
        "genice2_version": version("genice2"),
        "genice2_call": f"genice2 {phase} --rep {rep[0]} {rep[1]} {rep[2]} --water tip4p --seed {seed}",
        "max_shift_nm": {"O": float(delta[:, 0].max()), "H": float(delta[:, 1:3].max()),
                         "M": float(delta[:, 3].max())},
        "genice2_max_dev_oh_nm": float(np.abs(oh - TIP4PEW_OH).max()),
        "genice2_max_dev_hoh_deg": float(np.abs(hoh - TIP4PEW_HOH_DEG).max()),
        "genice2_om_nm": float(np.linalg.norm(sites[:, 3] - sites[:, 0], axis=-1).mean()),
    }
    return IceStructure(rebuilt.numpy().copy(), box, cutoff_for_box(box),
                        source=f"genice2 {info['genice2_version']}: {info['genice2_call']}", info=info)


# ---------------------------------------------------------------------------------------------
# OpenMM system
# ---------------------------------------------------------------------------------------------

def ice_topology(n_molecules: int, box: Sequence[float]):
    """An OpenMM Topology of `n_molecules` HOH residues with atoms O, H1, H2 and the virtual site M
    (no element; the names of tip4pew.xml's HOH template), bonds O-H1, O-H2, and the periodic box."""
    from openmm import Vec3, app, unit

    top = app.Topology()
    chain = top.addChain("W")
    for i in range(int(n_molecules)):
        res = top.addResidue("HOH", chain, id=str(i + 1))
        o = top.addAtom("O", app.element.oxygen, res)
        h1 = top.addAtom("H1", app.element.hydrogen, res)
        h2 = top.addAtom("H2", app.element.hydrogen, res)
        top.addAtom("M", None, res)
        top.addBond(o, h1)
        top.addBond(o, h2)
    a, b, c = (float(v) for v in box)
    top.setPeriodicBoxVectors((Vec3(a, 0, 0), Vec3(0, b, 0), Vec3(0, 0, c)) * unit.nanometer)
    return top


def ice_system(structure: IceStructure):
    """(openmm.app.Topology, openmm.System) of SYSTEMS.md section 5: tip4pew.xml, rigid water, PME,
    nonbondedCutoff = structure.cutoff, switching distance 0.9 x cutoff, dispersion correction on,
    Ewald error tolerance 1e-4, periodic box vectors from structure.box."""
    import openmm
    from openmm import app, unit

    if not isinstance(structure, IceStructure):
        raise ValueError(f"ice_system expects an IceStructure, got {type(structure).__name__}")
    topology = ice_topology(structure.n_molecules, structure.box)
    cutoff = structure.cutoff
    system = app.ForceField(FORCEFIELD_FILE).createSystem(
        topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer, rigidWater=True,
        switchDistance=SWITCH_FRACTION * cutoff * unit.nanometer, ewaldErrorTolerance=EWALD_ERROR_TOLERANCE,
        useDispersionCorrection=True)
    nb = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)]
    if len(nb) != 1 or not nb[0].getUseSwitchingFunction() or not nb[0].getUseDispersionCorrection() \
            or nb[0].getNonbondedMethod() != openmm.NonbondedForce.PME:  # pragma: no cover - OpenMM API guard
        raise RuntimeError("OpenMM did not build the PME / switching / dispersion-correction settings requested")
    return topology, system


# ---------------------------------------------------------------------------------------------
# rigid bodies
# ---------------------------------------------------------------------------------------------

class RigidWater:
    """The body frame of a rigid water: site coordinates b [4, 3] (nm; O, H1, H2, M) with the centre
    of mass of O, H1, H2 at the origin and the principal axes of inertia as body axes (increasing
    moments: e1 along H2 -> H1, e2 along the bisector towards the H, e3 = e1 x e2).

    Args: O-H length (nm), H-O-H angle (deg), virtual-site weights (w_O, w_H1, w_H2) of M, masses
    (amu) of O and H. Defaults: TIP4P/Ew as in OpenMM's tip4pew.xml.
    """

    def __init__(self, oh: float = TIP4PEW_OH, hoh_deg: float = TIP4PEW_HOH_DEG,
                 m_weights: Sequence[float] = TIP4PEW_M_WEIGHTS, mass_o: float = MASS_O, mass_h: float = MASS_H):
        half = math.radians(hoh_deg) / 2
        o = np.zeros(3)
        h1 = oh * np.array([math.sin(half), math.cos(half), 0.0])
        h2 = oh * np.array([-math.sin(half), math.cos(half), 0.0])
        w = np.asarray(m_weights, dtype=np.float64)
        m = w[0] * o + w[1] * h1 + w[2] * h2
        sites = np.stack([o, h1, h2, m])
        self.masses = np.array([mass_o, mass_h, mass_h])
        self.total_mass = float(self.masses.sum())
        sites -= (self.masses[:, None] * sites[:3]).sum(0) / self.total_mass
        inertia = _inertia(sites[:3], self.masses)
        if np.abs(inertia - np.diag(np.diag(inertia))).max() > 1e-15 or not np.all(np.diff(np.diag(inertia)) > 0):
            raise ValueError(f"RigidWater: the body axes are not the principal axes in increasing order for "
                             f"O-H {oh} nm, H-O-H {hoh_deg} deg, masses {mass_o}, {mass_h}")
        self.body = sites  # [4, 3] nm, float64
        self.moments = np.diag(inertia).copy()  # amu nm^2: I1 < I2 < I3
        self.om = float(np.linalg.norm(sites[3] - sites[0]))

    def body_like(self, x: Tensor) -> Tensor:
        """The body coordinates [4, 3] in the dtype and device of `x`."""
        return torch.as_tensor(self.body, dtype=x.dtype, device=x.device)

    def volume_element(self, mass_weighted: bool = False) -> float:
        """sqrt(det(J^T J)) of (com, u) -> (O, H1, H2) in R^9 (u: orthonormal chart of S^3; module
        docstring): 8 * 3^(3/2) * sqrt(det I_cen) (nm^3) for the plain metric, or
        M^(3/2) * 8 * sqrt(I1 I2 I3) (amu^(3/2) nm^3) for the mass metric J^T diag(m) J."""
        if mass_weighted:
            return self.total_mass ** 1.5 * 8.0 * math.sqrt(float(np.prod(self.moments)))
        r = self.body[:3] - self.body[:3].mean(0)
        return 8.0 * 3.0 ** 1.5 * math.sqrt(float(np.linalg.det(_inertia(r, np.ones(3)))))


def _inertia(r: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """sum_a m_a (|r_a|^2 I - r_a r_a^T) about the origin."""
    return sum(m * (np.dot(v, v) * np.eye(3) - np.outer(v, v)) for m, v in zip(masses, r))


TIP4PEW = RigidWater()


def rigid_to_atoms(com: Tensor, q: Tensor, water: RigidWater = TIP4PEW) -> Tensor:
    """Site positions [B, n, 4, 3] (O, H1, H2, M; nm) = com + R(q) b of centres of mass com [B, n, 3]
    (nm) and unit quaternions q [B, n, 4] (w, x, y, z). Even in q; differentiable."""
    if com.dim() != 3 or com.shape[-1] != 3:
        raise ValueError(f"rigid_to_atoms expects com of shape [batch, n_molecules, 3], got {tuple(com.shape)}")
    if q.dim() != 3 or q.shape[-1] != 4 or q.shape[:2] != com.shape[:2]:
        raise ValueError(f"rigid_to_atoms expects q of shape [batch, n_molecules, 4] matching com "
                         f"{tuple(com.shape)}, got {tuple(q.shape)}")
    norm_err = (q.detach().norm(dim=-1) - 1).abs()
    if bool((norm_err > 1e-4).any()):
        raise ValueError(f"rigid_to_atoms expects unit quaternions; the largest | |q| - 1 | is {float(norm_err.max()):.3g}")
    body = water.body_like(com)
    rot = to_matrix(q)  # [B, n, 3, 3]
    return com[:, :, None, :] + torch.einsum("bnij,aj->bnai", rot, body)


def atoms_to_rigid(positions: Tensor, box=None, wrap: bool = True,
                   water: RigidWater = TIP4PEW) -> tuple[Tensor, Tensor]:
    """(com [B, n, 3] nm, canonical q [B, n, 4] with w >= 0) of site positions [B, n, 4, 3] (O, H1, H2, M;
    or [B, n, 3, 3] without M; nm).

    With `box` (3 edge lengths, nm), H1 and H2 are first moved to the minimum image of their O
    (molecules made whole) and, if `wrap`, com is wrapped into [0, L) per axis; without a box the
    positions are used as they are. M is ignored (it follows from O, H1, H2). The rotation is the
    mass-weighted Kabsch fit of the body onto O, H1, H2 about their centre of mass.
    """
    if positions.dim() != 4 or positions.shape[2] not in (3, 4) or positions.shape[3] != 3:
        raise ValueError(f"atoms_to_rigid expects positions of shape [batch, n_molecules, 4, 3] (O, H1, H2, M) "
                         f"or [batch, n_molecules, 3, 3], got {tuple(positions.shape)}")
    x = positions[:, :, :3, :]
    if box is not None:
        b = as_box(box, x)
        d = x[:, :, 1:] - x[:, :, :1]
        x = torch.cat([x[:, :, :1], x[:, :, :1] + d - torch.round(d / b) * b], dim=2)
    masses = torch.as_tensor(water.masses, dtype=x.dtype, device=x.device)
    com = (masses[:, None] * x).sum(2) / masses.sum()
    sq = masses.sqrt()[:, None]
    body = (sq * water.body_like(x)[:3]).expand(x.shape[0] * x.shape[1], 3, 3)
    target = (sq * (x - com[:, :, None, :])).reshape(-1, 3, 3)
    rot = optimal_rotation(body, target)  # R with R b_a ~ x_a - com
    q = from_matrix(rot).reshape(x.shape[0], x.shape[1], 4)
    if box is not None and wrap:
        com = wrap_into_box(com, b)
    return com, q


# ---------------------------------------------------------------------------------------------
# the target
# ---------------------------------------------------------------------------------------------

class IceTarget(OpenMMTarget):
    """Ice with rigid TIP4P/Ew water at `temperature_kelvin` (SYSTEMS.md section 5) through the OpenMM
    bridge.

    `energy(x)`: reduced energy u = U / (R T) of flattened site positions x [B, n * 4 * 3] (nm; per
    molecule O, H1, H2, M). The bridge recomputes M from O, H1, H2 (``computeVirtualSites``), so the
    M entries of x are ignored and get zero gradient. Molecules must be whole (H1, H2 near their
    O, as `rigid_to_atoms` gives them); positions outside the box are fine.
    `energy_rigid(com [B, n, 3], q [B, n, 4])` = energy(rigid_to_atoms(com, q)), differentiable.
    Attributes: `n_molecules`, `box` (float64 tensor [3], nm), `cutoff` (nm), `rigid_dim` = 7 n
    (3 com + 4 quaternion per molecule), `structure`, `water` (the `RigidWater` body).
    Close the worker processes with `close()` or use the target as a context manager.
    """

    def __init__(self, structure: IceStructure, temperature_kelvin: float, platform: str = "CPU",
                 n_workers: int | None = None, threads_per_worker: int = 1):
        topology, system = ice_system(structure)
        super().__init__(system, topology, structure.positions.reshape(-1, 3), temperature_kelvin, platform=platform,
                         n_workers=n_workers, threads_per_worker=threads_per_worker, forcefield=(FORCEFIELD_FILE,))
        self.structure = structure
        self.water = TIP4PEW
        self.n_molecules = structure.n_molecules
        self.box = torch.as_tensor(structure.box, dtype=torch.float64)
        self.cutoff = structure.cutoff
        self.rigid_dim = 7 * self.n_molecules

    @property
    def space(self) -> Space:
        """The rigid-body representation the flows act on: `n_molecules` bodies (centre of mass and
        unit quaternion, dim = rigid_dim = 7 n) in the periodic `box`; `energy` itself takes the
        atom positions (dim = 12 n), `rigid_energy` the rigid-body form."""
        return Space(self.rigid_dim, molecules=self.n_molecules, box=tuple(float(b) for b in self.box))

    def energy(self, x: Tensor) -> Tensor:
        """Reduced energy of atom positions [B, 12 n] nm; the M entries are recomputed by OpenMM and get
        zero gradient (module docstring)."""
        self.check_input(x)
        return openmm_energy(x, self.bridge)

    def energy_rigid(self, com: Tensor, q: Tensor) -> Tensor:
        """Reduced energy [B] of centres of mass com [B, n, 3] (nm) and unit quaternions q [B, n, 4]."""
        if com.dim() != 3 or com.shape[1] != self.n_molecules:
            raise ValueError(f"IceTarget.energy_rigid expects com of shape [batch, {self.n_molecules}, 3], "
                             f"got {tuple(com.shape)}")
        pos = rigid_to_atoms(com, q, self.water)
        return self.energy(pos.reshape(pos.shape[0], -1))

    # flattened rigid-body coordinates x [B, 7 n]: per molecule (com_x, com_y, com_z, q_w, q_x, q_y, q_z)
    def to_rigid(self, positions: Tensor) -> Tensor:
        """Flattened rigid-body coordinates [B, 7 n] of site positions [B, 12 n] or [B, n, 4, 3] (nm):
        molecules made whole, com wrapped into the box, canonical q (w >= 0)."""
        positions = torch.as_tensor(positions)
        pos = positions.reshape(positions.shape[0], self.n_molecules, 4, 3)
        com, q = atoms_to_rigid(pos, box=self.box.to(pos), wrap=True, water=self.water)
        return torch.cat([com, q], -1).reshape(pos.shape[0], self.rigid_dim)

    def split_rigid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(com [B, n, 3], q [B, n, 4]) of flattened rigid-body coordinates x [B, 7 n]."""
        if x.dim() != 2 or x.shape[-1] != self.rigid_dim:
            raise ValueError(f"{type(self).__name__} expects rigid-body coordinates of shape [batch, {self.rigid_dim}] "
                             f"(7 per molecule: com, quaternion), got {tuple(x.shape)}")
        xr = x.reshape(x.shape[0], self.n_molecules, 7)
        return xr[..., :3], xr[..., 3:]

    def from_rigid(self, x: Tensor) -> Tensor:
        """Site positions [B, 12 n] (nm) of flattened rigid-body coordinates [B, 7 n]."""
        com, q = self.split_rigid(x)
        return rigid_to_atoms(com, q, self.water).reshape(x.shape[0], -1)

    def random_translation(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Every configuration of x [B, 7 n] (rigid-body coordinates) shifted as a whole by its own
        uniform random vector in the box (coms wrapped back into the box).

        The energy is invariant under a global translation, so the Boltzmann density is uniform in
        the crystal's overall position; Langevin MD with OpenMM's centre-of-mass motion remover never
        moves it. Shifting MD frames by independent uniform vectors turns samples of the density
        conditioned on one overall position into samples of the full density (what free-energy
        estimators that map or reweight configurations assume)."""
        com, q = self.split_rigid(x)
        shift = torch.rand(x.shape[0], 1, 3, generator=generator, dtype=torch.float64)
        shift = (shift * self.box).to(device=x.device, dtype=x.dtype)
        com = wrap_into_box(com + shift, self.box.to(device=x.device, dtype=x.dtype))
        return torch.cat([com, q], -1).reshape(x.shape)

    def rigid_energy(self, x: Tensor) -> Tensor:
        """Reduced energy [B] of flattened rigid-body coordinates [B, 7 n]; differentiable."""
        return self.energy(self.from_rigid(x))

    @classmethod
    def from_config(cls, temperature_kelvin: float, phase: str = "11", rep: Sequence[int] = (1, 1, 1),
                    structure_file: str | None = None, platform: str = "CPU", n_workers: int | None = None,
                    threads_per_worker: int = 1) -> "IceTarget":
        """The target from a structure file in the reference format (`structure_file`) or, without
        one, built by genice2 (`phase`, `rep` unit cells per axis): what the Hydra configs call."""
        structure = load_ice_json(structure_file) if structure_file else build_ice(phase, rep)
        return cls(structure, temperature_kelvin, platform=platform, n_workers=n_workers,
                   threads_per_worker=threads_per_worker)

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta.update({"n_molecules": self.n_molecules, "box_nm": self.structure.box.tolist(), "cutoff_nm": self.cutoff,
                     "structure_source": self.structure.source, "rigid_dim": self.rigid_dim})
        return meta


__all__ = [
    "IceStructure", "load_ice_json", "build_ice", "genice_sites", "cutoff_for_box", "ice_topology", "ice_system",
    "RigidWater", "TIP4PEW", "rigid_to_atoms", "atoms_to_rigid", "wrap_into_box", "IceTarget", "SITE_NAMES",
    "CUTOFF_MARGIN",
]
