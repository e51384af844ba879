"""Molecular dynamics data for OpenMM targets: Langevin dynamics written in resumable chunks.

`run_md(target, out_dir, ...)` integrates Langevin dynamics (OpenMM's LangevinMiddleIntegrator,
the BAOAB splitting of Zhang et al. 2019, accurate in configuration space) from the target's
structure and writes, inside `out_dir`:

    topology.pdb              the starting structure: open the trajectory with it in VMD / PyMOL
    metadata.json             temperature, force field, timestep, friction, length, seed, platform,
                              OpenMM version, progress; status "running" or "complete"
    chunks/chunk_NNNNN.dcd    frames written through mdtraj, for viewers (VMD, PyMOL, mdtraj)
    chunks/chunk_NNNNN.npz    the same frames at full float32 precision in nm (`x`), their
                              potential energies (kJ/mol) and forces (kJ/mol/nm); training reads these
    state.xml                 the simulation state after the last complete chunk (checkpoint)

Every file is written atomically (`bgexp.atomic`), the chunk first and the checkpoint last,
so a run killed at any moment resumes from its last complete chunk (`run_md` on the same folder
continues; a chunk written after the last checkpoint is discarded and redone). `load_md` reads
the chunks back and checks them against the topology.

Provenance: a folder is only ever continued or reused by a request with the same target, atom
count, force field, temperature and settings (`check_md_folder`, called by `run_md` before any
work, also on a complete folder). Anything else is an `MDSettingsMismatch` that lists each
differing field, requested against stored, and says what to do; a folder whose metadata.json
stores no settings (an older format) cannot be checked and is refused in the same way. It is an
error rather than a new folder because the folder is the user's own path (`data.path`,
`out_dir`): MD costs hours, and silently writing elsewhere would hide which data a run used.
A chunk that cannot be read (truncated, damaged, missing) is an `MDError` naming the file.
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgexp.atomic import atomic_path, atomic_write, write_json_atomic

log = logging.getLogger(__name__)

METADATA = "metadata.json"
TOPOLOGY = "topology.pdb"
STATE = "state.xml"
CHUNKS = "chunks"


class MDError(ValueError):
    """An MD folder or trajectory that is missing, inconsistent or does not fit the topology."""


class MDSettingsMismatch(MDError):
    """An MD folder made with other settings (or with none stored) than the requested ones."""


# what must agree between the run in a folder and a request to continue or reuse it
# (the settings' `temperature` is compared through `temperature_kelvin`: None means the target's)
CHECKED_FIELDS = ("target", "n_atoms", "forcefield", "temperature_kelvin", "settings")


@dataclass
class MDSettings:
    """Langevin settings. `n_frames` frames, one every `report_interval` steps, after
    `equilibration_steps` unrecorded steps; chunks of `chunk_frames` frames are the unit of
    checkpointing."""

    n_frames: int = 1000
    report_interval: int = 500
    timestep_fs: float = 2.0
    friction_per_ps: float = 1.0
    equilibration_steps: int = 10000
    chunk_frames: int = 100
    seed: int = 0
    minimize: bool = True
    temperature: float | None = None  # kelvin; None: the target's. Another value gives biased data


    def check(self) -> None:
        for name in ("n_frames", "report_interval", "chunk_frames"):
            if getattr(self, name) < 1:
                raise MDError(f"md.{name} must be >= 1, got {getattr(self, name)}")
        if self.timestep_fs <= 0 or self.friction_per_ps <= 0:
            raise MDError("md.timestep_fs and md.friction_per_ps must be positive")
        if self.temperature is not None and self.temperature <= 0:
            raise MDError(f"md.temperature must be positive (kelvin), got {self.temperature}")
        if self.equilibration_steps < 0:
            raise MDError(f"md.equilibration_steps must be >= 0, got {self.equilibration_steps}")


@dataclass
class MDData:
    """Frames of an MD folder: x [n, 3 N] nm (float32), energies [n] kJ/mol, forces [n, 3 N]."""

    x: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    metadata: dict[str, Any]
    topology_path: Path


def _chunk_paths(out_dir: Path, k: int) -> tuple[Path, Path]:
    base = out_dir / CHUNKS / f"chunk_{k:05d}"
    return base.with_suffix(".dcd"), base.with_suffix(".npz")


def read_metadata(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / METADATA
    if not path.is_file():
        raise MDError(f"{out_dir} is not an MD folder: it has no {METADATA}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MDError(f"{path} is not valid JSON ({err})") from err


def is_complete(out_dir: str | Path) -> bool:
    try:
        return read_metadata(out_dir).get("status") == "complete"
    except MDError:
        return False


def run_md(target, out_dir: str | Path, settings: MDSettings | None = None, platform: str = "CPU",
           threads: int | None = None, progress: bool = True) -> Path:
    """Run (or resume) Langevin MD of an `OpenMMTarget` into `out_dir`; returns `out_dir`.

    Resuming, or reusing a complete folder, requires the same settings, target and temperature;
    anything else is an MDSettingsMismatch, before any work, that lists the differing fields
    (requested and stored) and what to do (`check_md_folder`).
    """
    # imported first, so that a missing dependency fails before anything is written
    import mdtraj  # noqa: F401
    import openmm  # noqa: F401

    settings = settings or MDSettings()
    settings.check()
    out_dir = Path(out_dir)
    temperature = float(settings.temperature or target.temperature)
    metadata = _run_metadata(target, settings, temperature, platform)
    check_md_folder(out_dir, metadata)
    (out_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    n_chunks = -(-settings.n_frames // settings.chunk_frames)
    chunks_done, complete = _previous_progress(out_dir, metadata, n_chunks)
    if complete:
        log.info("MD in %s is already complete (%d frames)", out_dir, settings.n_frames)
        return out_dir
    _discard_stale_chunks(out_dir, chunks_done)
    simulation = _make_simulation(target, settings, temperature, platform, threads, chunks_done)
    if chunks_done == 0:
        _start_new_run(simulation, target, out_dir, settings, temperature, metadata)
    else:
        simulation.loadState(str(out_dir / STATE))
        log.info("resuming MD in %s after %d of %d chunks", out_dir, chunks_done, n_chunks)
    _run_chunks(simulation, target, out_dir, settings, metadata, chunks_done, n_chunks, progress)
    return out_dir


def _run_metadata(target, settings: MDSettings, temperature: float, platform: str) -> dict[str, Any]:
    """The metadata of a run (without its progress fields): target, temperature, settings,
    platform, OpenMM version, trajectory length and units."""
    import openmm

    return {
        **target.metadata(),
        "temperature_kelvin": temperature,
        "settings": asdict(settings),
        "platform": platform,
        "openmm_version": openmm.version.version,
        "length_ps": settings.n_frames * settings.report_interval * settings.timestep_fs / 1000.0,
        "frame_interval_ps": settings.report_interval * settings.timestep_fs / 1000.0,
        "units": {"positions": "nm", "energies": "kJ/mol", "forces": "kJ/mol/nm"},
    }


def _previous_progress(out_dir: Path, metadata: dict[str, Any], n_chunks: int) -> tuple[int, bool]:
    """(chunks done, whether the run is complete) of the run already in `out_dir`; (0, False) for
    a new folder (checked by `check_md_folder` first). MDError if its checkpoint is missing."""
    if not (out_dir / METADATA).exists():
        return 0, False
    old = read_metadata(out_dir)
    chunks_done = int(old.get("chunks_done", 0))
    if chunks_done >= n_chunks and old.get("status") == "complete":
        return chunks_done, True
    if chunks_done and not (out_dir / STATE).exists():
        raise MDError(f"{out_dir}: metadata says {chunks_done} chunks are done but {STATE} is missing")
    return chunks_done, False


class _Missing:
    """A field a stored metadata.json lacks."""

    def __repr__(self) -> str:
        return "<not stored>"


MISSING = _Missing()


def check_md_folder(out_dir: str | Path, metadata: dict[str, Any]) -> None:
    """Refuse (MDSettingsMismatch) to continue or reuse the run in `out_dir` for a request whose
    metadata (that `run_md` would write) differs in target, atoms, force field, temperature or settings;
    also refuse a folder whose metadata stores none of them (an older format), and chunk files
    without a metadata.json (not an MD folder of this module). A missing or empty folder passes."""
    out_dir = Path(out_dir)
    if not (out_dir / METADATA).exists():
        stray = sorted((out_dir / CHUNKS).glob("chunk_*")) if (out_dir / CHUNKS).is_dir() else []
        if stray:  # metadata.json is written before the first chunk: these come from elsewhere
            raise MDSettingsMismatch(
                f"{out_dir} holds MD chunks ({stray[0].name}, ...) but no {METADATA}, so the settings they "
                f"were made with are unknown; delete the folder to run the MD again, or point the data path "
                f"at another folder")
        return
    differences = settings_differences(read_metadata(out_dir), metadata)
    if differences:
        raise MDSettingsMismatch(_mismatch_message(out_dir, differences))


def settings_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, requested, stored) for every checked field in which two runs' metadata differ; settings
    are compared one by one (`settings.n_frames`), their `temperature` through `temperature_kelvin`.
    A field the stored metadata lacks is listed with stored value `MISSING`."""
    def checked(metadata: dict[str, Any]) -> dict[str, Any]:
        out = {key: metadata.get(key, MISSING) for key in CHECKED_FIELDS}
        if isinstance(out["settings"], dict):
            out["settings"] = {k: v for k, v in out["settings"].items() if k != "temperature"}
        return out

    return differences(checked(requested), checked(stored))


def differences(requested: Any, stored: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, requested, stored) for every leaf in which two nested dicts differ; a key that
    one side lacks has the value `MISSING` there."""
    if isinstance(requested, dict) and isinstance(stored, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(requested) | set(stored), key=str):
            out += differences(requested.get(key, MISSING), stored.get(key, MISSING), f"{prefix}{key}.")
        return out
    return [] if requested == stored else [(prefix.rstrip("."), requested, stored)]


def _mismatch_message(out_dir: Path, differences: list[tuple[str, Any, Any]]) -> str:
    lines = [f"  {field}: requested {requested!r}, stored {stored!r}" for field, requested, stored in differences]
    if any(stored is MISSING for _, _, stored in differences):
        head = (f"{out_dir}/{METADATA} does not store the settings this MD was made with (a folder of an "
                f"older format, or edited), so it cannot be checked against the requested ones:")
        advice = (f"delete {out_dir} to run the MD again with the requested settings, point the data path at "
                  f"another folder, or request no MD settings (data.md: null) to use its frames as they are")
    else:
        head = f"{out_dir} holds an MD run with other settings than the requested ones:"
        advice = (f"delete {out_dir} to run the MD again with the requested settings, or point the data path "
                  f"(data.path / out_dir) at another folder for this run")
    return "\n".join([head, *lines, advice])


def _discard_stale_chunks(out_dir: Path, chunks_done: int) -> None:
    """Delete the chunk files numbered `chunks_done` and up: written after the last checkpoint,
    they are redone."""
    for stale in (out_dir / CHUNKS).glob("chunk_*"):
        if int(stale.stem.split("_")[1]) >= chunks_done:
            stale.unlink()  # written after the last checkpoint: redo it


def _make_simulation(target, settings: MDSettings, temperature: float, platform: str, threads: int | None,
                     chunks_done: int):
    """An OpenMM Simulation of the target with a Langevin middle integrator, its random seed
    derived from the settings' seed and the number of chunks already done."""
    import openmm
    from openmm import app, unit

    system = target.system
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, settings.friction_per_ps / unit.picosecond,
        settings.timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(int(settings.seed) * 100003 + chunks_done + 1)
    properties = {"Threads": str(threads)} if (platform == "CPU" and threads) else {}
    return app.Simulation(target.topology, system, integrator,
                          openmm.Platform.getPlatformByName(platform), properties)


def _start_new_run(simulation, target, out_dir: Path, settings: MDSettings, temperature: float,
                   metadata: dict[str, Any]) -> None:
    """Write the topology, set the target's structure (minimised if asked), draw velocities,
    write the metadata of a running run with no chunk done, then equilibrate."""
    from openmm import unit

    _write_topology(target, out_dir)
    simulation.context.setPositions(target.positions * unit.nanometer)
    if settings.minimize:
        simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, int(settings.seed) + 1)
    write_json_atomic(out_dir / METADATA, {**metadata, "status": "running", "chunks_done": 0, "frames_done": 0},
                      sort_keys=True)
    if settings.equilibration_steps:
        log.info("equilibrating %d steps", settings.equilibration_steps)
        simulation.step(settings.equilibration_steps)


def _write_topology(target, out_dir: Path) -> None:
    """The target's topology and starting structure as `out_dir`/topology.pdb."""
    from openmm import app, unit

    pdb = io.StringIO()
    app.PDBFile.writeFile(target.topology, target.positions * unit.nanometer, pdb, keepIds=True)
    atomic_write(out_dir / TOPOLOGY, pdb.getvalue())


def _run_chunks(simulation, target, out_dir: Path, settings: MDSettings, metadata: dict[str, Any],
                chunks_done: int, n_chunks: int, progress: bool) -> None:
    """Integrate chunks `chunks_done` .. `n_chunks` - 1; after each, write its frames, the
    checkpoint and the metadata (in that order)."""
    import mdtraj

    md_top = mdtraj.Topology.from_openmm(target.topology)
    bar = _progress(n_chunks * settings.chunk_frames, chunks_done * settings.chunk_frames, progress)
    start = time.time()
    try:
        for k in range(chunks_done, n_chunks):
            n = min(settings.chunk_frames, settings.n_frames - k * settings.chunk_frames)
            xyz, energies, forces = _record_frames(simulation, n, target.n_atoms, settings.report_interval, bar)
            if not np.all(np.isfinite(xyz)) or not np.all(np.isfinite(energies)):
                raise MDError(f"MD in {out_dir} blew up in chunk {k} (non-finite positions or energies); "
                              f"reduce md.timestep_fs")
            _write_chunk(out_dir, k, md_top, xyz, energies, forces)
            with atomic_path(out_dir / STATE) as tmp:
                simulation.saveState(str(tmp))
            _write_progress(out_dir, metadata, settings, k + 1, n_chunks, time.time() - start)
    finally:
        bar.close()


def _record_frames(simulation, n: int, n_atoms: int, report_interval: int, bar):
    """`n` frames, one every `report_interval` steps: positions [n, n_atoms, 3] nm (float32),
    potential energies [n] kJ/mol, forces [n, n_atoms, 3] kJ/mol/nm (float32)."""
    from openmm import unit

    xyz = np.empty((n, n_atoms, 3), dtype=np.float32)
    energies, forces = np.empty(n), np.empty((n, n_atoms, 3), dtype=np.float32)
    for i in range(n):
        simulation.step(report_interval)
        state = simulation.context.getState(getPositions=True, getEnergy=True, getForces=True)
        xyz[i] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        energies[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        forces[i] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        bar.update(1)
    return xyz, energies, forces


def _write_chunk(out_dir: Path, k: int, md_top, xyz: np.ndarray, energies: np.ndarray, forces: np.ndarray) -> None:
    """Chunk `k`: its frames as DCD (for viewers), then frames, energies and forces as npz."""
    import mdtraj

    dcd, npz = _chunk_paths(out_dir, k)
    with atomic_path(dcd) as tmp:
        mdtraj.Trajectory(xyz, md_top).save_dcd(str(tmp))
    atomic_write(npz, lambda f: np.savez(f, x=xyz, energies=energies, forces=forces))


def _write_progress(out_dir: Path, metadata: dict[str, Any], settings: MDSettings, done: int, n_chunks: int,
                    wall_s: float) -> None:
    """The metadata after `done` chunks: status, chunks and frames done, this session's wall time."""
    write_json_atomic(out_dir / METADATA, {
        **metadata,
        "status": "complete" if done == n_chunks else "running",
        "chunks_done": done,
        "frames_done": min(done * settings.chunk_frames, settings.n_frames),
        "wall_s_last_session": wall_s,
    }, sort_keys=True)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="MD frames", unit="frame", disable=not enabled)


def load_md(out_dir: str | Path, n_atoms: int | None = None, allow_incomplete: bool = False) -> MDData:
    """All complete chunks of an MD folder; MDError when missing, incomplete or mismatched."""
    import mdtraj

    out_dir = Path(out_dir)
    metadata = read_metadata(out_dir)
    if metadata.get("status") != "complete" and not allow_incomplete:
        raise MDError(
            f"MD in {out_dir} is incomplete ({metadata.get('frames_done', 0)} frames of "
            f"{metadata.get('settings', {}).get('n_frames')}); run it to the end (it resumes) or allow incomplete data"
        )
    top_path = out_dir / TOPOLOGY
    if not top_path.is_file():
        raise MDError(f"{out_dir} has no {TOPOLOGY}")
    top = mdtraj.load_topology(str(top_path))
    expected = n_atoms if n_atoms is not None else top.n_atoms
    if top.n_atoms != expected:
        raise MDError(f"{top_path} has {top.n_atoms} atoms but the target has {expected}")
    xs, es, fs = [], [], []
    for k in range(int(metadata.get("chunks_done", 0))):
        _, npz = _chunk_paths(out_dir, k)
        xyz, energies, forces = read_chunk(npz)
        if xyz.ndim != 3 or xyz.shape[1:] != (expected, 3):
            raise MDError(f"MD chunk {npz} holds frames of {xyz.shape[1:]} but the topology has {expected} atoms")
        if len(energies) != len(xyz):
            raise MDError(f"{npz} holds {len(energies)} energies for {len(xyz)} frames")
        xs.append(xyz.reshape(len(xyz), -1))
        es.append(energies)
        fs.append(forces.reshape(len(xyz), -1))
    if not xs:
        raise MDError(f"{out_dir} holds no complete chunk yet")
    return MDData(np.concatenate(xs).astype(np.float32), np.concatenate(es), np.concatenate(fs),
                  metadata, top_path)


def read_chunk(npz: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames, energies and forces of one chunk .npz; MDError naming the file when it is missing,
    truncated, damaged or lacks an array (a chunk cannot be redone alone: its starting state is gone)."""
    try:
        with np.load(npz, allow_pickle=False) as f:
            return f["x"], f["energies"], f["forces"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        reason = "is missing" if not npz.exists() else f"is damaged or truncated ({type(err).__name__}: {err})"
        out_dir = npz.parent.parent
        raise MDError(f"MD chunk {npz} {reason}; restore it from a copy, or delete the MD folder {out_dir} and "
                      f"run the MD again (a run with data.md settings regenerates it)") from err


def load_trajectory(path: str | Path, topology: str | Path, n_atoms: int):
    """An mdtraj trajectory of any format mdtraj reads, checked against the expected atom count."""
    import mdtraj

    path = Path(path)
    if not path.is_file():
        raise MDError(f"trajectory file {path} does not exist")
    try:
        top = mdtraj.load_topology(str(topology))
    except Exception as err:
        raise MDError(f"cannot read topology {topology}: {err}") from err
    if top.n_atoms != n_atoms:
        raise MDError(f"topology {topology} has {top.n_atoms} atoms but the target has {n_atoms}")
    try:
        traj = mdtraj.load(str(path), top=top)
    except ValueError as err:  # mdtraj: "xyz must be shape (Any, N, 3)" / atom count mismatch
        raise MDError(
            f"trajectory {path} does not fit topology {topology} ({n_atoms} atoms): {err}"
        ) from err
    except Exception as err:
        raise MDError(f"cannot read trajectory {path}: {err}") from err
    if traj.n_atoms != n_atoms:
        raise MDError(f"trajectory {path} has {traj.n_atoms} atoms but the target has {n_atoms}")
    return traj
