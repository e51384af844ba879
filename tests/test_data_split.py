"""Validation split by whole Markov chains (`data.split=chains`): each frame's chain is recorded by
the MC generator and read from .npz files; held-out chains never share a frame with training."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bgexp.targets.dimer import DimerTarget
from bgexp.targets.md import sample_states
from bgexp.training.data import DataError, TargetDataModule

TINY_MC = {"states": ["closed", "open"], "n_chains": 6, "burn_in": 20, "n_steps": 40, "thin": 10,
           "step_size": 0.02, "seed": 0}


class FarApartChains:
    """A 2-D Gaussian well per chain: chain c starts at (100 c, 0) and its small moves keep it there,
    so a frame's position says which chain made it."""

    states = {"a": lambda x: torch.ones(len(x), dtype=torch.bool), "b": lambda x: torch.ones(len(x), dtype=torch.bool)}

    def energy(self, x):
        centre = 100.0 * torch.round(x[:, 0] / 100.0)
        return 0.5 * ((x[:, 0] - centre) ** 2 + x[:, 1] ** 2)

    def initial_configurations(self, state, n, generator=None):
        return torch.stack([100.0 * torch.arange(n, dtype=torch.float32), torch.zeros(n)], -1)


def test_mc_frames_carry_the_chain_that_made_them():
    n_chains = 5
    samples = sample_states(FarApartChains(), ["a", "b"], n_chains=n_chains, n_steps=30, burn_in=10, thin=10,
                            step_size=0.1, seed=0, progress=False)
    position_chain = torch.round(samples.x[:, 0] / 100.0).long()
    # chains numbered over states: state k's chains are k * n_chains + 0..n_chains-1
    assert torch.equal(samples.chain, position_chain + n_chains * samples.state)
    assert torch.equal(torch.bincount(samples.chain), torch.full((2 * n_chains,), 3))


def _dimer_module(tmp_path: Path, split: str, **kwargs) -> TargetDataModule:
    return TargetDataModule(DimerTarget(), target_config={"name": "dimer"}, cache_dir=str(tmp_path / "cache"),
                            generate=TINY_MC, progress=False, split=split, val_fraction=0.2, **kwargs)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def test_generated_data_hold_out_whole_chains(tmp_path):
    dm = _dimer_module(tmp_path, "chains")
    dm.setup()
    x_all = torch.as_tensor(dm.load_all(), dtype=torch.get_default_dtype())
    chain = dm.chain
    assert chain.shape == (len(x_all),) and len(np.unique(chain)) == 12  # 6 chains per state
    by_row = {row.numpy().tobytes(): c for row, c in zip(x_all, chain)}
    val_chains = {by_row[r] for r in _rows(dm.x_val)}
    train_chains = {by_row[r] for r in _rows(dm.x_train)}
    assert val_chains and train_chains and not val_chains & train_chains
    # every frame of a held-out chain is held out: whole chains, 4 frames each
    assert len(dm.x_val) == 4 * len(val_chains) and len(dm.x_val) >= 0.2 * len(x_all)
    assert len(dm.x_val) + len(dm.x_train) == len(x_all)
    # the cache read back gives the same split
    again = _dimer_module(tmp_path, "chains")
    again.setup()
    assert torch.equal(again.x_val, dm.x_val)


def test_npz_chain_array_is_used_and_a_single_trajectory_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 76))
    chain = np.repeat(np.arange(8) * 3, 5)  # ids need not be contiguous
    np.savez(tmp_path / "chains.npz", x=x, chain=chain)
    dm = TargetDataModule(DimerTarget(), path=str(tmp_path / "chains.npz"), split="chains", val_fraction=0.25,
                          progress=False)
    dm.setup()
    row_chain = {row.tobytes(): c for row, c in zip(x.astype(np.float32), chain)}
    val = {row_chain[r.numpy().astype(np.float32).tobytes()] for r in dm.x_val}
    train = {row_chain[r.numpy().astype(np.float32).tobytes()] for r in dm.x_train}
    assert len(val) == 2 and not val & train and len(dm.x_val) == 10

    np.savez(tmp_path / "one.npz", x=x)
    with pytest.raises(DataError, match="one chain.*split=tail"):
        TargetDataModule(DimerTarget(), path=str(tmp_path / "one.npz"), split="chains", progress=False).setup()
    # two sources without chain ids are two chains
    dm = TargetDataModule(DimerTarget(), path=[str(tmp_path / "one.npz"), str(tmp_path / "one.npz")],
                          split="chains", val_fraction=0.25, progress=False)
    dm.setup()
    assert len(dm.x_val) == 40 and len(dm.x_train) == 40


@pytest.mark.bad_input
def test_bad_chain_array_and_unknown_split_are_named_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((10, 76)), chain=np.zeros(9, dtype=np.int64))
    with pytest.raises(DataError, match="bad.npz.*'chain' must be an integer array of length 10"):
        TargetDataModule(DimerTarget(), path=str(tmp_path / "bad.npz"), split="chains", progress=False).setup()
    with pytest.raises(ValueError, match="data.split must be.*'chains'"):
        TargetDataModule(DimerTarget(), path=str(tmp_path / "bad.npz"), split="frames", progress=False)


def test_cache_without_chains_is_regenerated(tmp_path, caplog):
    dm = _dimer_module(tmp_path, "chains")
    x = dm.load_all()
    path = dm.cache_path()
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "chain"}
    np.savez(path, **arrays)
    with caplog.at_level(logging.WARNING, logger="bgexp.training.data"):
        again = _dimer_module(tmp_path, "chains")
        np.testing.assert_array_equal(again.load_all(), x)
    assert "no chain" in caplog.text and again.chain is not None
