"""The ODE integrator interface: orders of convergence, torchdyn's rk4 defect, blow-ups, direction of time."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchdyn", reason="torchdyn is installed with `pip install --no-deps torchdyn==1.0.6`")

from bgexp.flows.integrators import FIXED_STEP, ODEIntegrator, ODESolverError  # noqa: E402


def time_dependent(t, x):
    """dx/dt = cos(t) x + sin(t): a field whose stages must be evaluated at the right times."""
    return torch.cos(t) * x + torch.sin(t)


def exact(t1: float, x0: float = 1.0) -> float:
    """x(t) = exp(sin t) (x0 + int_0^t sin(s) exp(-sin s) ds), the integral by Simpson's rule."""
    s = torch.linspace(0.0, t1, 20001, dtype=torch.float64)
    g = torch.sin(s) * torch.exp(-torch.sin(s))
    h = t1 / 20000
    integral = h / 3 * (g[0] + g[-1] + 4 * g[1:-1:2].sum() + 2 * g[2:-1:2].sum())
    return math.exp(math.sin(t1)) * (x0 + float(integral))


X0 = torch.ones(3, 1, dtype=torch.float64)
T1 = 2.0


@pytest.mark.parametrize("solver, order", sorted(FIXED_STEP.items()))
def test_fixed_step_solvers_reach_their_order(solver, order):
    reference = exact(T1)
    errors = []
    for steps in (16, 32, 64, 128):
        x1 = ODEIntegrator(solver, steps=steps).integrate(time_dependent, X0, 0.0, T1)
        errors.append(abs(float(x1[0, 0]) - reference))
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(3)]
    assert min(observed[1:]) > order - 0.15 and observed[-1] < order + 0.5, (solver, observed, errors)


def test_torchdyn_rk4_as_shipped_is_first_order_on_a_time_dependent_field():
    """The defect this interface works around (see bgexp/flows/integrators.py)."""
    from torchdyn.numerics import odeint

    reference = exact(T1)
    errors = []
    for steps in (16, 32, 64):
        _, xs = odeint(time_dependent, X0, torch.linspace(0, T1, steps + 1, dtype=torch.float64), solver="rk4")
        errors.append(abs(float(xs[-1, 0, 0]) - reference))
    assert math.log2(errors[0] / errors[1]) < 1.3 and math.log2(errors[1] / errors[2]) < 1.3


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
def test_adaptive_solvers_meet_their_tolerance(solver):
    reference = exact(T1)
    previous = math.inf
    for tol in (1e-4, 1e-6, 1e-8):
        integrator = ODEIntegrator(solver, atol=tol, rtol=tol)
        error = abs(float(integrator.integrate(time_dependent, X0, 0.0, T1)[0, 0]) - reference)
        assert error < 50 * tol and error < previous
        assert integrator.nfe > 0
        previous = error


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_integrating_back_in_time_returns_the_start(solver):
    integrator = ODEIntegrator(solver, steps=200, atol=1e-9, rtol=1e-9)
    x1 = integrator.integrate(time_dependent, X0, 0.0, T1)
    back = integrator.integrate(time_dependent, x1, T1, 0.0)
    assert torch.allclose(back, X0, atol=1e-6)


def test_blow_ups_are_errors_not_hangs():
    def explodes(t, x):  # dx/dt = x^2: x = 1 / (1 - t) is infinite at t = 1
        return x * x

    with pytest.raises(ODESolverError, match="non-finite|field evaluations"):
        ODEIntegrator("dopri5", atol=1e-8, rtol=1e-8, max_nfe=20_000).integrate(explodes, X0, 0.0, 2.0)
    with pytest.raises(ODESolverError, match="non-finite"):
        ODEIntegrator("euler", steps=100).integrate(explodes, X0, 0.0, 2.0)
    with pytest.raises(ODESolverError, match="field evaluations"):
        ODEIntegrator("dopri5", max_nfe=10).integrate(time_dependent, X0, 0.0, T1)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown ODE solver"):
        ODEIntegrator("rk45")
    with pytest.raises(ValueError, match="steps"):
        ODEIntegrator("rk4", steps=0)
    with pytest.raises(ValueError, match="atol"):
        ODEIntegrator("dopri5", atol=0.0)
