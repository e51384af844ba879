"""Force matching (Koehler, Kraemer, Noe, "Smooth Normalizing Flows", NeurIPS 2021):
L_FM = mean_{b,i} (d log q(x_b) / d x_{b,i} - f_{b,i})^2 with f = -grad u, the data's forces
(MD folders, .npz files, autograd), exact-sampler data generation, training and evaluation."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bgexp.flows import NormalPrior, RealNVP
from bgexp.flows.base import AffineStandardization
from bgexp.targets import dynamics
from bgexp.targets.base import Target
from bgexp.training.callbacks import EvaluationCallback
from bgexp.training.data import DataError, TargetDataModule
from bgexp.evaluation import evaluate
from bgexp.training.losses import JointLoss, force_matching_error
from bgexp.training.module import BoltzmannGenerator
from bgexp.training.tasks.bg import final_evaluation

DIM = 4


class Quadratic(Target):
    """u(x) = |x - c|^2 / (2 s^2): mu = N(c, s^2 I), reduced force f = -(x - c) / s^2; an exact sampler."""

    def __init__(self, dim=DIM, c=0.3, s=0.7, kbt=None):
        super().__init__()
        self.dim, self.temperature = dim, 300.0
        self.c, self.s = c, s
        if kbt is not None:
            self.kbt = kbt
        self.states = {"left": lambda x: x[:, 0] < self.c, "right": lambda x: x[:, 0] >= self.c}
        self.n_sample_calls = 0

    def energy(self, x):
        return ((x - self.c) ** 2).sum(-1) / (2 * self.s**2)

    def force(self, x):
        return -(x - self.c) / self.s**2

    def sample(self, n, generator=None):
        self.n_sample_calls += 1
        return self.c + self.s * torch.randn(n, self.dim, generator=generator)

    def initial_configurations(self, state, n, generator=None):
        sign = -1.0 if state == "left" else 1.0
        x = self.c + 0.1 * torch.randn(n, self.dim, generator=generator)
        x[:, 0] = self.c + sign * 0.5
        return x


class NoSampler(Quadratic):
    sample = None  # no exact sampler


class Kinked(Quadratic):
    """u = sqrt(|x_0|): the force is infinite at x_0 = 0."""

    def energy(self, x):
        return torch.sqrt(x[:, 0].abs())


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def gaussian_bg(mean, std, loss=None):
    """A BG whose density is exactly N(mean, diag(std^2)), float64."""
    flow = AffineStandardization(DIM, mean=mean, std=std)
    bg = BoltzmannGenerator(NormalPrior(DIM), flow, Quadratic(), loss or JointLoss(alpha=0, beta=1, force_weight=1),
                            optimizer=adam)
    return bg.double()


def realnvp_bg(loss=None, seed=0):
    torch.manual_seed(seed)
    bg = BoltzmannGenerator(NormalPrior(DIM), RealNVP(DIM, 2, [16], activation="tanh"), Quadratic(),
                            loss or JointLoss(alpha=0, beta=1, force_weight=1), optimizer=adam).double()
    with torch.no_grad():  # move away from the identity initialisation
        for p in bg.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return bg


# the loss ------------------------------------------------------------------------------------
def test_fm_of_a_gaussian_flow_equals_the_closed_form():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(DIM, generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(DIM, generator=g, dtype=torch.float64)
    bg = gaussian_bg(mean, std)
    x = torch.randn(50, DIM, generator=g, dtype=torch.float64)
    f = torch.randn(50, DIM, generator=g, dtype=torch.float64)
    fm, log_q = bg.loss.force_matching(bg, x, f)
    expected = ((-(x - mean) / std**2 - f) ** 2).mean()
    torch.testing.assert_close(fm, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_q, bg.log_prob(x))
    # the Boltzmann forces of a target equal to the flow density are matched exactly
    target = Quadratic(c=0.3, s=0.7)
    exact = gaussian_bg(torch.full((DIM,), 0.3, dtype=torch.float64), torch.full((DIM,), 0.7, dtype=torch.float64))
    fm0, _ = exact.loss.force_matching(exact, x, target.force(x))
    assert float(fm0.detach()) == pytest.approx(0.0, abs=1e-20)
    # the standalone error: sqrt of the same mean and relative to the force scale, batch-independent
    err = force_matching_error(bg, x, f, batch_size=7)
    assert err["force_rmse"] == pytest.approx(math.sqrt(float(expected)), rel=1e-12)
    assert err["force_rmse_relative"] == pytest.approx(math.sqrt(float(expected)) / math.sqrt(float((f**2).mean())),
                                                       rel=1e-12)


def test_fm_of_realnvp_matches_finite_differences_and_has_parameter_gradients():
    bg = realnvp_bg()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, DIM, generator=g, dtype=torch.float64)
    f = torch.randn(6, DIM, generator=g, dtype=torch.float64)
    fm, _ = bg.loss.force_matching(bg, x, f)

    # brute force: central differences of log q, one sample and one coordinate at a time
    h = 1e-5
    total = 0.0
    with torch.no_grad():
        for b in range(x.shape[0]):
            for i in range(DIM):
                e = torch.zeros(1, DIM, dtype=torch.float64)
                e[0, i] = h
                xb = x[b : b + 1]
                score = float(bg.log_prob(xb + e) - bg.log_prob(xb - e)) / (2 * h)
                total += (score - float(f[b, i])) ** 2
    assert float(fm.detach()) == pytest.approx(total / x.numel(), rel=1e-6)
    assert float(fm.detach()) > 1e-3  # not a trivial case

    # gradient in the flow parameters (needs create_graph): finite, non-zero, and equal to a
    # directional finite difference of L_FM
    params = [p for p in bg.flow.parameters() if p.requires_grad]
    grads = torch.autograd.grad(fm, params)
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    direction = [torch.randn_like(p) for p in params]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    eps = 1e-6

    def fm_at(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        value = float(bg.loss.force_matching(bg, x, f)[0].detach())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value

    numeric = (fm_at(1.0) - fm_at(-1.0)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_force_matching_error_works_under_no_grad_and_inference_mode():
    bg = realnvp_bg()
    x = torch.randn(20, DIM, dtype=torch.float64)
    f = torch.randn(20, DIM, dtype=torch.float64)
    expected = math.sqrt(float(bg.loss.force_matching(bg, x, f)[0]))
    with torch.no_grad():
        assert force_matching_error(bg, x, f)["force_rmse"] == pytest.approx(expected, rel=1e-10)
    with torch.inference_mode():
        xi, fi = x.clone(), f.clone()
        assert force_matching_error(bg, xi, fi, batch_size=3)["force_rmse"] == pytest.approx(expected, rel=1e-10)
    assert all(p.grad is None for p in bg.parameters())
    with pytest.raises(ValueError, match="do not match"):
        force_matching_error(bg, x, f[:, :2])


def test_joint_loss_weights_and_terms():
    loss = JointLoss(alpha=0.0, beta=0.0, force_weight=2.0)
    assert loss.needs_data and loss.needs_forces
    assert JointLoss(alpha=1.0, beta=0.0).needs_data is False
    JointLoss(alpha=0.0, beta=0.0, force_weight=1.0, nll_warmup_steps=3)  # warm-up on force matching alone
    with pytest.raises(ValueError, match="not both zero"):
        JointLoss(alpha=0.0, beta=0.0, force_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        JointLoss(force_weight=-1.0)

    bg = realnvp_bg(JointLoss(alpha=0.0, beta=0.5, force_weight=2.0))
    x = torch.randn(10, DIM, dtype=torch.float64)
    f = bg.target.force(x)
    value, metrics = bg.loss(bg, x, step=0, forces=f)
    fm = float(bg.loss.force_matching(bg, x, f)[0])
    nll = float(-bg.log_prob(x).mean())
    assert metrics["fm"] == pytest.approx(fm, rel=1e-12)
    assert metrics["nll"] == pytest.approx(nll, rel=1e-12)
    assert float(value) == pytest.approx(0.5 * nll + 2.0 * fm, rel=1e-12)
    # FM only: the loss is gamma * L_FM, no nll metric
    only = JointLoss(alpha=0.0, beta=0.0, force_weight=3.0)
    value, metrics = only(bg, x, step=0, forces=f)
    assert float(value) == pytest.approx(3.0 * fm, rel=1e-12) and "nll" not in metrics
    with pytest.raises(ValueError, match="data.forces=true"):
        only(bg, x, step=0)


def test_training_step_without_forces_is_a_clear_error():
    bg = realnvp_bg(JointLoss(alpha=0.0, beta=1.0, force_weight=1.0))
    x = torch.randn(8, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="data.forces=true"):
        bg.training_step((x,), 0)


# data ----------------------------------------------------------------------------------------
def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_forces_are_read_or_computed_and_paired_with_x(tmp_path):
    target = Quadratic()
    x = np.random.default_rng(0).normal(size=(40, DIM))
    stored = 3.0 * x + 1.0  # any per-row function shows that rows stay paired through the split
    with_forces = _save(tmp_path / "with.npz", x=x, forces=stored)
    dm = TargetDataModule(target, path=with_forces, forces=True, progress=False, batch_size=8)
    dm.setup()
    assert dm.f_train.shape == dm.x_train.shape and dm.f_val.shape == dm.x_val.shape
    torch.testing.assert_close(dm.f_train, 3.0 * dm.x_train + 1.0)
    torch.testing.assert_close(dm.f_val, 3.0 * dm.x_val + 1.0)

    without = _save(tmp_path / "without.npz", x=x)
    dm = TargetDataModule(target, path=without, forces=True, progress=False, batch_size=8)
    dm.setup()
    torch.testing.assert_close(dm.f_train, target.force(dm.x_train))
    torch.testing.assert_close(dm.f_val, target.force(dm.x_val))
    xb, fb = next(iter(dm.train_dataloader()))
    assert xb.shape == fb.shape == (8, DIM)
    torch.testing.assert_close(fb, target.force(xb))
    assert len(next(iter(dm.val_dataloader()))) == 2

    # forces off: the batches stay (x,) and no forces are made
    dm = TargetDataModule(target, path=with_forces, progress=False, batch_size=8)
    dm.setup()
    assert dm.f_train is None and dm.f_val is None
    assert len(next(iter(dm.train_dataloader()))) == 1 and len(next(iter(dm.val_dataloader()))) == 1


def test_bad_forces_are_errors_naming_the_source(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, DIM))
    bad = x.copy()
    bad[[3, 7], 1] = np.nan
    path = _save(tmp_path / "nanforces.npz", x=x, forces=bad)
    with pytest.raises(DataError, match=r"nanforces.npz: 2 of 20 samples have NaN or infinite forces"):
        TargetDataModule(Quadratic(), path=path, forces=True, progress=False).setup()
    path = _save(tmp_path / "shape.npz", x=x, forces=bad[:, :2])
    with pytest.raises(DataError, match="shape.npz: 'forces' has shape"):
        TargetDataModule(Quadratic(), path=path, forces=True, progress=False).setup()
    # computed forces: u = sqrt|x_0| has an infinite force at x_0 = 0
    x_kink = x.copy()
    x_kink[5, 0] = 0.0
    path = _save(tmp_path / "kink.npz", x=x_kink)
    with pytest.raises(DataError, match=r"kink.npz: 1 of 20 samples"):
        TargetDataModule(Kinked(), path=path, forces=True, progress=False).setup()


def _fake_md_folder(path, x, forces):
    """An MD folder in the layout of bgexp.targets.dynamics (what run_md writes), without MD."""
    import mdtraj

    n_atoms = x.shape[1] // 3
    (path / dynamics.CHUNKS).mkdir(parents=True)
    top = mdtraj.Topology()
    residue = top.add_residue("ARG", top.add_chain())
    for k in range(n_atoms):
        top.add_atom(f"C{k}", mdtraj.element.carbon, residue)
    mdtraj.Trajectory(x[:1].reshape(1, n_atoms, 3).astype(np.float32), top).save_pdb(str(path / dynamics.TOPOLOGY))
    _, npz = dynamics._chunk_paths(path, 0)
    np.savez(npz, x=x.reshape(len(x), n_atoms, 3).astype(np.float32), energies=np.zeros(len(x)),
             forces=forces.reshape(len(x), n_atoms, 3).astype(np.float32))
    (path / dynamics.METADATA).write_text(json.dumps({"status": "complete", "chunks_done": 1,
                                                      "frames_done": len(x)}))
    return path


def test_md_folder_forces_are_divided_by_kbt(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 6))
    forces_kj = rng.normal(scale=100.0, size=(30, 6))  # kJ/mol/nm
    folder = _fake_md_folder(tmp_path / "md600K", x, forces_kj)
    target = Quadratic(dim=6, kbt=2.494)
    dm = TargetDataModule(target, path=str(folder), forces=True, split="tail", val_fraction=0.2, progress=False)
    dm.setup()
    # tail split: the validation rows are the last frames (in reverse order)
    expected = torch.as_tensor(forces_kj.astype(np.float32).astype(np.float64) / 2.494)
    torch.testing.assert_close(dm.f_val.double(), expected[24:].flip(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dm.f_train.double(), expected[:24].flip(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dm.x_val.double(), torch.as_tensor(x.astype(np.float32)[24:][::-1].copy()).double())
    # a target without kT cannot reduce kJ/mol/nm
    with pytest.raises(DataError, match="md600K.*kbt"):
        TargetDataModule(Quadratic(dim=6), path=str(folder), forces=True, progress=False).setup()
    # without forces the folder still loads (and no kT is needed)
    dm = TargetDataModule(Quadratic(dim=6), path=str(folder), progress=False)
    dm.setup()
    assert dm.f_train is None and dm.x_train.shape == (27, 6)


def test_exact_generation_samples_the_target_and_caches(tmp_path):
    target = Quadratic()
    settings = {"method": "exact", "n_samples": 64, "seed": 5}
    dm = TargetDataModule(target, cache_dir=str(tmp_path), generate=settings, forces=True, progress=False)
    dm.setup()
    assert target.n_sample_calls == 1
    expected = Quadratic().sample(64, generator=torch.Generator().manual_seed(5))
    x_all = torch.cat([dm.x_train, dm.x_val])
    torch.testing.assert_close(x_all.sort(0).values, expected.to(x_all).sort(0).values)
    torch.testing.assert_close(dm.f_train, target.force(dm.x_train))
    cache = dm.cache_path()
    assert cache.is_file() and str(cache) == dm.source
    # the same settings read the cache; another seed is another file
    again = TargetDataModule(target, cache_dir=str(tmp_path), generate=settings, progress=False)
    again.setup()
    assert target.n_sample_calls == 1
    torch.testing.assert_close(again.x_train, dm.x_train)
    other = TargetDataModule(target, cache_dir=str(tmp_path), generate={**settings, "seed": 6}, progress=False)
    other.setup()
    assert target.n_sample_calls == 2 and other.cache_path() != cache
    # a malformed cache is regenerated
    cache.write_bytes(b"not an npz")
    TargetDataModule(target, cache_dir=str(tmp_path), generate=settings, progress=False).setup()
    assert target.n_sample_calls == 3


def test_exact_generation_errors(tmp_path):
    with pytest.raises(DataError, match="NoSampler has no exact sampler"):
        TargetDataModule(NoSampler(), cache_dir=str(tmp_path), generate={"method": "exact", "n_samples": 8, "seed": 0})
    with pytest.raises(ValueError, match="method must be one of"):
        TargetDataModule(Quadratic(), cache_dir=str(tmp_path), generate={"method": "hmc"})
    with pytest.raises(ValueError, match="n_samples and seed"):
        TargetDataModule(Quadratic(), cache_dir=str(tmp_path), generate={"method": "exact", "n_samples": 8})


def test_mc_generation_with_explicit_method_and_computed_forces(tmp_path):
    target = Quadratic()
    settings = {"method": "mc", "states": ["left", "right"], "n_chains": 4, "n_steps": 20, "burn_in": 0, "thin": 2}
    dm = TargetDataModule(target, cache_dir=str(tmp_path), generate=settings, forces=True, progress=False)
    dm.setup()
    assert dm.x_train.shape[0] + dm.x_val.shape[0] == 2 * 4 * 10
    torch.testing.assert_close(dm.f_train, target.force(dm.x_train))


# training and evaluation ----------------------------------------------------------------------
def test_training_with_force_matching_logs_fm_and_validation_force_error(tmp_path):
    torch.manual_seed(0)
    target = Quadratic()
    x = target.sample(75, generator=torch.Generator().manual_seed(0)).numpy()
    path = _save(tmp_path / "train.npz", x=x)
    dm = TargetDataModule(target, path=path, forces=True, batch_size=20, val_fraction=0.2, progress=False)
    bg = BoltzmannGenerator(NormalPrior(DIM), RealNVP(DIM, 2, [16]), target,
                            JointLoss(alpha=0.0, beta=1.0, force_weight=1.0), optimizer=adam)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[EvaluationCallback(n_samples=100, batch_size=50, n_bootstrap=5)])
    trainer.fit(bg, datamodule=dm)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    for key in ("train/fm", "train/nll", "val/force_rmse", "val/nll", "eval/force_rmse", "eval/force_rmse_relative"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    with torch.no_grad():
        expected = force_matching_error(bg, dm.x_val, dm.f_val)["force_rmse"]
    assert float(metrics["val/force_rmse"]) == pytest.approx(expected, rel=1e-4)  # one validation batch

    # a forces-free data module with a force-matching loss: the clear error
    plain = TargetDataModule(target, path=path, batch_size=20, progress=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="data.forces=true"):
        trainer.fit(bg, datamodule=plain)


def test_evaluate_and_final_evaluation_report_force_errors(tmp_path):
    bg = realnvp_bg()
    target = bg.target
    x = target.sample(300, generator=torch.Generator().manual_seed(1)).double()
    f = target.force(x)
    result = evaluate(bg, n_samples=200, batch_size=100, n_bootstrap=5, data=x, forces=f)
    expected = force_matching_error(bg, x[:200], f[:200])
    assert result.metrics["force_rmse"] == pytest.approx(expected["force_rmse"], rel=1e-12)
    assert result.metrics["force_rmse_relative"] == pytest.approx(expected["force_rmse_relative"], rel=1e-12)
    assert "force_rmse" not in evaluate(bg, n_samples=50, n_bootstrap=5, data=x).metrics
    with pytest.raises(ValueError, match="same shape"):
        evaluate(bg, n_samples=50, n_bootstrap=5, data=x, forces=f[:10])
    cfg = OmegaConf.create({"evaluation": {"final_n_samples": 100, "batch_size": 100, "final_n_bootstrap": 5,
                                           "confidence": 0.9}})
    final = final_evaluation(cfg, bg, x, tmp_path, forces=f)
    assert final.metrics["force_rmse"] == pytest.approx(force_matching_error(bg, x[:100], f[:100])["force_rmse"])
