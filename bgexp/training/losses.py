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

Optional force matching (Koehler, Kraemer, Noe, "Smooth Normalizing Flows", NeurIPS 2021): on data
x with reduced forces f(x) = -grad_x u(x) at the target temperature (the score of mu ~ exp(-u)),
the flow's score is matched to the forces,
  L_FM = mean over the batch b and the coordinates i of (d log q(x_b) / d x_{b,i} - f_{b,i})^2,
with grad_x log q taken by autograd with create_graph=True so that L_FM is differentiable in the
flow parameters (this needs a flow whose log-density is smooth in x). The joint loss becomes
  L = w_KL(step) * L_KL + beta * L_ML + force_weight * L_FM.
Data at another temperature (biased MD) still give the forces at the target temperature,
f = F / kT_target, since the potential U does not depend on T.

Very high energies (clashes early in training) are cut linear-logarithmically (bgflow's
`linlogcut`): u_cut = u for u <= u_high, u_high + log(1 + u - u_high) above, so their gradients
stay bounded. Non-finite energies are counted, reported as a metric and replaced by `u_max`
before the cut (their gradient is zero), never dropped silently.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from bgexp.evaluation.metrics import force_matching_error  # noqa: F401  (moved to evaluation; re-exported)
from bgexp.evaluation.samples import GeneratorModel


class BoltzmannGenerator(GeneratorModel, Protocol):
    """What a training loss needs of the model (bgexp.training.module.BoltzmannGenerator has it): the
    evaluation interface plus the `prior` and the per-rank `latent_generator` of training. A Protocol,
    so that the losses do not import the module that calls them."""

    prior: Any
    latent_generator: torch.Generator | None


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
    """alpha * KL + beta * NLL + force_weight * FM with an NLL warm-up and a linear KL ramp (see
    module docstring).

    alpha = 0 gives pure maximum likelihood; beta = 0 with no warm-up gives pure reverse KL;
    force_weight > 0 adds force matching, L_FM = mean_{b,i} (d log q(x_b)/d x_{b,i} - f_{b,i})^2,
    on data with reduced forces f = -grad u (data.forces=true).
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
        force_weight: float = 0.0,
    ):
        if alpha < 0 or beta < 0 or force_weight < 0 or alpha + beta + force_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and alpha, beta not both zero unless force_weight > 0 "
                             f"(alpha={alpha}, beta={beta}, force_weight={force_weight})")
        if nll_warmup_steps < 0 or kl_ramp_steps < 0 or kl_batch_size < 1:
            raise ValueError("nll_warmup_steps, kl_ramp_steps must be >= 0 and kl_batch_size >= 1")
        if beta == 0 and force_weight == 0 and nll_warmup_steps > 0:
            raise ValueError("an NLL warm-up needs beta > 0 (or force_weight > 0): there would be no loss "
                             "during warm-up")
        self.alpha, self.beta = float(alpha), float(beta)
        self.force_weight = float(force_weight)
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
        return self.beta > 0 or self.force_weight > 0

    @property
    def needs_forces(self) -> bool:
        return self.force_weight > 0

    def kl_weight(self, step: int) -> float:
        if self.alpha == 0 or step < self.nll_warmup_steps:
            return 0.0
        if self.kl_ramp_steps == 0:
            return self.alpha
        return self.alpha * min(1.0, (step - self.nll_warmup_steps + 1) / self.kl_ramp_steps)

    def nll(self, bg: "BoltzmannGenerator", x: Tensor) -> Tensor:
        return -bg.log_prob(x).mean()

    def force_matching(self, bg: "BoltzmannGenerator", x: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        """(L_FM, log q(x)): L_FM = mean over batch and coordinates of (grad_x log q(x) - f)^2.

        Force matching of Koehler, Kraemer, Noe, "Smooth Normalizing Flows" (NeurIPS 2021): f are
        the reduced forces -grad_x u(x) of the data. grad_x log q is taken on a copy of x that
        requires grad, with create_graph=True so that L_FM can be differentiated in the flow
        parameters. log q(x) is returned as well (the NLL term reuses it: same value, same
        parameter gradients as bg.log_prob(x)).
        """
        if f.shape != x.shape:
            raise ValueError(f"forces of shape {tuple(f.shape)} do not match the data of shape {tuple(x.shape)}")
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            log_q = bg.log_prob(x)
            (score,) = torch.autograd.grad(log_q.sum(), x, create_graph=True)
        return ((score - f.to(score)) ** 2).mean(), log_q

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
        self, bg: "BoltzmannGenerator", x: Tensor | None, step: int, forces: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss at optimisation step `step` and the scalars to log.

        `forces` are the reduced forces f = -grad u of the data `x` (needed when force_weight > 0).
        """
        w_kl = self.kl_weight(step)
        metrics: dict[str, float] = {"weight/kl": w_kl}
        loss = torch.zeros((), device=bg.device)
        log_q = None
        if self.force_weight > 0:
            if x is None or forces is None:
                raise ValueError("this loss has force_weight > 0 (force matching) but the batch has no forces: "
                                 "set data.forces=true so the data module provides them")
            fm, log_q = self.force_matching(bg, x, forces)
            loss = loss + self.force_weight * fm
            metrics["fm"] = float(fm.detach())
        if self.beta > 0:
            if x is None:
                raise ValueError("this loss has beta > 0 (an NLL term) but no data was given")
            nll = -log_q.mean() if log_q is not None else self.nll(bg, x)
            loss = loss + self.beta * nll
            metrics["nll"] = float(nll.detach())
        if w_kl > 0:
            kl, stats = self.kl(bg, self.kl_batch_size)
            loss = loss + w_kl * kl
            metrics["kl"] = float(kl.detach())
            metrics.update(stats)
        return loss, metrics
