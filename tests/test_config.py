"""Configs compose with Hydra's compose API and build real objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bgexp.flows import NormalPrior, SequentialFlow
from bgexp.targets import DimerTarget
from bgexp.train import CONFIG_DIR
from bgexp.training.artifacts import config_hash
from bgexp.training.assemble import build_logger, build_model, build_target

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_is_the_paper_sized_dimer_experiment():
    cfg = compose_cfg()
    assert cfg.experiment_name == "dimer_realnvp"
    assert cfg.flow.transform.n_couplings == 8 and list(cfg.flow.transform.hidden) == [200, 200, 200]
    assert cfg.flow.transform.activation == "tanh"
    assert cfg.loss.alpha > 0 and cfg.loss.beta > 0
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.offline is True


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    target = build_target(cfg)
    try:
        if cfg.get("tfep"):  # targeted FEP: a flow between two states in the target's rigid-body coordinates
            from bgexp.training.tasks.tfep import build_tfep_flow

            flow = build_tfep_flow(cfg, target)
            x = target.to_rigid(torch.as_tensor(target.positions).reshape(1, -1)).float().repeat(4, 1)
            y, logdet = flow(x)
            assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(logdet).all()
            return
        data = target.positions.reshape(1, -1) if hasattr(target, "positions") else None
        data = torch.randn(32, target.dim) if data is None else \
            torch.as_tensor(data, dtype=torch.float32) + 0.01 * torch.randn(64, target.dim)
        model = build_model(cfg, target, data=data)
        x, log_q = model.sample(4)
        assert x.shape == (4, target.dim) and torch.isfinite(log_q).all()
    finally:
        if hasattr(target, "close"):
            target.close()


def test_group_override_on_the_command_line_beats_the_experiment():
    cfg = compose_cfg(["loss=nll"])
    assert cfg.loss.alpha == 0.0 and cfg.loss.beta == 1.0


def test_standardization_is_fitted_to_the_training_data():
    cfg = compose_cfg()
    data = 3.0 + 0.5 * torch.randn(500, 76)
    model = build_model(cfg, DimerTarget(), data=data)
    assert isinstance(model.flow, SequentialFlow)
    standardization = model.flow.layers[-1]
    torch.testing.assert_close(standardization.mean, data.mean(0))
    assert isinstance(model.prior, NormalPrior) and model.prior.dim == 76


@pytest.mark.parametrize("trainer,accelerator", [("cpu", "cpu"), ("gpu", "gpu"), ("ddp", "gpu")])
def test_trainer_groups(trainer, accelerator):
    assert compose_cfg([f"trainer={trainer}"]).trainer.accelerator == accelerator


def test_logger_none_gives_no_logger():
    assert build_logger(compose_cfg(["logger=none"])) is False


def test_config_hash_ignores_paths_and_logger_but_not_hyperparameters():
    a = compose_cfg(["logger=none"])
    b = compose_cfg(["logger=none", "paths.output_dir=/elsewhere"])
    c = compose_cfg(["logger=none", "optim.lr=0.5"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
