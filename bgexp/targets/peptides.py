"""Peptide targets with OpenMM energies: alanine dipeptide (ALA2) and BPTI in implicit solvent.

Definitions: ../shared/SYSTEMS.md, section 3 (ALA2: ACE-ALA-NME, 22 atoms, Amber99SB-ILDN + OBC
through amber99sbildn.xml + amber99_obc.xml, no constraints, no cutoff, 300 K) and section 4
(BPTI: PDB 5PTI prepared with pdbfixer, 892 atoms, the same force field). Structures and
systems come from `bgexp.targets.structures`; energies go through the OpenMM bridge
(`bgexp.targets.openmm`), u = U / (R T).

Configurations are flattened positions in nm, x in R^{3 N}. ALA2 observables: the backbone
torsions phi = C(ACE)-N-CA-C and psi = N-CA-C-N(NME) in radians, [-pi, pi). States: C7eq
(phi < 0, which includes the beta and C5 region) and C7ax (phi >= 0, the left-handed region
C7ax / alpha_L), the split used for alanine dipeptide free-energy differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bgexp.geometry import superpose, torsion_of
from bgexp.targets.base import Reference, ReferenceValue, load_reference_file
from bgexp.targets.openmm import OpenMMTarget
from bgexp.targets.structures import (
    DEFAULT_FORCEFIELD,
    build_alanine_dipeptide,
    create_system,
    minimize,
    prepare_protein,
)

ALA2_REFERENCE_FILE = "ala2.json"


def _atom_index(topology, residue: str, name: str) -> int:
    for atom in topology.atoms():
        if atom.residue.name == residue and atom.name == name:
            return atom.index
    raise ValueError(f"the topology has no atom {name} in a residue {residue}")


class AlanineDipeptide(OpenMMTarget):
    """ALA2 in OBC implicit solvent (SYSTEMS.md section 3), built from templates and minimised."""

    def __init__(
        self,
        temperature: float = 300.0,
        forcefield: Sequence[str] = DEFAULT_FORCEFIELD,
        platform: str = "CPU",
        n_workers: int | None = None,
        threads_per_worker: int = 1,
    ):
        topology, positions = build_alanine_dipeptide()
        system = create_system(topology, forcefield)
        positions = minimize(system, topology, positions)
        super().__init__(system, topology, positions, temperature, platform=platform, n_workers=n_workers,
                         threads_per_worker=threads_per_worker, forcefield=forcefield)
        self.phi_atoms = (_atom_index(topology, "ACE", "C"), _atom_index(topology, "ALA", "N"),
                          _atom_index(topology, "ALA", "CA"), _atom_index(topology, "ALA", "C"))
        self.psi_atoms = (_atom_index(topology, "ALA", "N"), _atom_index(topology, "ALA", "CA"),
                          _atom_index(topology, "ALA", "C"), _atom_index(topology, "NME", "N"))
        self.observables = {"phi": self.phi, "psi": self.psi}
        # 2-D free-energy surfaces drawn (and compared with the reference) at evaluation
        self.surfaces = {"ramachandran": ("phi", "psi", (-np.pi, np.pi), (-np.pi, np.pi))}
        self.states = {"C7eq": self.is_c7eq, "C7ax": self.is_c7ax}
        self.reference = self._load_reference()

    def phi(self, x: Tensor) -> Tensor:
        return torsion_of(x, self.phi_atoms)

    def psi(self, x: Tensor) -> Tensor:
        return torsion_of(x, self.psi_atoms)

    def is_c7eq(self, x: Tensor) -> Tensor:
        return self.phi(x) < 0

    def is_c7ax(self, x: Tensor) -> Tensor:
        return self.phi(x) >= 0

    def _load_reference(self) -> Reference | None:
        """Long-MD reference (scripts/reference_ala2.py), keyed by temperature and force field."""
        table = load_reference_file(ALA2_REFERENCE_FILE)
        entry = (table or {}).get(f"{self.temperature:g}")
        if not entry or entry.get("forcefield") != list(self.forcefield):
            return None
        source = entry["source"]
        delta_f = {name: ReferenceValue(v["value"], v.get("ci_low"), v.get("ci_high"), source)
                   for name, v in entry.get("delta_f", {}).items()}
        return Reference(delta_f=delta_f, profiles=entry.get("profiles", {}), source=source,
                         surfaces=entry.get("surfaces", {}))


class BPTI(OpenMMTarget):
    """BPTI in OBC implicit solvent (SYSTEMS.md section 4), prepared with pdbfixer and cached.

    `source`: a PDB id (5PTI ships with the package and works offline) or a local structure file.
    `cache_dir`: where the prepared PDB and the serialized system are kept (None: no cache).
    Observable: the C-alpha RMSD to the prepared structure after optimal superposition (nm).
    """

    def __init__(
        self,
        source: str = "5PTI",
        cache_dir: str | None = None,
        temperature: float = 300.0,
        forcefield: Sequence[str] = DEFAULT_FORCEFIELD,
        ph: float = 7.0,
        platform: str = "CPU",
        n_workers: int | None = None,
        threads_per_worker: int = 1,
    ):
        prepared = prepare_protein(source, cache_dir=cache_dir, ph=ph, forcefield_files=forcefield)
        super().__init__(prepared.system, prepared.topology, prepared.positions, temperature, platform=platform,
                         n_workers=n_workers, threads_per_worker=threads_per_worker, forcefield=forcefield)
        self.source = str(source)
        self.prepared_pdb = None if prepared.pdb_path is None else Path(prepared.pdb_path)
        self.ca_indices = np.array([a.index for a in prepared.topology.atoms() if a.name == "CA"])
        self.observables = {"ca_rmsd": self.ca_rmsd}

    def ca_rmsd(self, x: Tensor) -> Tensor:
        """C-alpha RMSD (nm) to the prepared structure after optimal superposition (Kabsch)."""
        ref = torch.as_tensor(self.positions[self.ca_indices], dtype=x.dtype, device=x.device)
        ca = x.reshape(x.shape[0], -1, 3)[:, self.ca_indices]
        return (superpose(ca, ref) - ref).pow(2).sum(-1).mean(-1).sqrt()
