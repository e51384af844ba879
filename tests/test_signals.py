"""SIGTERM and SIGINT to bgexp-train (bgexp/training/signals.py, bgexp/train.py): a run ends with
failed.json (reason terminated), a loadable checkpoints/last.ckpt and a non-zero exit status, and
`resume=` completes it; a signal to a sweep stops the sweep (the remaining members are not
launched) with the same status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bgexp.training.artifacts import read_checkpoint
from bgexp.training.errors import TerminatedError
from bgexp.training.signals import Termination, as_terminated, terminating_on_signals
from helpers import TINY, cli_env, console_script, run_cli

# still training when the signal comes: many epochs, no periodic evaluation, no logger
LONG = [*TINY, "trainer.max_epochs=200", "evaluation.every_n_epochs=1000", "loss.nll_warmup_steps=100000",
        "logger=none"]


def _start(args: list[str], tmp: Path) -> subprocess.Popen:
    env = cli_env(tmp)
    env["OMP_NUM_THREADS"] = "1"
    log = open(tmp / "train.out", "w")  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen([console_script("bgexp-train"), *args], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.output, proc.log = tmp / "train.out", log
    return proc


def _signal_after_first_checkpoint(proc: subprocess.Popen, pattern: str, root: Path, signum=signal.SIGTERM,
                                   timeout: float = 180) -> Path:
    """Wait for `root/<pattern>` (an epoch checkpoint), send `signum` to the process, wait for it."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = sorted(root.glob(pattern))
            if found:
                os.kill(proc.pid, signum)
                proc.wait(timeout=120)
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no {pattern} under {root} appeared (exit {proc.poll()}):\n"
                             f"{proc.output.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log.close()


def _check_terminated(run_dir: Path, proc: subprocess.Popen, signal_name: str = "SIGTERM") -> dict:
    out = proc.output.read_text()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["reason"] == "terminated" and failed["signal"] == signal_name, failed
    assert failed["resume"] == f"bgexp-train resume={run_dir}"
    assert not (run_dir / "results.json").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # loads, safely
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == checkpoint["global_step"]
    assert f"stopped by {signal_name}" in out, out[-3000:]
    return checkpoint


@pytest.mark.bad_input
@pytest.mark.slow
def test_sigterm_ends_a_run_with_failed_json_and_a_checkpoint_and_resume_completes_it(tmp_path):
    runs = tmp_path / "outputs" / "runs" / "dimer_realnvp"
    proc = _start(LONG, tmp_path)
    _signal_after_first_checkpoint(proc, "*/checkpoints/last.ckpt", runs)
    assert proc.returncode == 128 + signal.SIGTERM  # 143, as a shell reports a SIGTERMed job
    (run_dir,) = list(runs.iterdir())
    checkpoint = _check_terminated(run_dir, proc)
    assert checkpoint["global_step"] > 0

    epochs = checkpoint["epoch"] + 2  # the terminated epoch and one more
    resumed = run_cli("bgexp-train", [f"resume={run_dir}", f"trainer.max_epochs={epochs}"], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert 0 <= json.loads((run_dir / "results.json").read_text())["ess"] <= 1
    assert not (run_dir / "failed.json").exists()  # the run has not failed after all
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] > checkpoint["global_step"] and final["epoch"] == epochs - 1


@pytest.mark.bad_input
@pytest.mark.slow
def test_sigint_ends_a_run_like_sigterm(tmp_path):
    runs = tmp_path / "outputs" / "runs" / "dimer_realnvp"
    proc = _start(LONG, tmp_path)
    _signal_after_first_checkpoint(proc, "*/checkpoints/last.ckpt", runs, signum=signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT  # 130
    (run_dir,) = list(runs.iterdir())
    _check_terminated(run_dir, proc, "SIGINT")


@pytest.mark.bad_input
@pytest.mark.slow
def test_sigterm_stops_a_sweep_with_a_non_zero_status(tmp_path):
    """The interrupted member has failed.json and last.ckpt; the second member is not launched."""
    proc = _start(["-m", *LONG, "seed=0,1"], tmp_path)
    root = tmp_path / "outputs" / "multiruns" / "dimer_realnvp"
    _signal_after_first_checkpoint(proc, "*/0/checkpoints/last.ckpt", root)
    assert proc.returncode == 128 + signal.SIGTERM
    (sweep,) = list(root.iterdir())
    checkpoint = _check_terminated(sweep / "0", proc)
    assert not (sweep / "1").exists()
    # the interrupted member resumes and completes in its own folder
    epochs = checkpoint["epoch"] + 2
    resumed = run_cli("bgexp-train", [f"resume={sweep / '0'}", f"trainer.max_epochs={epochs}"], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert (sweep / "0" / "results.json").is_file() and not (sweep / "0" / "failed.json").exists()


def test_a_signal_outside_training_raises_terminated_error_and_a_repeated_one_is_forced():
    with terminating_on_signals() as termination:
        with pytest.raises(TerminatedError) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in the main thread before this ends
    assert info.value.exit_status == 143 and not info.value.forced and termination.signum == signal.SIGTERM
    assert not isinstance(info.value, Exception)  # no `except Exception` swallows it
    assert signal.getsignal(signal.SIGTERM) is not termination.handle  # the previous handler is back

    fitting = Termination()
    fitting.fitting = True
    fitting.handle(signal.SIGINT)  # the first one only asks (the callback stops at a step boundary)
    assert fitting.requested
    with pytest.raises(TerminatedError) as info:
        fitting.handle(signal.SIGINT)
    assert info.value.forced and info.value.exit_status == 130


def test_lightnings_sigterm_exception_counts_as_terminated():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    assert as_terminated(SIGTERMException()).signal_name == "SIGTERM"
    assert as_terminated(ValueError("x")) is None
