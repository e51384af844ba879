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

Sensitivity: "autograd" backpropagates through the solver's operations (exact gradients of the
discrete solve; memory grows with the number of steps). "adjoint" (Chen et al., NeurIPS 2018)
keeps only x(t1) and, in the backward pass, integrates the adjoint state a = dL/dx and the
parameter gradient backwards in time,

    da/dt = -a^T df/dx,   dL/dtheta = -int_{t1}^{t0} a^T df/dtheta dt,

with the same solver and tolerances (torchdyn's adjoint, `torchdyn.numerics.sensitivity`; torchdyn's
`ODEProblem` wrapper is not used because torchdyn.core imports the legacy `pytorch_lightning`
package). Memory does not grow with the steps; the gradients match autograd's up to the solver
error. The field must then be an `nn.Module`, every parameter of which reaches its output.

Safety: every evaluation of the field is counted (`nfe`); a non-finite state or field, or more than
`max_nfe` evaluations in one solve (an adaptive step size that keeps shrinking), raises
`ODESolverError` with the time reached, instead of running on or hanging.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

Field = Callable[[Tensor, Tensor], Tensor]
FIXED_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}  # solver -> order
ADAPTIVE = ("tsit5", "dopri5")
SENSITIVITIES = ("autograd", "adjoint")


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


class _ForwardTimeModule(nn.Module):
    """The field in the time s = sign (t - t0), which increases along the solve: dx/ds =
    sign f(t0 + sign s, x), called through the integrator's counting and finiteness checks.
    torchdyn's adjoint assumes increasing time; this makes a backwards solve (a flow's inverse)
    an ordinary forward one."""

    def __init__(self, field: nn.Module, counted: Field, t0: float, sign: float):
        super().__init__()
        self.field = field
        self._counted, self.t0, self.sign = counted, float(t0), float(sign)

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        return self.sign * self._counted(self.t0 + self.sign * s, x)


class ODEIntegrator:
    """Integrate dx/dt = f(t, x) between two times (see the module docstring)."""

    def __init__(self, solver: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5, steps: int = 20,
                 max_nfe: int = 100_000, sensitivity: str = "autograd"):
        if solver not in FIXED_STEP and solver not in ADAPTIVE:
            raise ValueError(f"unknown ODE solver {solver!r}; choose one of {sorted(FIXED_STEP) + list(ADAPTIVE)}")
        if solver in FIXED_STEP and int(steps) < 1:
            raise ValueError(f"a fixed-step solver needs steps >= 1, got {steps}")
        if solver in ADAPTIVE and not (atol > 0 and rtol > 0):
            raise ValueError(f"adaptive solvers need atol > 0 and rtol > 0, got {atol}, {rtol}")
        if max_nfe < 1:
            raise ValueError(f"max_nfe must be >= 1, got {max_nfe}")
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
        self.sensitivity = sensitivity
        self.solver, self.atol, self.rtol = solver, float(atol), float(rtol)
        self.steps, self.max_nfe = int(steps), int(max_nfe)
        self.nfe = 0  # field evaluations of the last solve

    @property
    def order(self) -> int | None:
        return FIXED_STEP.get(self.solver)

    def _adjoint_solve(self, f: Field, counted: Field, x0: Tensor, t_span: Tensor, solver) -> Tensor:
        """The solution at the times of t_span, differentiated by the adjoint method."""
        from torchdyn.numerics.sensitivity import _gather_odefunc_adjoint

        if not isinstance(f, nn.Module):
            raise TypeError("sensitivity='adjoint' needs the field as an nn.Module (its parameters get the gradients)")
        parameters = list(f.parameters())
        if not parameters or not all(p.requires_grad for p in parameters):
            raise ValueError("sensitivity='adjoint' needs a field whose parameters all require gradients")
        adaptive = self.solver in ADAPTIVE
        t0 = float(t_span[0])
        sign = 1.0 if float(t_span[-1]) >= t0 else -1.0
        function = _gather_odefunc_adjoint(
            _ForwardTimeModule(f, counted, t0, sign), None, solver, self.atol if adaptive else 0.0, self.rtol if adaptive else 0.0,
            None, solver, self.atol if adaptive else 0.0, self.rtol if adaptive else 0.0, None, "standard",
        )
        flat = torch.cat([p.contiguous().flatten() for p in parameters])
        _, xs = function.apply(flat, x0, sign * (t_span - t0))
        return xs

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
            options: dict = {}
        else:
            t_span = torch.tensor([float(t0), float(t1)], dtype=x0.dtype, device=x0.device)
            options = {"atol": self.atol, "rtol": self.rtol}
        solver = self._solver_argument(x0.dtype)
        if self.sensitivity == "adjoint" and torch.is_grad_enabled():
            xs = self._adjoint_solve(f, counted, x0, t_span, solver)
        else:
            _, xs = odeint(counted, x0, t_span, solver=solver, **options)
        x1 = xs[-1]
        if not torch.isfinite(x1).all():
            raise ODESolverError(f"{self.solver}: non-finite state at t = {t1}")
        return x1
