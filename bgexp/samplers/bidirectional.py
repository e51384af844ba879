"""Bidirectional annealed importance sampling: forward and reverse AIS works combined by BAR.

One-sided SMC / AIS estimates log Z_1 / Z_0 from samples of pi_0 alone; its log is biased low by
about Var(log Z-hat) / 2, and its replicates scatter widely when the annealing dissipates many kT
(measured on the dimer: per-state SMC replicates several kT apart).  When exact samples of pi_1
are also at hand (equilibrium data of the target, pulled back into the sampler's coordinates),
the same annealing can be run both ways on one fixed schedule 0 = b_0 < b_1 < ... < b_K = 1:

* forward, y ~ pi_0:   reweight b_{k-1} -> b_k, then ``n_steps`` moves of the kernel T_k
  (invariant for pi_{b_k}, frozen step size eps_k), k = 1 .. K-1;
      W_F = -sum_{k=1..K} (b_k - b_{k-1}) delta(y_{k-1}),     delta = log pi_1 - log pi_0;
* reverse, y ~ pi_1:   reweight b_k -> b_{k-1}, then the moves of T_{k-1}, k = K .. 2;
      W_R = -sum_{k=K..1} (b_{k-1} - b_k) delta(y'_k).

Every T_k satisfies detailed balance with respect to pi_{b_k} (MALA, HMC), and the reverse
protocol applies them in the reverse order, so the two work distributions obey Crooks'
fluctuation theorem,  p_F(W) / p_R(-W) = exp(W - Delta f),  Delta f = -ln Z_1 / Z_0
(Crooks, Phys. Rev. E 61, 2361 (2000); for AIS: Neal, Stat. Comput. 11, 125 (2001)).  Bennett's
acceptance ratio on (W_F, W_R) is then the maximum-likelihood estimate of Delta f (Shirts, Bair,
Hooker, Pande, PRL 91, 140601 (2003)) and needs only overlap between the two work distributions,
not between pi_0 and pi_1.  The one-sided estimates bracket it in expectation,
E[-ln mean exp(-W_F)] >= Delta f >= E[ln mean exp(-W_R)] (Grosse, Ghahramani, Adams,
"Sandwiching the marginal likelihood using bidirectional Monte Carlo", arXiv:1511.02543 (2015)),
and are reported beside it.

The schedule and the step sizes come from a pilot (`pilot_schedule`: a short adaptive SMC whose
b's and adapted step sizes are then frozen), so both directions use the same kernels.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bgexp.estimators.free_energy import bar
from bgexp.samplers.errors import SamplerSettingError
from bgexp.samplers.kernels import Kernel
from bgexp.samplers.paths import AnnealingPath, LogDensityFn
from bgexp.samplers.smc import SMCResult, logsumexp
from bgexp.samplers.state import check_space
from bgexp.spaces import Space

__all__ = ["AnnealingProtocol", "BidirectionalResult", "annealed_works", "bidirectional_ais", "pilot_protocol"]


@dataclass
class AnnealingProtocol:
    """A fixed annealing protocol: b_1 < ... < b_K = 1 (b_0 = 0 implied) and the frozen step size
    of the kernel at every level (eps_k for the moves at b_k; the last one is unused)."""

    schedule: list[float]
    step_sizes: list[float]
    n_steps_per_level: int

    def __post_init__(self) -> None:
        bs = [float(b) for b in self.schedule]
        if not bs or bs[-1] != 1.0 or any(b2 <= b1 for b1, b2 in zip([0.0] + bs, bs)):
            raise SamplerSettingError(f"a protocol's schedule must increase strictly from 0 to 1, got {self.schedule!r}")
        if len(self.step_sizes) != len(bs) or not all(math.isfinite(e) and e > 0 for e in self.step_sizes):
            raise SamplerSettingError(f"one finite step size > 0 per level is needed ({len(bs)} levels), "
                                      f"got {self.step_sizes!r}")
        if int(self.n_steps_per_level) != self.n_steps_per_level or self.n_steps_per_level < 0:
            raise SamplerSettingError(f"n_steps_per_level must be an integer >= 0, got {self.n_steps_per_level!r}")
        self.schedule, self.step_sizes = bs, [float(e) for e in self.step_sizes]
        self.n_steps_per_level = int(self.n_steps_per_level)

    @property
    def n_levels(self) -> int:
        return len(self.schedule)

    def evals_per_particle(self, kernel: Kernel) -> int:
        """log pi_1 evaluations per particle of one direction: the start and the moves."""
        return 1 + (self.n_levels - 1) * self.n_steps_per_level * kernel.evals_per_step


def pilot_protocol(result: SMCResult, n_steps_per_level: int | None = None) -> AnnealingProtocol:
    """The protocol of an adaptive SMC run: its b's and the step size its kernel had adapted to by
    the end of each level (frozen from then on)."""
    steps = result.settings.get("n_steps_per_level") if n_steps_per_level is None else n_steps_per_level
    return AnnealingProtocol([r.b for r in result.history], [r.step_size for r in result.history], int(steps))


def annealed_works(y0: Tensor, log_pi0: LogDensityFn, log_pi1: LogDensityFn, space: Space, kernel: Kernel,
                   protocol: AnnealingProtocol, *, reverse: bool = False,
                   generator: torch.Generator | None = None) -> dict[str, Any]:
    """The works of one direction of the protocol (module docstring) for particles y0 [N, d]:
    samples of pi_0 (forward) or of pi_1 (``reverse=True``); no resampling, the kernel frozen at
    the protocol's step size of each level.  Returns works [N] (float64, +inf for particles that
    reached a point where log pi_1 or log pi_0 is not finite: weight zero), the final particles,
    the energy evaluations and the model time."""
    check_space(space)
    if kernel.space != space:
        raise SamplerSettingError("the kernel was built for another space")
    if y0.dim() != 2 or y0.shape[0] == 0 or y0.shape[1] != space.dim:
        raise SamplerSettingError(f"y0 must be a non-empty tensor [N, {space.dim}], got {tuple(y0.shape)}")
    kernel = copy.deepcopy(kernel).freeze()
    path = AnnealingPath(log_pi0, log_pi1)
    bs = [0.0] + protocol.schedule
    order = list(range(len(bs)))
    if reverse:
        order = order[::-1]
    need_grad = protocol.n_steps_per_level > 0
    state = path.evaluate(kernel.geometry.prepare(y0.detach()), bs[order[0]], need_grad=need_grad)
    log_w = np.zeros(y0.shape[0])
    for prev, k in zip(order[:-1], order[1:]):
        delta = (state.aux["log_pi1"] - state.aux["log_pi0"]).cpu().numpy()
        valid = state.aux["valid"].cpu().numpy()
        with np.errstate(invalid="ignore"):
            log_w = log_w + (bs[k] - bs[prev]) * delta
        log_w[~valid] = -np.inf
        last = k == order[-1]
        state = AnnealingPath.retarget(state, bs[k])
        if not last and protocol.n_steps_per_level:
            kernel.step_size = protocol.step_sizes[k - 1]
            density = path.at(bs[k])
            for _ in range(protocol.n_steps_per_level):
                state, _ = kernel.step(state, density, generator)
    works = -log_w
    return {"works": works, "y": state.y, "n_energy_evals": path.counters.n_energy_evals,
            "n_nonfinite": path.counters.n_nonfinite, "model_s": path.counters.model_s}


@dataclass
class BidirectionalResult:
    """log Z_1 / Z_0 by BAR on forward and reverse works, with Bennett's asymptotic std; the
    one-sided estimates (forward: Jarzynski from pi_0's side, a lower bound in expectation;
    reverse: from pi_1's side, an upper bound in expectation); the works; the cost."""

    log_normalizer: float
    std: float
    forward_log_normalizer: float
    reverse_log_normalizer: float
    work_forward: np.ndarray
    work_reverse: np.ndarray
    n_energy_evals: int
    wall_s: float
    model_s: float
    protocol: AnnealingProtocol
    n_nonfinite: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def forward_ess(self) -> float:
        """The Kish ESS fraction of the forward AIS weights exp(-W_F)."""
        from bgexp.estimators import ess

        return float(ess(-self.work_forward))

    @property
    def overhead_fraction(self) -> float:
        return max(0.0, 1.0 - self.model_s / self.wall_s) if self.wall_s > 0 else float("nan")


def _log_mean_exp(a: np.ndarray) -> float:
    return float(logsumexp(a) - math.log(a.size))


def bidirectional_ais(y_pi0: Tensor, y_pi1: Tensor, log_pi0: LogDensityFn, log_pi1: LogDensityFn, space: Space,
                      kernel: Kernel, protocol: AnnealingProtocol, *, log_weights0: Tensor | None = None,
                      generator: torch.Generator | None = None) -> BidirectionalResult:
    """Forward works from ``y_pi0`` (samples of pi_0), reverse works from ``y_pi1`` (samples of
    pi_1), BAR on both (module docstring).  ``log_weights0`` is refused: the reverse direction
    needs pi_0 itself at its end, so the forward particles must be exact samples of pi_0."""
    if log_weights0 is not None:
        raise SamplerSettingError("bidirectional AIS needs exact samples of pi_0 (no initial weights)")
    t0 = time.perf_counter()
    fwd = annealed_works(y_pi0, log_pi0, log_pi1, space, kernel, protocol, generator=generator)
    rev = annealed_works(y_pi1, log_pi0, log_pi1, space, kernel, protocol, reverse=True, generator=generator)
    delta_f, std = bar(fwd["works"], rev["works"])
    return BidirectionalResult(
        log_normalizer=-delta_f, std=std,
        forward_log_normalizer=_log_mean_exp(-fwd["works"]),
        reverse_log_normalizer=-_log_mean_exp(-rev["works"]),
        work_forward=fwd["works"], work_reverse=rev["works"],
        n_energy_evals=fwd["n_energy_evals"] + rev["n_energy_evals"], wall_s=time.perf_counter() - t0,
        model_s=fwd["model_s"] + rev["model_s"], protocol=protocol,
        n_nonfinite=fwd["n_nonfinite"] + rev["n_nonfinite"],
        settings={"n_forward": int(y_pi0.shape[0]), "n_reverse": int(y_pi1.shape[0]),
                  "n_levels": protocol.n_levels, "n_steps_per_level": protocol.n_steps_per_level,
                  "kernel": kernel.name})
