"""PCA whitening representation layer (bgexp.flows.representation.pca_whitening)."""

from __future__ import annotations

import pytest
import torch

from bgexp.flows.representation import PCAWhitening, pca_whitening
from bgexp.spaces import Space, SpaceError

DIM = 6


def correlated(n: int = 4000, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    """Gaussian data with a full, non-diagonal covariance and a non-zero mean, in float64."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64) + torch.eye(dim, dtype=torch.float64)
    return torch.linspace(-2, 3, dim, dtype=torch.float64) + torch.randn(n, dim, generator=g, dtype=torch.float64) @ mixing


def fitted(space: Space, data: torch.Tensor) -> PCAWhitening:
    layer, _ = pca_whitening(space, data=data)
    return layer.double()


def test_whitened_data_have_zero_mean_and_identity_covariance():
    data = correlated()
    layer, next_space = pca_whitening(Space(DIM), data=data)
    layer = layer.double()
    layer.fit(data)  # refit in float64 buffers (the factory stores in the default dtype)
    y, _ = layer.inverse(data)
    torch.testing.assert_close(y.mean(0), torch.zeros(DIM, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(DIM, dtype=torch.float64), atol=1e-10, rtol=0)
    assert next_space == Space(DIM)


def test_round_trip_and_logdet_against_brute_force_jacobian_float64():
    data = correlated()
    layer = PCAWhitening(DIM).double().fit(data)
    z = torch.randn(5, DIM, dtype=torch.float64)
    x, ld_forward = layer.forward(z)
    z_back, ld_inverse = layer.inverse(x)
    torch.testing.assert_close(z_back, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_forward, -ld_inverse, atol=1e-12, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda v: layer.forward(v[None])[0][0], z[0])
    sign, value = torch.linalg.slogdet(jac)
    assert float(sign) != 0.0
    assert float(value) == pytest.approx(float(ld_forward[0]), abs=1e-10)
    # = 0.5 sum log lambda, lambda the eigenvalues of the data covariance
    expected = 0.5 * torch.log(torch.linalg.eigvalsh(torch.cov(data.T))).sum()
    assert float(ld_forward[0]) == pytest.approx(float(expected), abs=1e-10)


def test_circular_features_pass_through_untouched():
    circular = (False, True, False, False, True, False)
    data = correlated()
    data[:, 1] = torch.remainder(data[:, 1], 6.28) - 3.14
    data[:, 4] = torch.remainder(data[:, 4], 6.28) - 3.14
    layer, next_space = pca_whitening(Space(DIM, circular), data=data)
    layer = layer.double()
    layer.fit(data)
    y, _ = layer.inverse(data)
    assert torch.equal(y[:, [1, 4]], data[:, [1, 4]])
    linear = [0, 2, 3, 5]
    torch.testing.assert_close(torch.cov(y[:, linear].T), torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    assert next_space.circular == circular
    x, _ = layer.forward(y)
    torch.testing.assert_close(x, data, atol=1e-10, rtol=0)


def test_rank_deficient_data_are_floored_and_stay_invertible():
    data = correlated()
    data = data - data.mean(-1, keepdim=True)  # every row sums to 0: one zero variance
    with pytest.warns(RuntimeWarning, match="floored"):
        layer = PCAWhitening(DIM).double().fit(data, min_variance=1e-6)
    assert float(layer.scale.min()) == pytest.approx(1e-3)
    z = torch.randn(4, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer.inverse(layer.forward(z)[0])[0], z, atol=1e-9, rtol=0)


@pytest.mark.bad_input
def test_particle_structure_is_dropped_and_rigid_bodies_are_refused():
    space = Space(8, particles=4, spatial_dim=2)
    _, next_space = pca_whitening(space, data=correlated(dim=8))
    assert next_space == Space(8)
    with pytest.raises(SpaceError, match="rigid-body"):
        pca_whitening(Space(14, molecules=2, box=(1.0, 1.0, 1.0)))


def test_buffers_travel_in_the_state_dict():
    """A checkpoint restores the fitted whitening into a layer built without data."""
    layer, _ = pca_whitening(Space(DIM, (False,) * 5 + (True,)), data=correlated())
    state = layer.state_dict()
    assert set(state) == {"linear", "mean", "eigvecs", "scale"}
    fresh, _ = pca_whitening(Space(DIM, (False,) * 5 + (True,)), data=None)
    x = correlated(n=7, seed=1).float()
    assert not torch.allclose(fresh.inverse(x)[0], layer.inverse(x)[0])
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.inverse(x)[0], layer.inverse(x)[0])
    assert torch.equal(fresh.forward(x)[1], layer.forward(x)[1])


@pytest.mark.bad_input
def test_bad_inputs_are_named():
    layer = PCAWhitening(DIM)
    with pytest.raises(ValueError, match=r"\[batch, 6\]"):
        layer.fit(torch.zeros(10, DIM + 1))
    with pytest.raises(ValueError, match="at least 2"):
        layer.fit(torch.zeros(1, DIM))
    with pytest.raises(ValueError, match="min_variance"):
        layer.fit(correlated(n=10), min_variance=0.0)


def test_the_realnvp_pca_recipe_builds_and_fits_on_the_data():
    """conf/flow/realnvp_pca.yaml through the builder: the representation is the fitted whitening."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from bgexp.targets.base import Target
    from bgexp.training.assemble import build_flow

    class Gaussian(Target):
        def __init__(self):
            super().__init__()
            self.dim, self.temperature = DIM, 1.0

        def energy(self, x):
            return 0.5 * (x**2).sum(-1)

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "flow" / "realnvp_pca.yaml")
    cfg.transform.n_couplings, cfg.transform.hidden = 2, [8]
    data = correlated()
    built = build_flow(cfg, Gaussian(), data)
    assert isinstance(built.representation, PCAWhitening)
    y, _ = built.representation.inverse(data.float())
    torch.testing.assert_close(torch.cov(y.double().T), torch.eye(DIM, dtype=torch.float64), atol=1e-3, rtol=0)
