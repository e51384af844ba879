"""End-to-end: the real console scripts, the real offline W&B logger, results.json contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY, run_cli

pytestmark = pytest.mark.slow


def test_train_writes_results_and_offline_wandb_run(tiny_run):
    run_dir: Path = tiny_run["run_dir"]
    results = tiny_run["results"]
    # the ARCHITECTURE.md results.json contract
    for key in ("experiment", "config_hash", "seed", "ess", "n_samples", "delta_f", "nll_test",
                "n_energy_evals", "wall_s", "figures", "files"):
        assert key in results, key
    assert results["experiment"] == "dimer_realnvp"
    assert results["n_samples"] == 500
    assert 0.0 < results["ess"] <= 1.0
    assert np.isfinite(results["nll_test"])
    assert set(results["delta_f"]) == {"closed->open"}
    entry = results["delta_f"]["closed->open"]
    assert {"value", "ci_low", "ci_high", "reference", "reference_source"} <= set(entry)
    # KL steps used the target energy; the final evaluation used n_samples more (plus data energies)
    assert results["n_energy_evals"]["training"] > 0
    assert results["n_energy_evals"]["evaluation"] >= 500
    for path in results["figures"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    samples = np.load(run_dir / "samples.npz")
    assert samples["x"].shape == (500, 76)
    np.testing.assert_allclose(samples["log_w"], -samples["energy"] - samples["log_q"], rtol=1e-10)
    # the offline W&B run exists, holds the history with ESS and the logged figures
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))
    assert list((offline[0] / "files" / "media" / "images").rglob("*.png"))
    assert str(offline[0]) in tiny_run["stdout"]
    assert "results.json" in tiny_run["stdout"]


def test_eval_and_sample_reuse_the_checkpoint(tiny_run):
    tmp, run_dir = tiny_run["tmp"], tiny_run["run_dir"]
    proc = run_cli("bgexp-eval", [f"run_dir={run_dir}", "n_samples=400", "n_bootstrap=10"], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    evals = list((run_dir / "eval").glob("*/results.json"))
    assert len(evals) == 1
    results = json.loads(evals[0].read_text())
    assert results["n_samples"] == 400
    assert results["config_hash"] == tiny_run["results"]["config_hash"]

    out = tmp / "samples.npz"
    proc = run_cli("bgexp-sample", [f"run_dir={run_dir}", "n_samples=123", f"out={out}"], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = np.load(out)
    assert data["x"].shape == (123, 76)
    assert "sampling" in proc.stderr and "123/123" in proc.stderr  # the progress bar
    np.testing.assert_allclose(data["log_w"], -data["energy"] - data["log_q"], rtol=1e-10)

    # a name without .npz: the file written is the one printed
    proc = run_cli("bgexp-sample", [f"run_dir={run_dir}", "n_samples=5", f"out={tmp / 'plain'}"], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp / "plain.npz").is_file() and str(tmp / "plain.npz") in proc.stdout


def test_csv_logger_and_no_logger(tmp_path):
    proc = run_cli("bgexp-train", [*TINY, "trainer.max_epochs=1", "logger=csv", "evaluation.every_n_epochs=5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "dimer_realnvp").iterdir())
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert not (run_dir / "wandb").exists()
    assert (run_dir / "results.json").is_file()


def test_unknown_experiment_lists_the_options(tmp_path):
    proc = run_cli("bgexp-train", ["experiment=no_such_experiment"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "no_such_experiment" in proc.stderr
    assert "dimer_realnvp" in proc.stderr  # Hydra lists the available options


def test_resume_from_last_checkpoint(tiny_run, tmp_path):
    import torch

    last = tiny_run["run_dir"] / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=False)
    assert before["epoch"] == 1  # written after the final epoch (max_epochs=2), better or worse
    proc = run_cli("bgexp-train", [*TINY, "trainer.max_epochs=3", "logger=none", f"ckpt_path={last}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "dimer_realnvp").iterdir())
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert after["epoch"] == before["epoch"] + 1  # continued from epoch 2, trained one more
    assert after["global_step"] > before["global_step"]
    # the energy-evaluation counter carries over from the checkpoint
    assert after["bgexp_counters"]["n_energy_evals_train"] > before["bgexp_counters"]["n_energy_evals_train"]
    assert (run_dir / "results.json").is_file()


def test_resume_refuses_a_checkpoint_of_another_flow(tiny_run, tmp_path):
    last = tiny_run["run_dir"] / "checkpoints" / "last.ckpt"
    overrides = [o for o in TINY if not o.startswith("flow.transform.n_couplings")]
    proc = run_cli("bgexp-train", [*overrides, "flow.transform.n_couplings=2", "logger=none",
                                   f"ckpt_path={last}"], tmp_path)
    assert proc.returncode != 0
    assert "another configuration" in proc.stderr
    assert "flow.transform.n_couplings: checkpoint has 4, config has 2" in proc.stderr


def test_benchmark_script_summarises_a_run(tiny_run, tmp_path):
    import subprocess
    import sys

    from helpers import REPO, cli_env

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_dimer.py"), "--run-dir",
                           str(tiny_run["run_dir"]), "--n-samples", "300", "--out-dir", str(out), "n_bootstrap=10"],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads((out / "dimer.json").read_text())
    assert row["n_samples"] == 300 and 0 < row["ess"] <= 1
    assert row["reference"] == pytest.approx(1.156, abs=0.01)  # the shipped umbrella/MBAR value
    assert row["n_energy_evals_training"] == tiny_run["results"]["n_energy_evals"]["training"]
    assert set(row["goals"]) == {"abs_error_le_0.3", "ci_covers_reference", "ess_ge_0.05", "under_60_min"}
    assert "| ESS |" in (out / "dimer.md").read_text()
