"""Batched, differentiable molecular geometry in torch: distances, bond angles, torsions.

Shared by flows (internal coordinates) and targets (observables such as the backbone
dihedrals); it imports neither. Points have shape [..., 3]; results have shape [...].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def norm(v: Tensor, keepdim: bool = False) -> Tensor:
    return torch.linalg.vector_norm(v, dim=-1, keepdim=keepdim)


def dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).sum(-1)


def normalize(v: Tensor) -> Tensor:
    """v / |v|; the norm is floored at the smallest normal float so that an exactly zero
    vector gives zeros instead of NaN (only degenerate geometries ever reach the floor)."""
    return v / norm(v, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def bond_lengths(xi: Tensor, xj: Tensor) -> Tensor:
    """|x_i - x_j|."""
    return norm(xi - xj)


def bond_angles(xi: Tensor, xj: Tensor, xk: Tensor) -> Tensor:
    """The angle i-j-k at vertex j, in [0, pi].

    Computed as atan2(|u x v|, u . v) with u = x_i - x_j, v = x_k - x_j, which (unlike
    acos(cos)) needs no clamping and stays accurate near 0 and pi.
    """
    u, v = xi - xj, xk - xj
    return torch.atan2(norm(torch.linalg.cross(u, v)), dot(u, v))


def dihedrals(xi: Tensor, xj: Tensor, xk: Tensor, xl: Tensor) -> Tensor:
    """The torsion i-j-k-l (IUPAC sign convention, as in mdtraj), in [-pi, pi).

    With b1 = x_j - x_i, b2 = x_k - x_j, b3 = x_l - x_k:
        phi = atan2(|b2| b1 . (b2 x b3), (b1 x b2) . (b2 x b3)).
    atan2 returns (-pi, pi]; the value pi is mapped to -pi so that the range is half-open.
    """
    b1, b2, b3 = xj - xi, xk - xj, xl - xk
    n2 = torch.linalg.cross(b2, b3)
    y = norm(b2) * dot(b1, n2)
    x = dot(torch.linalg.cross(b1, b2), n2)
    phi = torch.atan2(y, x)
    return torch.where(phi >= math.pi, phi - 2 * math.pi, phi)


def nerf(xj: Tensor, xk: Tensor, xl: Tensor, bond: Tensor, angle: Tensor, torsion: Tensor) -> Tensor:
    """Natural extension reference frame (NeRF; Parsons et al., J. Comput. Chem. 26, 1063, 2005):
    the point x_i with |x_i - x_j| = bond, bond_angles(x_i, x_j, x_k) = angle and
    dihedrals(x_i, x_j, x_k, x_l) = torsion (radians, IUPAC sign convention).

    Reference points have shape [..., 3], the internal coordinates shape [...] (broadcast). With
    the frame e_1 = (x_j - x_k)/|x_j - x_k|, n = e_1 x (x_l - x_k)/|...| and e_2 = n x e_1 (the
    direction of x_l seen from the k-j axis):
        x_i = x_j + bond (-cos(angle) e_1 + sin(angle) (cos(torsion) e_2 + sin(torsion) n)),
    a spherical parametrisation about x_j (polar angle pi - angle), so |det dx_i/d(bond, angle,
    torsion)| = bond^2 sin(angle). Differentiable, any float dtype/device.
    """
    e1 = normalize(xj - xk)
    n = normalize(torch.linalg.cross(e1, xl - xk))
    e2 = torch.linalg.cross(n, e1)
    b, a, t = bond.unsqueeze(-1), angle.unsqueeze(-1), torsion.unsqueeze(-1)
    return xj + b * (-torch.cos(a) * e1 + torch.sin(a) * (torch.cos(t) * e2 + torch.sin(t) * n))


def torsion_of(x: Tensor, atoms: tuple[int, int, int, int]) -> Tensor:
    """The torsion of four atoms of flattened configurations x [batch, 3 N]."""
    xyz = x.reshape(x.shape[0], -1, 3)
    i, j, k, l = atoms
    return dihedrals(xyz[:, i], xyz[:, j], xyz[:, k], xyz[:, l])


def superpose(x: Tensor, ref: Tensor) -> Tensor:
    """Optimally rotate and translate `x` onto `ref` (Kabsch 1976, proper rotations only).

    `x` is [batch, 3N] or [batch, N, 3]; `ref` is [N, 3], [3N], [batch, N, 3] or [batch, 3N].
    Returns `x` moved onto `ref`, with the shape of `x`. Rotation R = V diag(1, 1, d) U^T from the
    SVD U S V^T of the covariance X_c^T Y_c, with d = sign det(V U^T).
    """
    shape = x.shape
    if x.dim() == 2:
        if x.shape[-1] % 3:
            raise ValueError(f"superpose expects x of shape [batch, 3N] or [batch, N, 3], got {tuple(shape)}")
        x = x.reshape(x.shape[0], -1, 3)
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"superpose expects x of shape [batch, 3N] or [batch, N, 3], got {tuple(shape)}")
    n_atoms = x.shape[1]
    ref = ref.to(x)
    if ref.dim() in (1, 2) and ref.numel() == 3 * n_atoms:
        ref = ref.reshape(1, n_atoms, 3)
    else:
        ref = ref.reshape(ref.shape[0], n_atoms, 3)
    x_mean, ref_mean = x.mean(1, keepdim=True), ref.mean(1, keepdim=True)
    xc, rc = x - x_mean, ref - ref_mean
    rot = optimal_rotation(xc, rc.expand_as(xc))
    return (xc @ rot.transpose(1, 2) + ref_mean).reshape(shape)


def optimal_rotation(x: Tensor, ref: Tensor) -> Tensor:
    """The proper rotation R [batch, d, d] minimising sum_i |R x_i - ref_i|^2 (Kabsch 1976), any d.

    `x` and `ref` are centred point sets [batch, n, d]. With the SVD U S V^T = X^T Y of the
    covariance, R = V diag(1, ..., 1, s) U^T and s = sign det(V U^T), so that det R = +1.
    Apply it as x @ R^T.
    """
    if x.dim() != 3 or x.shape != ref.shape:
        raise ValueError(f"optimal_rotation expects two point sets [batch, n, d] of one shape, got "
                         f"{tuple(x.shape)} and {tuple(ref.shape)}")
    u, _, vh = torch.linalg.svd(x.transpose(1, 2) @ ref)
    v, ut = vh.transpose(1, 2), u.transpose(1, 2)
    s = torch.sign(torch.linalg.det(v @ ut))
    diag = torch.ones(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
    diag[:, -1] = torch.where(s == 0, torch.ones_like(s), s)
    return v @ torch.diag_embed(diag) @ ut


def wrap_angle(x: Tensor) -> Tensor:
    """Angles mapped onto [-pi, pi) in their own dtype: x - 2 pi floor((x + pi) / 2 pi) (derivative 1).
    Values already inside are returned unchanged; a wrapped value that rounds onto pi becomes -pi."""
    y = torch.remainder(x + math.pi, 2 * math.pi) - math.pi
    y = torch.where(y >= math.pi, y - 2 * math.pi, y)
    return torch.where((x >= -math.pi) & (x < math.pi), x, y)


def as_box(box, like: Tensor | None = None) -> Tensor:
    """Edge lengths [3] of an orthorhombic periodic box from three numbers (or one, for a cube), as
    a tensor in the dtype and device of `like` (float64 on the CPU without it). Raises ValueError
    unless there are 3 positive, finite edge lengths."""
    dtype, device = (torch.float64, None) if like is None else (like.dtype, like.device)
    lengths = torch.as_tensor(box, dtype=dtype, device=device).flatten()
    if lengths.numel() == 1:
        lengths = lengths.expand(3).clone()
    if lengths.shape != (3,) or not bool(torch.isfinite(lengths).all()) or not bool((lengths > 0).all()):
        shown = lengths.tolist() if lengths.numel() <= 9 else tuple(lengths.shape)
        raise ValueError(f"box must be 3 positive edge lengths (or one, for a cube), got {shown}")
    return lengths


def wrap_into_box(x: Tensor, box: Tensor) -> Tensor:
    """Periodic coordinates x - L floor(x / L) in [0, L) per axis of an orthorhombic box (derivative 1;
    a value that rounds onto L becomes 0). `box` broadcasts against x (edge lengths on the last axis)."""
    wrapped = torch.remainder(x, box)
    return torch.where(wrapped >= box, wrapped - box, wrapped)

