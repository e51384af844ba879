"""DimerTarget against the definition in ../shared/SYSTEMS.md, section 1.

Expected values are computed here by hand or by an independent plain-Python implementation
(`reference_potential`), never by calling the target's own code.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bgexp.targets import DimerTarget

N = 38
FAR = 1000.0  # spacing at which (1.1 / r)^12 ~ 3e-36: repulsion negligible


@pytest.fixture(scope="module")
def target() -> DimerTarget:
    return DimerTarget()


def reference_potential(x: list[float]) -> float:
    """SYSTEMS.md section 1, written out with a plain double loop over particles."""
    p = [(x[2 * i], x[2 * i + 1]) for i in range(N)]
    rep = 0.0
    for i in range(N):
        for j in range(i + 1, N):
            if (i, j) == (0, 1):
                continue
            r = math.hypot(p[i][0] - p[j][0], p[i][1] - p[j][1])
            rep += 1.0 * (1.1 / r) ** 12
    restraint = 20.0 * ((p[0][0] + p[1][0]) ** 2 + p[0][1] ** 2 + p[1][1] ** 2)
    d = math.hypot(p[0][0] - p[1][0], p[0][1] - p[1][1])
    s = 2.0 * (d - 1.5)
    dimer = -0.5 * s - 25.0 * s**2 + 10.0 * s**4
    box = sum(2.0 * 100.0 * max(0.0, abs(c) - 3.0) ** 2 for c in x)
    return rep + restraint + dimer + box


def far_apart(d: float = 1.5) -> torch.Tensor:
    """Dimer centred on the x axis at distance d; solvent on a grid of spacing FAR, far from
    each other and from the dimer (well outside the box: use only with the non-box terms)."""
    x = torch.zeros(N, 2, dtype=torch.float64)
    x[0, 0], x[1, 0] = -d / 2, d / 2
    for k, (a, b) in enumerate(itertools.product(range(6), range(6))):
        x[2 + k] = torch.tensor([FAR * (a + 1), FAR * (b + 1)], dtype=torch.float64)
    return x


def inside_box(d: float = 1.5) -> torch.Tensor:
    """Dimer at distance d on the x axis, solvent on a 6 x 6 grid (spacing 1.1) inside the box."""
    x = torch.zeros(N, 2, dtype=torch.float64)
    x[0, 0], x[1, 0] = -d / 2, d / 2
    xs = [-2.75, -1.65, -0.55, 0.55, 1.65, 2.75]
    ys = [-2.9, -1.8, -0.9, 0.9, 1.8, 2.9]
    for k, (a, b) in enumerate(itertools.product(xs, ys)):
        x[2 + k] = torch.tensor([a, b], dtype=torch.float64)
    return x


def batch(*configs: torch.Tensor) -> torch.Tensor:
    return torch.stack([c.reshape(-1) for c in configs])


def well_separated(n: int, seed: int) -> torch.Tensor:
    """Random configurations: the in-box grid jittered by 0.15, dimer at a random distance,
    a few coordinates pushed through the walls."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        d = 0.8 + 1.5 * torch.rand((), generator=g, dtype=torch.float64).item()
        x = inside_box(d) + 0.15 * torch.randn(N, 2, generator=g, dtype=torch.float64)
        x[2:] = x[2:].clamp(-2.95, 2.95)
        if k % 2 == 1:
            x[2 + k, 0] = 3.0 + 0.4 * k / n  # through the +x wall
            x[30, 1] = -3.2
        out.append(x.reshape(-1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# the whole potential against an independent implementation


def test_potential_matches_independent_double_loop(target):
    x = well_separated(6, seed=0)
    expected = torch.tensor([reference_potential(row.tolist()) for row in x], dtype=torch.float64)
    got = target.potential(x)
    assert got.dtype == torch.float64 and got.shape == (6,)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # the configurations exercise every term: the odd ones sit partly outside the box
    assert (target.box(x[1::2]) > 1.0).all() and (target.box(x[0::2]) == 0).all()


def test_potential_matches_reference_in_float32(target):
    x = well_separated(4, seed=1)
    expected = torch.tensor([reference_potential(row.tolist()) for row in x], dtype=torch.float64)
    got = target.potential(x.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_initial_configurations_match_reference(target):
    for state in ("closed", "open"):
        x = target.initial_configurations(state, 2, generator=torch.Generator().manual_seed(0)).double()
        expected = torch.tensor([reference_potential(row.tolist()) for row in x], dtype=torch.float64)
        torch.testing.assert_close(target.potential(x), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# each term on hand-made configurations


@pytest.mark.parametrize("r", [0.9, 1.1, 1.3, 2.0])
def test_repulsion_of_one_close_pair(target, r):
    x = far_apart()
    x[0] = torch.tensor([-5000.0, -5000.0], dtype=torch.float64)  # the dimer out of the way too
    x[1] = torch.tensor([-9000.0, -5000.0], dtype=torch.float64)
    x[5] = x[4] + torch.tensor([r * 0.6, r * 0.8], dtype=torch.float64)  # particles 4 and 5 at distance r
    expected = (1.1 / r) ** 12
    torch.testing.assert_close(target.repulsion(batch(x)), torch.tensor([expected], dtype=torch.float64))


def test_dimer_pair_is_excluded_from_repulsion(target):
    x = far_apart(d=0.5)  # the dimer itself at 0.5: (1.1/0.5)^12 ~ 1.3e4 if it were counted
    assert target.repulsion(batch(x)).item() < 1e-20
    # ... but the dimer particles repel the solvent: particle 2 at 0.5 from particle 0
    y = x.clone()
    y[2] = y[0] + torch.tensor([0.0, 0.5], dtype=torch.float64)
    r12 = math.hypot(0.5, 0.5)  # particle 2 to particle 1
    expected = (1.1 / 0.5) ** 12 + (1.1 / r12) ** 12
    torch.testing.assert_close(target.repulsion(batch(y)), torch.tensor([expected], dtype=torch.float64))


def test_repulsion_counts_each_pair_once(target):
    x = far_apart()
    x[0] = torch.tensor([-5000.0, -5000.0], dtype=torch.float64)
    x[1] = torch.tensor([-9000.0, -5000.0], dtype=torch.float64)
    # three solvent particles on a line, spacing 1.0: pairs at 1, 1, 2
    x[3] = x[2] + torch.tensor([1.0, 0.0], dtype=torch.float64)
    x[4] = x[2] + torch.tensor([2.0, 0.0], dtype=torch.float64)
    expected = 2 * 1.1**12 + (1.1 / 2.0) ** 12
    torch.testing.assert_close(target.repulsion(batch(x)), torch.tensor([expected], dtype=torch.float64))


def test_restraint_with_displaced_dimer(target):
    x = far_apart()
    x[0] = torch.tensor([0.3, 0.1], dtype=torch.float64)
    x[1] = torch.tensor([0.5, -0.2], dtype=torch.float64)
    # 20 * [(0.3 + 0.5)^2 + 0.1^2 + 0.2^2] = 20 * (0.64 + 0.01 + 0.04) = 13.8
    torch.testing.assert_close(target.restraint(batch(x)), torch.tensor([13.8], dtype=torch.float64))
    centred = far_apart(d=1.7)
    assert target.restraint(batch(centred)).item() == 0.0


@pytest.mark.parametrize(
    "d, expected",
    [
        (1.5, 0.0),  # s = 0
        (1.0, 0.5 - 25.0 + 10.0),  # s = -1: -14.5
        (2.0, -0.5 - 25.0 + 10.0),  # s = +1: -15.5
        (0.5, 1.0 - 100.0 + 160.0),  # s = -2: 61
        (2.5, -1.0 - 100.0 + 160.0),  # s = +2: 59
    ],
)
def test_double_well_values(target, d, expected):
    x = far_apart(d)
    torch.testing.assert_close(target.double_well(batch(x)), torch.tensor([expected], dtype=torch.float64))
    # the dimer well does not depend on the orientation of the dimer
    y = far_apart()
    y[0] = torch.tensor([0.0, -d / 2], dtype=torch.float64)
    y[1] = torch.tensor([0.0, d / 2], dtype=torch.float64)
    torch.testing.assert_close(target.double_well(batch(y)), torch.tensor([expected], dtype=torch.float64))


def test_double_well_minima_and_barrier(target):
    d = torch.linspace(0.5, 2.5, 20001, dtype=torch.float64)
    configs = torch.zeros(len(d), N * 2, dtype=torch.float64)
    configs[:, 0], configs[:, 2] = -d / 2, d / 2
    u = target.double_well(configs)
    closed, open_ = d < 1.5, d >= 1.5
    d_closed = d[closed][u[closed].argmin()].item()
    d_open = d[open_][u[open_].argmin()].item()
    assert abs(d_closed - 0.94) < 0.01 and abs(d_open - 2.06) < 0.01
    barrier_closed = -u[closed].min().item()  # U(1.5) = 0
    barrier_open = -u[open_].min().item()
    assert 14.5 < barrier_closed < 16.5 and 14.5 < barrier_open < 16.5
    assert abs(0.5 * (barrier_closed + barrier_open) - 15.6) < 0.2


@pytest.mark.parametrize(
    "particle, coord, value",
    [(7, 0, 3.5), (7, 0, -3.5), (7, 1, 3.5), (7, 1, -3.5), (0, 0, -3.5), (1, 1, 3.5)],
    ids=["+x", "-x", "+y", "-y", "dimer0-x", "dimer1+y"],
)
def test_box_wall_each_side_counted_once(target, particle, coord, value):
    x = inside_box()
    assert target.box(batch(x)).item() == 0.0
    x[particle, coord] = value
    # 2 * k_box * (|c| - l)^2 = 2 * 100 * 0.5^2 = 50, once (not twice as in the TF code)
    torch.testing.assert_close(target.box(batch(x)), torch.tensor([50.0], dtype=torch.float64))


def test_box_wall_adds_up_and_is_zero_inside(target):
    x = inside_box()
    x[10] = torch.tensor([2.999, -3.0], dtype=torch.float64)  # at or inside the wall: no energy
    assert target.box(batch(x)).item() == 0.0
    x[10] = torch.tensor([3.2, -3.3], dtype=torch.float64)
    x[20, 0] = -4.0
    expected = 200.0 * (0.2**2 + 0.3**2 + 1.0**2)  # 2 * 100 * sum of squared excess
    torch.testing.assert_close(target.box(batch(x)), torch.tensor([expected], dtype=torch.float64))


def test_box_wall_enters_the_total_once(target):
    """Move a solvent particle through the +x wall where it is far from the rest: the total
    changes by the wall term (counted once) plus the computed change of its repulsion."""
    x = inside_box()
    y = x.clone()
    y[2 + 33, 0] = 3.5  # the grid point (2.75, 0.9) moved to (3.5, 0.9)
    delta = target.potential(batch(y)) - target.potential(batch(x))
    rep_change = sum(
        (1.1 / math.dist(y[2 + 33].tolist(), y[j].tolist())) ** 12
        - (1.1 / math.dist(x[2 + 33].tolist(), x[j].tolist())) ** 12
        for j in range(N)
        if j != 2 + 33
    )
    assert abs(rep_change) > 0.1  # the repulsion changed too
    torch.testing.assert_close(delta, torch.tensor([50.0 + rep_change], dtype=torch.float64))


def test_hand_made_total(target):
    """Dimer at d = 1.0 centred (restraint 0, well -14.5), solvent far apart (repulsion ~0) but
    outside the box: the wall term is sum over solvent coordinates of 200 (|c| - 3)^2."""
    x = far_apart(d=1.0)
    wall = sum(200.0 * (abs(c) - 3.0) ** 2 for c in x[2:].reshape(-1).tolist())
    expected = -14.5 + wall
    torch.testing.assert_close(target.potential(batch(x)), torch.tensor([expected], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# temperature, forces, observables, states, shapes


def test_temperature_scales_the_energy():
    x = well_separated(3, seed=2)
    u1 = DimerTarget().energy(x)
    torch.testing.assert_close(u1, DimerTarget().potential(x))
    torch.testing.assert_close(DimerTarget(temperature=2.0).energy(x), 0.5 * u1)
    torch.testing.assert_close(DimerTarget(temperature=0.5).energy(x), 2.0 * u1)
    with pytest.raises(ValueError, match="temperature"):
        DimerTarget(temperature=0.0)


def test_autograd_forces_match_central_differences(target):
    x = well_separated(2, seed=3)
    x.requires_grad_(True)
    forces = -torch.autograd.grad(target.energy(x).sum(), x)[0]
    h = 1e-6
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    fd = []
    with torch.no_grad():
        for row in x.detach():
            plus = target.energy(row + h * eye)
            minus = target.energy(row - h * eye)
            fd.append(-(plus - minus) / (2 * h))
    fd = torch.stack(fd)
    assert forces.abs().max() > 1.0  # non-trivial forces
    scale = forces.abs().max()
    torch.testing.assert_close(forces, fd, rtol=1e-6, atol=1e-6 * scale)


def test_dimer_distance_and_states(target):
    x = batch(far_apart(1.0), far_apart(1.4999), far_apart(1.5), far_apart(2.2))
    y = far_apart()
    y[0] = torch.tensor([0.3, 0.4], dtype=torch.float64)
    y[1] = torch.tensor([-0.3, -0.4], dtype=torch.float64)  # d = 1.0 along a diagonal
    x = torch.cat([x, batch(y)])
    torch.testing.assert_close(
        target.dimer_distance(x), torch.tensor([1.0, 1.4999, 1.5, 2.2, 1.0], dtype=torch.float64)
    )
    assert target.observables["dimer_distance"](x).shape == (5,)
    assert target.states["closed"](x).tolist() == [True, True, False, False, True]
    assert target.states["open"](x).tolist() == [False, False, True, True, False]
    assert list(target.states) == ["closed", "open"]
    assert target.state_of(x).tolist() == [0, 0, 1, 1, 0]


def test_dimension_and_bad_shapes(target):
    assert target.dim == 76
    with pytest.raises(ValueError, match=r"\[batch, 76\]"):
        target.energy(torch.zeros(3, 75))
    with pytest.raises(ValueError, match=r"\[batch, 76\]"):
        target.energy(torch.zeros(76))
    with pytest.raises(ValueError, match=r"\[batch, 76\]"):
        target.energy(torch.zeros(2, 38, 2))
    with pytest.raises(ValueError, match="state"):
        target.initial_configurations("half-open", 2)


def test_a_modified_dimer_has_no_reference_instead_of_a_wrong_one():
    """The shipped reference belongs to the standard system: another spring, box or state boundary
    must not be scored against it (it is looked up by temperature only otherwise)."""
    from bgexp.targets import DimerTarget

    assert "closed->open" in DimerTarget().reference.delta_f
    assert "closed->open" in DimerTarget(temperature=2.0).reference.delta_f
    for changed in ({"k_dimer": 5.0}, {"box_half_length": 4.0}, {"d_transition": 1.4}, {"eps": 2.0}):
        assert DimerTarget(**changed).reference is None, changed
    assert DimerTarget(temperature=0.7).reference is None  # no reference at that temperature
