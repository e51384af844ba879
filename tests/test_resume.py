"""Fault tolerance: atomic checkpoints, resuming a SIGKILLed run from its folder, sweep objectives."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bgexp.training.resume import AtomicCheckpointIO, wandb_run_id
from bgexp.training.artifacts import objective
from helpers import TINY, cli_env, console_script, run_cli


def test_atomic_checkpoint_keeps_the_old_file_when_a_write_dies(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "weights": torch.arange(5.0)}, path)
    assert torch.load(path, weights_only=False)["epoch"] == 1

    def dying_save(self, checkpoint, path, storage_options=None):  # killed half-way through the write
        Path(path).write_bytes(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["epoch"] == 1  # the previous checkpoint, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_wandb_run_id_is_created_once_per_folder(tmp_path):
    first = wandb_run_id(tmp_path)
    assert len(first) == 8 and first.isalnum()
    assert wandb_run_id(tmp_path) == first
    assert wandb_run_id(tmp_path / "other") != first


def test_objective_reads_results_json_paths():
    results = {"ess": 0.25, "nll_test": -3.0, "metrics": {"kl_quadrature": 0.01, "surface/ramachandran/kl": 0.2},
               "delta_f": {"a->b": {"value": 1.5, "error": -0.4}, "a->c": {"value": 2.0, "error": None}}}
    assert objective(results, "ess") == 0.25
    assert objective(results, "abs:nll_test") == 3.0
    assert objective(results, "metrics.kl_quadrature") == 0.01
    assert objective(results, "metrics.surface/ramachandran/kl") == 0.2
    assert objective(results, "delta_f.a->b.value") == 1.5
    assert objective(results, "abs_delta_f_error") == pytest.approx(0.4)
    assert math.isnan(objective(results, "delta_f.a->c.error"))
    assert math.isnan(objective(results, "metrics.missing"))
    assert math.isnan(objective({"delta_f": {}}, "abs_delta_f_error"))


@pytest.mark.slow
def test_a_sigkilled_run_resumes_from_its_folder_and_finishes(tmp_path):
    """Kill -9 in the middle of training; `bgexp-train resume=<folder>` continues from last.ckpt in
    the same folder with the same W&B run id and writes results.json."""
    args = [*TINY, "trainer.max_epochs=30", "evaluation.every_n_epochs=100", "loss.nll_warmup_steps=1000"]
    proc = subprocess.Popen([console_script("bgexp-train"), *args], cwd=tmp_path, env=cli_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "outputs" / "runs" / "dimer_realnvp"
    deadline = time.monotonic() + 240
    checkpoint = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("*/checkpoints/last.ckpt"))
            if found and torch.load(found[0], weights_only=False)["epoch"] >= 2:
                checkpoint = found[0]
                break
            time.sleep(0.2)
        assert checkpoint is not None, "no checkpoint of epoch 2 appeared"
        os.killpg(proc.pid, signal.SIGKILL)  # mid-training: no clean-up of any kind
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run_dir = checkpoint.parents[1]
    assert not (run_dir / "results.json").exists()
    killed = torch.load(checkpoint, weights_only=False)  # readable: not corrupt
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        torch.load(ckpt, weights_only=False)
    run_id = (run_dir / "wandb_id").read_text().strip()

    resumed = run_cli("bgexp-train", [f"resume={run_dir}", "trainer.max_epochs=8"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert sorted(p.name for p in runs.iterdir()) == [run_dir.name]  # the same folder, no new one
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["ess"] <= 1
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["epoch"] == 7 and final["global_step"] > killed["global_step"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)  # one W&B run id
    assert (run_dir / "wandb_id").read_text().strip() == run_id


def test_resume_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    proc = run_cli("bgexp-train", [f"resume={tmp_path / 'nothing'}"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "not a bgexp run folder" in proc.stderr
