"""Unit quaternions as rotations: the algebra shared by rigid-body targets and rigid-body flows.

A quaternion is q = (w, x, y, z) = w + x i + y j + z k, stored as [..., 4]. Unit quaternions form
the sphere S^3; q and -q give the same rotation, so rotations are S^3/{+-1} (SO(3) is doubly
covered). Conventions:

- product: (a * b) = (a_w b_w - a_v . b_v,  a_w b_v + b_w a_v + a_v x b_v);
- rotation of a vector v: q * (0, v) * conj(q), as the matrix
      R(q) = [[1 - 2(y^2 + z^2), 2(xy - wz),       2(xz + wy)],
              [2(xy + wz),       1 - 2(x^2 + z^2), 2(yz - wx)],
              [2(xz - wy),       2(yz + wx),       1 - 2(x^2 + y^2)]]
  (active rotation, column vectors: v' = R v), even in q;
- `from_matrix` returns the canonical representative with w >= 0.

Tangent spaces: for a unit q, the three vectors q * i, q * j, q * k are orthonormal and orthogonal
to q (left multiplication by a unit quaternion is an isometry of R^4 and 1, i, j, k are
orthonormal), so `tangent_basis(q)` [..., 4, 3] is an orthonormal basis of T_q S^3 that depends
smoothly on q. A curve q(t) = q * exp(t omega / 2) rotates by the body-frame angular velocity
omega, so the basis is the body frame scaled by 1/2: dq = (1/2) q * (0, omega).

Haar measure: the uniform measure on S^3 pushes forward to the Haar (uniform) measure on SO(3);
`random_unit` samples it as normalised standard normal vectors in R^4 (Shoemake 1992 in effect).
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalize(q: Tensor, eps: float = 0.0) -> Tensor:
    """q / |q| over the last axis."""
    return q / (q.norm(dim=-1, keepdim=True) + eps)


def multiply(a: Tensor, b: Tensor) -> Tensor:
    """The Hamilton product a * b, broadcast over the leading axes."""
    a, b = torch.broadcast_tensors(a, b)
    aw, av = a[..., :1], a[..., 1:]
    bw, bv = b[..., :1], b[..., 1:]
    w = aw * bw - (av * bv).sum(-1, keepdim=True)
    v = aw * bv + bw * av + torch.linalg.cross(av, bv, dim=-1)
    return torch.cat([w, v], -1)


def conjugate(q: Tensor) -> Tensor:
    """(w, -x, -y, -z): the inverse of a unit quaternion."""
    return torch.cat([q[..., :1], -q[..., 1:]], -1)


def to_matrix(q: Tensor) -> Tensor:
    """The rotation matrix R(q) [..., 3, 3] of unit quaternions [..., 4] (module docstring); R(-q) = R(q)."""
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def from_matrix(r: Tensor) -> Tensor:
    """The unit quaternion with w >= 0 of rotation matrices [..., 3, 3].

    The eigenvector of the largest eigenvalue of the symmetric 4 x 4 matrix K of Bar-Itzhack (2000),
    K = (1/3) [[R00 - R11 - R22, R10 + R01, R20 + R02, R12 - R21], ...]: robust for every angle
    (no branch on the trace), and it returns the nearest rotation's quaternion for a slightly
    non-orthogonal R.
    """
    r00, r01, r02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    r10, r11, r12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    k = torch.stack([
        torch.stack([r00 + r11 + r22, r21 - r12, r02 - r20, r10 - r01], -1),
        torch.stack([r21 - r12, r00 - r11 - r22, r01 + r10, r02 + r20], -1),
        torch.stack([r02 - r20, r01 + r10, r11 - r00 - r22, r12 + r21], -1),
        torch.stack([r10 - r01, r02 + r20, r12 + r21, r22 - r00 - r11], -1),
    ], -2) / 3.0
    _, vectors = torch.linalg.eigh(k)
    q = vectors[..., -1]
    return torch.where(q[..., :1] < 0, -q, q)


def rotate(q: Tensor, v: Tensor) -> Tensor:
    """R(q) v for vectors v [..., 3] (broadcast with q [..., 4])."""
    return (to_matrix(q) @ v[..., None])[..., 0]


def tangent_basis(q: Tensor) -> Tensor:
    """An orthonormal basis [..., 4, 3] of the tangent space T_q S^3: the columns q * i, q * j, q * k."""
    units = torch.eye(4, dtype=q.dtype, device=q.device)[1:]  # i, j, k as quaternions
    columns = [multiply(q, units[m].expand_as(q)) for m in range(3)]
    return torch.stack(columns, -1)


def random_unit(shape: tuple[int, ...] | int, generator: torch.Generator | None = None,
                dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Uniform unit quaternions [*shape, 4] (uniform on S^3, hence Haar-uniform rotations)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    q = torch.randn(*shape, 4, generator=generator, dtype=dtype, device=device)
    return normalize(q)


def canonical(q: Tensor) -> Tensor:
    """The representative of {q, -q} with w >= 0."""
    return torch.where(q[..., :1] < 0, -q, q)


__all__ = ["normalize", "multiply", "conjugate", "to_matrix", "from_matrix", "rotate", "tangent_basis",
           "random_unit", "canonical"]
