"""One flow at several temperatures: the prior scaled to N(0, tau I), the energy u / tau, the
target's references at tau (bgexp/training/tasks/temperatures.py), through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from bgexp.flows import NormalPrior
from bgexp.targets import DimerTarget
from bgexp.training.errors import ConfigError
from bgexp.training.tasks.temperatures import at_temperature, relative_temperatures
from helpers import TINY, run_cli


class _Model:
    def __init__(self):
        self.target, self.prior = DimerTarget(), NormalPrior(dim=76, temperature=1.0)


def test_at_temperature_scales_the_prior_and_restores():
    model = _Model()
    hot = DimerTarget(temperature=2.0)
    z = torch.randn(5, 76)
    with at_temperature(model, hot, 2.0, 1.0):
        assert model.target is hot and model.prior.temperature == 2.0
        expected = -0.5 * (z ** 2).sum(-1) / 2.0 - 38 * math.log(2 * math.pi * 2.0)
        assert torch.allclose(model.prior.log_prob(z), expected)
        x = torch.randn(4, 76)
        assert torch.allclose(model.target.energy(x), DimerTarget().energy(x) / 2.0, rtol=1e-5)
    assert model.prior.temperature == 1.0 and isinstance(model.target, DimerTarget) and model.target.temperature == 1.0


@pytest.mark.bad_input
@pytest.mark.parametrize("values, message", [([0.5, -1], "> 0"), (["hot"], "not a number"), ([0], "> 0")])
def test_bad_temperatures_are_config_errors(values, message):
    cfg = OmegaConf.create({"evaluation": {"temperatures": values}})
    with pytest.raises(ConfigError, match=message):
        relative_temperatures(cfg)


@pytest.mark.slow
def test_cli_run_with_relabelling_at_three_temperatures(tmp_path):
    proc = run_cli("bgexp-train", [*TINY, "logger=csv", "target.relabel_solvent=true", "trainer.max_epochs=1",
                                   "evaluation.every_n_epochs=10", "evaluation.temperatures=[0.5,1,2]"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run_dir,) = sorted((tmp_path / "outputs" / "runs" / "dimer_realnvp").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert 0.0 <= results["metrics"]["outside_canonical_region"] <= 1.0
    block = results["temperatures"]
    assert sorted(block) == ["0.5", "1", "2"]
    expected = {"0.5": 1.610, "1": 1.156, "2": 1.139}  # the project's references (SYSTEMS.md)
    for key, ref in expected.items():
        entry = block[key]
        assert entry["temperature"] == float(key)
        assert entry["delta_f"]["closed->open"]["reference"] == pytest.approx(ref, abs=0.01)
        assert 0.0 <= entry["ess"] <= 1.0
    # the same flow at tau = 1 is the main evaluation (same seed offset and sample count)
    assert block["1"]["ess"] == pytest.approx(results["ess"])
