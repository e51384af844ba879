"""Unit quaternions (bgexp/quaternions.py) against scipy's rotations, float64."""

from __future__ import annotations

import torch
from scipy.spatial.transform import Rotation

from bgexp import quaternions as Q


def unit(n: int, seed: int) -> torch.Tensor:
    return Q.random_unit(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_matrix_matches_scipy_and_is_even_in_q():
    q = unit(200, 0)
    expected = torch.as_tensor(Rotation.from_quat(q[:, [1, 2, 3, 0]].numpy()).as_matrix())  # scipy: scalar last
    assert torch.allclose(Q.to_matrix(q), expected, atol=1e-13)
    assert torch.allclose(Q.to_matrix(-q), Q.to_matrix(q), atol=1e-15)
    assert torch.allclose(Q.rotate(q, torch.ones(200, 3, dtype=torch.float64)),
                          expected @ torch.ones(3, dtype=torch.float64), atol=1e-13)


def test_from_matrix_inverts_to_matrix_for_all_angles():
    q = Q.canonical(unit(500, 1))
    q[0] = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # a half turn: trace -1
    q[1] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # the identity
    assert torch.allclose(Q.from_matrix(Q.to_matrix(q)), Q.canonical(q), atol=1e-12)


def test_product_composes_rotations_and_conjugate_inverts():
    a, b = unit(100, 2), unit(100, 3)
    assert torch.allclose(Q.to_matrix(Q.multiply(a, b)), Q.to_matrix(a) @ Q.to_matrix(b), atol=1e-13)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(Q.multiply(a, Q.conjugate(a)), identity.expand(100, 4), atol=1e-13)


def test_tangent_basis_is_orthonormal_and_orthogonal_to_q():
    q = unit(100, 4)
    frame = torch.cat([q[..., None], Q.tangent_basis(q)], -1)  # [q | E], 4 x 4
    assert torch.allclose(frame.transpose(1, 2) @ frame, torch.eye(4, dtype=torch.float64).expand(100, 4, 4),
                          atol=1e-13)


def test_random_unit_is_uniform_on_the_sphere():
    q = unit(200_000, 5)
    # E[q q^T] = I / 4 for the uniform distribution on S^3; standard error ~ 1e-3
    second = q.T @ q / q.shape[0]
    assert torch.allclose(second, torch.eye(4, dtype=torch.float64) / 4, atol=5e-3)
