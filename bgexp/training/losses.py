"""Training losses of Boltzmann generators (Noe et al., Science 2019, Eqs. 4-6).

- NLL (maximum likelihood on data x ~ rho):  L_ML = E_x[-log q(x)],
  log q(x) = log p_Z(F^-1(x)) + log|det dF^-1/dx|.
- Reverse KL (energy-based, samples x = F(z), z ~ p_Z):
  KL(q || mu) = E_z[u(F(z)) - log|det dF/dz|] + E_z[log p_Z(z)] + log Z;
  the last two terms do not depend on the flow, so L_KL = E_z[u_cut(F(z)) - log|det dF/dz|].
- Joint: L = w_KL(step) * L_KL + w_NLL(step) * L_ML, with a schedule: NLL only for
  `nll_warmup_steps`, then the KL weight ramps linearly from 0 to `alpha` over `kl_ramp_steps`.

Optional reaction-coordinate (RC) loss of the same paper (Eq. 7), on the KL samples x_i = F(z_i) and
an observable r(x) (`rc_observable`), in one of two forms (`rc_form`):
- `entropy` (the default): a Gaussian kernel density estimate h_k on a grid g_k over [lo, hi],
  h_k ~ sum_i exp(-(r_i - g_k)^2 / (2 sigma^2)) normalised to sum 1, sigma = (hi - lo)/(K - 1), and
  L_RC = sum_k h_k log h_k (the negative entropy of r under the flow).
- `log_barrier` (the dimer's RC loss as published, Noe, Olsson, Koehler, Wu, Science 2019, and its
  code): K Gaussian bins with centres c_k = linspace(lo, hi, K) and width sigma = (hi - lo) / K
  (the dimer: K = 11 over [0.5, 2.5], sigma = 2/11); each sample's memberships are normalised over
  the bins, m_ik = exp(-(r_i - c_k)^2 / (2 sigma^2)) / sum_l exp(-(r_i - c_l)^2 / (2 sigma^2)),
  averaged over the batch into a soft histogram h_k = (1/N) sum_i m_ik (sum_k h_k = 1), and
  L_RC = -sum_k log h_k. It is smallest, K log K, for the flat histogram h_k = 1/K (AM-GM) and
  grows without bound as a bin empties. Computed in log space (log h_k = logsumexp_i log m_ik -
  log N with log m_ik a log-softmax over k), log h_k clamped below at log(1e-30) against log 0.
  With `kl_temperatures`, one histogram per temperature and the loss averaged over them, as the
  paper trains several temperatures at once.
Adding the RC term spreads samples along r and stops the reverse KL from collapsing onto one state;
reweighting removes the bias it introduces.

Staged schedule (`stages`, the published dimer recipe: ML weight 100 then 20 then 0.1, KL weight 1,
RC weight 1 -> 10, energy cut 1e4 -> 1e3): a list of stages {steps, nll, kl, rc, energy_cut}, each
lasting `steps` optimisation steps, the last for the rest of training (it has no `steps`). In a
stage, L = nll * L_ML + kl * L_KL + rc * L_RC + force_weight * L_FM with u_cut at `energy_cut`; a
stage with kl = 0 draws no KL batch (no energies), one with nll = 0 evaluates no NLL. `stages`
replaces alpha, beta, nll_warmup_steps, kl_ramp_steps, rc_weight and energy_cut_high (a config
that gives both is refused). The stage index and its weights are logged every step. A learning
rate per stage is not part of the loss (the optimiser belongs to the module; use a scheduler).

Several temperatures (`kl_temperatures`, relative to the target's): the KL batch is split over
them, z ~ N(0, tau I) scaled prior, energies u / tau (see `reverse_kl`); the NLL stays on the data
at the target temperature. Evaluate the same flow at tau with `evaluation.temperatures`.

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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


RC_FORMS = ("entropy", "log_barrier")
# the keys that `stages` replaces (refused beside it) and their values without stages
SCHEDULE_DEFAULTS = {"alpha": 1.0, "beta": 1.0, "nll_warmup_steps": 0, "kl_ramp_steps": 0, "rc_weight": 0.0,
                     "energy_cut_high": 1e3}


@dataclass(frozen=True)
class Stage:
    """One stage of a staged schedule: weights of the NLL, KL and RC terms and the energy cut, from
    optimisation step `start` for `steps` steps (None: the rest of training)."""

    start: int
    steps: int | None
    nll: float
    kl: float
    rc: float
    energy_cut: float


def parse_stages(stages: Sequence[Mapping[str, Any]], force_weight: float = 0.0) -> tuple[Stage, ...]:
    """Checked stages from the config list (see the module docstring); ValueError naming the stage
    and the field otherwise."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise ValueError(f"loss.stages must be a non-empty list of stages {{steps, nll, kl, rc, energy_cut}}, "
                         f"got {stages!r}")
    allowed, parsed, start = {"steps", "nll", "kl", "rc", "energy_cut"}, [], 0
    for k, stage in enumerate(stages):
        where = f"loss.stages[{k}]"
        if not isinstance(stage, Mapping):
            raise ValueError(f"{where} must be a mapping {{steps, nll, kl, rc, energy_cut}}, got {stage!r}")
        unknown = sorted(set(stage) - allowed)
        if "lr" in unknown:
            raise ValueError(f"{where}: a learning rate per stage (lr) is not supported by the loss; set optim.lr "
                             f"and a scheduler instead")
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; a stage has {sorted(allowed)}")
        missing = sorted({"nll", "kl"} - set(stage))
        if missing:
            raise ValueError(f"{where}: missing {missing} (the weights of the NLL and KL terms)")
        last = k == len(stages) - 1
        steps = stage.get("steps")
        if last and steps is not None:
            raise ValueError(f"{where}: the last stage lasts for the rest of training; drop its steps "
                             f"(got steps={steps})")
        if not last and (steps is None or isinstance(steps, bool) or int(steps) != steps or steps < 1):
            raise ValueError(f"{where}: steps must be an integer >= 1 (every stage but the last), got {steps!r}")
        nll, kl = float(stage["nll"]), float(stage["kl"])
        rc, cut = float(stage.get("rc", 0.0)), float(stage.get("energy_cut", SCHEDULE_DEFAULTS["energy_cut_high"]))
        if min(nll, kl, rc) < 0 or not all(math.isfinite(v) for v in (nll, kl, rc)):
            raise ValueError(f"{where}: the weights nll, kl, rc must be finite and >= 0, got {nll}, {kl}, {rc}")
        if nll + kl + force_weight == 0:
            raise ValueError(f"{where}: nll and kl are both 0 (and no force matching): the stage has no loss")
        if rc > 0 and kl == 0:
            raise ValueError(f"{where}: rc={rc} needs kl > 0 (the RC term is taken on the KL samples, and a stage "
                             f"with kl = 0 draws none)")
        if not cut > 0:
            raise ValueError(f"{where}: energy_cut must be > 0, got {cut}")
        parsed.append(Stage(start, None if last else int(steps), nll, kl, rc, cut))
        start += 0 if last else int(steps)
    return tuple(parsed)


class JointLoss:
    """alpha * KL + beta * NLL + force_weight * FM with an NLL warm-up and a linear KL ramp (see
    module docstring).

    alpha = 0 gives pure maximum likelihood; beta = 0 with no warm-up gives pure reverse KL;
    force_weight > 0 adds force matching, L_FM = mean_{b,i} (d log q(x_b)/d x_{b,i} - f_{b,i})^2,
    on data with reduced forces f = -grad u (data.forces=true). `rc_form` picks the RC term
    (entropy | log_barrier); `stages` a staged schedule instead of alpha, beta, the warm-up and the
    ramp, rc_weight and energy_cut_high (module docstring). Unset (None) schedule keys take the
    values of SCHEDULE_DEFAULTS.
    """

    def __init__(
        self,
        alpha: float | None = None,
        beta: float | None = None,
        nll_warmup_steps: int | None = None,
        kl_ramp_steps: int | None = None,
        kl_batch_size: int = 256,
        energy_cut_high: float | None = None,
        energy_max: float = 1e9,
        rc_weight: float | None = None,
        rc_observable: str | None = None,
        rc_range: tuple[float, float] = (0.0, 1.0),
        rc_bins: int = 50,
        force_weight: float = 0.0,
        rc_form: str = "entropy",
        stages: Sequence[Mapping[str, Any]] | None = None,
        kl_temperatures: Sequence[float] | None = None,
    ):
        given = {"alpha": alpha, "beta": beta, "nll_warmup_steps": nll_warmup_steps, "kl_ramp_steps": kl_ramp_steps,
                 "rc_weight": rc_weight, "energy_cut_high": energy_cut_high}
        self.stages: tuple[Stage, ...] | None = None
        if stages is not None:
            both = sorted(key for key, value in given.items() if value is not None)
            if both:
                raise ValueError(f"loss.stages replaces {sorted(given)}, but the config also gives {both}: set "
                                 f"them to null or drop loss.stages (conf/loss/staged.yaml sets none of them)")
            self.stages = parse_stages(stages, force_weight=float(force_weight))
            if any(stage.rc > 0 for stage in self.stages) and not rc_observable:
                raise ValueError("a stage with rc > 0 needs loss.rc_observable, the name of a target observable")
        values = {key: SCHEDULE_DEFAULTS[key] if value is None else value for key, value in given.items()}
        alpha, beta = values["alpha"], values["beta"]
        nll_warmup_steps, kl_ramp_steps = values["nll_warmup_steps"], values["kl_ramp_steps"]
        rc_weight, energy_cut_high = values["rc_weight"], values["energy_cut_high"]
        if self.stages is not None:  # the flat keys are unused; alpha, beta: the largest stage weights
            alpha, beta = max(st.kl for st in self.stages), max(st.nll for st in self.stages)
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
        self.kl_temperatures = None if not kl_temperatures else [float(t) for t in kl_temperatures]
        if self.kl_temperatures is not None:
            if any(not t > 0 for t in self.kl_temperatures):
                raise ValueError(f"loss.kl_temperatures must all be > 0 (relative to target.temperature), got "
                                 f"{list(kl_temperatures)}")
            if len(self.kl_temperatures) > self.kl_batch_size:
                raise ValueError(f"loss.kl_batch_size={kl_batch_size} is smaller than the number of "
                                 f"loss.kl_temperatures ({len(self.kl_temperatures)}): each needs samples")
        self.energy_cut_high, self.energy_max = float(energy_cut_high), float(energy_max)
        if rc_weight < 0:
            raise ValueError(f"rc_weight must be >= 0, got {rc_weight}")
        if rc_weight > 0 and not rc_observable:
            raise ValueError("rc_weight > 0 needs loss.rc_observable, the name of a target observable")
        lo, hi = (float(v) for v in rc_range)
        if not hi > lo or rc_bins < 2:
            raise ValueError(f"need rc_range lo < hi and rc_bins >= 2 (got {rc_range}, {rc_bins})")
        if rc_form not in RC_FORMS:
            raise ValueError(f"loss.rc_form must be one of {list(RC_FORMS)}, got {rc_form!r}")
        self.rc_weight, self.rc_observable, self.rc_form = float(rc_weight), rc_observable, rc_form
        self.rc_grid = torch.linspace(lo, hi, int(rc_bins))
        self.rc_range = (lo, hi)
        # entropy: kernel width = grid spacing; log_barrier: (hi - lo) / K as published
        self.rc_bandwidth = (hi - lo) / (int(rc_bins) - 1) if rc_form == "entropy" else (hi - lo) / int(rc_bins)

    @property
    def needs_data(self) -> bool:
        if self.stages is not None:
            return any(stage.nll > 0 for stage in self.stages) or self.force_weight > 0
        return self.beta > 0 or self.force_weight > 0

    def stage(self, step: int) -> tuple[int, Stage]:
        """(index, stage) in force at optimisation step `step` (needs `stages`)."""
        if self.stages is None:
            raise ValueError("this loss has no stages (loss.stages is not set)")
        for index, stage in enumerate(self.stages):
            if stage.steps is None or step < stage.start + stage.steps:
                return index, stage
        raise AssertionError("unreachable: the last stage has no end")  # pragma: no cover

    @property
    def needs_forces(self) -> bool:
        return self.force_weight > 0

    def kl_weight(self, step: int) -> float:
        if self.stages is not None:
            return self.stage(step)[1].kl
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

    def rc_soft_histogram(self, r: Tensor) -> Tensor:
        """log h_k of the log-barrier form: memberships normalised over the bins per sample, averaged
        over the batch (module docstring), in log space."""
        centres = torch.linspace(*self.rc_range, len(self.rc_grid), dtype=r.dtype, device=r.device)
        log_m = torch.log_softmax(-0.5 * ((r[:, None] - centres[None, :]) / self.rc_bandwidth) ** 2, dim=1)
        return torch.logsumexp(log_m, dim=0) - math.log(r.shape[0])

    def rc_log_barrier(self, r: Tensor) -> Tensor:
        """-sum_k log h_k of the soft histogram of r (module docstring; minimum K log K when flat)."""
        return -self.rc_soft_histogram(r).clamp_min(math.log(1e-30)).sum()

    def rc_term(self, bg: "BoltzmannGenerator", x: Tensor) -> tuple[Tensor, str]:
        """The RC loss of the samples x in the configured form, and its metric name."""
        observables = bg.target.observables
        if self.rc_observable not in observables:
            raise ValueError(f"loss.rc_observable={self.rc_observable!r} is not an observable of the "
                             f"target; it has {sorted(observables)}")
        r = observables[self.rc_observable](x)
        if self.rc_form == "log_barrier":
            return self.rc_log_barrier(r), "rc_log_barrier"
        return self.rc_negative_entropy(r), "rc_neg_entropy"

    def reverse_kl(self, bg: "BoltzmannGenerator", n: int, energy_cut_high: float
                   ) -> tuple[Tensor, list[Tensor], dict[str, float]]:
        """(L_KL, the samples x of each KL temperature, their energy statistics) for n latent samples,
        reduced energies cut at `energy_cut_high`.

        With `kl_temperatures` [tau_1, ..., tau_K] the batch is split evenly over them: z ~ N(0, tau_k T_p I)
        (the prior's samples scaled by sqrt(tau_k)), x = F(z), energy u(x) / tau_k (the target at
        tau_k times its temperature), L_KL = mean_k E[u(F(z)) / tau_k - log|det dF/dz|], the mean of
        the reverse KLs at each temperature up to constants (Noe et al., Science 2019: one flow
        for several temperatures). Without it, K = 1 and tau_1 = 1."""
        taus = self.kl_temperatures or [1.0]
        sizes = [n // len(taus) + (1 if k < n % len(taus) else 0) for k in range(len(taus))]
        losses, groups, energies, n_bad = [], [], [], 0
        for tau, m in zip(taus, sizes):
            z = bg.prior.sample(m, generator=bg.latent_generator)
            if tau != 1.0:
                z = z * math.sqrt(tau)
            x, logdet = bg.flow(z)
            u = bg.energy(x) if tau == 1.0 else bg.energy(x) / tau
            u_cut, bad = linlog_cut(u, energy_cut_high, self.energy_max)
            losses.append((u_cut - logdet).mean())
            groups.append(x)
            energies.append(u.detach())
            n_bad += bad
        u_all = torch.cat(energies)
        finite = u_all[torch.isfinite(u_all)]
        stats = {
            "kl/nonfinite_energies": float(n_bad),
            "kl/energy_median": float(finite.median()) if finite.numel() else float("nan"),
        }
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return loss, groups, stats

    def rc_of_groups(self, bg: "BoltzmannGenerator", groups: list[Tensor]) -> tuple[Tensor, str]:
        """The RC loss averaged over the KL temperatures (a histogram per temperature)."""
        terms = [self.rc_term(bg, x) for x in groups]
        value = terms[0][0] if len(terms) == 1 else torch.stack([t for t, _ in terms]).mean()
        return value, terms[0][1]

    def kl(self, bg: "BoltzmannGenerator", n: int) -> tuple[Tensor, dict[str, float]]:
        """L_KL + rc_weight * L_RC (the unstaged schedule; the RC term rides on the KL weight)."""
        loss, groups, stats = self.reverse_kl(bg, n, self.energy_cut_high)
        if self.rc_weight > 0:
            rc, name = self.rc_of_groups(bg, groups)
            stats[name] = float(rc.detach())
            loss = loss + self.rc_weight * rc
        return loss, stats

    def __call__(
        self, bg: "BoltzmannGenerator", x: Tensor | None, step: int, forces: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss at optimisation step `step` and the scalars to log.

        `forces` are the reduced forces f = -grad u of the data `x` (needed when force_weight > 0).
        """
        if self.stages is not None:
            return self._staged(bg, x, step, forces)
        w_kl = self.kl_weight(step)
        metrics: dict[str, float] = {"weight/kl": w_kl}
        loss = self._data_terms(bg, x, forces, self.beta, metrics,
                                "this loss has beta > 0 (an NLL term) but no data was given")
        if w_kl > 0:
            kl, stats = self.kl(bg, self.kl_batch_size)
            loss = loss + w_kl * kl
            metrics["kl"] = float(kl.detach())
            metrics.update(stats)
        return loss, metrics

    def _data_terms(self, bg: "BoltzmannGenerator", x: Tensor | None, forces: Tensor | None, nll_weight: float,
                    metrics: dict[str, float], no_data: str) -> Tensor:
        """force_weight * L_FM + nll_weight * L_ML on the data (terms of weight 0 not evaluated);
        their values go into `metrics`; `no_data` is the message when the NLL has no data."""
        loss = torch.zeros((), device=bg.device)
        log_q = None
        if self.force_weight > 0:
            if x is None or forces is None:
                raise ValueError("this loss has force_weight > 0 (force matching) but the batch has no forces: "
                                 "set data.forces=true so the data module provides them")
            fm, log_q = self.force_matching(bg, x, forces)
            loss = loss + self.force_weight * fm
            metrics["fm"] = float(fm.detach())
        if nll_weight > 0:
            if x is None:
                raise ValueError(no_data)
            nll = -log_q.mean() if log_q is not None else self.nll(bg, x)
            loss = loss + nll_weight * nll
            metrics["nll"] = float(nll.detach())
        return loss

    def _staged(self, bg: "BoltzmannGenerator", x: Tensor | None, step: int,
                forces: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """nll * L_ML + kl * L_KL + rc * L_RC + force_weight * L_FM with the weights and the energy cut
        of the stage at `step`; terms of weight 0 are not evaluated."""
        index, stage = self.stage(step)
        metrics: dict[str, float] = {"stage": float(index), "weight/nll": stage.nll, "weight/kl": stage.kl,
                                     "weight/rc": stage.rc, "energy_cut": stage.energy_cut}
        loss = self._data_terms(bg, x, forces, stage.nll, metrics,
                                f"stage {index} of loss.stages has nll={stage.nll} but no data was given")
        if stage.kl > 0:
            kl, groups, stats = self.reverse_kl(bg, self.kl_batch_size, stage.energy_cut)
            loss = loss + stage.kl * kl
            metrics["kl"] = float(kl.detach())
            metrics.update(stats)
            if stage.rc > 0:
                rc, name = self.rc_of_groups(bg, groups)
                loss = loss + stage.rc * rc
                metrics[name] = float(rc.detach())
        return loss, metrics
