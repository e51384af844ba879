"""scripts/benchmark_smc.py end to end on the torus toy: a tiny training run (bgexp-train), then
bgexp-eval with SMC at two particle counts; the report's rows (IS, SMC from the flow and from the
prior, MCMC from the data), its Markdown table and its plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers import REPO, cli_env, console_script

TRAIN = ["data.generate.n_samples=2000", "data.batch_size=128", "flow.transform.hidden=[32]", "trainer.max_epochs=2",
         "trainer.enable_progress_bar=false", "evaluation.every_n_epochs=2", "evaluation.n_samples=300",
         "evaluation.n_bootstrap=10", "evaluation.final_n_samples=1000", "evaluation.final_n_bootstrap=10",
         "logger=csv"]
SMC = ["--smc", "smc.n_replicates=2", "smc.progress=false", "smc.step_size=0.3"]


@pytest.mark.slow
def test_benchmark_smc_on_the_torus(tmp_path):
    console_script("bgexp-train")
    out = tmp_path / "bench"
    # training overrides before and after the options: they may stand anywhere
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark_smc.py"), *TRAIN[:3], "--experiment", "torus_spline",
           "--particles", "150", "100", *TRAIN[3:], *SMC, "--eval", "n_bootstrap=10", "--n-samples", "1000",
           "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    report = json.loads((out / "smc_torus_spline.json").read_text())
    rows = report["rows"]
    assert {r["method"] for r in rows} == {"is", "smc_flow", "smc_prior", "mcmc"}
    assert report["particles"] == [100, 150] and report["pairs"] == ["left->right"]
    assert report["references"]["left->right"] == pytest.approx(0.782352, abs=1e-5)
    for row in rows:
        estimate = row["delta_f"]["left->right"]
        assert math.isfinite(estimate["value"]) and estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"]
        assert estimate["reference"] == pytest.approx(0.782352, abs=1e-5)
        assert estimate["error"] == pytest.approx(estimate["value"] - estimate["reference"])
        assert isinstance(estimate["covered"], bool)
        assert row["n_energy_evals"] > 0 and row["wall_s"] >= 0
    # the budgets: SMC from the flow counts training + evaluation + SMC; more particles cost more;
    # MCMC runs at the flow's whole budget
    for method in ("smc_flow", "smc_prior", "mcmc"):
        mine = [r for r in rows if r["method"] == method]
        assert [r["n_particles"] for r in mine] == [100, 150]
        assert mine[0]["n_energy_evals"] < mine[1]["n_energy_evals"], method
    for flow, mcmc in zip(*([r for r in rows if r["method"] == m] for m in ("smc_flow", "mcmc"))):
        assert flow["n_energy_evals"] == sum(flow["n_energy_evals_parts"].values())
        assert mcmc["budget"] == flow["n_energy_evals"] and mcmc["n_energy_evals"] <= mcmc["budget"]
        assert set(flow["ess"]) == {"left", "right"} and 0 <= flow["overhead_fraction"] <= 1
    assert len([r for r in rows if r["method"] == "is"]) == 1
    assert len(report["commands"]) == 3 and report["commands"][0].startswith("bgexp-train experiment=torus_spline")
    assert all("smc=default" in c and "smc.n_replicates=2" in c for c in report["commands"][1:])

    md = (out / "smc_torus_spline.md").read_text()
    assert "Machine: " in md and "threads" in md and "bgexp-eval run_dir=" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert any("Delta F(left->right)" in line and "energy evaluations" in line for line in table)
    # the energy W2 to the held-out frames: every row has it (SMC over replicates, IS and MCMC one value)
    assert any("energy W2 to held-out" in line for line in table)
    for row in rows:
        w2 = row["energy_w2"]
        assert w2 is not None and 0 <= w2["value"] < 5, row["method"]
        assert (w2["ci_low"] is None) == (row["method"] in ("is", "mcmc"))
    assert "finite-sample floor at 100 particles" in md
    for label in ("IS of the flow", "SMC from the flow", "SMC from the prior", "MCMC from the data"):
        assert any(line.startswith(f"| {label}") for line in table), label
    png = out / "smc_torus_spline.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
