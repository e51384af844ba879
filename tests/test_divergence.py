"""Divergence (issue 17 item 6): the guard stops a diverging run with TrainingDivergedError and
advice, writing failed.json; evaluation never dies on samples without weight (ESS 0 and the reason)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from bgexp.evaluation import evaluate
from bgexp.evaluation import metrics as m
from bgexp.targets.base import Reference
from bgexp.training.callbacks import DivergenceGuard, LossDivergence, run_guards
from bgexp.training.errors import ConfigError, TrainingDivergedError
from helpers import TINY, run_cli
from test_evaluation import Gauss, GaussianModel, sample_set

FAST = [*TINY, "trainer.max_epochs=3", "logger=none"]


# --- the loss monitor ---------------------------------------------------------------------------


def test_a_healthy_loss_with_spikes_and_a_kl_phase_is_not_divergence():
    g = np.random.default_rng(0)
    monitor = LossDivergence()
    nll = list(-5.0 - np.linspace(0, 70, 300) + g.normal(0, 3, 300))  # a falling NLL, negative
    nll[50] = nll[120] = 1e7  # single spikes
    kl = list(-75.0 + 300 * np.exp(-np.arange(300) / 50) + g.normal(0, 20, 300))  # the KL term joins
    assert all(monitor.update(v) is None for v in [*nll, *kl, math.nan, math.inf])


@pytest.mark.bad_input
def test_a_loss_growing_by_orders_of_magnitude_is_divergence_even_in_the_first_window():
    monitor = LossDivergence(window=20)
    seen = [monitor.update(v) for v in [3.0, 2.5, 1e6, 1e8, 1e8, 1e9, 1e9]]
    assert seen[:4] == [None] * 4 and seen[4] is not None and "best was 2.75" in seen[4]  # median of (3, 2.5)
    late = LossDivergence(window=10, growth=100.0)
    values = [10.0 - 0.01 * i for i in range(100)] + [5e4] * 10
    assert next(i for i, v in enumerate(values) if late.update(v)) == 104  # half the window: the median moves


@pytest.mark.bad_input
def test_divergence_settings_are_checked():
    with pytest.raises(ConfigError, match="divergence.window"):
        LossDivergence(window=0)
    with pytest.raises(ConfigError, match="divergence.growth"):
        LossDivergence(growth=-1.0)
    with pytest.raises(ConfigError, match="zero_weight_evaluations"):
        DivergenceGuard(zero_weight_evaluations=-1)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"divergence": {"windw": 3}, "optim": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="unknown keys \\['windw'\\]"):
        run_guards(cfg, "/tmp/unused")
    guards = run_guards(OmegaConf.create({"optim": {"lr": 10.0}, "loss": {"nll_warmup_steps": 7}}), "/tmp/unused")
    assert "optim.lr, now 10.0" in guards[0].advice and "loss.nll_warmup_steps, now 7" in guards[0].advice


# --- evaluation without weight ------------------------------------------------------------------------


class Infinite(Gauss):
    """Every energy +inf: every log-weight is -inf."""

    def energy(self, x):
        return torch.full((x.shape[0],), math.inf)


class NaNModel(GaussianModel):
    """A diverged flow: NaN samples and densities."""

    def sample(self, n, generator=None):
        x = torch.full((n, self.target.dim), math.nan)
        return x, torch.full((n,), math.nan)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["infinite energies", "nan samples"])
def test_evaluation_of_samples_without_weight_reports_ess_zero_and_the_reason(case, tmp_path):
    target = Gauss()
    edges = np.linspace(-2, 2, 11)
    centres = 0.5 * (edges[1:] + edges[:-1])
    target.reference = Reference(delta_f=target.reference.delta_f,
                                 profiles={"x0": {"x": list(centres), "f": list(centres ** 2 / 2), "bin_edges": list(edges)}})
    target.surfaces = {"plane": ("x0", "x1", (-1.0, 1.0), (-1.0, 1.0))}
    bg = GaussianModel(Infinite()) if case == "infinite energies" else NaNModel(target)
    if case == "infinite energies":
        bg.target.reference, bg.target.surfaces = target.reference, target.surfaces
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    result = evaluate(bg, n_samples=200, batch_size=100, n_bootstrap=10, data=data, figure_dir=tmp_path, tag="t")
    assert result.metrics["ess"] == 0.0
    assert result.problem is not None and "every one of the 200 log-weights is -inf" in result.problem
    entry = result.delta_f["left->right"]
    assert entry["value"] is None and entry["ci_low"] is None and entry["reason"] == result.problem
    assert entry["reference"] == 0.0  # the reference is still reported
    assert "profile/x0/rmse" not in result.metrics and "surface/plane/kl" not in result.metrics
    assert all(math.isfinite(v) or math.isnan(v) for v in result.metrics.values())  # plain floats for a logger
    if case == "nan samples":
        assert result.metrics["n_nonfinite_log_q"] == 200.0 and "200 with non-finite coordinates" in result.problem
    assert result.figures  # the figures are drawn all the same


@pytest.mark.bad_input
def test_a_profile_whose_samples_miss_every_low_energy_bin_has_no_rmse_instead_of_an_error():
    x = np.full((100, 2), 1.9)  # all in the last bin, where f_ref - min(f_ref) > max_f_ref
    target = Gauss(reference=False)
    edges = np.linspace(-2, 2, 11)
    centres = 0.5 * (edges[1:] + edges[:-1])
    target.reference = Reference(profiles={"x0": {"x": list(centres), "f": list(20 * centres ** 2),
                                                  "bin_edges": list(edges)}})
    s = sample_set(x, observed={"x0": x[:, 0], "x1": x[:, 1]})
    curve = m.profile_curve(s, target, "x0", max_f_ref=10.0)
    assert curve.rmse is None and np.isfinite(curve.f).sum() == 1
    assert m.profile_rmse(s, target) == {}


# --- the guard in a run --------------------------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.slow
def test_a_diverging_run_stops_with_training_diverged_error_and_failed_json(tmp_path):
    start = time.monotonic()
    proc = run_cli("bgexp-train", [*FAST, "optim.lr=10"], tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "TrainingDivergedError: training diverged" in proc.stderr, proc.stderr[-3000:]
    assert "optim.lr, now 10" in proc.stderr and "loss.nll_warmup_steps" in proc.stderr
    assert "no bin where" not in proc.stderr and "are -inf" not in proc.stderr.split("TrainingDivergedError")[0]
    (run_dir,) = list((tmp_path / "outputs" / "runs" / "dimer_realnvp").iterdir())
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["reason"] == "diverged" and failed["error"].startswith("TrainingDivergedError")
    assert not (run_dir / "results.json").exists()
    assert elapsed < 60, elapsed  # ~10 s alone: it stops within the first epoch


@pytest.mark.bad_input
@pytest.mark.slow
def test_data_scaled_by_1e30_ends_in_a_named_error(tmp_path):
    from bgexp.targets.dimer import DimerTarget

    x = torch.randn(400, DimerTarget().dim, generator=torch.Generator().manual_seed(0)).numpy() * 1e30
    np.savez(tmp_path / "huge.npz", x=x.astype(np.float32))
    proc = run_cli("bgexp-train", [*FAST, f"data.path={tmp_path / 'huge.npz'}", "data.generate=null"], tmp_path,
                   timeout=180)
    assert proc.returncode != 0
    assert any(name in proc.stderr for name in ("TrainingDivergedError", "DataError", "NonFiniteLossError")), \
        proc.stderr[-3000:]
    assert "no bin where" not in proc.stderr
