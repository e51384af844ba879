"""Honest error bars for SMC by independent replicates.

Resampled particles are correlated (they share ancestors), so a standard error computed from one
run's particles as if they were independent is too small.  Independent replicate runs are
independent by construction: any statistic computed once per run gives R i.i.d. values, and a
Student-t interval over them,

    mean +- t_{(1 + c)/2, R - 1} * s / sqrt(R),     s the sample standard deviation (ddof 1),

has the nominal coverage c when the per-run values are close to normal (Student, Biometrika 6, 1
(1908); for SMC: Chopin & Papaspiliopoulos, "An Introduction to Sequential Monte Carlo" (2020),
ch. 19, independent runs as the reference variance estimate).

What is reported for log Z (see `log_normalizer_estimate`):

* "log_mean_exp" (default): log of the mean of the R unbiased estimates Z-hat_r,
      log Zbar = log (1/R) sum_r Z-hat_r,
  with the t-interval of the Z-hat_r mapped through the log.  Zbar is unbiased for Z; log Zbar
  is biased low only by ~ Var(log Z-hat) / (2 R).
* "mean_log": the mean of log Z-hat_r with its t-interval.  That interval is for E[log Z-hat],
  which lies below log Z by ~ Var(log Z-hat) / 2 (Jensen; exact for log-normal Z-hat): it covers
  log Z only when that variance is small against the interval's width.

Delta F(a -> b) = -ln(sum_{i in b} w_i / sum_{i in a} w_i) is computed per replicate from its final
weighted particles (`bgexp.estimators.free_energy_difference`) and combined by the t-interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import stats
from scipy.special import logsumexp

from bgexp.estimators import free_energy_difference
from bgexp.samplers.errors import SamplerSettingError
from bgexp.samplers.smc import SMCResult

__all__ = ["ReplicateEstimate", "run_replicates", "replicate_seeds", "student_t_interval",
           "log_normalizer_estimate", "delta_f_estimate"]


@dataclass(frozen=True)
class ReplicateEstimate:
    """A value with its confidence interval from R independent replicates.

    value, ci_low, ci_high: the estimate and the interval at ``confidence``; std_err: the standard
    error of the value (for "log_mean_exp": relative standard error of Zbar, i.e. that of log Zbar
    by the delta method); values: the per-replicate values; n_nonfinite: replicates whose value is
    not finite (then the interval is (-inf, inf) and value is their mean, inf or nan); method.
    """

    value: float
    ci_low: float
    ci_high: float
    std_err: float
    confidence: float
    n_replicates: int
    values: tuple[float, ...]
    method: str
    n_nonfinite: int = 0

    def covers(self, x: float) -> bool:
        return self.ci_low <= x <= self.ci_high

    def as_dict(self) -> dict:
        d = asdict(self)
        d["values"] = list(self.values)
        return d


def replicate_seeds(seed: int, n_replicates: int) -> list[int]:
    """Independent 63-bit seeds for the replicates (numpy SeedSequence spawning)."""
    children = np.random.SeedSequence(int(seed)).spawn(int(n_replicates))
    return [int(c.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for c in children]


def run_replicates(run_one: Callable[[torch.Generator], SMCResult], n_replicates: int, seed: int,
                   device: str | torch.device = "cpu") -> list[SMCResult]:
    """Run ``run_one(generator)`` ``n_replicates`` times, each with its own torch.Generator (on
    ``device``) seeded from ``seed`` by `replicate_seeds`: independent, reproducible replicates.
    ``run_one`` must draw everything random (the initial samples y0 too) from that generator and
    build its own kernel, so that the replicates share nothing."""
    if int(n_replicates) != n_replicates or n_replicates < 1:
        raise SamplerSettingError(f"n_replicates must be an integer >= 1, got {n_replicates!r}")
    results = []
    for s in replicate_seeds(seed, int(n_replicates)):
        g = torch.Generator(device=device)
        g.manual_seed(s)
        results.append(run_one(g))
    return results


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise SamplerSettingError(f"confidence must be in (0, 1), got {confidence!r}")


def student_t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, low, high, standard error) of the Student-t interval over i.i.d. values (R >= 2)."""
    _check_confidence(confidence)
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise SamplerSettingError(f"a replicate interval needs at least 2 replicates, got {v.size}")
    mean = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(v.size))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=v.size - 1)) * se
    return mean, mean - half, mean + half, se


def _estimate(values: np.ndarray, confidence: float, method: str) -> ReplicateEstimate:
    bad = int((~np.isfinite(values)).sum())
    if bad:
        return ReplicateEstimate(float(values.mean()), -math.inf, math.inf, math.nan, confidence, values.size,
                                 tuple(values.tolist()), method, bad)
    mean, lo, hi, se = student_t_interval(values, confidence)
    return ReplicateEstimate(mean, lo, hi, se, confidence, values.size, tuple(values.tolist()), method)


def log_normalizer_estimate(results: Sequence[SMCResult], confidence: float = 0.95,
                            method: str = "log_mean_exp") -> ReplicateEstimate:
    """log Z_1 / Z_0 from replicate runs (see the module doc for the two methods).

    "log_mean_exp": value = log Zbar; the interval is the t-interval of the ratios
    Z-hat_r / Zbar (mean 1, standard error s_rel / sqrt(R)) mapped through the log,
    [log Zbar + log(1 - t s_rel/sqrt R), log Zbar + log(1 + t s_rel/sqrt R)] (lower end -inf when the
    relative error is that large).  "mean_log": mean and t-interval of log Z-hat_r (an interval for
    E[log Z-hat] <= log Z).
    """
    _check_confidence(confidence)
    logs = np.array([float(r.log_normalizer) for r in results], dtype=np.float64)
    if method == "mean_log":
        return _estimate(logs, confidence, method)
    if method != "log_mean_exp":
        raise SamplerSettingError(f"method must be 'log_mean_exp' or 'mean_log', got {method!r}")
    if logs.size < 2:
        raise SamplerSettingError(f"a replicate interval needs at least 2 replicates, got {logs.size}")
    if not np.isfinite(logs).all():
        return _estimate(logs, confidence, method)
    value = float(logsumexp(logs) - math.log(logs.size))
    ratios = np.exp(logs - value)  # Z-hat_r / Zbar, mean 1
    _, lo, hi, se = student_t_interval(ratios, confidence)
    ci_low = value + math.log(lo) if lo > 0 else -math.inf
    return ReplicateEstimate(value, ci_low, value + math.log(hi), se, confidence, logs.size,
                             tuple(logs.tolist()), method)


def _mask(indicator: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, name: str) -> np.ndarray:
    with torch.no_grad():
        m = indicator(y)
    m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
    if m.shape != (y.shape[0],) or m.dtype != bool:
        raise SamplerSettingError(f"{name} must map y [n, d] to a boolean mask [n], got dtype {m.dtype}, "
                                  f"shape {m.shape}")
    return m


def delta_f_estimate(results: Sequence[SMCResult], state_a: Callable[[torch.Tensor], torch.Tensor],
                     state_b: Callable[[torch.Tensor], torch.Tensor],
                     confidence: float = 0.95) -> ReplicateEstimate:
    """Delta F(a -> b) = F_b - F_a = -ln(sum_{i in b} w_i / sum_{i in a} w_i) [kT] per replicate,
    from its final particles ``y`` and weights ``log_weights`` (state masks from the callables
    y -> bool [n]; for latent-space runs the callable maps z to its state, e.g. through the flow),
    then the mean and Student-t interval over replicates.  A replicate in which a state has no
    weight gives +-inf; the estimate then reports it in ``n_nonfinite`` with the interval
    (-inf, inf)."""
    _check_confidence(confidence)
    vals = []
    for r in results:
        in_a = _mask(state_a, r.y, "state_a")
        in_b = _mask(state_b, r.y, "state_b")
        vals.append(free_energy_difference(r.log_weights.numpy(), in_a, in_b))
    return _estimate(np.asarray(vals, dtype=np.float64), confidence, "mean")
