"""Bad input fails early with a message that names the problem."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from torch.utils.data import DataLoader, TensorDataset

from bgexp.flows import NormalPrior, RealNVP
from bgexp.targets import DimerTarget
from bgexp.train import CONFIG_DIR
from bgexp.training.data import DataError, TargetDataModule
from bgexp.training.losses import JointLoss, linlog_cut
from bgexp.training.module import BoltzmannGenerator, NonFiniteLossError
from bgexp.training.artifacts import check_checkpoint_config
from bgexp.training.assemble import build_model, build_target
from bgexp.training.errors import ConfigError


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("override,options", [("flow=nope", "realnvp"), ("target=nope", "dimer"),
                                              ("experiment=nope", "dimer_realnvp"), ("loss=nope", "joint")])
def test_unknown_group_option_lists_the_choices(override, options):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg([override])
    assert "nope" in str(err.value) and options in str(err.value)


def test_flow_dimension_must_match_target():
    cfg = compose_cfg(["+flow.transform.dim=10"])
    with pytest.raises(ConfigError, match=r"flow.transform.dim=10 does not match the latent dimension 76"):
        build_model(cfg, build_target(cfg))


def test_matching_flow_dimension_is_accepted():
    cfg = compose_cfg(["+flow.transform.dim=76", "flow.transform.n_couplings=2", "flow.transform.hidden=[8]"])
    assert build_model(cfg, build_target(cfg)).flow.dim == 76


def _module(path=None, tmp_path=None, **generate):
    return TargetDataModule(DimerTarget(), path=str(path) if path else None,
                            cache_dir=str(tmp_path or "."), generate=generate or None, progress=False)


def test_missing_data_file(tmp_path):
    dm = _module(tmp_path / "nothing.npz")
    with pytest.raises(DataError, match="nothing.npz does not exist"):
        dm.setup()


def test_corrupt_data_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="not a readable .npz"):
        _module(bad).setup()


def test_data_file_with_wrong_shape_or_nan(tmp_path):
    path = tmp_path / "shape.npz"
    np.savez(path, x=np.zeros((10, 12)))
    with pytest.raises(DataError, match=r"shape \(10, 12\).*\[n, 76\]"):
        _module(path).setup()
    x = np.zeros((10, 76))
    x[3, 5] = np.nan
    np.savez(path, x=x)
    with pytest.raises(DataError, match="1 samples contain NaN"):
        _module(path).setup()
    np.savez(path, y=x)
    with pytest.raises(DataError, match="no array 'x'"):
        _module(path).setup()


GEN = dict(states=["closed", "open"], n_chains=4, burn_in=20, n_steps=20, thin=10, step_size=0.01, seed=0)


def test_cache_is_reused_and_stale_or_corrupt_cache_regenerated(tmp_path, caplog):
    dm = _module(tmp_path=tmp_path, **GEN)
    dm.setup()
    path = dm.cache_path()
    assert path.is_file() and dm.x_train.shape[1] == 76
    first = np.load(path)["x"]
    # the same settings reuse the cache (identical data)
    dm2 = _module(tmp_path=tmp_path, **GEN)
    dm2.setup()
    np.testing.assert_array_equal(np.load(dm2.cache_path())["x"], first)
    # a cache whose stored settings differ is not used: it is regenerated
    arrays = dict(np.load(path))
    arrays["settings_json"] = np.array('{"other": 1}')
    np.savez(path, **arrays)
    with caplog.at_level("WARNING"):
        _module(tmp_path=tmp_path, **GEN).setup()
    assert "other settings" in caplog.text
    # a truncated cache is regenerated too
    path.write_bytes(path.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level("WARNING"):
        dm3 = _module(tmp_path=tmp_path, **GEN)
        dm3.setup()
    assert "malformed" in caplog.text
    assert np.load(path)["x"].shape == first.shape
    # other settings give another cache file
    other = _module(tmp_path=tmp_path, **{**GEN, "seed": 1})
    assert other.cache_path() != path


def test_checkpoint_from_another_configuration():
    cfg = compose_cfg()
    stored = {"bgexp_config": {"target": dict(cfg.target), "flow": {"transform": {"n_couplings": 2}}}}
    with pytest.raises(ConfigError, match=r"another configuration(.|\n)*flow.transform.n_couplings: checkpoint has 2, config has 8"):
        check_checkpoint_config(stored, cfg, "x.ckpt")
    with pytest.raises(ConfigError, match="not written by bgexp"):
        check_checkpoint_config({}, cfg, "x.ckpt")


def test_corrupt_checkpoint(tmp_path):
    from bgexp.training.artifacts import read_checkpoint

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_checkpoint(bad, compose_cfg())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt", compose_cfg())


class NaNTarget(DimerTarget):
    def energy(self, x):
        return torch.full((x.shape[0],), math.nan) + 0 * x.sum(-1)


def _bg(target, alpha=1.0, beta=0.0, max_bad=3):
    return BoltzmannGenerator(NormalPrior(76), RealNVP(76, 2, [16]), target,
                              JointLoss(alpha=alpha, beta=beta, kl_batch_size=8),
                              optimizer=lambda params: torch.optim.Adam(params, 1e-3),
                              max_consecutive_nonfinite=max_bad)


def _fit(bg, steps=10):
    loader = DataLoader(TensorDataset(torch.randn(64, 76)), batch_size=8)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(bg, train_dataloaders=loader)


def test_nonfinite_energies_are_counted_not_dropped():
    u = torch.tensor([1.0, math.inf, math.nan, 5e3])
    cut, n_bad = linlog_cut(u, high=1e3, u_max=1e9)
    assert n_bad == 2 and torch.isfinite(cut).all()
    assert cut[0] == 1.0 and cut[3] == pytest.approx(1e3 + math.log1p(4e3))


def test_training_that_keeps_producing_nonfinite_energies_stops_with_a_message():
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        _fit(_bg(NaNTarget()))


def test_nonfinite_loss_steps_are_skipped_then_stop():
    bg = _bg(DimerTarget(), alpha=0.0, beta=1.0)
    with torch.no_grad():
        bg.flow.layers[0].net[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        _fit(bg)
    assert bg.n_nonfinite_steps == 3


def test_nonfinite_gradient_with_finite_loss_skips_the_step_and_keeps_parameters_finite():
    bg = _bg(DimerTarget(), max_bad=3)
    params = [p for p in bg.parameters()]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad[0] = float("nan")
    bg.on_before_optimizer_step(None)
    assert all(p.grad is None for p in params) and bg.n_nonfinite_steps == 1
    torch.optim.Adam(params, 1e-3).step()  # nothing to update: parameters unchanged
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    for _ in range(2):
        params[0].grad = torch.full_like(params[0], float("inf"))
        if bg.consecutive_nonfinite == 2:
            with pytest.raises(NonFiniteLossError, match="gradients were NaN or infinite"):
                bg.on_before_optimizer_step(None)
        else:
            bg.on_before_optimizer_step(None)
