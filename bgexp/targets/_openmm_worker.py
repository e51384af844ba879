"""One worker of the OpenMM bridge: a Context that answers energy-and-force requests.

Run by `OpenMMBridge` as `python -m bgexp.targets._openmm_worker FD PLATFORM`, where FD is one
end of a socket pair. The first message is (system XML, platform properties); then
('eval', positions [n, N, 3] nm) -> ('result', energies [n] kJ/mol, forces [n, N, 3] kJ/mol/nm)
until ('close',) or end of file (the parent is gone). Imports only numpy and openmm, so that a
worker starts quickly. `make_context` and `evaluate_chunk` also serve the in-process mode.
"""

from __future__ import annotations

import signal
import sys
import time

import numpy as np


def make_context(system_xml: str, platform: str, properties: dict[str, str]):
    """(context, integrator, virtual_sites) for a serialized system on `platform`; virtual_sites is
    a boolean mask over the particles, or None when the system has none."""
    import openmm

    system = openmm.XmlSerializer.deserialize(system_xml)
    integrator = openmm.VerletIntegrator(0.001)
    plat = openmm.Platform.getPlatformByName(platform)
    context = openmm.Context(system, integrator, plat, dict(properties))
    mask = np.array([system.isVirtualSite(i) for i in range(system.getNumParticles())], dtype=bool)
    return context, integrator, (mask if mask.any() else None)


def evaluate_chunk(context, virtual_sites: np.ndarray | None, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies [n] (kJ/mol) and forces [n, N, 3] (kJ/mol/nm); NaN energy where OpenMM fails.

    Virtual sites (e.g. the M site of TIP4P water) are recomputed from their parent atoms before
    each evaluation, so the energy does not depend on the positions given for them: their forces
    are returned as zero. (OpenMM reports a virtual site's own force in its slot *and* has already
    added it onto the parent atoms; passing both on would count it twice in -dU/dx.)"""
    has_virtual_sites = virtual_sites is not None
    n, n_atoms = positions.shape[0], positions.shape[1]
    energies = np.full(n, np.nan)
    forces = np.zeros((n, n_atoms, 3))
    for k in range(n):
        pos = positions[k]
        if not np.all(np.isfinite(pos)):
            continue
        try:
            context.setPositions(pos)
            if has_virtual_sites:
                context.computeVirtualSites()
            state = context.getState(getEnergy=True, getForces=True)
            e = state.getPotentialEnergy()._value  # kJ/mol
            f = state.getForces(asNumpy=True)._value
        except Exception:  # OpenMM raises on NaN coordinates or particles far outside the box
            continue
        if np.isfinite(e) and np.all(np.isfinite(f)):
            energies[k] = e
            forces[k] = f
            if has_virtual_sites:
                forces[k, virtual_sites] = 0.0
    return energies, forces


def serve(fd: int, platform: str) -> None:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes the pool
    conn = Connection(fd)
    try:
        system_xml, properties = conn.recv()
        context, _integrator, has_vs = make_context(system_xml, platform, properties)
    except (EOFError, OSError):
        return
    except Exception as exc:  # report the construction error to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    import os

    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message[0] == "close":
            return
        try:
            if message[0] == "eval":
                conn.send(("result",) + evaluate_chunk(context, has_vs, message[1]))
            elif message[0] == "sleep":  # test hook: a call that blocks
                time.sleep(float(message[1]))
                conn.send(("slept",))
        except (BrokenPipeError, ConnectionResetError):  # the parent is gone
            return


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
