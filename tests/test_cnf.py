"""Equivariant CNF (bgexp/flows/cnf.py) and the mean-free prior: divergences, log-dets, symmetries."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchdyn", reason="torchdyn is installed with `pip install --no-deps torchdyn==1.0.6`")

from bgexp.flows.cnf import EquivariantCNF, subspace_basis  # noqa: E402
from bgexp.flows.integrators import ODESolverError  # noqa: E402
from bgexp.flows.priors import MeanFreeNormalPrior  # noqa: E402

N, D = 4, 2


def make_flow(field: str, seed: int = 0, **kwargs) -> EquivariantCNF:
    torch.manual_seed(seed)
    flow = EquivariantCNF(N, D, field=field, hidden=16, n_layers=2, **kwargs).double()
    with torch.no_grad():  # a field that moves the particles visibly, but not a stiff one
        for p in flow.field.parameters():
            p.mul_(1.5)
    return flow


def samples(n: int = 4, seed: int = 1) -> torch.Tensor:
    return MeanFreeNormalPrior(N, D).double().sample(n, generator=torch.Generator().manual_seed(seed))


def random_orthogonal(d: int, seed: int, reflect: bool) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def test_mean_free_prior_is_normalised_on_its_subspace():
    prior = MeanFreeNormalPrior(3, 1).double()
    basis = subspace_basis(3, 1)  # [3, 2]
    g = torch.linspace(-8, 8, 801, dtype=torch.float64)
    a, b = torch.meshgrid(g, g, indexing="ij")
    points = torch.stack([a.reshape(-1), b.reshape(-1)], -1) @ basis.T
    mass = prior.log_prob(points).exp().sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-8)
    z = prior.sample(1000, generator=torch.Generator().manual_seed(0))
    assert z.reshape(1000, 3, 1).mean(1).abs().max() < 1e-12
    assert torch.allclose(prior.log_prob(z + 3.0), prior.log_prob(z))  # translation invariant


@pytest.mark.parametrize("field", ["egnn", "pairwise"])
def test_exact_divergence_equals_the_jacobian_trace(field):
    flow = make_flow(field)
    x, t = samples(), torch.tensor(0.3, dtype=torch.float64)
    v, div = flow.exact_divergence(t, x)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda y: flow.field(t, y[None])[0], x[i])
        assert float(div[i]) == pytest.approx(float(torch.trace(jac)), abs=1e-6)
    assert torch.allclose(v, flow.field(t, x))


def test_hutchinson_divergence_is_unbiased():
    flow = make_flow("egnn")
    x, t = samples(2), torch.tensor(0.7, dtype=torch.float64)
    _, exact = flow.exact_divergence(t, x)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([flow.hutchinson_divergence(t, x, torch.randint(0, 2, x.shape, generator=g).double() * 2 - 1)[1]
                         for _ in range(2000)])
    err = draws.std(0) / math.sqrt(len(draws))
    assert torch.all((draws.mean(0) - exact).abs() < 4 * err)


@pytest.mark.parametrize("field", ["egnn", "pairwise"])
def test_logdet_equals_brute_force_on_the_subspace_and_inverts(field):
    flow = make_flow(field, atol=1e-9, rtol=1e-9)
    z = samples(2)
    x, logdet = flow.forward(z)
    assert (x - z).abs().max() > 1e-2  # the flow does something
    basis = subspace_basis(N, D)
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda c: basis.T @ flow.forward((basis @ c)[None])[0][0],
                                                 basis.T @ z[i])
        assert float(logdet[i]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-6)
    back, logdet_inv = flow.inverse(x)
    assert (back - z).abs().max() < 1e-7 and (logdet + logdet_inv).abs().max() < 1e-6


def test_forward_then_inverse_at_default_tolerances_in_float32():
    torch.manual_seed(0)
    flow = EquivariantCNF(N, D, field="egnn", hidden=16, n_layers=2)
    z = MeanFreeNormalPrior(N, D).sample(16, generator=torch.Generator().manual_seed(2))
    x, logdet = flow.forward(z)
    back, logdet_inv = flow.inverse(x)
    assert (back - z).abs().max() <= 1e-4 and (logdet + logdet_inv).abs().max() <= 1e-4


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_transport_is_the_forward_map_without_the_divergence(solver):
    """transport(z) solves the bare field: the x of forward(z) (same solver), fewer field
    evaluations' worth of work per step (no Jacobian), and it counts its field evaluations."""
    torch.manual_seed(0)
    flow = EquivariantCNF(N, D, field="egnn", hidden=16, n_layers=2, solver=solver, steps=6).double()
    z = MeanFreeNormalPrior(N, D).sample(8, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        x, _ = flow.forward(z)
        nfe_forward = flow.nfe
        moved = flow.transport(z)
    assert (moved - x).abs().max() <= (1e-12 if solver == "rk4" else 1e-6)
    assert flow.nfe > 0 and (solver != "rk4" or flow.nfe == nfe_forward)
    with pytest.raises(ValueError, match="shape"):
        flow.transport(torch.zeros(2, 9, dtype=torch.float64))


@pytest.mark.parametrize("field", ["egnn", "pairwise"])
@pytest.mark.parametrize("symmetry", ["rotation", "reflection", "translation", "permutation"])
def test_equivariance_of_the_map_and_invariance_of_the_density(field, symmetry):
    flow = make_flow(field, atol=1e-9, rtol=1e-9)
    prior = MeanFreeNormalPrior(N, D).double()
    z = samples(3)

    def act(x: torch.Tensor) -> torch.Tensor:
        xyz = x.reshape(-1, N, D)
        if symmetry in ("rotation", "reflection"):
            xyz = xyz @ random_orthogonal(D, 3, reflect=symmetry == "reflection").T
        elif symmetry == "translation":
            xyz = xyz + torch.tensor([0.7, -1.3], dtype=torch.float64)
        else:
            xyz = xyz[:, torch.tensor([2, 0, 3, 1])]
        return xyz.reshape(x.shape)

    x, _ = flow.forward(z)
    if symmetry != "translation":  # the flow acts on the mean-free subspace; translations leave it
        x_acted, _ = flow.forward(act(z))
        assert (x_acted - act(x)).abs().max() < 1e-5

    def log_q(y: torch.Tensor) -> torch.Tensor:
        y = prior.remove_mean(y)
        zz, ld = flow.inverse(y)
        return prior.log_prob(zz) + ld

    assert (log_q(act(x)) - log_q(x)).abs().max() < 1e-5


def test_a_blow_up_in_the_field_is_an_error():
    flow = make_flow("pairwise")
    with torch.no_grad():
        next(flow.field.parameters()).fill_(float("nan"))
    with pytest.raises(ODESolverError, match="non-finite"):
        flow.forward(samples(2))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="divergence"):
        EquivariantCNF(N, D, divergence="trace")
    with pytest.raises(ValueError, match="field"):
        EquivariantCNF(N, D, field="transformer")
    with pytest.raises(ValueError, match="dim"):
        EquivariantCNF(N, D, dim=9)
    with pytest.raises(ValueError, match="shape"):
        EquivariantCNF(N, D).forward(torch.zeros(2, 9))


@pytest.mark.slow
@pytest.mark.parametrize("loss,logged", [("nll", b"train/nll"), ("flow_matching_ot", b"train/flow_matching")])
def test_dw4_ecnf_through_the_cli(tmp_path, loss, logged):
    """A short run of the CNF on DW4 through bgexp-train with the offline W&B logger, trained by
    maximum likelihood or by equivariant OT flow matching; the final evaluation reports the field
    evaluations per sample and the pair-distance histogram, and the SMC refinement follows."""
    import json
    from pathlib import Path

    from helpers import run_cli

    args = ["experiment=dw4_ecnf", f"loss={loss}", "data.generate.n_chains=20", "data.generate.burn_in=500",
            "data.generate.n_steps=2000", "data.generate.thin=20", "data.batch_size=128",
            "flow.transform.solver=rk4", "flow.transform.steps=4", "flow.transform.hidden=8",
            "flow.transform.n_layers=1", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "evaluation.n_samples=200", "evaluation.final_n_samples=300", "evaluation.n_bootstrap=10",
            "evaluation.final_n_bootstrap=10", "evaluation.final_n_data=200", "trainer.log_every_n_steps=5",
            "smc.n_particles=100", "smc.progress=false"]
    proc = run_cli("bgexp-train", args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "dw4_ecnf").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 < results["ess"] <= 1 and math.isfinite(results["nll_test"])
    assert results["training"]["steps"] > 0 and results["n_samples"] == 300
    assert results["metrics"]["nfe_per_sample"] == 16
    assert math.isfinite(results["metrics"]["distribution/pair_distance/w1_reweighted"])
    assert Path(results["figures"]["histogram_pair_distance"]).is_file()
    assert Path(results["files"]["wandb_run"]).name.startswith("offline-run-")
    assert any(logged in p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/*.wandb"))
    # the experiment refines by SMC by default: from the flow's weighted samples (one global run per
    # replicate), resampling below ESS 95%, with the energy W2 to the held-out frames
    smc = results["smc"]
    assert smc["settings"]["resample_threshold"] == 0.95 and smc["flow"]["mode"] == "global"
    assert 0 < smc["flow"]["ess"]["all"] <= 1 and math.isfinite(smc["flow"]["log_normalizer"]["value"])
    assert all(0 <= v < 50 for v in smc["flow"]["energy_w2"]["replicates"]) and math.isfinite(smc["mcmc"]["energy_w2"])
    assert "SMC from the flow: energy W2 to held-out data" in proc.stdout


@pytest.mark.parametrize("solver,options", [("rk4", {"steps": 6}), ("dopri5", {"atol": 1e-9, "rtol": 1e-9})])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_adjoint_gradients_equal_backpropagation(solver, options, direction):
    """Adjoint sensitivities (a backwards adjoint solve) against direct backpropagation through the
    solver, for parameters and inputs, in both directions of time, float64."""
    gradients = {}
    for sensitivity in ("autograd", "adjoint"):
        torch.manual_seed(1)
        flow = EquivariantCNF(n_particles=4, spatial_dim=2, hidden=8, n_layers=2, solver=solver,
                              sensitivity=sensitivity, **options).double()
        x = samples(5, seed=2).requires_grad_(True)
        y, logdet = getattr(flow, direction)(x)
        ((y**2).sum() + logdet.sum()).backward()
        gradients[sensitivity] = torch.cat([p.grad.flatten() for p in flow.parameters()] + [x.grad.flatten()])
    scale = gradients["autograd"].abs().max()
    assert torch.allclose(gradients["adjoint"], gradients["autograd"], atol=1e-6 * float(scale))


def test_adjoint_needs_every_parameter_to_require_gradients():
    flow = EquivariantCNF(n_particles=4, spatial_dim=2, hidden=4, n_layers=1, solver="euler", steps=2,
                          sensitivity="adjoint")
    flow.field.coord[0][0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="require gradients"):
        flow(samples(3).float())
    with pytest.raises(ValueError, match="sensitivity"):
        EquivariantCNF(n_particles=4, spatial_dim=2, sensitivity="backsolve")


def test_hutchinson_in_training_and_the_exact_divergence_in_evaluation():
    torch.manual_seed(0)
    flow = EquivariantCNF(n_particles=4, spatial_dim=2, hidden=8, n_layers=2, solver="rk4", steps=4,
                          divergence="hutchinson", eval_divergence="exact").double()
    exact = EquivariantCNF(n_particles=4, spatial_dim=2, hidden=8, n_layers=2, solver="rk4", steps=4).double()
    exact.load_state_dict(flow.state_dict())
    x = samples(6)
    flow.eval()
    assert torch.allclose(flow.inverse(x)[1], exact.inverse(x)[1], atol=1e-12)
    flow.train()
    assert not torch.allclose(flow.inverse(x)[1], exact.inverse(x)[1], atol=1e-6)  # a stochastic estimate
    assert flow.nfe == 16  # 4 steps x 4 stages of the classical RK4


def test_chunked_exact_divergence_equals_the_whole_batch():
    flow = make_flow("egnn")
    chunked = make_flow("egnn", divergence_chunk=3)
    x = samples(7)
    t = torch.tensor(0.3, dtype=torch.float64)
    assert torch.allclose(flow.exact_divergence(t, x)[1], chunked.exact_divergence(t, x)[1], atol=1e-12)
    with pytest.raises(ValueError, match="divergence_chunk"):
        make_flow("egnn", divergence_chunk=0)
