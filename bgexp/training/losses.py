"""Training losses of Boltzmann generators (Noe et al., Science 2019, Eqs. 4-6).

- NLL (maximum likelihood on data x ~ rho):  L_ML = E_x[-log q(x)],
  log q(x) = log p_Z(F^-1(x)) + log|det dF^-1/dx|.
- Reverse KL (energy-based, samples x = F(z), z ~ p_Z):
  KL(q || mu) = E_z[u(F(z)) - log|det dF/dz|] + E_z[log p_Z(z)] + log Z;
  the last two terms do not depend on the flow, so L_KL = E_z[u_cut(F(z)) - log|det dF/dz|].
- Joint: L = w_KL(step) * L_KL + w_NLL(step) * L_ML, with a schedule: NLL only for
  `nll_warmup_steps`, then the KL weight ramps linearly from 0 to `alpha` over `kl_ramp_steps`.

Optional reaction-coordinate (RC) loss of the same paper (Eq. 7): on the KL samples, a Gaussian
kernel density estimate h_k of an observable r(x) on a grid g_k over [lo, hi],
h_k ~ sum_i exp(-(r_i - g_k)^2 / (2 sigma^2)) normalised to sum 1, and L_RC = sum_k h_k log h_k
(the negative entropy of r under the flow). Adding rc_weight * L_RC spreads samples along r and
stops the reverse KL from collapsing onto one state; reweighting removes the bias it introduces.

Very high energies (clashes early in training) are cut linear-logarithmically (bgflow's
`linlogcut`): u_cut = u for u <= u_high, u_high + log(1 + u - u_high) above, so their gradients
stay bounded. Non-finite energies are counted, reported as a metric and replaced by `u_max`
before the cut (their gradient is zero), never dropped silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from bgexp.training.module import BoltzmannGenerator


def linlog_cut(u: Tensor, high: float = 1e3, u_max: float = 1e9) -> tuple[Tensor, int]:
    """Linear-log energy cut; returns (u_cut, number of non-finite energies replaced)."""
    nonfinite = ~torch.isfinite(u)
    n_bad = int(nonfinite.sum())
    if n_bad:
        u = torch.where(nonfinite, torch.full_like(u, u_max), u)
    u = torch.clamp(u, max=u_max)
    above = u > high
    safe = torch.where(above, u - high, torch.zeros_like(u))
    return torch.where(above, high + torch.log1p(safe), u), n_bad


class JointLoss:
    """alpha * KL + beta * NLL with an NLL warm-up and a linear KL ramp (see module docstring).

    alpha = 0 gives pure maximum likelihood; beta = 0 with no warm-up gives pure reverse KL.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        nll_warmup_steps: int = 0,
        kl_ramp_steps: int = 0,
        kl_batch_size: int = 256,
        energy_cut_high: float = 1e3,
        energy_max: float = 1e9,
        rc_weight: float = 0.0,
        rc_observable: str | None = None,
        rc_range: tuple[float, float] = (0.0, 1.0),
        rc_bins: int = 50,
    ):
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise ValueError(f"loss weights must be >= 0 and not both zero (alpha={alpha}, beta={beta})")
        if nll_warmup_steps < 0 or kl_ramp_steps < 0 or kl_batch_size < 1:
            raise ValueError("nll_warmup_steps, kl_ramp_steps must be >= 0 and kl_batch_size >= 1")
        if beta == 0 and nll_warmup_steps > 0:
            raise ValueError("an NLL warm-up needs beta > 0 (there would be no loss during warm-up)")
        self.alpha, self.beta = float(alpha), float(beta)
        self.nll_warmup_steps, self.kl_ramp_steps = int(nll_warmup_steps), int(kl_ramp_steps)
        self.kl_batch_size = int(kl_batch_size)
        self.energy_cut_high, self.energy_max = float(energy_cut_high), float(energy_max)
        if rc_weight < 0:
            raise ValueError(f"rc_weight must be >= 0, got {rc_weight}")
        if rc_weight > 0 and not rc_observable:
            raise ValueError("rc_weight > 0 needs loss.rc_observable, the name of a target observable")
        lo, hi = (float(v) for v in rc_range)
        if not hi > lo or rc_bins < 2:
            raise ValueError(f"need rc_range lo < hi and rc_bins >= 2 (got {rc_range}, {rc_bins})")
        self.rc_weight, self.rc_observable = float(rc_weight), rc_observable
        self.rc_grid = torch.linspace(lo, hi, int(rc_bins))
        self.rc_bandwidth = (hi - lo) / (int(rc_bins) - 1)

    @property
    def needs_data(self) -> bool:
        return self.beta > 0

    def kl_weight(self, step: int) -> float:
        if self.alpha == 0 or step < self.nll_warmup_steps:
            return 0.0
        if self.kl_ramp_steps == 0:
            return self.alpha
        return self.alpha * min(1.0, (step - self.nll_warmup_steps + 1) / self.kl_ramp_steps)

    def nll(self, bg: "BoltzmannGenerator", x: Tensor) -> Tensor:
        return -bg.log_prob(x).mean()

    def rc_negative_entropy(self, r: Tensor) -> Tensor:
        """sum_k h_k log h_k of the kernel density estimate of r on the grid (see module docstring)."""
        grid = self.rc_grid.to(r)
        kernel = torch.exp(-0.5 * ((r[:, None] - grid[None, :]) / self.rc_bandwidth) ** 2).mean(0)
        h = kernel / kernel.sum().clamp_min(1e-30)
        return (h * torch.log(h.clamp_min(1e-30))).sum()

    def kl(self, bg: "BoltzmannGenerator", n: int) -> tuple[Tensor, dict[str, float]]:
        z = bg.prior.sample(n, generator=bg.latent_generator)
        x, logdet = bg.flow(z)
        u = bg.energy(x)
        u_cut, n_bad = linlog_cut(u, self.energy_cut_high, self.energy_max)
        finite = u.detach()[torch.isfinite(u.detach())]
        stats = {
            "kl/nonfinite_energies": float(n_bad),
            "kl/energy_median": float(finite.median()) if finite.numel() else float("nan"),
        }
        loss = (u_cut - logdet).mean()
        if self.rc_weight > 0:
            observables = bg.target.observables
            if self.rc_observable not in observables:
                raise ValueError(f"loss.rc_observable={self.rc_observable!r} is not an observable of the "
                                 f"target; it has {sorted(observables)}")
            rc = self.rc_negative_entropy(observables[self.rc_observable](x))
            stats["rc_neg_entropy"] = float(rc.detach())
            loss = loss + self.rc_weight * rc
        return loss, stats

    def __call__(
        self, bg: "BoltzmannGenerator", x: Tensor | None, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss at optimisation step `step` and the scalars to log."""
        w_kl = self.kl_weight(step)
        metrics: dict[str, float] = {"weight/kl": w_kl}
        loss = torch.zeros((), device=bg.device)
        if self.beta > 0:
            if x is None:
                raise ValueError("this loss has beta > 0 (an NLL term) but no data was given")
            nll = self.nll(bg, x)
            loss = loss + self.beta * nll
            metrics["nll"] = float(nll.detach())
        if w_kl > 0:
            kl, stats = self.kl(bg, self.kl_batch_size)
            loss = loss + w_kl * kl
            metrics["kl"] = float(kl.detach())
            metrics.update(stats)
        return loss, metrics
