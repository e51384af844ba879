"""ODE integration for continuous flows, behind one small interface (torchdyn underneath).

    integrator = ODEIntegrator(solver="dopri5", atol=1e-5, rtol=1e-5)
    x1 = integrator.integrate(f, x0, t0=0.0, t1=1.0)       # dx/dt = f(t, x) from t0 to t1

The direction of time is explicit: a flow's forward map integrates from t0 = 0 to t1 = 1, its
inverse from 1 to 0 with the same field. Solvers:

- fixed step (`steps` steps of size (t1 - t0) / steps): "euler" (order 1), "midpoint" (order 2),
  "rk4" (order 4);
- adaptive (error per step below atol + rtol |x|): "tsit5" (Tsitouras 5(4)), "dopri5"
  (Dormand-Prince 5(4)).

torchdyn 1.0.6's fixed-step "rk4" is first order on time-dependent fields: its stages evaluate the
field at t + c[0] dt, t + c[1] dt, t + c[2] dt with the nodes c = (0, 1/2, 1/2, 1), i.e. at
t, t + dt/2, t + dt/2 instead of t + dt/2, t + dt/2, t + dt (an off-by-one in the node index; on
an autonomous field the nodes do not matter, which is why it looks fourth order there). It is not
exposed: "rk4" here is `ClassicalRK4`, the same tableau with the right nodes, passed to torchdyn's
odeint as a solver object (tests/test_integrators.py measures both).

Safety: every evaluation of the field is counted (`nfe`); a non-finite state or field, or more than
`max_nfe` evaluations in one solve (an adaptive step size that keeps shrinking), raises
`ODESolverError` with the time reached, instead of running on or hanging.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Field = Callable[[Tensor, Tensor], Tensor]
FIXED_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}  # solver -> order
ADAPTIVE = ("tsit5", "dopri5")


class ODESolverError(RuntimeError):
    """The ODE solve blew up (non-finite values) or exceeded its budget of field evaluations."""


def _torchdyn():
    try:
        from torchdyn.numerics import odeint
        from torchdyn.numerics.solvers.ode import RungeKutta4
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "continuous flows need torchdyn, installed without its declared dependencies (they pull "
            "torchvision, which breaks `import lightning` next to the CPU torch): "
            "`pip install --no-deps torchdyn==1.0.6` (see README, Install)"
        ) from err
    return odeint, RungeKutta4


def classical_rk4_class():
    """`ClassicalRK4`: torchdyn's RungeKutta4 stepper with the stage times t + c_i dt, c = (0, 1/2, 1/2, 1)."""
    _, RungeKutta4 = _torchdyn()

    class ClassicalRK4(RungeKutta4):
        def step(self, f, x, t, dt, k1=None, args=None):
            c, a, b, _ = self.tableau
            if k1 is None:
                k1 = f(t, x)
            k2 = f(t + c[1] * dt, x + dt * (a[0] * k1))
            k3 = f(t + c[2] * dt, x + dt * (a[1][0] * k1 + a[1][1] * k2))
            k4 = f(t + c[3] * dt, x + dt * (a[2][0] * k1 + a[2][1] * k2 + a[2][2] * k3))
            return None, x + dt * (b[0] * k1 + b[1] * k2 + b[2] * k3 + b[3] * k4), None

    return ClassicalRK4


class ODEIntegrator:
    """Integrate dx/dt = f(t, x) between two times (see the module docstring)."""

    def __init__(self, solver: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5, steps: int = 20,
                 max_nfe: int = 100_000):
        if solver not in FIXED_STEP and solver not in ADAPTIVE:
            raise ValueError(f"unknown ODE solver {solver!r}; choose one of {sorted(FIXED_STEP) + list(ADAPTIVE)}")
        if solver in FIXED_STEP and int(steps) < 1:
            raise ValueError(f"a fixed-step solver needs steps >= 1, got {steps}")
        if solver in ADAPTIVE and not (atol > 0 and rtol > 0):
            raise ValueError(f"adaptive solvers need atol > 0 and rtol > 0, got {atol}, {rtol}")
        if max_nfe < 1:
            raise ValueError(f"max_nfe must be >= 1, got {max_nfe}")
        self.solver, self.atol, self.rtol = solver, float(atol), float(rtol)
        self.steps, self.max_nfe = int(steps), int(max_nfe)
        self.nfe = 0  # field evaluations of the last solve

    @property
    def order(self) -> int | None:
        return FIXED_STEP.get(self.solver)

    def _solver_argument(self, dtype: torch.dtype):
        if self.solver == "rk4":
            return classical_rk4_class()(dtype=dtype)
        return self.solver

    def integrate(self, f: Field, x0: Tensor, t0: float, t1: float) -> Tensor:
        """x(t1) for x(t0) = x0 (t1 < t0 integrates backwards in time)."""
        odeint, _ = _torchdyn()
        self.nfe = 0

        def counted(t: Tensor, x: Tensor) -> Tensor:
            self.nfe += 1
            if self.nfe > self.max_nfe:
                raise ODESolverError(
                    f"{self.solver}: more than {self.max_nfe} field evaluations between t = {t0} and {t1} "
                    f"(reached t = {float(t):.6g}); the step size keeps shrinking: the field is too stiff for "
                    f"atol={self.atol:g}, rtol={self.rtol:g}, or it blows up"
                )
            if not torch.isfinite(x).all():
                raise ODESolverError(f"{self.solver}: non-finite state at t = {float(t):.6g} (integrating {t0} -> {t1})")
            dx = f(t, x)
            if not torch.isfinite(dx).all():
                raise ODESolverError(f"{self.solver}: non-finite vector field at t = {float(t):.6g}")
            return dx

        if self.solver in FIXED_STEP:
            t_span = torch.linspace(float(t0), float(t1), self.steps + 1, dtype=x0.dtype, device=x0.device)
            _, xs = odeint(counted, x0, t_span, solver=self._solver_argument(x0.dtype))
        else:
            t_span = torch.tensor([float(t0), float(t1)], dtype=x0.dtype, device=x0.device)
            _, xs = odeint(counted, x0, t_span, solver=self.solver, atol=self.atol, rtol=self.rtol)
        x1 = xs[-1]
        if not torch.isfinite(x1).all():
            raise ODESolverError(f"{self.solver}: non-finite state at t = {t1}")
        return x1
