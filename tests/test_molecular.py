"""Molecular targets end to end: MD chunks (resume, errors), internal coordinates on real MD
frames (reconstruction, brute-force log-dets), the ALA2 target and a real CLI run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")
import mdtraj  # noqa: E402

from bgexp.flows.coordinates import MixedCoordinates, ZMatrix, superpose  # noqa: E402
from bgexp.targets.dynamics import MDError, MDSettings, load_md, load_trajectory, run_md  # noqa: E402
from bgexp.targets.peptides import AlanineDipeptide  # noqa: E402
from bgexp.training.data import DataError, TargetDataModule  # noqa: E402
from helpers import REPO, SHORT_EVALUATION, ala2_tiny_md, run_cli  # noqa: E402

SHORT = MDSettings(n_frames=40, report_interval=50, chunk_frames=10, equilibration_steps=200, seed=3)


@pytest.fixture(scope="module")
def ala2():
    with AlanineDipeptide(n_workers=1) as target:
        yield target


@pytest.fixture(scope="module")
def ala2_md(ala2, tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "ala2"
    run_md(ala2, out, SHORT, threads=1, progress=False)
    return out


# MD data ------------------------------------------------------------------------------------
def test_md_folder_contents_and_energies_match_the_target(ala2, ala2_md):
    data = load_md(ala2_md, n_atoms=22)
    assert data.x.shape == (40, 66) and data.x.dtype == np.float32
    meta = json.loads((ala2_md / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["temperature_kelvin"] == 300.0
    assert meta["forcefield"] == ["amber99sbildn.xml", "amber99_obc.xml"] and meta["settings"]["seed"] == 3
    assert meta["length_ps"] == pytest.approx(40 * 50 * 2.0 / 1000)
    # the stored energies are the target's energies (kJ/mol -> kT)
    u = ala2.energy(torch.as_tensor(data.x[:5], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(u * ala2.bridge.kbt, data.energies[:5], rtol=1e-4, atol=0.05)
    # the DCD written for viewers holds the same frames (Angstrom in the file, nm in mdtraj)
    traj = load_trajectory(ala2_md / "chunks" / "chunk_00000.dcd", ala2_md / "topology.pdb", 22)
    np.testing.assert_allclose(traj.xyz.reshape(10, -1), data.x[:10], atol=1e-5)


def test_md_rerun_on_complete_folder_is_a_no_op_and_other_settings_are_refused(ala2, ala2_md):
    before = (ala2_md / "state.xml").stat().st_mtime_ns
    run_md(ala2, ala2_md, SHORT, progress=False)
    assert (ala2_md / "state.xml").stat().st_mtime_ns == before
    other = MDSettings(**{**SHORT.__dict__, "timestep_fs": 1.0})
    with pytest.raises(MDError, match="other settings"):
        run_md(ala2, ala2_md, other, progress=False)


KILLED_RUN = textwrap.dedent(
    """
    import sys
    from bgexp.targets.dynamics import MDSettings, run_md
    from bgexp.targets.peptides import AlanineDipeptide
    target = AlanineDipeptide(n_workers=0)
    run_md(target, sys.argv[1], MDSettings(n_frames=400, report_interval=50, chunk_frames=20,
           equilibration_steps=0, seed=1), threads=1, progress=False)
    """
)


def test_killed_md_resumes_from_its_last_chunk(ala2, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "md.py"
    script.write_text(KILLED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        meta = out / "metadata.json"
        if meta.exists() and json.loads(meta.read_text()).get("chunks_done", 0) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads((out / "metadata.json").read_text())
    assert done["status"] == "running" and 2 <= done["chunks_done"] < 20
    run_md(ala2, out, MDSettings(n_frames=400, report_interval=50, chunk_frames=20, equilibration_steps=0, seed=1),
           threads=1, progress=False)
    data = load_md(out, n_atoms=22)
    assert data.x.shape == (400, 66) and np.isfinite(data.x).all()
    assert sorted(p.name for p in (out / "chunks").glob("*.npz")) == [f"chunk_{k:05d}.npz" for k in range(20)]


def test_incomplete_md_and_wrong_atom_counts_are_clear_errors(ala2, ala2_md, tmp_path):
    with pytest.raises(MDError, match="has 22 atoms but the target has 30"):
        load_md(ala2_md, n_atoms=30)
    # a trajectory whose atom count differs from the topology
    other = mdtraj.Trajectory(np.zeros((3, 10, 3), dtype=np.float32), mdtraj.load_topology(str(ala2_md / "topology.pdb")).subset(range(10)))
    other.save_dcd(str(tmp_path / "ten_atoms.dcd"))
    with pytest.raises(MDError, match="does not fit topology"):
        load_trajectory(tmp_path / "ten_atoms.dcd", ala2_md / "topology.pdb", 22)
    dm = TargetDataModule(ala2, path=str(tmp_path / "ten_atoms.dcd"), topology=str(ala2_md / "topology.pdb"))
    with pytest.raises(DataError, match="ten_atoms.dcd"):
        dm.setup()
    dm = TargetDataModule(ala2, path=str(tmp_path / "ten_atoms.dcd"))
    with pytest.raises(DataError, match="give its topology as data.topology"):
        dm.setup()
    meta = json.loads((ala2_md / "metadata.json").read_text())
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metadata.json").write_text(json.dumps({**meta, "status": "running", "frames_done": 10}))
    with pytest.raises(MDError, match="incomplete"):
        load_md(partial)


def test_data_module_reads_md_folder_and_holds_out_the_tail(ala2, ala2_md):
    dm = TargetDataModule(ala2, path=str(ala2_md), split="tail", val_fraction=0.25, batch_size=8)
    dm.setup()
    x = load_md(ala2_md).x
    assert dm.x_train.shape == (30, 66) and dm.x_val.shape == (10, 66)
    np.testing.assert_array_equal(np.sort(dm.x_val.numpy(), axis=0), np.sort(x[30:], axis=0))


# internal coordinates on real MD frames ---------------------------------------------------
def ala2_coordinates(ala2, cartesian: str = "resname ALA and (name N or name CA or name C)") -> MixedCoordinates:
    top = ala2.mdtraj_topology()
    return MixedCoordinates(ZMatrix.from_topology(top, cartesian=top.select(cartesian)))


@pytest.mark.parametrize("cartesian", ["resname ALA and (name N or name CA or name C)", "backbone"])
def test_ala2_md_frames_reconstruct_to_1e5_nm_in_float32(ala2, ala2_md, cartesian):
    x = torch.as_tensor(load_md(ala2_md).x)
    coords = ala2_coordinates(ala2, cartesian).fit(x.double()).float()
    features, ld_inv = coords.inverse(x)
    x_back, ld_fwd = coords.forward(features)
    error = (superpose(x_back, x.reshape(-1, 22, 3)[0]) - superpose(x, x.reshape(-1, 22, 3)[0])).abs().max()
    assert error < 1e-5, f"reconstruction error {error:.2e} nm"
    torch.testing.assert_close(ld_fwd, -ld_inv, rtol=1e-4, atol=1e-3)


def test_ala2_phi_psi_are_torsion_features(ala2, ala2_md):
    """With the frame N, CA, C of alanine, phi is a torsion of the representation and psi is one
    up to the planarity of the carbonyl carbon (O-C-CA-N ~ psi + pi: the amide N of NME takes O as
    its sibling reference, so its own torsion is the narrow offset from O)."""
    x = torch.as_tensor(load_md(ala2_md).x, dtype=torch.float64)
    coords = ala2_coordinates(ala2).double()
    torsions = coords.inverse(x)[0][:, coords.slices["torsions"]]

    def closest(angle):
        return (torch.remainder(torsions - angle[:, None] + np.pi, 2 * np.pi) - np.pi).abs().max(0).values.min()

    assert closest(ala2.phi(x)) < 1e-8
    assert closest(ala2.psi(x) + np.pi) < 0.5  # thermal out-of-plane motion of the carbonyl: up to ~25 degrees


def test_ala2_logdet_matches_brute_force_jacobian_in_float64(ala2, ala2_md):
    """log|det| of (features, translation t, rotation w) -> R(w) x(features) + t at w = 0 equals the
    flow's forward log-det up to a configuration-independent constant (here zero)."""
    x = torch.as_tensor(load_md(ala2_md).x[:4], dtype=torch.float64)
    coords = ala2_coordinates(ala2, "backbone").fit(torch.as_tensor(load_md(ala2_md).x, dtype=torch.float64)).double()
    features, _ = coords.inverse(x)

    def rodrigues(w):
        theta = w.norm().clamp_min(1e-30)
        k = torch.zeros(3, 3, dtype=w.dtype)
        k[0, 1], k[0, 2], k[1, 2] = -w[2], w[1], -w[0]
        k = k - k.T
        return torch.eye(3, dtype=w.dtype) + torch.sin(theta) / theta * k + (1 - torch.cos(theta)) / theta**2 * k @ k

    differences = []
    for f in features:
        def full(v):
            xyz = coords.forward(v[: coords.dim][None])[0].reshape(-1, 3)
            return (xyz @ rodrigues(v[coords.dim + 3:]).T + v[coords.dim: coords.dim + 3]).reshape(-1)

        v0 = torch.cat([f, torch.zeros(3, dtype=f.dtype), torch.full((3,), 1e-12, dtype=f.dtype)])
        jac = torch.autograd.functional.jacobian(full, v0)
        brute = torch.linalg.slogdet(jac)[1]
        differences.append(float(brute - coords.forward(f[None])[1][0]))
    assert np.ptp(differences) < 1e-6, differences
    assert abs(differences[0]) < 1e-6


# a real CLI run -------------------------------------------------------------------------------
@pytest.mark.slow
def test_ala2_cli_run_writes_results_trajectory_and_ramachandran(tmp_path):
    args = ["experiment=ala2_realnvp", *ala2_tiny_md(tmp_path), "target.n_workers=2", "data.batch_size=64",
            "flow.transform.n_couplings=2", "flow.transform.hidden=[32]", "loss.nll_warmup_steps=3",
            "loss.kl_ramp_steps=3", "loss.kl_batch_size=32", "trainer.max_epochs=2", *SHORT_EVALUATION]
    proc = run_cli("bgexp-train", args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "ala2_realnvp").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["ess"] <= 1 and np.isfinite(results["nll_test"])
    assert "C7eq->C7ax" in results["delta_f"]
    assert results["n_energy_evals"]["training"] > 0
    assert json.loads((tmp_path / "md600" / "metadata.json").read_text())["temperature_kelvin"] == 600.0
    assert json.loads((tmp_path / "md300" / "metadata.json").read_text())["temperature_kelvin"] == 300.0
    traj = mdtraj.load(str(run_dir / "samples.dcd"), top=str(run_dir / "samples_topology.pdb"))
    assert traj.n_atoms == 22 and traj.n_frames > 0
    assert (run_dir / "figures" / "surface_ramachandran.png").stat().st_size > 0
    assert Path(results["files"]["wandb_run"]).name.startswith("offline-run-")  # the real logger, offline
    assert Path(results["files"]["wandb_run"]).is_dir()
    # no bridge worker outlives the run: a worker whose parent exited is reparented (ppid 1)
    deadline = time.monotonic() + 10
    while _orphaned_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _orphaned_workers()


def _orphaned_workers() -> list[int]:
    orphans = []
    for proc in Path("/proc").iterdir():
        try:
            if b"_openmm_worker" not in (proc / "cmdline").read_bytes():
                continue
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError, ValueError):
            continue
        if ppid == "1" and state not in ("Z", "X"):
            orphans.append(int(proc.name))
    return orphans


# BPTI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpti(tmp_path_factory):
    from bgexp.targets.peptides import BPTI

    with BPTI(cache_dir=str(tmp_path_factory.mktemp("structures")), n_workers=2) as target:
        yield target


@pytest.fixture(scope="module")
def bpti_md(bpti, tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "bpti"
    run_md(bpti, out, MDSettings(n_frames=4, report_interval=10, chunk_frames=2, equilibration_steps=0,
                                 minimize=False, seed=0), threads=1, progress=False)
    return load_md(out, n_atoms=892)


def test_bpti_bridge_energies_and_forces_equal_a_direct_context(bpti, bpti_md):
    import openmm

    x = np.concatenate([bpti_md.x, bpti.positions.reshape(1, -1)]).astype(np.float64)
    u, f = bpti.bridge.evaluate(x)
    context = openmm.Context(bpti.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    kbt = bpti.bridge.kbt
    for k, xk in enumerate(x):
        context.setPositions(xk.reshape(-1, 3))
        state = context.getState(getEnergy=True, getForces=True)
        e_ref, f_ref = state.getPotentialEnergy()._value, state.getForces(asNumpy=True)._value.reshape(-1)
        assert u[k] * kbt == pytest.approx(e_ref, rel=1e-5, abs=0.05)
        # the CPU platform accumulates forces in single precision: 1e-4 of the largest force
        np.testing.assert_allclose(f[k] * kbt, f_ref, rtol=0, atol=1e-4 * np.abs(f_ref).max())
    # and the MD file's own energies (CPU platform, mixed precision) agree with the bridge
    np.testing.assert_allclose(u[:-1] * kbt, bpti_md.energies, rtol=1e-5, atol=0.5)


def test_bpti_md_frames_reconstruct_to_1e5_nm_in_float32(bpti, bpti_md):
    top = bpti.mdtraj_topology()
    coords = MixedCoordinates(ZMatrix.from_topology(top, cartesian=top.select("name N or name CA or name C")),
                              whiten=False)
    x = torch.as_tensor(bpti_md.x)
    coords = coords.fit(x.double()).float()
    features, _ = coords.inverse(x)
    assert features.shape == (4, 3 * 892 - 6)
    x_back, _ = coords.forward(features)
    error = (superpose(x_back, x[0].reshape(-1, 3)) - superpose(x, x[0].reshape(-1, 3))).abs().max()
    assert error < 1e-5, f"reconstruction error {error:.2e} nm"


def test_bpti_observable_and_metadata(bpti, bpti_md):
    x = torch.as_tensor(np.concatenate([bpti.positions.reshape(1, -1), bpti_md.x]), dtype=torch.float64)
    rmsd = bpti.ca_rmsd(x)
    assert rmsd[0] < 1e-6 and (rmsd[1:] > 0).all() and (rmsd[1:] < 0.1).all()
    assert bpti.metadata()["n_atoms"] == 892 and bpti.dim == 2676


def test_generate_md_script_writes_a_complete_folder(tmp_path):
    out = tmp_path / "md"
    cmd = [sys.executable, str(REPO / "scripts" / "generate_md.py"), "target=ala2", "md.n_frames=6",
           "md.report_interval=5", "md.chunk_frames=4", "md.equilibration_steps=0", f"out_dir={out}",
           "progress=false", "threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MD data in {out}" in proc.stdout
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["frames_done"] == 6 and meta["chunks_done"] == 2
    assert meta["platform"] == "CPU" and meta["openmm_version"]
    assert load_md(out).x.shape == (6, 66)


def test_md_settings_list_must_match_the_sources(ala2, ala2_md):
    with pytest.raises(ValueError, match="lists 1 MD settings for 2 data.path entries"):
        TargetDataModule(ala2, path=[str(ala2_md), str(ala2_md)], md=[{"n_frames": 4}])
    with pytest.raises(MDError, match="md.temperature must be positive"):
        MDSettings(temperature=-5.0).check()
