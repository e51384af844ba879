"""The OpenMM energy bridge: values against a direct Context, gradients, lifecycle, dead workers."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")

from bgexp.targets.openmm import OpenMMBridge, OpenMMWorkerError, kbt_kj_per_mol, openmm_energy  # noqa: E402
from bgexp.targets.structures import build_alanine_dipeptide, create_system  # noqa: E402

T = 300.0


@pytest.fixture(scope="module")
def ala2():
    topology, positions = build_alanine_dipeptide()
    return create_system(topology), positions


def perturbed(positions: np.ndarray, n: int, scale: float = 0.003, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return positions.reshape(1, -1) + scale * rng.standard_normal((n, positions.size))


def direct(system, x: np.ndarray, platform: str = "Reference") -> tuple[np.ndarray, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) from a plain OpenMM Context, one by one."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    energies, forces = [], []
    for xi in x:
        context.setPositions(xi.reshape(-1, 3))
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy()._value)
        forces.append(state.getForces(asNumpy=True)._value.reshape(-1))
    return np.array(energies), np.array(forces)


def gone(pid: int) -> bool:
    """True when the process has exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pids, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(gone(p) for p in pids)


def assert_matches_direct(system, x, u, f):
    kbt = kbt_kj_per_mol(T)
    e_ref, f_ref = direct(system, x)
    np.testing.assert_allclose(u * kbt, e_ref, rtol=1e-5, atol=1e-3)
    scale = np.abs(f_ref).max()
    np.testing.assert_allclose(f * kbt, f_ref, rtol=0, atol=2e-5 * scale)


def test_ala2_pool_matches_direct_context(ala2):
    system, positions = ala2
    x = perturbed(positions, 40)
    with OpenMMBridge(system, T, platform="CPU", n_workers=2) as bridge:
        u, f = bridge.evaluate(x)
        assert len(bridge.worker_pids) == 2
    assert_matches_direct(system, x, u, f)


def test_in_process_mode_matches_pool(ala2):
    system, positions = ala2
    x = perturbed(positions, 8, seed=1)
    with OpenMMBridge(system, T, platform="Reference", n_workers=0) as local:
        u0, f0 = local.evaluate(x)
        assert local.worker_pids == []
    assert_matches_direct(system, x, u0, f0)


def test_autograd_gradient_is_minus_force_and_matches_finite_differences(ala2):
    system, positions = ala2
    x = torch.tensor(perturbed(positions, 3, seed=2), requires_grad=True)
    with OpenMMBridge(system, T, platform="Reference", n_workers=0) as bridge:
        u = openmm_energy(x, bridge)
        assert u.dtype == torch.float64 and u.shape == (3,)
        (grad,) = torch.autograd.grad((u * torch.tensor([1.0, 2.0, -0.5], dtype=u.dtype)).sum(), x)
        _, f = bridge.evaluate(x.detach().numpy())
        np.testing.assert_allclose(grad.numpy(), -f * np.array([[1.0], [2.0], [-0.5]]), rtol=1e-12)
        # central finite differences along a random direction, in double precision
        v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        v = v / v.norm(dim=1, keepdim=True)
        h = 1e-6
        up, _ = bridge.evaluate((x + h * v).detach().numpy())
        um, _ = bridge.evaluate((x - h * v).detach().numpy())
        fd = (up - um) / (2 * h)
        np.testing.assert_allclose(fd, (-f * v.numpy()).sum(1), rtol=1e-4, atol=1e-3)


def test_float32_input_gives_float32_energies(ala2):
    system, positions = ala2
    x = torch.tensor(perturbed(positions, 2), dtype=torch.float32, requires_grad=True)
    with OpenMMBridge(system, T, n_workers=1) as bridge:
        u = openmm_energy(x, bridge)
        u.sum().backward()
    assert u.dtype == torch.float32 and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_nonfinite_configurations_are_inf_and_counted(ala2):
    system, positions = ala2
    x = perturbed(positions, 4)
    x[0, :] = np.nan
    x[1, 3:6] = x[1, 0:3]  # two atoms on top of each other
    with OpenMMBridge(system, T, n_workers=2) as bridge:
        u, f = bridge.evaluate(x)
        assert bridge.n_nonfinite >= 1 and bridge.n_evaluations == 4
    assert np.isinf(u[0]) and u[0] > 0 and np.all(f[0] == 0)
    assert np.isfinite(u[2:]).all()
    assert (np.isinf(u[1]) and bridge.n_nonfinite == 2) or (np.isfinite(u[1]) and bridge.n_nonfinite == 1)


def test_wrong_shape_and_platform_are_clear_errors(ala2):
    system, positions = ala2
    with pytest.raises(ValueError, match=r"\[batch, 66\]"):
        OpenMMBridge(system, T, n_workers=0).evaluate(np.zeros((2, 60)))
    with pytest.raises(ValueError, match="platform 'NoSuchPlatform' is not available"):
        OpenMMBridge(system, T, platform="NoSuchPlatform")
    with pytest.raises(ValueError, match="temperature"):
        OpenMMBridge(system, -1.0)


def test_close_leaves_no_process_and_is_idempotent(ala2):
    system, positions = ala2
    bridge = OpenMMBridge(system, T, n_workers=2).open()
    pids = bridge.worker_pids
    assert all(not gone(p) for p in pids)
    bridge.close()
    bridge.close()
    assert wait_gone(pids, 5.0)
    # a closed bridge reopens on demand (a fresh pool)
    u, _ = bridge.evaluate(perturbed(positions, 2))
    assert np.isfinite(u).all() and set(bridge.worker_pids).isdisjoint(pids)
    bridge.close()


def test_exception_inside_with_block_closes_workers(ala2):
    system, _ = ala2
    with pytest.raises(RuntimeError, match="boom"):
        with OpenMMBridge(system, T, n_workers=2) as bridge:
            pids = bridge.worker_pids
            raise RuntimeError("boom")
    assert wait_gone(pids, 5.0)


def test_killed_worker_mid_call_is_restarted_and_result_is_exact(ala2):
    system, positions = ala2
    x = perturbed(positions, 6000, scale=0.002)  # ~1 s of work per worker
    with OpenMMBridge(system, T, n_workers=2) as bridge:
        expected, _ = bridge.evaluate(x[:50])
        victim = bridge.worker_pids[0]
        timer = threading.Timer(0.15, os.kill, args=(victim, signal.SIGKILL))
        timer.start()
        start = time.monotonic()
        u, _ = bridge.evaluate(x)
        elapsed = time.monotonic() - start
        timer.join()
        assert bridge.n_restarts == 1 and victim not in bridge.worker_pids
    np.testing.assert_array_equal(u[:50], expected)
    assert np.isfinite(u).all()
    assert elapsed < 30


def test_worker_that_keeps_dying_fails_with_a_clear_error(ala2):
    system, positions = ala2
    x = perturbed(positions, 6000, scale=0.002)
    bridge = OpenMMBridge(system, T, n_workers=2).open()
    stop = threading.Event()

    def killer():  # kill whatever process is worker 0, again and again
        while not stop.is_set():
            try:
                os.kill(bridge._workers[0].process.pid, signal.SIGKILL)
            except (ProcessLookupError, IndexError):
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(OpenMMWorkerError, match="worker 0 died"):
            bridge.evaluate(x)
    finally:
        stop.set()
        thread.join()
        bridge.close()
    assert time.monotonic() - start < 30


def test_hung_worker_times_out_and_is_replaced(ala2):
    system, positions = ala2
    with OpenMMBridge(system, T, n_workers=1, call_timeout=1.0) as bridge:
        worker = bridge._workers[0]
        worker.conn.send(("sleep", 60))  # the worker is now busy for a minute
        pid = worker.process.pid
        start = time.monotonic()
        u, _ = bridge.evaluate(perturbed(positions, 3))  # no answer within 1 s: killed, replaced, retried
        assert time.monotonic() - start < 20
        assert bridge.n_restarts == 1 and gone(pid)
    assert np.isfinite(u).all()


def test_pickled_bridge_carries_settings_not_processes(ala2):
    system, positions = ala2
    with OpenMMBridge(system, T, n_workers=1) as bridge:
        copy = pickle.loads(pickle.dumps(bridge))
        assert copy.worker_pids == [] and copy.n_workers == 1
        with copy:
            u, _ = copy.evaluate(perturbed(positions, 2))
        u0, _ = bridge.evaluate(perturbed(positions, 2))
    np.testing.assert_array_equal(u, u0)


SCRIPT = textwrap.dedent(
    """
    import faulthandler, signal, sys, time, numpy as np
    faulthandler.register(signal.SIGUSR1)  # the test asks for a traceback if the exit hangs
    # Ctrl-C as in a terminal, even when the test runs in a background job (which ignores SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from bgexp.targets.openmm import OpenMMBridge
    from bgexp.targets.structures import build_alanine_dipeptide, create_system
    top, pos = build_alanine_dipeptide()
    with OpenMMBridge(create_system(top), 300.0, n_workers=2) as bridge:
        print(*bridge.worker_pids, flush=True)
        x = pos.reshape(1, -1).repeat(2000, 0)
        while True:
            bridge.evaluate(x)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_ctrl_c_or_kill_of_the_parent_leaves_no_worker(sig, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        time.sleep(0.5)  # inside a call
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # show where the parent hangs
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            proc.kill()
            pytest.fail(f"the parent did not exit within 60 s of {sig!r}; its stacks:\n{proc.communicate()[1][-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in proc.stderr.read()
    assert wait_gone(pids, 10.0), "worker processes outlived their parent"
