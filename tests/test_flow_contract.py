"""One contract suite for every flow of bgexp (bgexp/flows/base.py, docs: ARCHITECTURE.md "Contracts").

REGISTRY holds one entry per flow config in conf/flow/*.yaml (its `transform` node built on a small
test Space with small hidden sizes) and one per representation layer. Every entry is held to:

- inverse(forward(z)) == z (float32 and float64; angles and box coordinates compared on the circle);
- log|det dx/dz| of forward equal to the brute-force Jacobian (torch.autograd.functional.jacobian,
  slogdet) in float64 (angles: the Jacobian of the angle map itself; rigid bodies: in the chart of
  box coordinates and tangent spaces of S^3);
- forward log-det = -(inverse log-det at the image);
- shapes and dtype preserved; an input of the wrong width raises a ValueError naming [batch, dim].

Tolerances: analytic families 1e-5 (float32) / 1e-10 (float64); root finding 1e-9; ODE flows at
the solver tolerance. Parameters are perturbed away from the zero-initialised heads (which make
every coupling the identity) so that the checks see non-trivial maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

pytest.importorskip("hydra")
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bgexp import quaternions as Q  # noqa: E402
from bgexp.flows.base import AffineStandardization, Flow, InverseFlow, SequentialFlow, out_dim  # noqa: E402
from bgexp.flows.coordinates import BoundedTorsions, MixedCoordinates, ZMatrix  # noqa: E402
from bgexp.flows.realnvp import RealNVP  # noqa: E402
from bgexp.flows.representation import PCAWhitening  # noqa: E402
from bgexp.flows.splines import NeuralSpline  # noqa: E402
from bgexp.spaces import Space  # noqa: E402
from bgexp.training.assemble import build_transform  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "flow"
MIXED = (True, False, False, True, False, True)
BOX = (1.0, 1.1, 1.2)
BATCH = 3


@dataclass
class Case:
    """A flow of the contract suite: `yaml` (a conf/flow file whose transform node is built with
    `overrides`) or `build(space)`; the test `space`; `kind` sets the tolerances ("analytic",
    "root" or "ode"); `jacobian=False` where the brute-force log-det is another suite's job."""

    space: Space
    yaml: str | None = None
    overrides: dict = field(default_factory=dict)
    build: Callable[[Space], Flow] | None = None
    kind: str = "analytic"
    scale: float = 0.3
    jacobian: bool = True


def _correlated_data(dim: int, n: int = 50) -> torch.Tensor:
    """Data with a full-rank, non-diagonal covariance (to fit a PCA whitening on)."""
    g = torch.Generator().manual_seed(3)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64) + 2 * torch.eye(dim, dtype=torch.float64)
    return 1.5 + torch.randn(n, dim, generator=g, dtype=torch.float64) @ mixing


SMALL_COUPLINGS = {"n_couplings": 3, "hidden": [8, 8]}
REGISTRY: dict[str, Case] = {
    # one per conf/flow/*.yaml ---------------------------------------------------------------
    "realnvp": Case(Space(6), "realnvp", SMALL_COUPLINGS),
    "realnvp_ic": Case(Space(6), "realnvp_ic", SMALL_COUPLINGS),  # bounded torsions: no angles left
    "realnvp_pca": Case(Space(6), "realnvp_pca", SMALL_COUPLINGS),
    "nsf_ic": Case(Space(6), "nsf_ic", {**SMALL_COUPLINGS, "n_bins": 4}),
    "nsf_torus_ic": Case(Space(6, MIXED), "nsf_torus_ic", {**SMALL_COUPLINGS, "n_bins": 4}),
    "spline_torus": Case(Space(4, (True,) * 4), "spline_torus", {**SMALL_COUPLINGS, "n_bins": 4}),
    "smooth_ic": Case(Space(6, MIXED), "smooth_ic", {**SMALL_COUPLINGS, "n_components": 3}, kind="root"),
    "smooth_torus": Case(Space(4, (True,) * 4), "smooth_torus", {**SMALL_COUPLINGS, "n_components": 3},
                         kind="root"),
    "ecnf": Case(Space(6, particles=3, spatial_dim=2), "ecnf",
                 {"spatial_dim": 2, "hidden": 8, "n_layers": 2, "solver": "dopri5", "atol": 1e-9, "rtol": 1e-9},
                 kind="ode", scale=0.1),
    "rigid": Case(Space(14, molecules=2, box=BOX), "rigid",
                  {"n_blocks": 1, "hidden": 8, "n_heads": 2, "n_layers": 1, "n_components_translation": 2},
                  kind="root", scale=0.05),
    # representation layers --------------------------------------------------------------------
    "AffineStandardization": Case(Space(5), build=lambda s: AffineStandardization(
        s.dim, torch.linspace(-1.0, 2.0, s.dim), torch.linspace(0.5, 3.0, s.dim))),
    "PCAWhitening": Case(Space(5, (False, True, False, False, False)), build=lambda s: PCAWhitening(
        s.dim, s.circular_mask()).double().fit(_correlated_data(s.dim))),
    "BoundedTorsions": Case(Space(6), build=lambda s: BoundedTorsions(torch.tensor(MIXED))),
    "MixedCoordinates": Case(Space(9), build=lambda s: MixedCoordinates(
        ZMatrix.from_bonds(5, [(0, 1), (1, 2), (2, 3), (3, 4)], [0, 1, 2]), whiten=False), jacobian=False),
    "InverseFlow": Case(Space(5), build=lambda s: InverseFlow(RealNVP(s.dim, 2, (8,), "tanh", 2.0, "alternate"))),
    "SequentialFlow": Case(Space(6), build=lambda s: SequentialFlow([
        BoundedTorsions(torch.tensor(MIXED)), NeuralSpline(s.dim, 2, (8,), n_bins=4, split="half"),
        AffineStandardization(s.dim, torch.zeros(s.dim), torch.full((s.dim,), 2.0))])),
}
TOLERANCE = {  # (round trip float32, round trip float64, log-det float64)
    "analytic": (1e-5, 1e-10, 1e-6),
    "root": (1e-4, 1e-9, 1e-6),
    "ode": (1e-4, 1e-6, 1e-5),
}


def test_registry_covers_every_flow_config():
    configs = {p.stem for p in CONF.glob("*.yaml")}
    covered = {case.yaml for case in REGISTRY.values() if case.yaml is not None}
    assert configs, f"no flow configs in {CONF}"
    assert configs <= covered, f"flow configs without a contract-suite entry: {sorted(configs - covered)}"
    assert covered <= configs, f"registry entries for missing configs: {sorted(covered - configs)}"


# ---------------------------------------------------------------------------------------------
# building and inputs
# ---------------------------------------------------------------------------------------------

def transform_node(name: str, overrides: dict) -> dict:
    """The `transform` node of conf/flow/<name>.yaml, interpolations resolved, with the overrides
    of keys it has."""
    cfg = OmegaConf.create({"flow": OmegaConf.load(CONF / f"{name}.yaml")})
    node = OmegaConf.to_container(cfg.flow.transform, resolve=True)
    node.update({k: v for k, v in overrides.items() if k in node})
    return node


def build(name: str, dtype: torch.dtype) -> Flow:
    case = REGISTRY[name]
    torch.manual_seed(0)
    # the YAML's transform through the builder runs use (the factory is called with space=case.space)
    flow = build_transform(transform_node(case.yaml, case.overrides), case.space) if case.yaml else \
        case.build(case.space)
    flow = flow.to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the zero-initialised heads
        for _, p in sorted(flow.named_parameters()):
            p.add_(case.scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    flow.eval()
    return flow


def latent(name: str, flow: Flow, dtype: torch.dtype) -> torch.Tensor:
    """z [BATCH, dim] in the flow's domain: angles in [-pi, pi), rigid bodies in the box."""
    space, g = REGISTRY[name].space, torch.Generator().manual_seed(2)
    if name == "MixedCoordinates":  # features of a bent chain, bonds ~ 0.15
        steps = torch.randn(BATCH, 5, 3, generator=g, dtype=torch.float64)
        xyz = torch.cumsum(0.15 * steps / steps.norm(dim=-1, keepdim=True), dim=1)
        return flow.inverse(xyz.reshape(BATCH, -1).to(dtype))[0].detach()
    if space.is_rigid_bodies:
        c = torch.rand(BATCH, space.molecules, 3, generator=g, dtype=torch.float64) * torch.tensor(BOX)
        q = Q.random_unit((BATCH, space.molecules), generator=g, dtype=torch.float64)
        return torch.cat([c, q], -1).flatten(-2).to(dtype)
    z = torch.randn(BATCH, space.dim, generator=g, dtype=torch.float64)
    angles = (torch.rand(BATCH, space.dim, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    return torch.where(space.circular_mask(), angles, z).to(dtype)


def difference(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b, on the circle for angles and in the periodic box for rigid-body centres."""
    space = REGISTRY[name].space
    d = a - b
    if space.is_rigid_bodies:
        centre = torch.tensor([True] * 3 + [False] * 4).repeat(space.molecules)
        box = torch.cat([torch.tensor(BOX, dtype=d.dtype), torch.ones(4, dtype=d.dtype)]).repeat(space.molecules)
        return torch.where(centre, d - box * torch.round(d / box), d)
    if name == "MixedCoordinates":
        circular = REGISTRY[name].build(space).circular
    else:
        circular = space.circular_mask()
    return torch.where(circular, torch.remainder(d + math.pi, 2 * math.pi) - math.pi, d)


# ---------------------------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------------------------

NAMES = sorted(REGISTRY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_shapes_and_opposite_logdets(name, dtype):
    flow = build(name, dtype)
    z = latent(name, flow, dtype)
    x, ld_forward = flow.forward(z)
    assert x.shape == (BATCH, out_dim(flow)) and x.dtype == dtype
    assert ld_forward.shape == (BATCH,) and ld_forward.dtype == dtype
    assert torch.isfinite(x).all() and torch.isfinite(ld_forward).all()
    z_back, ld_inverse = flow.inverse(x)
    assert z_back.shape == z.shape and z_back.dtype == dtype and ld_inverse.shape == (BATCH,)
    tol32, tol64, _ = TOLERANCE[REGISTRY[name].kind]
    tol = tol32 if dtype == torch.float32 else tol64
    scale = max(1.0, float(z.abs().max()))
    assert float(difference(name, z_back, z).abs().max()) <= tol * scale
    assert float((ld_forward + ld_inverse).abs().max()) <= tol * max(1.0, float(ld_forward.abs().max()))


def _rigid_chart(flow: Flow, z: torch.Tensor, jac: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """B_out^T J B_in with B = blockdiag(I_3 for the centre, tangent basis of S^3) per molecule."""
    n = flow.n_molecules

    def basis(v: torch.Tensor) -> torch.Tensor:
        blocks = []
        for i in range(n):
            q = v[7 * i + 3:7 * i + 7]
            block = torch.zeros(7, 6, dtype=v.dtype)
            block[:3, :3] = torch.eye(3, dtype=v.dtype)
            block[3:, 3:] = Q.tangent_basis(q)
            blocks.append(block)
        return torch.block_diag(*blocks)

    return basis(x).T @ jac @ basis(z)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].jacobian])
def test_logdet_equals_brute_force_jacobian(name):
    flow = build(name, torch.float64)
    z = latent(name, flow, torch.float64)
    _, logdet = flow.forward(z)
    tol = TOLERANCE[REGISTRY[name].kind][2]
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: flow.forward(v[None])[0][0], z[b])
        if REGISTRY[name].space.is_rigid_bodies:
            jac = _rigid_chart(flow, z[b], jac, flow.forward(z[b:b + 1])[0][0].detach())
        sign, value = torch.linalg.slogdet(jac)
        assert float(sign) != 0.0
        assert float(value) == pytest.approx(float(logdet[b]), abs=tol)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_width_raises_a_named_error(name):
    flow = build(name, torch.float32)
    width_in, width_out = flow.dim, out_dim(flow)
    with pytest.raises(ValueError, match=rf"\[batch, {width_in}\]"):
        flow.forward(torch.zeros(2, width_in + 1))
    with pytest.raises(ValueError, match=rf"\[batch, {width_out}\]"):
        flow.inverse(torch.zeros(2, width_out + 1))


# ---------------------------------------------------------------------------------------------
# factories on a Space, priors from a Space, checkpoints of the per-family couplings
# ---------------------------------------------------------------------------------------------

def test_factories_take_what_they_need_from_the_space():
    from bgexp.flows.cnf import equivariant_cnf
    from bgexp.flows.realnvp import realnvp
    from bgexp.flows.rigid import rigid_body_flow
    from bgexp.flows.splines import neural_spline
    from bgexp.flows.torus import smooth_torus

    assert realnvp(Space(4), n_couplings=2, hidden=(4,)).dim == 4
    spline = neural_spline(Space(4, (True, False, False, True)), n_couplings=2, hidden=(4,))
    assert spline.circular.tolist() == [True, False, False, True]
    smooth = smooth_torus(Space(3, (False, True, True)), n_couplings=2, hidden=(4,), n_components=2)
    assert smooth.layers[0].circular.tolist() == [False, True, True]
    cnf = equivariant_cnf(Space(8, particles=4, spatial_dim=2), hidden=4, n_layers=1)
    assert (cnf.n_particles, cnf.spatial_dim) == (4, 2)
    rigid = rigid_body_flow(Space(21, molecules=3, box=BOX), n_blocks=1, hidden=4, n_heads=2, n_layers=1)
    assert rigid.n_molecules == 3 and rigid.box.tolist() == list(BOX)


def test_a_family_that_cannot_act_on_the_space_raises_a_space_error():
    from bgexp.flows.cnf import equivariant_cnf
    from bgexp.flows.realnvp import realnvp
    from bgexp.flows.rigid import rigid_body_flow
    from bgexp.flows.splines import neural_spline
    from bgexp.spaces import SpaceError

    rigid_space = Space(14, molecules=2, box=BOX)
    with pytest.raises(SpaceError, match="without circular features"):
        realnvp(Space(4, (True, False, False, False)))
    with pytest.raises(SpaceError, match="rigid"):
        realnvp(rigid_space)
    with pytest.raises(SpaceError, match="rigid"):
        neural_spline(rigid_space)
    with pytest.raises(SpaceError, match="particle space"):
        equivariant_cnf(Space(6))
    with pytest.raises(SpaceError, match="spatial_dim=3"):
        equivariant_cnf(Space(6, particles=3, spatial_dim=2), spatial_dim=3)
    with pytest.raises(SpaceError, match="rigid-body space"):
        rigid_body_flow(Space(14))
    with pytest.raises(SpaceError, match="bgexp.spaces.Space"):
        realnvp("not a space")


def test_priors_from_a_space():
    from bgexp.flows.priors import MeanFreeNormalPrior, NormalPrior, TorusPrior
    from bgexp.spaces import SpaceError

    assert NormalPrior(space=Space(3)).dim == 3
    torus = TorusPrior(space=Space(3, (True, False, True)))
    assert torus.circular.tolist() == [True, False, True]
    assert torus.log_prob(torus.sample(4)).shape == (4,)
    prior = instantiate({"_target_": "bgexp.flows.MeanFreeNormalPrior"}, space=Space(6, particles=3, spatial_dim=2))
    assert (prior.n_particles, prior.spatial_dim, prior.dim) == (3, 2, 6)
    assert MeanFreeNormalPrior(dim=6, spatial_dim=3).n_particles == 2  # the old arguments still work
    with pytest.raises(SpaceError, match="particle space"):
        MeanFreeNormalPrior(space=Space(6))
    with pytest.raises(SpaceError, match="without circular features"):
        NormalPrior(space=Space(3, (True, False, True)))
    with pytest.raises(SpaceError, match="circular"):
        TorusPrior(circular=[True, True, True], space=Space(3, (True, False, True)))


@pytest.mark.parametrize("family", ["realnvp", "spline", "smooth"])
def test_checkpoints_of_the_per_family_couplings_still_load(family):
    """Before the one coupling, AffineCoupling saved `kept` and `changed`, SplineCoupling and
    SmoothCoupling their index buffers; they load strictly into the one coupling."""
    from bgexp.flows.torus import SmoothTorusFlow

    torch.manual_seed(0)
    flow = {"realnvp": lambda: RealNVP(5, 2, (4,), split="alternate"),
            "spline": lambda: NeuralSpline(5, 2, (4,), n_bins=3, circular=[True, False, True, False, False]),
            "smooth": lambda: SmoothTorusFlow(5, 2, (4,), n_components=2)}[family]()
    state = flow.state_dict()
    for k, layer in enumerate(flow.layers):
        mask, circular = state.pop(f"layers.{k}.mask"), state[f"layers.{k}.circular"]
        if family == "realnvp":
            state.pop(f"layers.{k}.circular")
            state[f"layers.{k}.kept"], state[f"layers.{k}.changed"] = layer.kept_linear, layer.changed_linear
        else:
            state[f"layers.{k}.mask"] = mask
            for name in ("kept_linear", "kept_circular", "changed_linear", "changed_circular"):
                state[f"layers.{k}.{name}"] = getattr(layer, name)
    torch.manual_seed(1)
    fresh = type(flow)(5, 2, (4,), **({"n_bins": 3, "circular": [True, False, True, False, False]}
                                      if family == "spline" else {"n_components": 2} if family == "smooth"
                                      else {"split": "alternate"}))
    fresh.load_state_dict(state, strict=True)
    for a, b in zip(fresh.layers, flow.layers):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.changed_circular, b.changed_circular)
    z = torch.rand(3, 5) * 2 - 1
    assert torch.equal(fresh.inverse(z)[0], flow.inverse(z)[0])
