"""Log-densities with gradients for the kernels, and the annealing path of SMC / AIS.

The sampler works on coordinates y chosen by the caller, between two unnormalised log-densities
on the same y:

    log pi_b(y) = (1 - b) log pi_0(y) + b log pi_1(y),      b in [0, 1]          (geometric path)

pi_0 is what can be sampled exactly, pi_1 the target.  The same code serves both places a
Boltzmann generator can be refined:

* x-space: y = x, log pi_0 = log q(x) (the flow's density), log pi_1 = -u(x);
* latent z-space: y = z, log pi_0 = log p_Z(z) (the prior), log pi_1 = -u(F(z)) + log|det dF/dz|
  (the pull-back of the target through the flow; only forward passes).

Both give Z_1 / Z_0 = Z_u / Z_q (a change of variables leaves the normalizer unchanged).  See
Neal, "Annealed importance sampling", Stat. Comput. 11, 125 (2001) and Del Moral, Doucet, Jasra,
"Sequential Monte Carlo samplers", JRSS B 68, 411 (2006).

Bookkeeping kept here (`PathCounters`): every call of log_pi1 on n points counts n energy
evaluations; points where log pi_1 (or its gradient) is not finite are counted and treated as
log pi_b = -inf (weight zero, a proposal there is rejected) -- never dropped silently; the time
spent in log_pi0 / log_pi1 and their gradients is accumulated so that the sampler's own
overhead can be reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from bgexp.samplers.errors import NoGradientError, SamplerSettingError
from bgexp.samplers.state import ChainState

__all__ = ["Density", "LogDensity", "AnnealingPath", "AnnealedDensity", "PathCounters", "as_density"]

LogDensityFn = Callable[[Tensor], Tensor]


class Density:
    """A log-density on a batch, as the kernels see it: ``evaluate(y, need_grad) -> ChainState``
    with log_prob [n] (float64, -inf where not finite) and its gradient w.r.t. y."""

    def evaluate(self, y: Tensor, need_grad: bool = True) -> ChainState:  # pragma: no cover - abstract
        raise NotImplementedError


def _call(fn: LogDensityFn, y: Tensor, name: str) -> Tensor:
    out = fn(y)
    if not isinstance(out, Tensor):
        raise SamplerSettingError(f"{name} must return a torch.Tensor of shape [n], got {type(out).__name__}")
    if out.shape != (y.shape[0],):
        raise SamplerSettingError(f"{name} must return shape [n] = [{y.shape[0]}], got {tuple(out.shape)}")
    return out


def _grad(out: Tensor, y: Tensor, name: str, retain: bool) -> Tensor:
    """d(sum out)/dy; a NoGradientError when autograd cannot give it."""
    if not out.requires_grad:
        raise NoGradientError(
            f"{name} returned a tensor without autograd history (no grad_fn): MALA/HMC need its gradient "
            "w.r.t. y; compute it with differentiable torch operations")
    try:
        (g,) = torch.autograd.grad(out.sum(), y, retain_graph=retain, allow_unused=True)
    except RuntimeError as err:
        raise NoGradientError(f"the gradient of {name} could not be computed: {err}") from err
    if g is None:
        raise NoGradientError(f"{name} does not depend on its input y (autograd found no path)")
    return g


class LogDensity(Density):
    """A plain callable ``log_density(y) -> [n]`` with its gradient by autograd.

    Values that are not finite (and points whose gradient is not finite) become -inf with a zero
    gradient.  ``n_evals`` counts points evaluated, ``n_nonfinite`` the non-finite ones.
    """

    def __init__(self, fn: LogDensityFn, name: str = "log_density"):
        if not callable(fn):
            raise SamplerSettingError(f"{name} must be callable y -> [n], got {type(fn).__name__}")
        self.fn = fn
        self.name = name
        self.n_evals = 0
        self.n_nonfinite = 0

    def evaluate(self, y: Tensor, need_grad: bool = True) -> ChainState:
        y_in = y.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            out = _call(self.fn, y_in, self.name)
            g = _grad(out, y_in, self.name, retain=False) if need_grad else None
        self.n_evals += int(y.shape[0])
        lp = out.detach().double()
        ok = torch.isfinite(lp)
        if g is not None:
            ok = ok & torch.isfinite(g).all(dim=1)
            g = torch.where(ok.unsqueeze(1), g.detach(), torch.zeros_like(g))
        self.n_nonfinite += int((~ok).sum())
        lp = torch.where(ok, lp, torch.full_like(lp, -torch.inf))
        return ChainState(y.detach(), lp, g)


def as_density(fn_or_density: Union[LogDensityFn, Density]) -> Density:
    """A `Density` as is; a plain callable wrapped in `LogDensity`."""
    if isinstance(fn_or_density, Density):
        return fn_or_density
    return LogDensity(fn_or_density)


@dataclass
class PathCounters:
    """Energy evaluations (log_pi1 calls, in points), non-finite points, and model time (s)."""

    n_energy_evals: int = 0
    n_pi0_evals: int = 0
    n_nonfinite: int = 0
    n_nonfinite_pi0: int = 0
    model_s: float = 0.0


def _sync(y: Tensor) -> None:
    if y.is_cuda:
        torch.cuda.synchronize(y.device)


class AnnealingPath:
    """The geometric path between log_pi0 and log_pi1 (see module doc).

    ``evaluate(y, b, need_grad)`` calls both log-densities once on the batch and returns a
    `ChainState` targeting pi_b whose ``aux`` holds log_pi0, log_pi1 (float64), their gradients
    g0, g1 and a validity flag; ``retarget(state, b')`` re-expresses it for another b without any
    new evaluation.  A point is valid when log pi_0, log pi_1 (and, when asked for, both
    gradients) are finite; an invalid point has log pi_b = -inf for every b.  A non-finite
    log pi_1 (value or gradient) counts in ``counters.n_nonfinite``, a non-finite log pi_0 in
    ``counters.n_nonfinite_pi0``.
    """

    def __init__(self, log_pi0: LogDensityFn, log_pi1: LogDensityFn):
        for name, fn in (("log_pi0", log_pi0), ("log_pi1", log_pi1)):
            if not callable(fn):
                raise SamplerSettingError(f"{name} must be callable y -> [n], got {type(fn).__name__}")
        self.log_pi0 = log_pi0
        self.log_pi1 = log_pi1
        self.counters = PathCounters()

    # checks that cost no energy evaluation -------------------------------------------------
    def probe_gradients(self, like: Tensor) -> None:
        """Call both log-densities on an empty batch [0, d] (zero energy evaluations) and raise
        NoGradientError if one returns a tensor without autograd history.  A callable that cannot
        take an empty batch is not judged here; its gradient is checked at the first evaluation
        (before any MCMC step)."""
        y = torch.zeros((0, like.shape[1]), dtype=like.dtype, device=like.device, requires_grad=True)
        for name, fn in (("log_pi0", self.log_pi0), ("log_pi1", self.log_pi1)):
            try:
                with torch.enable_grad():
                    out = fn(y)
            except Exception:  # noqa: BLE001 - an empty batch may legitimately be unsupported
                continue
            if isinstance(out, Tensor) and out.shape == (0,) and not out.requires_grad:
                raise NoGradientError(
                    f"{name} returned a tensor without autograd history (no grad_fn) on an empty probe "
                    "batch: MALA/HMC need its gradient w.r.t. y")

    # evaluation ----------------------------------------------------------------------------
    def evaluate(self, y: Tensor, b: float, need_grad: bool = True) -> ChainState:
        n = int(y.shape[0])
        _sync(y)
        t0 = time.perf_counter()
        y_in = y.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            l0 = _call(self.log_pi0, y_in, "log_pi0")
            self.counters.n_pi0_evals += n
            l1 = _call(self.log_pi1, y_in, "log_pi1")
            self.counters.n_energy_evals += n
            g0 = g1 = None
            if need_grad:
                g0 = _grad(l0, y_in, "log_pi0", retain=True)
                g1 = _grad(l1, y_in, "log_pi1", retain=False)
        _sync(y)
        self.counters.model_s += time.perf_counter() - t0

        l0 = l0.detach().double()
        l1 = l1.detach().double()
        ok0 = torch.isfinite(l0)
        ok1 = torch.isfinite(l1)
        if need_grad:
            ok0 = ok0 & torch.isfinite(g0).all(dim=1)
            ok1 = ok1 & torch.isfinite(g1).all(dim=1)
        self.counters.n_nonfinite += int((~ok1).sum())
        self.counters.n_nonfinite_pi0 += int((~ok0).sum())
        valid = ok0 & ok1
        neg_inf = torch.full_like(l0, -torch.inf)
        aux = {"log_pi0": torch.where(valid, l0, neg_inf), "log_pi1": torch.where(valid, l1, neg_inf),
               "valid": valid}
        if need_grad:
            zero = torch.zeros_like(g0)
            keep = valid.unsqueeze(1)
            aux["g0"] = torch.where(keep, g0.detach(), zero)
            aux["g1"] = torch.where(keep, g1.detach(), zero)
        return self.retarget(ChainState(y.detach(), l0, None, aux), b)

    @staticmethod
    def retarget(state: ChainState, b: float) -> ChainState:
        """The same particles as a state of pi_b: log pi_b = (1 - b) log pi_0 + b log pi_1 and its
        gradient, from the cached values (no evaluation)."""
        aux = state.aux
        valid = aux["valid"]
        lp = (1.0 - b) * aux["log_pi0"] + b * aux["log_pi1"]
        lp = torch.where(valid, lp, torch.full_like(lp, -torch.inf))
        grad = None
        if "g0" in aux:
            grad = (1.0 - b) * aux["g0"] + b * aux["g1"]
        return ChainState(state.y, lp, grad, aux)

    def at(self, b: float) -> "AnnealedDensity":
        """pi_b as a `Density` for the kernels."""
        return AnnealedDensity(self, b)


class AnnealedDensity(Density):
    """pi_b of an `AnnealingPath` (evaluations count in the path's counters)."""

    def __init__(self, path: AnnealingPath, b: float):
        self.path = path
        self.b = float(b)

    def evaluate(self, y: Tensor, need_grad: bool = True) -> ChainState:
        return self.path.evaluate(y, self.b, need_grad)
