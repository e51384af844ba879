"""A short targeted-FEP run for ice XI (16 rigid TIP4P/Ew waters, 250 K -> 100 K) through bgexp-train
with the offline W&B logger: MD of both states generated on the fly (tiny), the rigid-body flow
trained by the mapped work, LFEP/LBAR and the plain FEP/BAR baselines written to results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("genice2", reason="the ice structure is built with genice2 (a project dependency)")

TINY_MD = ("{n_frames: 60, report_interval: 20, timestep_fs: 2.0, friction_per_ps: 1.0, "
           "equilibration_steps: 200, chunk_frames: 30, seed: 0, minimize: true}")


@pytest.mark.slow
def test_ice16_rigid_through_the_cli(tmp_path):
    from helpers import run_cli

    args = ["experiment=ice16_rigid", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", f"tfep.data_a.md={TINY_MD}", f"tfep.data_b.md={TINY_MD}",
            "tfep.batch_size=16", "tfep.n_bootstrap=10", "flow.transform.n_blocks=1", "flow.transform.hidden=16",
            "flow.transform.n_layers=1", "target.n_workers=1"]
    proc = run_cli("bgexp-train", args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "ice16_rigid").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    estimates = results["tfep"]["estimates"]
    assert set(estimates) == {"lfep", "fep", "lbar", "bar"}
    assert all(math.isfinite(e["value"]) for e in estimates.values())
    assert results["tfep"]["reference"]["value"] == pytest.approx(-669.7109)
    assert results["tfep"]["n_samples_a"] == 12 and results["tfep"]["n_samples_b"] == 60  # 20% of A held out
    # training batches of 16 from the 48 training frames: 3 steps per epoch, each 16 energy evaluations
    assert results["training"]["steps"] == 6 and results["n_energy_evals"]["training"] == 6 * 16
    assert 0 < results["ess"] <= 1
    assert Path(results["figures"]["works"]).is_file() and (run_dir / "works.npz").is_file()
    assert any(b"train/work" in p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/*.wandb"))

    # bgexp-eval re-evaluates the trained map on the run's own held-out frames: the same works
    # (deterministic flow and energies), so the same LFEP and LBAR; a new bootstrap seed only moves
    # the bars
    proc = run_cli("bgexp-eval", [f"run_dir={run_dir}", "n_bootstrap=12", "seed=3"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    evaluated = json.loads(next((run_dir / "eval").glob("*/results.json")).read_text())
    assert evaluated["evaluated_from"] == str(run_dir)
    for name in ("lfep", "lbar", "fep", "bar"):
        assert evaluated["tfep"]["estimates"][name]["value"] == pytest.approx(estimates[name]["value"], abs=1e-6)
        assert evaluated["tfep"]["estimates"][name]["statistical_inefficiency"][0] >= 1.0
    assert evaluated["training"] == results["training"]
    assert evaluated["n_energy_evals"]["evaluation"] == 12 + 60 and evaluated["tfep"]["n_samples_a"] == 12

    # a checkpoint given by path is checked against the run's config (it carries its own)
    best = run_dir / "checkpoints" / "best.ckpt"
    proc = run_cli("bgexp-eval", [f"run_dir={run_dir}", f"checkpoint={best}", "n_bootstrap=5"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert len(list((run_dir / "eval").glob("*/results.json"))) == 2

    # one results schema for every task: config hash, and nll_test (null: a map has no density of the data)
    from bgexp.training.artifacts import read_results

    schema = read_results(run_dir / "results.json")
    assert schema.config_hash == results["config_hash"] and schema.nll_test is None
    assert "tfep" in schema.blocks and schema.n_energy_evals["training"] == 6 * 16

    # bgexp-sample has no model to sample from here: a named refusal, not a Hydra TypeError
    proc = run_cli("bgexp-sample", [f"run_dir={run_dir}", "n_samples=10"], tmp_path)
    assert proc.returncode != 0
    assert "UnsupportedOperationError" in proc.stderr and "bgexp-eval" in proc.stderr

    # bgexp-summarize reads the run through the schema
    proc = run_cli("bgexp-summarize", [str(run_dir.parent)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "ice16_rigid" in (run_dir.parent / "summary.md").read_text() or (run_dir.parent / "summary.csv").is_file()
