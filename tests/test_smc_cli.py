"""SMC refinement through the CLI (smc=default): the torus toy target, a short maximum-likelihood
run, then annealed SMC from the flow and from the prior, per state, with replicate intervals;
bgexp-eval repeats it on the checkpoint; a bad SMC setting fails before any work."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from helpers import run_cli

SMALL_SMC = ["smc=default", "smc.n_particles=150", "smc.n_replicates=3", "smc.progress=false", "smc.step_size=0.3"]
TINY = ["experiment=torus_spline", "data.generate.n_samples=2000", "data.batch_size=128", "flow.transform.hidden=[32]",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "evaluation.every_n_epochs=2",
        "evaluation.n_samples=300", "evaluation.n_bootstrap=10", "evaluation.final_n_samples=1000",
        "evaluation.final_n_bootstrap=10"]


def _check_block(results: dict, sweeps: int = 0) -> None:
    block = results["smc"]
    assert block["settings"]["n_particles"] == 150 and block["settings"]["n_replicates"] == 3
    for source in ("flow", "prior"):
        entry = block[source]
        assert entry["mode"] == "per_state" and set(entry["ess"]) == {"left", "right"}
        estimate = entry["delta_f"]["left->right"]
        assert len(estimate["replicates"]) == 3 and math.isfinite(estimate["value"])
        assert estimate["ci_low"] < estimate["value"] < estimate["ci_high"]
        assert estimate["reference"] == pytest.approx(0.782352, abs=1e-5)
        assert abs(estimate["error"]) < 0.5  # 2-D, 150 particles: a loose check; coverage is tests/test_samplers.py's
        assert entry["n_energy_evals"] > 3 * 2 * 150
        assert 0 < min(entry["ess"].values()) <= 1
    assert results["n_energy_evals"]["smc"] == block["flow"]["n_energy_evals"]
    # MCMC from the training data at the flow's whole budget (training + evaluation + SMC)
    mcmc = block["mcmc"]
    spent = results["n_energy_evals"]
    assert mcmc["budget"] == spent["training"] + spent["evaluation"] + spent["smc"]
    assert 0.9 * mcmc["budget"] <= mcmc["n_energy_evals"] <= mcmc["budget"]
    estimate = mcmc["delta_f"]["left->right"]
    assert len(estimate["replicates"]) == 3 and math.isfinite(estimate["value"])
    assert abs(sum(mcmc["populations"].values()) - 1) < 1e-9
    # SMC from the prior at the same budget: a cap per run (3 replicates x 2 states), reported
    prior = block["prior"]
    sweep_cost = 150 * (1 + sweeps * 5) if sweeps else 0  # the final sweeps come out of each run's share
    assert prior["budget"] == mcmc["budget"]
    assert prior["max_energy_evals_per_run"] == max(prior["budget"] // 6 - sweep_cost, 150 * 6)
    assert prior["n_energy_evals"] <= 6 * (prior["max_energy_evals_per_run"] + sweep_cost) and prior["budget_stops"] >= 0
    # energy W2 to the held-out frames: every sampler's, and that of training frames of the same size
    for source in ("flow", "prior"):
        w2 = block[source]["energy_w2"]
        assert len(w2["replicates"]) == 3 and all(0 <= v < 5 for v in w2["replicates"])
    assert 0 <= mcmc["energy_w2"] < 5 and block["data_energy_w2"]["n_frames"] == 150
    assert len(block["energy_histograms"]["edges"]) == 51 and len(block["flow"]["energy_histogram"]) == 50
    assert Path(results["figures"]["smc_energies"]).is_file()
    assert Path(results["figures"]["smc_flow"]).is_file() and Path(results["figures"]["smc_prior"]).is_file()
    # the observables after SMC: final particles, plus the sweeps at b = 1, per replicate and pooled
    for source in ("flow", "prior"):
        observables = block[source]["observables"]
        assert observables["n_configurations"] == [(1 + sweeps) * 2 * 150] * 3 or sweeps == 0 or source == "prior"
        assert set(observables["pooled"]) == {"profile/theta1/rmse", "profile/theta2/rmse", "surface/torus/kl"}
        assert len(observables["replicates"]["surface/torus/kl"]["replicates"]) == 3
        assert all(0 <= v < 1.5 for k, v in observables["pooled"].items() if "rmse" in k)
    assert Path(results["figures"]["surface_torus_smc"]).is_file()
    assert Path(results["figures"]["profile_theta1_smc"]).is_file()


@pytest.mark.slow
def test_smc_refinement_through_train_and_eval(tmp_path):
    proc = run_cli("bgexp-train", [*TINY, *SMALL_SMC, "smc.final_sweeps=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "SMC from the flow: Delta F(left->right)" in proc.stdout and "MCMC from the data" in proc.stdout
    assert "SMC from the flow, observables (2700 weighted configurations, replicates pooled)" in proc.stdout
    run_dir = next((tmp_path / "outputs" / "runs" / "torus_spline").iterdir())
    _check_block(json.loads((run_dir / "results.json").read_text()), sweeps=2)
    # the W&B run (offline) holds the SMC scalars
    assert any(b"final/smc/flow/delta_f" in p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/*.wandb"))

    # bgexp-eval with the bidirectional estimate, reverse from the held-out frames (200 exact samples the
    # flow never saw) after 5 MALA moves
    proc = run_cli("bgexp-eval", [f"run_dir={run_dir}", "n_samples=500", "n_bootstrap=10", *SMALL_SMC,
                                  "smc.bidirectional=true", "smc.reverse_steps=5", "smc.q_draws=5000",
                                  "smc.reverse_frames=heldout"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Bidirectional AIS + BAR (flow, data): Delta F(left->right)" in proc.stdout
    results = json.loads(next((run_dir / "eval").glob("*/results.json")).read_text())
    _check_block(results)
    bidir = results["smc"]["flow"]["bidirectional"]
    estimate = bidir["delta_f"]["left->right"]
    assert estimate["ci_low"] < estimate["value"] < estimate["ci_high"] and abs(estimate["error"]) < 0.5
    assert len(bidir["replicates_interval"]["left->right"]["replicates"]) == 3
    assert bidir["replicates"][0]["left"]["reverse_steps"] == 5 and bidir["replicates"][0]["left"]["q_draws"] >= 5000
    # the reverse frames are the 200 held-out ones, split over the two states: fewer than 150 in each
    # (the 1 800 training frames would give 150 per state)
    n_reverse = {s: bidir["replicates"][0][s]["n_reverse"] for s in ("left", "right")}
    assert all(0 < n < 150 for n in n_reverse.values()) and sum(n_reverse.values()) <= 200, n_reverse
    assert 0 < bidir["n_energy_evals"] < results["smc"]["flow"]["n_energy_evals"]
    hist = bidir["work_histograms"]["left"]
    assert len(hist["edges"]) == 41 and 0 < sum(hist["forward"]) <= 3 * 150 and 0 < sum(hist["reverse"]) <= 3 * 150
    assert Path(results["figures"]["smc_works"]).is_file()


@pytest.mark.parametrize("bad, message", [("smc.n_particles=0", "n_particles must be >= 2"),
                                          ("smc.n_replicates=1", "n_replicates must be >= 2"),
                                          ("smc.kernel=gibbs", "smc.kernel must be one of"),
                                          ("+smc.particles=10", "smc: .*particles")])
def test_a_bad_smc_setting_fails_before_any_work(bad, message, tmp_path):
    import re

    start = time.time()
    proc = run_cli("bgexp-train", [*TINY, *SMALL_SMC, bad], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
    assert not list((tmp_path / "outputs").rglob("*.npz"))  # no data were generated
    assert time.time() - start < 60
