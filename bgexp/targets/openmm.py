"""The OpenMM energy bridge: any `openmm.System` at a temperature as a differentiable energy in kT.

    u(x) = U(x) / (k_B T),    -du/dx = F(x) / (k_B T)

with U in kJ/mol from OpenMM, k_B T = R T in kJ/mol, x in nm (flattened [batch, 3 N]). Forces come
back as the gradient through a custom autograd function (`OpenMMEnergyFunction`), so a Boltzmann
generator trains by reverse KL through OpenMM without a re-implementation of the force field.

Evaluation:
- CPU / Reference platform: a pool of worker processes, each owning its own `Context` (one CPU
  thread each by default). The batch is split into contiguous chunks, one per worker. The pool is
  started and closed explicitly: `OpenMMBridge` is a context manager; `close()` is idempotent and
  runs on errors and Ctrl-C (workers ignore SIGINT so that the parent decides). A worker that dies
  mid-call is restarted and its chunk retried once; a second death fails the call with
  `OpenMMWorkerError` naming the exit code. Every wait polls the worker's liveness, so a dead
  worker is noticed within a fraction of a second, never a hang. Workers exit on their own when the
  parent dies (their pipe closes).
- CUDA / OpenCL: one context in the main process (`n_workers=0` does the same on any platform).

Non-finite energies (clashes, NaN coordinates, OpenMM exceptions) come back as +inf with zero
force and are counted in `n_nonfinite`; they never crash the run. Nothing is cached: every call
evaluates its inputs.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from bgexp.targets._openmm_worker import evaluate_chunk, make_context
from bgexp.targets.base import Target

log = logging.getLogger(__name__)

MOLAR_GAS_CONSTANT = 0.00831446261815324  # kJ / (mol K)
IN_PROCESS_PLATFORMS = ("CUDA", "OpenCL", "HIP", "Metal")


class OpenMMWorkerError(RuntimeError):
    """A worker process of the bridge died twice on the same call, or the bridge is closed."""


def kbt_kj_per_mol(temperature_kelvin: float) -> float:
    """k_B T in kJ/mol."""
    return MOLAR_GAS_CONSTANT * float(temperature_kelvin)


@dataclass
class _Worker:
    process: Any
    conn: Any


class OpenMMBridge:
    """Energies (kT) and forces (kT/nm) of an `openmm.System` for batches of configurations.

    Args:
        system: the `openmm.System` (serialized once and sent to every worker).
        temperature: in kelvin; sets k_B T = R T.
        platform: 'CPU' (default), 'Reference', 'CUDA', 'OpenCL'.
        n_workers: worker processes for CPU/Reference; None = number of usable cores;
            0 = evaluate in this process. CUDA/OpenCL always evaluate in this process.
        threads_per_worker: OpenMM CPU threads per worker (the 'Threads' property).
        platform_properties: extra OpenMM platform properties.
        start_timeout: seconds to wait for a worker to build its Context.
        call_timeout: seconds a single chunk may take before the worker is treated as hung
            (killed, restarted, retried once); None waits as long as the worker is alive.
    """

    def __init__(
        self,
        system,
        temperature: float,
        platform: str = "CPU",
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        platform_properties: dict[str, str] | None = None,
        start_timeout: float = 120.0,
        call_timeout: float | None = None,
    ):
        import openmm

        if temperature <= 0:
            raise ValueError(f"temperature must be positive (kelvin), got {temperature}")
        available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        if platform not in available:
            raise ValueError(f"OpenMM platform {platform!r} is not available here; available: {available}")
        self.system_xml = openmm.XmlSerializer.serialize(system)
        self.n_atoms = system.getNumParticles()
        self.temperature = float(temperature)
        self.kbt = kbt_kj_per_mol(temperature)
        self.platform = platform
        self.properties = dict(platform_properties or {})
        if platform == "CPU":
            self.properties.setdefault("Threads", str(int(threads_per_worker)))
        if platform in IN_PROCESS_PLATFORMS:
            n_workers = 0
        elif n_workers is None:
            n_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}")
        self.n_workers = int(n_workers)
        self.start_timeout = float(start_timeout)
        self.call_timeout = call_timeout
        self.n_calls = 0
        self.n_evaluations = 0
        self.n_nonfinite = 0
        self.n_restarts = 0
        self._workers: list[_Worker] = []
        self._local = None  # (context, integrator, has_virtual_sites) for the in-process mode

    # lifecycle --------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return bool(self._workers) or self._local is not None

    def open(self) -> "OpenMMBridge":
        """Start the workers (or the in-process context). Idempotent."""
        if self.is_open:
            return self
        if self.n_workers == 0:
            self._local = make_context(self.system_xml, self.platform, self.properties)
            return self
        try:
            self._workers = [self._start_worker() for _ in range(self.n_workers)]
            for w in self._workers:
                self._await_ready(w)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every worker (politely, then by force) and free the contexts. Idempotent."""
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(("close",))
            except Exception:
                pass
        deadline = time.monotonic() + 2.0
        for w in workers:
            _kill(w.process, grace=max(0.0, deadline - time.monotonic()))
            w.conn.close()
        self._local = None

    def __enter__(self) -> "OpenMMBridge":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a safety net only; runs close() explicitly everywhere else
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        """Pickle the settings only (DDP spawn, checkpoints); the copy starts its own pool."""
        state = dict(self.__dict__)
        state["_workers"], state["_local"] = [], None
        return state

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _start_worker(self) -> _Worker:
        """A fresh interpreter running `bgexp.targets._openmm_worker` over a socket pair.

        A subprocess rather than multiprocessing's spawn: it never re-imports the user's main
        module (scripts without an `if __name__ == "__main__"` guard work) and loads no torch.
        """
        parent, child = socket.socketpair()
        child_fd = child.fileno()
        process = subprocess.Popen(
            [sys.executable, "-m", "bgexp.targets._openmm_worker", str(child_fd), self.platform],
            pass_fds=(child_fd,),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        conn = Connection(parent.detach())
        conn.send((self.system_xml, self.properties))
        return _Worker(process, conn)

    def _await_ready(self, worker: _Worker) -> None:
        reply = self._receive(worker, self.start_timeout, what="start")
        if reply[0] == "error":
            raise RuntimeError(f"OpenMM worker could not create a {self.platform} context: {reply[1]}")

    def _receive(self, worker: _Worker, timeout: float | None, what: str):
        """Wait for a message, checking every 0.1 s that the worker is still alive."""
        start = time.monotonic()
        while not worker.conn.poll(0.1):
            if worker.process.poll() is not None:
                raise _WorkerDied(worker.process.returncode)
            if timeout is not None and time.monotonic() - start > timeout:
                _kill(worker.process)
                raise _WorkerDied(f"killed after {timeout:g} s without an answer ({what})")
        try:
            return worker.conn.recv()
        except (EOFError, OSError):
            _kill(worker.process, grace=2.0)
            raise _WorkerDied(worker.process.returncode)

    def _replace_worker(self, index: int) -> _Worker:
        old = self._workers[index]
        _kill(old.process)
        old.conn.close()
        self.n_restarts += 1
        new = self._start_worker()
        self._workers[index] = new
        self._await_ready(new)
        return new

    # evaluation -------------------------------------------------------------------------------
    def evaluate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduced energies u [n] and reduced forces -du/dx [n, 3 N] for positions [n, 3 N] (nm).

        Non-finite results are returned as u = +inf with zero force and counted.
        """
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != 3 * self.n_atoms:
            raise ValueError(
                f"OpenMM bridge expects positions of shape [batch, {3 * self.n_atoms}] "
                f"({self.n_atoms} atoms x 3, nm), got {positions.shape}"
            )
        self.open()  # a closed bridge reopens on demand
        xyz = positions.reshape(positions.shape[0], self.n_atoms, 3)
        if self._local is not None:
            energies, forces = evaluate_chunk(self._local[0], self._local[2], xyz)
        else:
            energies, forces = self._evaluate_pool(xyz)
        bad = ~np.isfinite(energies)
        self.n_calls += 1
        self.n_evaluations += positions.shape[0]
        self.n_nonfinite += int(bad.sum())
        u = energies / self.kbt
        u[bad] = np.inf
        f = forces.reshape(positions.shape[0], -1) / self.kbt
        f[bad] = 0.0
        return u, f

    def _evaluate_pool(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunks = [c for c in np.array_split(np.arange(xyz.shape[0]), len(self._workers)) if len(c)]
        energies = np.empty(xyz.shape[0])
        forces = np.empty(xyz.shape)
        deaths = [0] * len(chunks)
        for k, idx in enumerate(chunks):  # send every chunk first: the workers run in parallel
            self._dispatch(k, xyz[idx], deaths)
        for k, idx in enumerate(chunks):
            while True:
                try:
                    reply = self._receive(self._workers[k], self.call_timeout, what="eval")
                    break
                except _WorkerDied as died:
                    self._worker_died(k, died.status, deaths, len(idx))
                    self._dispatch(k, xyz[idx], deaths)
            energies[idx], forces[idx] = reply[1], reply[2]
        return energies, forces

    def _dispatch(self, k: int, chunk: np.ndarray, deaths: list[int]) -> None:
        """Send a chunk to worker k, restarting it (once per call) if it is already dead."""
        while True:
            try:
                self._workers[k].conn.send(("eval", chunk))
                return
            except OSError:
                self._worker_died(k, self._workers[k].process.poll(), deaths, len(chunk))

    def _worker_died(self, k: int, status, deaths: list[int], n: int) -> None:
        deaths[k] += 1
        if deaths[k] > 1:
            raise OpenMMWorkerError(
                f"OpenMM worker {k} died twice on the same chunk of {n} configurations "
                f"(last exit status {status}); giving up"
            )
        log.warning("OpenMM worker %d died (exit status %s); restarting it", k, status)
        try:
            self._replace_worker(k)
        except _WorkerDied as again:
            raise OpenMMWorkerError(
                f"OpenMM worker {k} died (exit status {status}) and its replacement died while starting "
                f"(exit status {again.status}); giving up"
            ) from None


def _kill(process: subprocess.Popen, grace: float = 0.0) -> None:
    """Wait up to `grace` seconds for the process to exit, then kill it and reap it."""
    try:
        process.wait(timeout=grace) if grace > 0 else None
    except subprocess.TimeoutExpired:
        pass
    if process.poll() is None:
        process.kill()
        process.wait(timeout=5.0)


class _WorkerDied(OpenMMWorkerError):
    """A worker exited or was killed; `status` is its exit status (or why it was killed)."""

    def __init__(self, status):
        super().__init__(f"an OpenMM worker process exited unexpectedly (status {status})")
        self.status = status


class OpenMMEnergyFunction(torch.autograd.Function):
    """u(x) through OpenMM with du/dx = -F/kT as the backward (custom autograd function)."""

    @staticmethod
    def forward(ctx, x: Tensor, bridge: OpenMMBridge) -> Tensor:
        u, f = bridge.evaluate(x.detach().cpu().numpy())
        ctx.save_for_backward(torch.from_numpy(-f).to(dtype=x.dtype, device=x.device))
        return torch.from_numpy(u).to(dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad_u,) = ctx.saved_tensors
        return grad_output[:, None] * grad_u, None


def openmm_energy(x: Tensor, bridge: OpenMMBridge) -> Tensor:
    """Differentiable reduced energy [batch] of flattened positions x [batch, 3 N] in nm."""
    return OpenMMEnergyFunction.apply(x, bridge)


class OpenMMTarget(Target):
    """A target whose energy is an `openmm.System` at `temperature` kelvin, through `OpenMMBridge`.

    Subclasses (peptides, ice) provide the system, the topology, a starting structure, the
    observables and the states. Configurations are flattened positions in nm, x in R^{3 N}.
    The target owns its bridge: use it as a context manager or call `close()` when done
    (the training entry point does both).
    """

    def __init__(
        self,
        system,
        topology,
        positions: np.ndarray,
        temperature: float,
        platform: str = "CPU",
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        forcefield: Sequence[str] = (),
    ):
        super().__init__()
        self.system = system
        self.topology = topology
        self.positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        self.n_atoms = system.getNumParticles()
        if self.positions.shape[0] != self.n_atoms:
            raise ValueError(
                f"{type(self).__name__}: the structure has {self.positions.shape[0]} atoms but the "
                f"system has {self.n_atoms} particles"
            )
        if topology is not None and topology.getNumAtoms() != self.n_atoms:
            raise ValueError(
                f"{type(self).__name__}: the topology has {topology.getNumAtoms()} atoms but the system "
                f"has {self.n_atoms} particles"
            )
        self.dim = 3 * self.n_atoms
        self.temperature = float(temperature)
        self.kbt = kbt_kj_per_mol(temperature)  # kT in kJ/mol: reduced energy u = U / kbt
        self.forcefield = tuple(forcefield)
        self.bridge = OpenMMBridge(
            system, temperature, platform=platform, n_workers=n_workers, threads_per_worker=threads_per_worker
        )

    def energy(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return openmm_energy(x, self.bridge)

    def mdtraj_topology(self):
        import mdtraj

        return mdtraj.Topology.from_openmm(self.topology)

    def close(self) -> None:
        self.bridge.close()

    def __enter__(self) -> "OpenMMTarget":
        self.bridge.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def metadata(self) -> dict[str, Any]:
        """What MD files and results record about this target."""
        return {
            "target": type(self).__name__,
            "n_atoms": self.n_atoms,
            "temperature_kelvin": self.temperature,
            "forcefield": list(self.forcefield),
            "platform": self.bridge.platform,
        }
