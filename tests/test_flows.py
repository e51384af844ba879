"""The flow contract (bgexp/flows): invertibility, log-determinants, bounds, shapes, priors.

Couplings start as the identity, so every flow here is first given random parameters
(conditioner weights ~ N(0, 0.3^2), random mean/std for standardisations); otherwise the checks
would be trivially true. The two deepest stacks use std 0.2: with std 0.3, eight random GELU
couplings map N(0, 1) to |x| ~ 1e4 with log-dets ~ 30, a map so ill-conditioned that no float32
implementation inverts it to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from bgexp.flows import (
    AffineCoupling,
    AffineStandardization,
    Flow,
    InverseFlow,
    NormalPrior,
    RealNVP,
    SequentialFlow,
)
from bgexp.flows.nn import coupling_masks

HIDDEN = (16, 16)


def randomise(flow: Flow, seed: int = 0, std: float = 0.3) -> Flow:
    """Random conditioner weights for every coupling and random buffers for standardisations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, AffineCoupling):
                for p in module.net.parameters():
                    p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif isinstance(module, AffineStandardization):
                module.mean.copy_(torch.randn(module.dim, generator=g))
                module.std.copy_(torch.exp(0.5 * torch.randn(module.dim, generator=g)))
    return flow


def _mask(dim: int, split: str) -> torch.Tensor:
    return coupling_masks(dim, 1, split)[0]


# name -> factory() building a (not yet randomised) float32 flow; a lone AffineStandardization and
# InverseFlow(RealNVP) are held to the same checks by tests/test_flow_contract.py
DEEP = {"realnvp-8-gelu", "sequential-mixed"}
FLOWS = {
    "coupling-half": lambda: AffineCoupling(_mask(8, "half"), HIDDEN),
    "coupling-half-flipped": lambda: AffineCoupling(~_mask(8, "half"), HIDDEN),
    "coupling-alternate": lambda: AffineCoupling(_mask(8, "alternate"), HIDDEN),
    "coupling-alternate-odd-dim": lambda: AffineCoupling(_mask(7, "alternate"), HIDDEN, "relu"),
    "coupling-single-changed": lambda: AffineCoupling(torch.arange(6) != 3, HIDDEN, "silu"),
    "realnvp-1-tanh": lambda: RealNVP(8, 1, HIDDEN, "tanh"),
    "realnvp-3-relu-alternate": lambda: RealNVP(7, 3, HIDDEN, "relu", split="alternate"),
    "realnvp-4-tanh-random": lambda: RealNVP(9, 4, HIDDEN, "tanh", split="random"),
    "realnvp-4-silu": lambda: RealNVP(6, 4, HIDDEN, "silu", max_log_scale=1.5),
    "realnvp-8-gelu": lambda: RealNVP(8, 8, (12,), "gelu"),
    "sequential-mixed": lambda: SequentialFlow(
        [
            AffineStandardization(8),
            RealNVP(8, 2, HIDDEN, "tanh"),
            AffineCoupling(_mask(8, "alternate"), HIDDEN, "elu"),
            InverseFlow(RealNVP(8, 2, HIDDEN, "softplus", split="alternate")),
            AffineStandardization(8),
        ]
    ),
}


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Flow:
    return randomise(FLOWS[name](), seed, std=0.2 if name in DEEP else 0.3).to(dtype)


@pytest.fixture(params=sorted(FLOWS))
def flow_name(request) -> str:
    return request.param


def latent(flow: Flow, n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, flow.dim, generator=g, dtype=torch.float64).to(dtype)


def test_randomised_flow_is_not_the_identity(flow_name):
    flow = build(flow_name, torch.float64)
    z = latent(flow, 16, torch.float64)
    x, logdet = flow.forward(z)
    assert x.shape == z.shape and logdet.shape == (16,)
    assert (x - z).abs().max() > 1e-2
    assert logdet.abs().max() > 1e-3


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"]
)
def test_inverse_of_forward_is_identity(flow_name, dtype, tol):
    flow = build(flow_name, dtype)
    z = latent(flow, 64, dtype)
    with torch.no_grad():
        x, _ = flow.forward(z)
        z_back, _ = flow.inverse(x)
        x_back, _ = flow.forward(z_back)
    assert x.dtype == dtype and z_back.dtype == dtype
    torch.testing.assert_close(z_back, z, atol=tol, rtol=tol)
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["float32", "float64"]
)
def test_forward_and_inverse_logdets_cancel(flow_name, dtype, tol):
    flow = build(flow_name, dtype)
    z = latent(flow, 64, dtype)
    with torch.no_grad():
        x, ld_forward = flow.forward(z)
        _, ld_inverse = flow.inverse(x)
    assert ld_forward.shape == ld_inverse.shape == (64,)
    torch.testing.assert_close(ld_forward, -ld_inverse, atol=tol, rtol=tol)


def _brute_force_logdets(fn, points: torch.Tensor) -> torch.Tensor:
    out = []
    for p in points:
        jac = jacobian(lambda v: fn(v.unsqueeze(0))[0].squeeze(0), p)
        assert jac.shape == (p.numel(), p.numel())
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def test_logdet_matches_brute_force_jacobian(flow_name):
    flow = build(flow_name, torch.float64)
    z = latent(flow, 4, torch.float64)
    x, ld_forward = flow.forward(z)
    torch.testing.assert_close(ld_forward, _brute_force_logdets(flow.forward, z), atol=1e-6, rtol=1e-6)
    _, ld_inverse = flow.inverse(x)
    torch.testing.assert_close(ld_inverse, _brute_force_logdets(flow.inverse, x), atol=1e-6, rtol=1e-6)


def test_logdet_is_differentiable(flow_name):
    flow = build(flow_name, torch.float64)
    z = latent(flow, 8, torch.float64).requires_grad_(True)
    x, logdet = flow.forward(z)
    (x.sum() + logdet.sum()).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("max_log_scale", [0.5, 3.0])
@pytest.mark.parametrize("split", ["half", "alternate"])
def test_log_scale_is_bounded_with_huge_weights(max_log_scale, split):
    mask = _mask(8, split)
    coupling = randomise(AffineCoupling(mask, HIDDEN, max_log_scale=max_log_scale), std=100.0)
    n_changed = int((~mask).sum())
    z = 10.0 * latent(coupling, 256, torch.float32)
    with torch.no_grad():
        x, ld_forward = coupling.forward(z)
        _, ld_inverse = coupling.inverse(x)
    bound = max_log_scale * n_changed * (1 + 1e-6)
    assert torch.isfinite(x).all()
    assert ld_forward.abs().max() <= bound
    assert ld_inverse.abs().max() <= bound
    # the weights are huge, so tanh saturates: the bound is reached, not just respected
    assert ld_forward.abs().max() > 0.5 * max_log_scale


def test_single_changed_coordinate_saturates_at_the_bound():
    coupling = randomise(AffineCoupling(torch.arange(5) != 0, HIDDEN, max_log_scale=2.0), std=100.0)
    z = 10.0 * latent(coupling, 128, torch.float64).float()
    with torch.no_grad():
        _, logdet = coupling.forward(z)
    assert logdet.abs().max() <= 2.0 + 1e-6
    # saturated: almost every sample sits at +-max_log_scale (a few lie near the tanh zero crossing)
    assert (logdet.abs() > 1.99).float().mean() > 0.9


def test_realnvp_logdet_bounded_by_sum_over_couplings():
    flow = randomise(RealNVP(6, 5, HIDDEN, max_log_scale=1.0), std=100.0)
    z = latent(flow, 128, torch.float32)
    with torch.no_grad():
        _, logdet = flow.forward(z)
    assert logdet.abs().max() <= 5 * 3 * 1.0 * (1 + 1e-6)


@pytest.mark.parametrize("n_couplings", [1, 4, 8])
@pytest.mark.parametrize("split", ["half", "alternate"])
def test_fresh_realnvp_is_exactly_the_identity(n_couplings, split):
    torch.manual_seed(0)
    flow = RealNVP(9, n_couplings, HIDDEN, "tanh", split=split)
    z = latent(flow, 32, torch.float32)
    x, ld_forward = flow.forward(z)
    z_back, ld_inverse = flow.inverse(z)
    assert torch.equal(x, z) and torch.equal(z_back, z)
    assert torch.equal(ld_forward, torch.zeros(32)) and torch.equal(ld_inverse, torch.zeros(32))


def test_coupling_masks_alternate():
    masks = coupling_masks(5, 3, "half")
    assert masks[0].tolist() == [True, True, False, False, False]
    assert masks[1].tolist() == [False, False, True, True, True]
    assert torch.equal(masks[2], masks[0])
    assert coupling_masks(4, 2, "alternate")[0].tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="split"):
        coupling_masks(4, 2, "diagonal")
    random = coupling_masks(10, 4, "random", seed=1)
    assert all(int(m.sum()) == 5 for m in random)
    assert torch.equal(random[1], ~random[0]) and torch.equal(random[3], ~random[2])
    assert not torch.equal(random[2], random[0])  # a new split for every pair
    assert all(torch.equal(a, b) for a, b in zip(random, coupling_masks(10, 4, "random", seed=1)))


def test_coupling_changes_only_the_transformed_part():
    mask = _mask(8, "alternate")
    coupling = randomise(AffineCoupling(mask, HIDDEN))
    z = latent(coupling, 16, torch.float32)
    with torch.no_grad():
        x, _ = coupling.forward(z)
    assert torch.equal(x[:, mask], z[:, mask])
    assert (x[:, ~mask] - z[:, ~mask]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask=torch.ones(4, dtype=torch.bool)), "mask"),
        (dict(mask=torch.zeros(4, dtype=torch.bool)), "mask"),
        (dict(mask=torch.tensor([True, False]), max_log_scale=0.0), "max_log_scale"),
        (dict(mask=torch.tensor([True, False]), activation="sigmoidish"), "activation"),
    ],
)
def test_bad_coupling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AffineCoupling(**kwargs)


def test_sequential_flow_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="dim"):
        SequentialFlow([AffineStandardization(4), AffineStandardization(5)])
    with pytest.raises(ValueError):
        SequentialFlow([])


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("bad_shape", ["wrong_last_dim", "last_dim_one", "one_dimensional"])
def test_wrong_shape_raises_value_error_naming_the_expected_shape(
    flow_name, direction, bad_shape
):
    flow = build(flow_name)
    shape = {"wrong_last_dim": (3, flow.dim + 1), "last_dim_one": (3, 1), "one_dimensional": (flow.dim,)}
    with pytest.raises(ValueError, match=rf"\[batch, {flow.dim}\]"):
        getattr(flow, direction)(torch.zeros(shape[bad_shape]))


def test_affine_standardization_fit_whitens_data():
    g = torch.Generator().manual_seed(3)
    data = 2.0 + 3.0 * torch.randn(2000, 4, generator=g, dtype=torch.float64)
    flow = AffineStandardization(4).double().fit(data)
    torch.testing.assert_close(flow.mean, data.mean(0))
    torch.testing.assert_close(flow.std, data.std(0))
    z, logdet = flow.inverse(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet, -torch.log(data.std(0)).sum().expand(2000))
    assert "mean" in flow.state_dict() and "std" in flow.state_dict()
    assert len(list(flow.parameters())) == 0


# ---------------------------------------------------------------------------------------------
# NormalPrior


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_prior_log_prob_matches_torch_normal(temperature):
    prior = NormalPrior(5, temperature=temperature).double()
    z = 2.0 * torch.randn(100, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale = torch.tensor(math.sqrt(temperature), dtype=torch.float64)
    expected = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), scale).log_prob(z).sum(-1)
    torch.testing.assert_close(prior.log_prob(z), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_prior_sample_moments(temperature):
    prior = NormalPrior(4, temperature=temperature)
    z = prior.sample(20000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (20000, 4) and z.dtype == torch.float32
    assert z.mean(0).abs().max() < 0.05 * math.sqrt(temperature)
    torch.testing.assert_close(z.var(0), torch.full((4,), temperature), atol=0.05 * temperature, rtol=0)


def test_prior_sample_reproducible_with_generator():
    prior = NormalPrior(3)
    a = prior.sample(10, generator=torch.Generator().manual_seed(7))
    b = prior.sample(10, generator=torch.Generator().manual_seed(7))
    c = prior.sample(10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_prior_follows_module_dtype_and_checks_shape():
    prior = NormalPrior(3).double()
    assert prior.sample(4).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        prior.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError):
        NormalPrior(0)
    with pytest.raises(ValueError):
        NormalPrior(2, temperature=0.0)
