"""Metropolis-adjusted gradient kernels (MALA, HMC), batched over particles, on a `Space`.

Each particle is its own chain (its own accept/reject); the step size is one number per batch,
adapted during a warm-up by a constant-gain Robbins-Monro recursion on its logarithm,

    log eps_{t+1} = log eps_t + gain * (a_t - a*),

with a_t the batch mean of the acceptance probabilities min(1, alpha) of step t (over particles
whose current density is finite) and a* the target acceptance (MALA 0.574: Roberts & Rosenthal,
JRSS B 60, 255 (1998); HMC 0.65: Beskos et al., Bernoulli 19, 1501 (2013)).  Robbins & Monro,
Ann. Math. Stat. 22, 400 (1951); Andrieu & Thoms, Stat. Comput. 18, 343 (2008).  ``freeze()``
stops the adaptation; with a frozen step size each kernel leaves its target exactly invariant.

Usage::

    kernel = MALA(space, step_size=0.1)
    state = kernel.init(y, log_density)            # one evaluation; NoGradientError here if needed
    state, accept = kernel.step(state, log_density, generator)   # state.y: the new positions
    state, accepts = kernel.run(state, log_density, n_steps=100, generator=generator)

``log_density`` is a plain callable y [n, d] -> [n] (differentiable in y; the gradient comes from
autograd) or a `bgexp.samplers.paths.Density`.  ``step`` also accepts a tensor y (it then
evaluates it first, one extra evaluation).

The space: circular features are wrapped into [-pi, pi) after every move (the density must be
periodic there: the caller's promise) and the MALA proposal density is the wrapped normal; on a
particle space the noise, the momentum and the gradient are projected onto the mean-free subspace,
so the chain stays there and detailed balance holds on it; a rigid-body space is refused at
construction with `UnsupportedSpaceError`.  Points with a non-finite log-density (or gradient) are
never accepted.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from bgexp.samplers.errors import SamplerSettingError
from bgexp.samplers.paths import Density, LogDensityFn, as_density
from bgexp.samplers.state import ChainState, SpaceGeometry
from bgexp.spaces import Space

__all__ = ["Kernel", "MALA", "HMC"]


class Kernel:
    """Common machinery: space geometry, step size and its adaptation, accept/reject."""

    default_target_accept = 0.5
    name = "kernel"

    def __init__(self, space: Space, step_size: float = 0.1, *, target_accept: float | None = None,
                 adapt: bool = True, adapt_gain: float = 0.5, min_step_size: float = 1e-8,
                 max_step_size: float | None = None):
        self.geometry = SpaceGeometry(space)  # UnsupportedSpaceError here
        self.space = space
        if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
            raise SamplerSettingError(f"step_size must be a finite number > 0, got {step_size!r}")
        target = self.default_target_accept if target_accept is None else float(target_accept)
        if not 0.0 < target < 1.0:
            raise SamplerSettingError(f"target_accept must be in (0, 1), got {target_accept!r}")
        if not adapt_gain > 0:
            raise SamplerSettingError(f"adapt_gain must be > 0, got {adapt_gain!r}")
        if max_step_size is None:
            max_step_size = math.pi if self.geometry.has_circular else math.inf
        if not 0 < min_step_size <= max_step_size:
            raise SamplerSettingError(f"need 0 < min_step_size <= max_step_size, got {min_step_size}, {max_step_size}")
        self.min_step_size = float(min_step_size)
        self.max_step_size = float(max_step_size)
        self.step_size = min(max(float(step_size), self.min_step_size), self.max_step_size)
        self.target_accept = target
        self.adapt = bool(adapt)
        self.adapt_gain = float(adapt_gain)

    # adaptation ----------------------------------------------------------------------------
    def freeze(self) -> "Kernel":
        """Stop adapting the step size (the kernel is then exactly invariant)."""
        self.adapt = False
        return self

    def unfreeze(self) -> "Kernel":
        self.adapt = True
        return self

    def _adapt(self, accept_rate: float) -> None:
        if not self.adapt or not math.isfinite(accept_rate):
            return
        log_eps = math.log(self.step_size) + self.adapt_gain * (accept_rate - self.target_accept)
        self.step_size = min(max(math.exp(log_eps), self.min_step_size), self.max_step_size)

    # cost ----------------------------------------------------------------------------------
    @property
    def evals_per_step(self) -> int:
        """Log-density (energy) evaluations per particle per step."""
        return 1

    # public API ----------------------------------------------------------------------------
    def init(self, y: Tensor, log_density: Union[LogDensityFn, Density]) -> ChainState:
        """Place y on the space (mean-free, wrapped) and evaluate the density and its gradient."""
        self._check_y(y)
        return as_density(log_density).evaluate(self.geometry.prepare(y), need_grad=True)

    def step(self, state: Union[ChainState, Tensor], log_density: Union[LogDensityFn, Density],
             generator: torch.Generator | None = None) -> tuple[ChainState, float]:
        """One Metropolis-adjusted move of every particle: (new state, mean acceptance probability).
        The step size is adapted afterwards if the kernel is not frozen."""
        density = as_density(log_density)
        if isinstance(state, Tensor):
            state = self.init(state, density)
        if state.grad is None:
            state = density.evaluate(state.y, need_grad=True)
        proposal, log_alpha = self._propose(state, density, generator)
        log_alpha = torch.nan_to_num(log_alpha, nan=-math.inf)
        u = torch.rand(state.n, generator=generator, device=state.y.device, dtype=torch.float64)
        accept = torch.log(u) < log_alpha
        live = torch.isfinite(state.log_prob)
        if bool(live.any()):
            rate = float(torch.exp(torch.clamp(log_alpha[live], max=0.0)).mean())
        else:
            rate = float("nan")
        self._adapt(rate)
        return state.where(accept, proposal), rate

    def run(self, state: Union[ChainState, Tensor], log_density: Union[LogDensityFn, Density], n_steps: int,
            generator: torch.Generator | None = None) -> tuple[ChainState, list[float]]:
        """``n_steps`` steps; the state and the acceptance of each step."""
        density = as_density(log_density)
        if isinstance(state, Tensor):
            state = self.init(state, density)
        rates = []
        for _ in range(int(n_steps)):
            state, rate = self.step(state, density, generator)
            rates.append(rate)
        return state, rates

    def warmup(self, state: Union[ChainState, Tensor], log_density: Union[LogDensityFn, Density], n_steps: int,
               generator: torch.Generator | None = None) -> ChainState:
        """Adapt the step size for ``n_steps`` steps, then freeze it; returns the state (its moves
        are warm-up, to be excluded from estimates)."""
        self.unfreeze()
        state, _ = self.run(state, log_density, n_steps, generator)
        self.freeze()
        return state

    # internals -----------------------------------------------------------------------------
    def _check_y(self, y: Tensor) -> None:
        if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[1] != self.space.dim:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise SamplerSettingError(f"particles must be a tensor [n, {self.space.dim}], got {shape}")

    def _noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        xi = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return self.geometry.project(xi)

    def _propose(self, state: ChainState, density: Density,
                 generator: torch.Generator | None) -> tuple[ChainState, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(step_size={self.step_size:.4g}, target_accept={self.target_accept}, "
                f"adapt={self.adapt}, space={self.space.describe()!r})")


class MALA(Kernel):
    """Metropolis-adjusted Langevin algorithm.

    Proposal y' = y + (eps^2 / 2) grad log pi(y) + eps xi, xi ~ N(0, I) (projected / wrapped as
    the space requires), accepted with probability

        min(1, pi(y') q(y | y') / (pi(y) q(y' | y))),   q(y' | y) = N(y'; y + eps^2/2 grad log pi(y), eps^2 I).

    One density evaluation (value and gradient) per step.  Roberts & Tweedie, Bernoulli 2, 341
    (1996); target acceptance 0.574 (Roberts & Rosenthal 1998).
    """

    default_target_accept = 0.574
    name = "mala"

    def _propose(self, state, density, generator):
        geo = self.geometry
        eps = self.step_size
        half = 0.5 * eps * eps
        # y, y' and the projected drifts are mean-free, so are both displacements below; the noise
        # is projected by `prepare` (the mean-free part of y + drift + eps xi is y + drift + eps P xi)
        mean_fwd = state.y + half * geo.project(state.grad)
        xi = torch.randn(state.y.shape, generator=generator, device=state.y.device, dtype=state.y.dtype)
        y_new = geo.prepare(mean_fwd + eps * xi)
        prop = density.evaluate(y_new, need_grad=True)
        mean_bwd = prop.y + half * geo.project(prop.grad)
        log_q_fwd = geo.log_kernel(prop.y - mean_fwd, eps)
        log_q_bwd = geo.log_kernel(state.y - mean_bwd, eps)
        log_alpha = prop.log_prob - state.log_prob + log_q_bwd - log_q_fwd
        return prop, log_alpha


class HMC(Kernel):
    """Hamiltonian Monte Carlo with a leapfrog integrator of ``n_leapfrog`` steps of size eps and
    unit mass: H(y, p) = -log pi(y) + |p|^2 / 2, p ~ N(0, I) (mean-free on particle spaces),
    accepted with probability min(1, exp(H(y, p) - H(y', p'))).  ``n_leapfrog`` density
    evaluations per step.  Duane, Kennedy, Pendleton, Roweth, Phys. Lett. B 195, 216 (1987);
    Neal, "MCMC using Hamiltonian dynamics", Handbook of MCMC (2011); target acceptance 0.65
    (Beskos et al. 2013).
    """

    default_target_accept = 0.65
    name = "hmc"

    def __init__(self, space: Space, step_size: float = 0.1, n_leapfrog: int = 5, **kwargs):
        super().__init__(space, step_size, **kwargs)
        if int(n_leapfrog) != n_leapfrog or n_leapfrog < 1:
            raise SamplerSettingError(f"n_leapfrog must be an integer >= 1, got {n_leapfrog!r}")
        self.n_leapfrog = int(n_leapfrog)

    @property
    def evals_per_step(self) -> int:
        return self.n_leapfrog

    def _propose(self, state, density, generator):
        geo = self.geometry
        eps = self.step_size
        p = self._noise(state.y, generator)
        h0 = -state.log_prob + 0.5 * p.double().pow(2).sum(dim=1)
        y = state.y
        p = p + 0.5 * eps * geo.project(state.grad)
        cur = state
        for i in range(self.n_leapfrog):
            y = geo.prepare(y + eps * p)
            cur = density.evaluate(y, need_grad=True)
            y = cur.y
            p = p + (eps if i < self.n_leapfrog - 1 else 0.5 * eps) * geo.project(cur.grad)
        h1 = -cur.log_prob + 0.5 * p.double().pow(2).sum(dim=1)
        return cur, h0 - h1
