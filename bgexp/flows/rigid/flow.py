"""Rigid-body flows on (T^3 x S^3)^N (Köhler, Invernizzi, de Haan, Noé, "Rigid Body Flows for Sampling
Molecular Crystal Structures", ICML 2023).

**Rigid-body flow.** `RigidBodyFlow` acts on configurations of N rigid molecules, x [B, 7N],
molecule-major (c_x, c_y, c_z, q_w, q_x, q_y, q_z): centres c in an orthorhombic periodic box with
edge lengths L and unit quaternions q (q ~ -q), i.e. on (T^3 x S^3)^N. Densities are w.r.t. Lebesgue
measure on the box times the volume of S^3 per molecule. It alternates couplings, each conditioned
by a permutation-equivariant `MoleculeTransformer` (self-attention over the molecule axis, no
positional encoding, zero-initialised head):

    RotationCoupling:       q_i <- ConvexRotation(q_i; theta_i(c)),  c unchanged,
                            log|det| = sum_i (tangent-space log-det of ConvexRotation);
    TranslationCoupling(a): c_{i,a} <- L_a/(2 pi) (F_i(2 pi c_{i,a}/L_a - pi) + pi), F_i a smooth
                            circular ramp mixture (bgexp/flows/torus.py) conditioned on the other
                            two axes (sin, cos) and R(q) of all molecules,
                            log|det| = sum_i log F_i'.

Conditioners see only periodic functions of c and only R(q) (even in q), so the flow is periodic
in c, commutes with q_i -> -q_i and with permutations of the molecules (Köhler et al. 2023;
targeted free-energy perturbation with such maps: Wirnsberger et al. 2020). The forward direction
is closed form in every layer; the inverse uses root finding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bgexp.flows._space import as_space
from bgexp.flows.base import Flow, SequentialFlow
from bgexp.flows.nn import MoleculeTransformer
from bgexp.flows.rigid.rotation import ConvexRotation
from bgexp.flows.torus import CircularMixtureParams, smooth_circular_forward, smooth_circular_inverse
from bgexp.geometry import as_box, wrap_into_box
from bgexp.quaternions import to_matrix
from bgexp.spaces import Space, SpaceError

MOLECULE_FEATURES = 7  # c_x, c_y, c_z, q_w, q_x, q_y, q_z
UNIT_TOLERANCE = 1e-3  # accepted | |q| - 1 | of input quaternions


def _parse_axis(axis) -> int:
    names = {"x": 0, "y": 1, "z": 2}
    a = names.get(axis, axis) if isinstance(axis, str) else axis
    if a not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1, 2 or 'x', 'y', 'z', got {axis!r}")
    return int(a)


def _periodic_features(c: Tensor, box: Tensor) -> Tensor:
    """(sin, cos)(2 pi c_a / L_a) for the axes of c [..., A]: [..., 2 A], invariant under c_a -> c_a + L_a."""
    angle = (2.0 * math.pi) * c / box
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def split_configuration(owner, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """(c wrapped into [0, L) [B, N, 3], q [B, N, 4]) of x [B, 7N] after checking its shape, that it is
    finite and that | |q| - 1 | <= 1e-3; `owner` has `n_molecules`, `dim` and `box` (errors name its class)."""
    n, kind = owner.n_molecules, type(owner).__name__
    if x.dim() != 2 or x.shape[-1] != owner.dim:
        raise ValueError(f"{kind}(n_molecules={n}) expects {name} of shape [batch, 7N] = [batch, {owner.dim}] "
                         f"(per molecule c_x, c_y, c_z, q_w, q_x, q_y, q_z), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{kind} expects a floating point {name}, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{kind} got non-finite values in {name}")
    molecules = x.reshape(x.shape[0], n, MOLECULE_FEATURES)
    c, q = molecules[..., :3], molecules[..., 3:]
    deviation = (q.detach().norm(dim=-1) - 1.0).abs()
    bad = ~(deviation <= UNIT_TOLERANCE)
    if bool(bad.any()):
        sample, molecule = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{kind} expects unit quaternions in {name} (| |q| - 1 | <= {UNIT_TOLERANCE}): "
                         f"{int(bad.sum())} are not, e.g. molecule {molecule} of sample {sample} has "
                         f"|q| = {float(q[sample, molecule].detach().norm()):.6g}")
    return wrap_into_box(c, owner.box.to(x.dtype)), q


class _RigidBodyLayer(Flow):  # noqa: D101 - see RigidBodyFlow
    """Shared plumbing: configurations x [B, 7N] as centres c [B, N, 3] and quaternions q [B, N, 4]."""

    def __init__(self, n_molecules: int, box, anchor: bool = False):
        super().__init__()
        if int(n_molecules) != n_molecules or n_molecules < 1:
            raise ValueError(f"n_molecules must be an integer >= 1, got {n_molecules}")
        self.n_molecules = int(n_molecules)
        self.dim = MOLECULE_FEATURES * self.n_molecules
        self.register_buffer("box", as_box(box))
        self.anchor = bool(anchor)

    def relative(self, c: Tensor) -> Tensor:
        """Centres as the conditioners see them: relative to molecule 0 (wrapped) with an anchor,
        else as they are."""
        if not self.anchor:
            return c
        return wrap_into_box(c - c[:, :1], self.box.to(c.dtype))

    def split(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        return split_configuration(self, x, name)

    @staticmethod
    def join(c: Tensor, q: Tensor) -> Tensor:
        return torch.cat([c, q], dim=-1).flatten(-2)

    def _conditioner_input(self, features: Tensor) -> Tensor:
        return features.to(self.conditioner.head.weight.dtype)


class RotationCoupling(_RigidBodyLayer):
    """q_i <- ConvexRotation(q_i; theta_i), theta = conditioner(features of all centres); c unchanged.

    Features per molecule: (sin, cos)(2 pi c_{i,a} / L_a), a = x, y, z (6 numbers, periodic in the
    box), through a `MoleculeTransformer` to theta_i [N, ConvexRotation(n_components).n_params].
    Bijection: the centres pass through unchanged (after wrapping into the box), so the parameters
    theta are known from the output as well, and for fixed theta each q_i -> Phi_i(q_i) is a
    diffeomorphism of S^3 commuting with q -> -q (module docstring); the Jacobian in the chart
    (c, tangent coordinates of every q_i) is block triangular with identity blocks for c, so

        log|det| = sum_i log|det dPhi_i|_{T S^3}|     (ConvexRotation's tangent-space log-det).

    `forward` is the closed form; `inverse` inverts each Phi_i by ConvexRotation.inverse (root
    finding with implicit gradients) with the same theta. Raw theta = 0 (the zero-initialised
    head) gives |Phi_i(q) - q| <= 2 K init_weight (= 4e-3 for K = 2).
    """

    def __init__(self, n_molecules: int, box, n_components: int = 2, anchor: bool = False, **transformer_kwargs):
        super().__init__(n_molecules, box, anchor)
        self.rotation = ConvexRotation(n_components)
        self.conditioner = MoleculeTransformer(6, self.rotation.n_params, **transformer_kwargs)

    def _transform(self, x: Tensor, closed_form: bool, name: str) -> tuple[Tensor, Tensor]:
        c, q = self.split(x, name)
        features = _periodic_features(self.relative(c), self.box.to(x.dtype))
        theta = self.conditioner(self._conditioner_input(features)).to(x.dtype)
        q_out, logdet = (self.rotation.forward if closed_form else self.rotation.inverse)(q, theta)
        return self.join(c, q_out), logdet.sum(-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, True, "z")

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, False, "x")


class TranslationCoupling(_RigidBodyLayer):
    """c_{i,a} <- L_a/(2 pi) (F_i(2 pi c_{i,a}/L_a - pi) + pi) along one axis a; the rest unchanged.

    F_i is the smooth circular ramp mixture of bgexp/flows/torus.py on angles in [-pi, pi)
    (`smooth_circular_forward`: theta' = wrap(2 pi M((theta + pi)/2 pi) - pi + shift) with
    M(u) = c u + (1 - c) sum_k w_k R_k(u), M' >= c >= min_slope > 0), whose raw parameters
    [N, 4K + 2] come from a `MoleculeTransformer` on, per molecule, (sin, cos)(2 pi c_{i,b}/L_b) of
    the two other axes b != a and the nine entries of R(q_i) (13 numbers; R(-q) = R(q), so the
    layer commutes with q -> -q). c is first wrapped into [0, L) (c - L floor(c/L), derivative 1),
    so theta = 2 pi c_a / L_a - pi lies in [-pi, pi) and the output lies in [0, L_a).

    Bijection: the conditioner never sees coordinate a of any molecule, so its output is the same
    before and after the layer; for fixed parameters u -> M(u) is an increasing degree-one
    diffeomorphism of the circle (torus.py), hence each c_{i,a} -> c'_{i,a} is a diffeomorphism
    of the periodic interval [0, L_a). The Jacobian is triangular with diagonal
    dc'/dc = (L_a / 2 pi) F_i' (2 pi / L_a) = M_i'(u_i): the scale factors cancel and

        log|det| = sum_i log M_i'((theta_i + pi) / 2 pi).

    `forward` is the closed form; `inverse` uses `smooth_circular_inverse` (bisection-safeguarded
    Newton in float64, implicit gradients).

    Initialisation: at raw = 0, torus.py's mixture has floor c = (1 + min_slope)/2 and K evenly
    spread ramps, whose sum is not exactly linear (for K = 4 it moves angles by up to 0.01 rad, and
    by 0.28 rad for K = 2). A fixed (untrained) offset on the raw floor logit makes raw = 0 give
    the floor `init_floor` (default 0.9), so the zero-initialised head gives a map within
    (1 - init_floor)/(1 - (1 + min_slope)/2) of that deviation: nearer the identity, with the full
    range c in (min_slope, 1) still reachable.
    """

    def __init__(self, n_molecules: int, box, axis, n_components: int = 4, min_slope: float = 0.05,
                 init_floor: float = 0.9, anchor: bool = False, **transformer_kwargs):
        super().__init__(n_molecules, box, anchor)
        self.axis = _parse_axis(axis)
        self.others = [b for b in range(3) if b != self.axis]
        if int(n_components) != n_components or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {n_components}")
        if not 0.0 < min_slope < 1.0:
            raise ValueError(f"min_slope must be in (0, 1), got {min_slope}")
        if not min_slope < init_floor < 1.0:
            raise ValueError(f"init_floor must be in (min_slope, 1) = ({min_slope}, 1), got {init_floor}")
        self.n_components, self.min_slope, self.init_floor = int(n_components), float(min_slope), float(init_floor)
        n_raw = 4 * self.n_components + 2
        offset = torch.zeros(n_raw, dtype=torch.float64)
        fraction = (init_floor - min_slope) / (1.0 - min_slope)
        offset[4 * self.n_components] = math.log(fraction / (1.0 - fraction))  # sigmoid(offset) = fraction
        self.register_buffer("raw_offset", offset)
        self.conditioner = MoleculeTransformer(4 + 9, n_raw, **transformer_kwargs)

    def extra_repr(self) -> str:
        return (f"axis={'xyz'[self.axis]}, n_components={self.n_components}, min_slope={self.min_slope}, "
                f"init_floor={self.init_floor}")

    def _transform(self, x: Tensor, closed_form: bool, name: str) -> tuple[Tensor, Tensor]:
        c, q = self.split(x, name)
        box = self.box.to(x.dtype)
        rel = self.relative(c)
        rotation = to_matrix(q).flatten(-2)  # [B, N, 9], even in q
        features = torch.cat([_periodic_features(rel[..., self.others], box[self.others]), rotation], dim=-1)
        raw = self.conditioner(self._conditioner_input(features)).to(x.dtype) + self.raw_offset.to(x.dtype)
        params = CircularMixtureParams.from_raw(raw, self.n_components, self.min_slope)
        length, a = box[self.axis], self.axis
        theta = (2.0 * math.pi) * rel[..., a] / length - math.pi
        theta_out, logdet = (smooth_circular_forward if closed_form else smooth_circular_inverse)(theta, params)
        moved = length / (2.0 * math.pi) * (theta_out + math.pi)
        if self.anchor:  # molecule 0 stays; the others move relative to it
            moved = torch.cat([rel[:, :1, a], moved[:, 1:]], dim=1) + c[:, :1, a]
            logdet = logdet[:, 1:]
        c_axis = wrap_into_box(moved, length)
        c_out = torch.cat([c[..., :a], c_axis[..., None], c[..., a + 1:]], dim=-1)
        return self.join(c_out, q), logdet.sum(-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, True, "z")

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, False, "x")


class RigidBodyFlow(SequentialFlow):
    """A flow on (T^3 x S^3)^N, N rigid molecules in an orthorhombic periodic box (Köhler et al. 2023).

    x [B, 7N], molecule-major: (c_x, c_y, c_z, q_w, q_x, q_y, q_z) per molecule, c periodic with
    edge lengths `box` (nm), q a unit quaternion (q ~ -q). `n_blocks` times
    [RotationCoupling, TranslationCoupling(x), TranslationCoupling(y), TranslationCoupling(z)],
    each conditioned by its own `MoleculeTransformer(hidden, n_heads, n_layers)`. A composition of
    bijections is a bijection and log-dets add (w.r.t. Lebesgue measure on the box times the
    volume of S^3 per molecule). Every layer is permutation-equivariant in the molecules, commutes
    with q_i -> -q_i and is periodic in c, and so is the flow.

    `forward` (z -> x) is the closed form in every layer: differentiable to all orders in the inputs
    and parameters (use it to map samples of one thermodynamic state onto another, targeted FEP).
    `inverse` (x -> z) uses root finding in every layer (exact first derivatives; for evaluation).
    Inputs: c anywhere (wrapped), | |q| - 1 | <= 1e-3; outputs: c in [0, L), q unit (to rounding).

    `anchor=True` makes the flow equivariant under translating the whole system, F(x + t) = F(x) + t
    (with the log-det invariant): the conditioners see centres relative to molecule 0, the
    translation couplings move every other molecule relative to molecule 0, and molecule 0's centre
    is never changed (each layer stays triangular; permutation equivariance then holds among
    molecules 1..N-1). Needed when the energy is translation invariant and the samples fix the
    overall position (MD with the centre-of-mass motion removed): a map that is not equivariant
    learns to move the overall position on that slice, and estimators from the slice are biased
    (bgexp/training/tfep.py).
    """

    def __init__(self, n_molecules: int | None = None, box=None, n_blocks: int = 2, n_components_rotation: int = 2,
                 n_components_translation: int = 4, hidden: int = 64, n_heads: int = 4, n_layers: int = 2,
                 anchor: bool = False, space: Space | None = None):
        n_molecules, box = _molecules_and_box(n_molecules, box, space)
        if int(n_blocks) != n_blocks or n_blocks < 1:
            raise ValueError(f"n_blocks must be an integer >= 1, got {n_blocks}")
        kwargs = dict(hidden=hidden, n_heads=n_heads, n_layers=n_layers)
        layers: list[Flow] = []
        for _ in range(int(n_blocks)):
            layers.append(RotationCoupling(n_molecules, box, n_components_rotation, anchor=anchor, **kwargs))
            layers += [TranslationCoupling(n_molecules, box, axis, n_components_translation, anchor=anchor, **kwargs)
                       for axis in range(3)]
        super().__init__(layers)
        self.n_molecules = int(n_molecules)
        self.register_buffer("box", as_box(box))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        split_configuration(self, z, "z")
        return super().forward(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        split_configuration(self, x, "x")
        return super().inverse(x)


def _molecules_and_box(n_molecules, box, space: Space | None):
    """(n_molecules, box) as given, or from a rigid-body space (SpaceError where the space is not
    one, or disagrees with what is given)."""
    if space is None:
        if n_molecules is None or box is None:
            raise ValueError("RigidBodyFlow needs `n_molecules` and `box`, or a rigid-body `space`")
        return n_molecules, box
    space = as_space(space, "RigidBodyFlow")
    if not space.is_rigid_bodies:
        raise SpaceError(f"RigidBodyFlow expects a rigid-body space (molecules and a periodic box, "
                         f"{MOLECULE_FEATURES} numbers per molecule), got {space.describe()}")
    if space.dim != MOLECULE_FEATURES * space.molecules:
        raise SpaceError(f"RigidBodyFlow expects dim = {MOLECULE_FEATURES} x molecules = "
                         f"{MOLECULE_FEATURES * space.molecules}, got {space.describe()}")
    if len(space.box) not in (1, 3):
        raise SpaceError(f"RigidBodyFlow expects an orthorhombic box (3 edge lengths, or one for a cube), "
                         f"got {list(space.box)}")
    if n_molecules is not None and int(n_molecules) != space.molecules:
        raise SpaceError(f"RigidBodyFlow: n_molecules={n_molecules} does not match the space ({space.describe()})")
    if box is not None and not torch.equal(as_box(box), as_box(space.box)):
        raise SpaceError(f"RigidBodyFlow: box={box!r} does not match the space ({space.describe()})")
    return space.molecules, space.box


def rigid_body_flow(space: Space, n_blocks: int = 2, n_components_rotation: int = 2, n_components_translation: int = 4,
                    hidden: int = 64, n_heads: int = 4, n_layers: int = 2, anchor: bool = False) -> RigidBodyFlow:
    """RigidBodyFlow on a rigid-body space: molecules and box from the space (SpaceError otherwise)."""
    return RigidBodyFlow(n_blocks=n_blocks, n_components_rotation=n_components_rotation,
                         n_components_translation=n_components_translation, hidden=hidden, n_heads=n_heads,
                         n_layers=n_layers, anchor=anchor, space=space)


__all__ = ["MOLECULE_FEATURES", "UNIT_TOLERANCE", "RigidBodyFlow", "RotationCoupling", "TranslationCoupling",
           "rigid_body_flow", "split_configuration"]
