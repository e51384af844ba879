"""Torus flows end to end: the real CLI with the offline W&B logger, and the model built from config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bgexp.flows import SmoothTorusFlow, TorusPrior
from bgexp.flows.base import AffineStandardization
from bgexp.flows.coordinates import BoundedTorsions, MixedCoordinates
from bgexp.training.assemble import build_model, build_target
from bgexp.training.errors import ConfigError
from helpers import REPO, SHORT_EVALUATION, ala2_tiny_md, run_cli

TORUS_TINY = ["data.generate.n_samples=2000", "data.batch_size=128", "flow.transform.hidden=[32]",
              "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "evaluation.every_n_epochs=3",
              "evaluation.n_samples=500", "evaluation.n_bootstrap=10", "evaluation.final_n_samples=2000",
              "evaluation.final_n_bootstrap=20"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["torus_smooth", "torus_spline"])
def test_torus_experiment_through_the_cli(experiment, tmp_path):
    proc = run_cli("bgexp-train", [f"experiment={experiment}", *TORUS_TINY], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = next((tmp_path / "outputs" / "runs" / experiment).iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["metrics"]
    # a few epochs of maximum likelihood already give a usable density on the 2-torus
    assert results["ess"] > 0.5
    assert 0 <= metrics["kl_quadrature"] < 0.2
    entry = results["delta_f"]["left->right"]
    assert entry["reference"] == pytest.approx(0.782352, abs=1e-5)
    assert abs(entry["value"] - entry["reference"]) < 0.3
    # force matching ran on the data's forces and the force error is reported
    assert np.isfinite(metrics["force_rmse"]) and 0 < metrics["force_rmse_relative"] < 1
    assert results["training"]["steps"] > 0 and results["training"]["step_s"] > 0
    assert (run_dir / "figures" / "surface_torus.png").stat().st_size > 0
    assert Path(results["files"]["wandb_run"]).name.startswith("offline-run-")
    # the offline run's history holds the force-matching loss (keys are stored verbatim)
    assert any(b"train/fm" in p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/*.wandb"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_a_torus_space_needs_a_prior_on_the_circle():
    cfg = _compose(["experiment=torus_smooth", "flow.prior._target_=bgexp.flows.NormalPrior"])
    with pytest.raises(ConfigError, match="TorusPrior"):
        build_model(cfg, build_target(cfg))


def test_torus_model_is_a_density_on_the_torus():
    cfg = _compose(["experiment=torus_smooth", "flow.transform.hidden=[16]"])
    model = build_model(cfg, build_target(cfg))
    assert isinstance(model.flow, SmoothTorusFlow) and bool(model.flow.circular.all())
    assert isinstance(model.prior, TorusPrior) and model.prior.n_circular == 2
    # the density integrates to one over the torus (midpoint rule, spectrally accurate)
    n = 128
    grid = -math.pi + (torch.arange(n, dtype=torch.float64) + 0.5) * 2 * math.pi / n
    t1, t2 = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([t1.reshape(-1), t2.reshape(-1)], -1).float()
    with torch.no_grad():
        mass = model.log_prob(points).double().exp().sum() * (2 * math.pi / n) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_ala2_smooth_model_and_cli_with_force_matching(tmp_path):
    """The torsions are circular (no BoundedTorsions, not standardized), and a short NLL + force
    matching run through the CLI reports the force error of the learned density."""
    md = ala2_tiny_md(tmp_path)
    small = ["target.n_workers=2", "data.batch_size=64", "flow.transform.n_couplings=2", "flow.transform.hidden=[32]"]
    args = ["experiment=ala2_smooth", *md, *small, "trainer.max_epochs=2", *SHORT_EVALUATION]
    proc = run_cli("bgexp-train", args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "ala2_smooth").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_energy_evals"]["training"] == 0  # NLL + force matching: no energy calls in training
    assert "C7eq->C7ax" in results["delta_f"]
    assert np.isfinite(results["metrics"]["force_rmse"]) and results["metrics"]["force_rmse_relative"] > 0

    cfg = _compose(["experiment=ala2_smooth", *md, *small, "target.n_workers=0"])
    target = build_target(cfg)
    try:
        from bgexp.training.data import TargetDataModule

        data = TargetDataModule(target, path=[str(tmp_path / "md300")], forces=True)
        data.setup()
        model = build_model(cfg, target, data=data.x_train)
    finally:
        target.close()
    layers = list(model.flow.layers)
    assert not any(isinstance(layer, BoundedTorsions) for layer in layers)
    coordinates = next(layer for layer in layers if isinstance(layer, MixedCoordinates))
    standardization = next(layer for layer in layers if isinstance(layer, AffineStandardization))
    circular = coordinates.circular
    assert torch.equal(model.prior.circular, circular) and torch.equal(layers[0].circular, circular)
    assert torch.all(standardization.mean[circular] == 0) and torch.all(standardization.std[circular] == 1)
    # bonds and angles are standardized (the Cartesian block is already whitened, std 1)
    for part in ("bonds", "angles"):
        assert torch.all(standardization.std[coordinates.slices[part]] < 0.5)
    # the reduced forces at 300 K are the stored kJ/mol/nm forces over kT
    assert data.f_train.abs().max() > 10
