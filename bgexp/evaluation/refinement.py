"""SMC refinement of a Boltzmann generator and its equal-budget baselines (bgexp.samplers).

From the flow (Sequential Boltzmann generators, Tan et al., ICML 2025; stochastic normalizing
flows, Wu, Koehler, Noe, NeurIPS 2020): annealed SMC in the flow's latent space z, on the path

    log pi_b(z) = (1 - b) log p_Z(z) + b [-u(F(z)) + log|det dF/dz|],   b: 0 -> 1,

i.e. from the prior to the pull-back of the Boltzmann density through the flow. Moves on z need
only forward passes (no inverse), work for every representation (internal coordinates, torsions
on the circle) and see the target through the flow, where it is closest to the prior. pi_1's
normalizer is Z (the target's, the flow's Jacobian cancels), pi_0's is 1, so the SMC normalizer
estimates log Z directly.

Per state (`per_state`, the default for targets with several states): resampling drops a state
that the flow under-weights and MCMC does not cross a high barrier back (measured on the dimer:
ESS 0.97 and Delta F 5.0 kT against 1.16), so each state s is refined on its own, on the path
restricted to F(z) in s: started from the flow's samples that land in s, whose fraction Q_s
estimates the prior's mass there, it estimates Z_s / Q_s; then

    log Z_s = log Q_s + log(Z_s / Q_s),    Delta F(a -> b) = -(log Z_b - log Z_a).

Error bars: independent replicates (each with its own flow samples, Q_s and SMC), a Student-t
interval over them (bgexp.samplers.replicates).

Bidirectional (`bidirectional`, per state, needs data and an inverse): the one-sided SMC normalizer
scatters by kT between replicates when the flow is far from the target within a state (its log is
biased low by ~Var/2).  Equilibrium frames of the state are a second, free source of information:
pulled back by F^-1 they are exact samples of pi_1, so the SMC's protocol (its b's and adapted
step sizes, frozen) is run forward from fresh prior particles and backward from the frames, and
BAR on the two sets of works (Crooks) gives log Z_s / Q_s (bgexp.samplers.bidirectional).  The
frames must be independent of the flow's fit: a flow trained on them has a higher density at those
very frames than at fresh samples of the same distribution (measured on the dimer: log q 55 at the
training frames, ~17 after 600 MALA steps on exp(-u) from them, the energy unchanged), and reverse
works from them are biased; `reverse_steps` MCMC moves in x on the state's target first make them
fresh samples (the kernel keeps the target invariant).  `reverse_frames: heldout` starts the reverse
direction from the held-out frames instead, which the flow was not fitted to: with whole chains held
out (`data.split=chains`) they are independent of the fit without any moves (with a random split of
correlated frames they are not: neighbours of the training frames).  Independent is not enough: on
the dimer, held-out chains without moves gave Delta F 1.4-2 kT off, the reverse and forward works
hardly overlapping (README, "Bidirectional AIS + BAR").  For interchangeable particles the frames
are relabelled into the canonical region (exp(-u) is permutation-invariant); without relabelling,
MC frames sample a few labellings only and are not samples of the flow's labelled density.

Baselines: `prior` is the same SMC (same settings) without the trained transform (the prior
pushed through the fixed representation layers only, or used directly in x when there are none);
`mcmc` runs the same kernel in x from the training data for as many energy evaluations as the
flow used in all (training, importance sampling, SMC).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from bgexp.evaluation.metrics import wasserstein_2
from bgexp.evaluation.smc_observables import (ObservedSample, concatenate, mix_states, observable_curves,
                                              observable_figures, observable_metrics, swept_sample)
from bgexp.flows.base import ContinuousFlow
from bgexp.samplers import HMC, MALA, SMCResult, smc
from bgexp.samplers.bidirectional import bidirectional_ais, pilot_protocol
from bgexp.samplers.errors import SamplerSettingError
from bgexp.samplers.replicates import replicate_seeds, student_t_interval
from bgexp.spaces import Space

KERNELS = {"mala": MALA, "hmc": HMC}
REVERSE_FRAMES = ("training", "heldout")  # where the bidirectional estimate's reverse direction starts


@dataclass
class SMCSettings:
    """The `smc` config group (conf/smc): particles per run (per state with `per_state`), replicates,
    the kernel and its first step size, MCMC steps per level, the CESS target of the adaptive
    schedule, the resampling threshold (ESS fraction), an energy budget per run (None: none), the
    draws allowed to find a state's initial particles (a multiple of n_particles), the baselines
    to run, and the confidence of the intervals. `enabled: false` switches a configured block off
    (an experiment that refines by default: smc.enabled=false)."""

    enabled: bool = True
    n_particles: int = 1000
    n_replicates: int = 3
    kernel: str = "mala"
    step_size: float = 0.05
    n_steps_per_level: int = 5
    cess_target: float = 0.99
    resample_threshold: float = 0.5
    max_energy_evals: int | None = None
    per_state: bool | None = None
    max_draw_factor: int = 200
    baselines: tuple[str, ...] = ("prior",)
    confidence: float = 0.95
    batch_size: int = 2000
    progress: bool = True
    bidirectional: bool = False
    n_bidirectional: int | None = None
    reverse_steps: int = 0
    reverse_frames: str = "training"
    q_draws: int = 100_000
    final_sweeps: int = 0

    def __post_init__(self) -> None:
        self.baselines = tuple(self.baselines or ())
        if int(self.n_particles) < 2:
            raise SamplerSettingError(f"smc.n_particles must be >= 2, got {self.n_particles}")
        if int(self.n_replicates) < 2:
            raise SamplerSettingError(f"smc.n_replicates must be >= 2 (the error bars come from replicates), "
                                      f"got {self.n_replicates}")
        if self.kernel not in KERNELS:
            raise SamplerSettingError(f"smc.kernel must be one of {sorted(KERNELS)}, got {self.kernel!r}")
        if not 0 < self.confidence < 1:
            raise SamplerSettingError(f"smc.confidence must be in (0, 1), got {self.confidence}")
        unknown = set(self.baselines) - {"prior", "mcmc"}
        if unknown:
            raise SamplerSettingError(f"smc.baselines: unknown {sorted(unknown)} (available: prior, mcmc)")
        if int(self.max_draw_factor) < 1:
            raise SamplerSettingError(f"smc.max_draw_factor must be >= 1, got {self.max_draw_factor}")
        if self.n_bidirectional is not None and int(self.n_bidirectional) < 2:
            raise SamplerSettingError(f"smc.n_bidirectional must be >= 2 (or null: n_particles), got {self.n_bidirectional}")
        if int(self.q_draws) != self.q_draws or self.q_draws < 0:
            raise SamplerSettingError(f"smc.q_draws must be an integer >= 0, got {self.q_draws}")
        if int(self.reverse_steps) != self.reverse_steps or self.reverse_steps < 0:
            raise SamplerSettingError(f"smc.reverse_steps must be an integer >= 0, got {self.reverse_steps}")
        if int(self.final_sweeps) != self.final_sweeps or self.final_sweeps < 0:
            raise SamplerSettingError(f"smc.final_sweeps must be an integer >= 0, got {self.final_sweeps}")
        if self.reverse_frames not in REVERSE_FRAMES:
            raise SamplerSettingError(f"smc.reverse_frames must be one of {REVERSE_FRAMES}, got {self.reverse_frames!r}")
        if self.bidirectional and self.per_state is False:
            raise SamplerSettingError("smc.bidirectional needs smc.per_state (the data are equilibrium samples within "
                                      "each state, not across states)")

    @property
    def n_works(self) -> int:
        """Particles per direction of the bidirectional estimate."""
        return int(self.n_bidirectional or self.n_particles)


@dataclass
class Pullback:
    """The path's two ends in z for a flow F (or the identity): log p_Z(z) and -u(F(z)) + log|det|."""

    prior: torch.nn.Module
    flow: torch.nn.Module | None
    energy: Callable[[Tensor], Tensor]
    space: Space

    def push(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.flow is None:
            return z, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        return self.flow(z)

    def log_pi0(self, z: Tensor) -> Tensor:
        return self.prior.log_prob(z)

    @torch.no_grad()
    def pull(self, x: Tensor) -> Tensor:
        """z = F^-1(x): equilibrium samples of the target pulled back are exact samples of pi_1."""
        if self.flow is None:
            return x
        return self.flow.inverse(x)[0]

    def log_pi1(self, z: Tensor) -> Tensor:
        x, logdet = self.push(z)
        return -self.energy(x) + logdet

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n exact samples of pi_0 (the prior) and their initial log-weights (zero)."""
        z = self.prior.sample(n, generator=generator)
        return z, torch.zeros(n, dtype=torch.float64)

    def restricted_log_pi1(self, state: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """log pi_1 restricted to F(z) in `state` (-inf outside). With particles started inside,
        every pi_b with b > 0 is then restricted too (moves that leave are rejected), and log pi_0
        can stay whole: the first increment, taken inside, is the same, and the estimate is
        Z_s / Q_s for initial particles drawn from the prior restricted to the state."""
        def log_pi1(z: Tensor) -> Tensor:
            x, logdet = self.push(z)
            value = -self.energy(x) + logdet
            with torch.no_grad():
                mask = state(x)
            return torch.where(mask, value, torch.full_like(value, -math.inf))

        return log_pi1


class WeightedStart(Pullback):
    """For continuous flows (one ODE solve per density evaluation): SMC in x from a Gaussian pi_0
    fitted to flow samples (diagonal; isotropic and centred on particle spaces), started from the
    flow's own samples x ~ q with initial log-weights log pi_0(x) - log q(x). The flow is solved
    once per particle; the annealing needs energies only. The estimate is unchanged: the weighted
    start represents pi_0, so the normalizer is Z_1 / Z_0 as before (Del Moral, Doucet, Jasra 2006)."""

    def __init__(self, model, space: Space, n_fit: int = 2000):
        super().__init__(prior=None, flow=None, energy=canonical_energy(model.target), space=space)
        self.model = model
        with torch.no_grad():  # the fit needs samples only: the bare field, no divergence
            z = model.prior.sample(n_fit, generator=torch.Generator().manual_seed(0))
            x = model.flow.transport(z).double()
        if space.is_particles:
            self.mean, self.var = torch.zeros_like(x[0]), x.square().mean().expand(x.shape[1])
        else:
            self.mean, self.var = x.mean(0), x.var(0).clamp_min(1e-12)

    def log_pi0(self, x: Tensor) -> Tensor:
        mean, var = self.mean.to(x), self.var.to(x)
        return (-0.5 * (x - mean).square() / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, log_q = self.model.sample(n, generator=generator)
        return x, (self.log_pi0(x) - log_q.to(x)).double().cpu()


def pullbacks(model) -> dict[str, Pullback]:
    """"flow": the trained flow (pulled back into its latent space, or, for continuous flows, a
    weighted start in x); "prior": the prior through the fixed representation only. Energies are
    the target's (the sampler counts them; they are reported as n_energy_evals.smc)."""
    energy = model.target.energy
    flow = (WeightedStart(model, model.target.space) if isinstance(model.flow, ContinuousFlow)
            else Pullback(model.prior, model.flow, canonical_energy(model.target), model.latent_space))
    return {"flow": flow, "prior": Pullback(model.prior, model.representation, energy, model.latent_space)}


def canonical_energy(target) -> Callable[[Tensor], Tensor]:
    """The target's energy, +inf outside its canonical region when its interchangeable particles
    are relabelled (the flow is a density of that region: bgexp/targets/permutations.py), so that
    SMC from the flow targets mu restricted to it; the target's energy otherwise. SMC from the
    prior and MCMC need no restriction: every observable they estimate is permutation-invariant."""
    relabelling = target.relabelling
    if relabelling is None:
        return target.energy

    def energy(x: Tensor) -> Tensor:
        u = target.energy(x)
        inside = relabelling.in_canonical_region(x).to(u.device)
        return torch.where(inside, u, torch.full_like(u, math.inf))

    return energy


# one run ------------------------------------------------------------------------------------------
def _kernel(settings: SMCSettings, space: Space):
    return KERNELS[settings.kernel](space, step_size=float(settings.step_size))


def _smc(settings: SMCSettings, z0: Tensor, log_w0: Tensor, log_pi0, log_pi1, space: Space, generator) -> SMCResult:
    weighted = bool((log_w0 != 0).any())
    return smc(z0, log_pi0, log_pi1, space, _kernel(settings, space), n_steps_per_level=settings.n_steps_per_level,
               cess_target=settings.cess_target, resample_threshold=settings.resample_threshold,
               max_energy_evals=settings.max_energy_evals, log_weights0=log_w0 if weighted else None,
               generator=generator, progress=settings.progress)


@torch.no_grad()
def draw_in_state(path: Pullback, state: Callable[[Tensor], Tensor], n: int, settings: SMCSettings,
                  generator: torch.Generator, min_draws: int = 0) -> tuple[Tensor, Tensor, float, int]:
    """Up to n starting particles whose F(z) lies in `state` with their initial log-weights, the
    estimate Q = accepted / drawn of the starting distribution's mass there (draws stop at
    n * max_draw_factor, and go on to at least `min_draws`), and the number drawn."""
    kept, weights, drawn, hits = [], [], 0, 0
    while (hits < n and drawn < n * settings.max_draw_factor) or drawn < min_draws:
        z, log_w0 = path.draw(settings.batch_size, generator)
        mask = state(path.push(z)[0])
        drawn += z.shape[0]
        hits += int(mask.sum())
        if sum(k.shape[0] for k in kept) < n:
            kept.append(z[mask])
            weights.append(log_w0[mask.cpu()])
    # Q from every draw (the tail beyond n is drawn, counted and not used)
    return torch.cat(kept)[:n], torch.cat(weights)[:n], hits / drawn, drawn


def _observed(path: Pullback, target, log_pi1, result: SMCResult, settings: SMCSettings,
              generator: torch.Generator) -> ObservedSample:
    """The target's observables on the run's final weighted particles and after each of
    `final_sweeps` sweeps at b = 1 (bgexp.evaluation.smc_observables)."""
    return swept_sample(target, lambda y: path.push(y)[0], log_pi1, result, _kernel(settings, path.space),
                        int(settings.final_sweeps), int(settings.n_steps_per_level), generator)


def run_per_state(path: Pullback, states: dict[str, Callable], settings: SMCSettings,
                  generator: torch.Generator, data: Tensor | None, target) -> dict[str, Any]:
    """One replicate of the per-state refinement: log Z_s for every state (module docstring); with
    ``settings.bidirectional`` and `data`, also the bidirectional estimate of every log Z_s."""
    log_z, ess, evals, levels, wall, model_s, history = {}, {}, 0, {}, 0.0, 0.0, {}
    bidir: dict[str, dict[str, float]] = {}
    finals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    observed: dict[str, ObservedSample] = {}
    budget_stops = 0
    n_extra = settings.n_works if settings.bidirectional else 0
    for name, state in states.items():
        t0 = time.perf_counter()  # drawing the starting particles is flow evaluation (model time)
        z_all, log_w_all, q, drawn = draw_in_state(path, state, settings.n_particles + n_extra, settings, generator,
                                                   min_draws=settings.q_draws if settings.bidirectional else 0)
        z0, log_w0 = z_all[:settings.n_particles], log_w_all[:settings.n_particles]
        model_s += time.perf_counter() - t0
        if q == 0 or z0.shape[0] < 2:
            log_z[name], ess[name], levels[name] = -math.inf, 0.0, 0
            if settings.bidirectional and data is not None:  # no particles: no estimate for this state
                bidir[name] = {"log_z": -math.inf, "std": math.nan, "q": q, "q_draws": drawn, "n_energy_evals": 0}
            continue
        result = _smc(settings, z0, log_w0, path.log_pi0, path.restricted_log_pi1(state), path.space, generator)
        log_z[name] = math.log(q) + result.log_normalizer
        budget_stops += int(result.budget_exhausted)
        finals[name] = final_energies(path, result)
        observed[name] = _observed(path, target, path.restricted_log_pi1(state), result, settings, generator)
        ess[name], levels[name] = result.ess, result.n_levels
        history[name] = result.history_table()
        evals += result.n_energy_evals + observed[name].n_energy_evals
        wall += result.wall_s + observed[name].wall_s
        model_s += result.model_s + observed[name].model_s
        if settings.bidirectional and data is not None:
            t0 = time.perf_counter()
            entry = bidirectional_in_state(path, target, state, settings, result, z_all[settings.n_particles:], q, data,
                                           generator)
            entry["q"], entry["q_draws"] = q, drawn
            bidir[name] = entry
            evals += entry["n_energy_evals"]
            wall += time.perf_counter() - t0
            model_s += entry.pop("model_s")
    out = {"log_z": log_z, "ess": ess, "n_energy_evals": evals, "levels": levels, "wall_s": wall,
           "model_s": model_s, "history": history, "final": _mix_states(finals, log_z), "budget_stops": budget_stops,
           "observed": mix_states(observed, log_z)}
    if bidir:
        out["bidirectional"] = bidir
    return out


def bidirectional_in_state(path: Pullback, target, state: Callable[[Tensor], Tensor], settings: SMCSettings,
                           result: SMCResult, z_forward: Tensor, q: float, data: Tensor,
                           generator: torch.Generator) -> dict[str, Any]:
    """log Z_s = log Q_s + BAR(forward works from the prior's particles in s, reverse works from
    the data in s pulled back by F^-1), on the protocol of this state's SMC run
    (`bgexp.samplers.bidirectional`).  The data must be equilibrium samples of the target within
    the state in the flow's coordinates (for interchangeable particles: relabelled, so that they
    sample the canonical region the flow's density lives on)."""
    frames = data[state(data).to(data.device)]
    if frames.shape[0] < 2 or z_forward.shape[0] < 2:
        return {"log_z": -math.inf, "std": math.nan, "n_forward": int(z_forward.shape[0]),
                "n_reverse": int(frames.shape[0]), "n_energy_evals": 0, "model_s": 0.0}
    pick = torch.randperm(frames.shape[0], generator=torch.Generator().manual_seed(
        int(torch.randint(2 ** 31, (1,), generator=generator))))[:settings.n_works]
    frames, decorrelation = decorrelate(target, state, frames[pick].to(z_forward), settings, generator)
    z_reverse = path.pull(frames)
    res = bidirectional_ais(z_forward, z_reverse, path.log_pi0, path.restricted_log_pi1(state), path.space,
                            _kernel(settings, path.space), pilot_protocol(result), generator=generator)
    return {"log_z": math.log(q) + res.log_normalizer, "std": res.std,
            "work_forward": res.work_forward, "work_reverse": res.work_reverse,
            "forward_log_z": math.log(q) + res.forward_log_normalizer,
            "reverse_log_z": math.log(q) + res.reverse_log_normalizer, "forward_ess": res.forward_ess,
            "n_forward": int(z_forward.shape[0]), "n_reverse": int(z_reverse.shape[0]),
            "n_levels": res.protocol.n_levels, "n_energy_evals": int(res.n_energy_evals) + decorrelation["n_energy_evals"],
            "reverse_steps": settings.reverse_steps, "reverse_step_size": decorrelation["step_size"],
            "model_s": res.model_s + decorrelation["model_s"]}


def decorrelate(target, state: Callable[[Tensor], Tensor], x: Tensor, settings: SMCSettings,
                generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """``settings.reverse_steps`` moves of the kernel in x on exp(-u) restricted to the state, the
    first fifth adapting the step size, then relabelled into the canonical region (if the target
    relabels; exp(-u) is permutation-invariant, so this samples it restricted to that region).  The
    kernel leaves the target invariant: equilibrium frames stay equilibrium samples, and they lose
    their link to the flow, which was fitted to these very frames (a flow's density is higher at
    its training frames than at fresh samples of the same distribution, so reverse works from the
    training frames themselves are biased)."""
    steps = int(settings.reverse_steps)
    if steps == 0:
        return x, {"n_energy_evals": 0, "model_s": 0.0, "step_size": None}

    def log_density(y: Tensor) -> Tensor:
        value = -target.energy(y)
        return torch.where(state(y).to(value.device), value, torch.full_like(value, -math.inf))

    kernel = KERNELS[settings.kernel](target.space, step_size=0.01)
    t0 = time.perf_counter()
    chain = kernel.warmup(x, log_density, max(steps // 5, 1), generator=generator)
    chain, _ = kernel.run(chain, log_density, steps - max(steps // 5, 1), generator=generator)
    evals = x.shape[0] * (steps + 1) * kernel.evals_per_step
    return _canonical(target, chain.y), {"n_energy_evals": int(evals), "model_s": time.perf_counter() - t0, "step_size": kernel.step_size}


def run_global(path: Pullback, states: dict[str, Callable], settings: SMCSettings,
               generator: torch.Generator, target) -> dict[str, Any]:
    """One replicate over all configurations: log Z and every state's weighted share."""
    t0 = time.perf_counter()  # drawing the starting particles is flow evaluation (model time)
    z0, log_w0 = path.draw(settings.n_particles, generator)
    draw_s = time.perf_counter() - t0
    result = _smc(settings, z0, log_w0, path.log_pi0, path.log_pi1, path.space, generator)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = path.push(result.y)[0]
    draw_s += time.perf_counter() - t0
    final = final_energies(path, result, x)
    observed = _observed(path, target, path.log_pi1, result, settings, generator)
    log_w = result.log_weights.numpy()
    log_z = {}
    for name, state in states.items():
        mask = state(x).cpu().numpy()
        share = log_w[mask]
        log_z[name] = float(np.logaddexp.reduce(share) - math.log(len(log_w))) if share.size else -math.inf
    return {"log_z": log_z, "log_normalizer": result.log_normalizer, "ess": {"all": result.ess},
            "n_energy_evals": result.n_energy_evals + observed.n_energy_evals, "levels": {"all": result.n_levels},
            "wall_s": result.wall_s + observed.wall_s, "model_s": result.model_s + draw_s + observed.model_s,
            "history": {"all": result.history_table()}, "final": final, "budget_stops": int(result.budget_exhausted),
            "observed": observed}


@torch.no_grad()
def final_energies(path: Pullback, result: SMCResult, x: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The final particles' reduced energies u(F(z)) and self-normalised final weights (before any
    last resampling): the SMC's estimate of the target's energy distribution. The N energies are a
    metric's (the energy W2), not the estimator's, and are not counted in the budget."""
    x = path.push(result.y)[0] if x is None else x
    return path.energy(x).double().cpu().numpy(), result.normalized_weights()


def _mix_states(finals: dict[str, tuple[np.ndarray, np.ndarray]], log_z: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-state final energies and weights combined into one weighted sample of the whole target:
    state s enters with its estimated probability Z_s / sum_t Z_t (`mix_states`)."""
    mixed = mix_states({name: ObservedSample({"u": u}, w) for name, (u, w) in finals.items()}, log_z)
    return mixed.observed.get("u", np.zeros(0)), mixed.weights


# replicates and the results block ---------------------------------------------------------------
def refine(path: Pullback, target, settings: SMCSettings, seed: int, reference=None,
           data: Tensor | None = None, heldout_u: np.ndarray | None = None) -> dict[str, Any]:
    """`n_replicates` independent runs (per state or global) and their Delta F with Student-t
    intervals against the target's reference: the block results.json stores under smc/<name>.
    With ``settings.bidirectional`` and `data` (per state), a `bidirectional` sub-block too; with
    held-out energies `heldout_u`, the energy W2 of every replicate's final weighted particles."""
    states = dict(target.states)
    per_state = settings.per_state if settings.per_state is not None else len(states) > 1
    start = time.perf_counter()
    if per_state:
        replicates = [run_per_state(path, states, settings, torch.Generator().manual_seed(s), data, target)
                      for s in replicate_seeds(seed, settings.n_replicates)]
    else:
        replicates = [run_global(path, states, settings, torch.Generator().manual_seed(s), target)
                      for s in replicate_seeds(seed, settings.n_replicates)]
    names = list(states)
    delta_f = _delta_f_intervals(names, [r["log_z"] for r in replicates], settings, reference)
    wall = time.perf_counter() - start
    model_s = sum(r["model_s"] for r in replicates)
    extra = {} if per_state else {  # log Z_1 / Z_0 (the target's log Z when pi_0 is normalised)
        "log_normalizer": _interval([r["log_normalizer"] for r in replicates], settings.confidence, None)}
    if all("bidirectional" in r for r in replicates):
        extra["bidirectional"] = _bidirectional_block(names, replicates, settings, reference)
    if heldout_u is not None:
        extra["energy_w2"] = _interval([_energy_w2(heldout_u, *r["final"]) for r in replicates], settings.confidence, None)
        edges = energy_edges(heldout_u)
        extra["energy_histogram"] = np.mean([_weighted_density(u, w, edges) for u, w in
                                             (r["final"] for r in replicates)], axis=0).tolist()
    observables = observables_block(target, [r["observed"] for r in replicates], settings.confidence)
    if observables:
        extra["observables"] = observables
    return {"mode": "per_state" if per_state else "global", "delta_f": delta_f, **extra,
            "ess": _mean_dicts([r["ess"] for r in replicates]),
            "n_energy_evals": int(sum(r["n_energy_evals"] for r in replicates)), "wall_s": wall,
            "overhead_fraction": max(0.0, 1.0 - model_s / wall) if wall > 0 else None,
            "levels": _mean_dicts([r["levels"] for r in replicates]),
            "budget_stops": int(sum(r["budget_stops"] for r in replicates)),
            "replicates": [{k: r[k] for k in ("log_z", "ess", "n_energy_evals", "levels")} for r in replicates],
            "history": replicates[0]["history"]}


def observables_block(target, samples: list[ObservedSample], confidence: float) -> dict[str, Any]:
    """The observable metrics after SMC (profile RMSE, surface KL against the target's reference):
    `replicates`, each metric's Student-t interval over the replicates' samples; `pooled`, the
    metrics of all replicates' samples pooled (equal shares: a larger sample, the one to read for a
    histogram metric, which missed bins bias upwards); `n_configurations` per replicate; `curves`
    of the pooled sample for the figures. {} when the target has no metric with a reference."""
    per_replicate = [observable_metrics(target, s) for s in samples]
    pooled_sample = concatenate(samples, [1.0] * len(samples))
    pooled = observable_metrics(target, pooled_sample)
    if not pooled:
        return {}
    keys = [k for k in pooled if all(k in m for m in per_replicate)]
    return {"replicates": {k: _interval([m[k] for m in per_replicate], confidence, None) for k in keys},
            "pooled": pooled, "n_configurations": [s.n for s in samples],
            "curves": observable_curves(target, pooled_sample)}


def _delta_f_intervals(names: list[str], log_z: list[dict[str, float]], settings: SMCSettings,
                       reference) -> dict[str, Any]:
    """Delta F(first state -> each other) per replicate, and their Student-t interval."""
    delta_f = {}
    for b in names[1:]:
        key = f"{names[0]}->{b}"
        values = [-(r[b] - r[names[0]]) for r in log_z]
        delta_f[key] = _interval(values, settings.confidence, reference.delta_f.get(key) if reference else None)
    return delta_f


def _bidirectional_block(names: list[str], replicates: list[dict[str, Any]], settings: SMCSettings,
                         reference) -> dict[str, Any]:
    """The bidirectional estimates.  `delta_f`: BAR on the works of all replicates pooled per state
    (forward AIS particles are independent, and so are the decorrelated reverse ones), log Z_s =
    log Q_s + BAR, its std sqrt(std_BAR^2 + (1 - Q_s) / (Q_s n_draws)) (Bennett's asymptotic std and
    the binomial std of log Q_s from every replicate's draws); a normal interval.  Beside it,
    `replicates_interval`: the Student-t interval over the replicates' own estimates, a check of
    that std; per replicate and state the BAR std, the one-sided estimates and the particles."""
    from bgexp.estimators.free_energy import bar

    rows = [r["bidirectional"] for r in replicates]
    z = float(stats.norm.ppf(0.5 + settings.confidence / 2))
    pooled: dict[str, tuple[float, float]] = {}
    histograms: dict[str, dict[str, Any]] = {}
    for name in names:
        wf = np.concatenate([row[name].get("work_forward", np.array([])) for row in rows])
        wr = np.concatenate([row[name].get("work_reverse", np.array([])) for row in rows])
        hits = sum(row[name]["q"] * row[name]["q_draws"] for row in rows)
        draws = sum(row[name]["q_draws"] for row in rows)
        if wf.size < 2 or wr.size < 2 or hits == 0:
            pooled[name] = (-math.inf, math.nan)
            continue
        delta, std = bar(wf, wr)
        q = hits / draws
        pooled[name] = (math.log(q) - delta, math.sqrt(std ** 2 + (1 - q) / (q * draws)))
        histograms[name] = _work_histogram(wf, wr, delta)
    delta_f = {}
    for b in names[1:]:
        key = f"{names[0]}->{b}"
        value = -(pooled[b][0] - pooled[names[0]][0])
        std = math.hypot(pooled[b][1], pooled[names[0]][1])
        entry: dict[str, Any] = {"value": None, "ci_low": None, "ci_high": None, "std": None,
                                 "confidence": settings.confidence, "reference": None, "reference_source": None}
        if math.isfinite(value) and math.isfinite(std):
            entry.update(value=value, std=std, ci_low=value - z * std, ci_high=value + z * std)
        delta_f[key] = _against_reference(entry, reference.delta_f.get(key) if reference else None)
    per_replicate = _delta_f_intervals(names, [{k: v["log_z"] for k, v in row.items()} for row in rows],
                                       settings, reference)
    for key, entry in per_replicate.items():
        a, b = key.split("->")
        entry["bar_std"] = [float(math.hypot(row[a]["std"], row[b]["std"])) for row in rows]
    for row in rows:  # the works stay out of results.json
        for entry in row.values():
            entry.pop("work_forward", None)
            entry.pop("work_reverse", None)
    return {"delta_f": delta_f, "replicates_interval": per_replicate,
            "log_z": {k: {"value": v[0], "std": v[1]} for k, v in pooled.items()},
            "work_histograms": histograms,
            "n_energy_evals": int(sum(v["n_energy_evals"] for row in rows for v in row.values())),
            "replicates": rows}


def _work_histogram(wf: np.ndarray, wr: np.ndarray, delta_f: float, bins: int = 40) -> dict[str, Any]:
    """Forward works and negated reverse works on shared bins (finite works, 0.5-99.5 percentiles):
    what the work-distribution figure draws, small enough for results.json."""
    both = np.concatenate([wf[np.isfinite(wf)], -wr[np.isfinite(wr)]])
    lo, hi = (np.percentile(both, [0.5, 99.5]) if both.size else (0.0, 1.0))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {"edges": edges.tolist(), "forward": np.histogram(wf[np.isfinite(wf)], edges)[0].tolist(),
            "reverse": np.histogram(-wr[np.isfinite(wr)], edges)[0].tolist(),
            "delta_f": float(delta_f) if math.isfinite(delta_f) else None}


def _interval(values: list[float], confidence: float, reference) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    entry: dict[str, Any] = {"value": None, "ci_low": None, "ci_high": None, "confidence": confidence,
                             "replicates": values, "reference": None, "reference_source": None}
    if len(finite) == len(values) and len(values) >= 2:
        mean, low, high, _ = student_t_interval(values, confidence)
        entry.update(value=mean, ci_low=low, ci_high=high)
    return _against_reference(entry, reference)


def _against_reference(entry: dict[str, Any], reference) -> dict[str, Any]:
    """The entry with the reference, and (when it has a value) its error and whether its interval
    covers the reference."""
    if reference is not None:
        entry.update(reference=reference.value, reference_source=reference.source)
        if entry["value"] is not None:
            entry["error"] = entry["value"] - reference.value
            entry["covered"] = bool(entry["ci_low"] <= reference.value <= entry["ci_high"])
    return entry


def _energy_w2(heldout_u: np.ndarray, u: np.ndarray, weights: np.ndarray | None = None) -> float:
    """W2 between the held-out frames' energies and a (weighted) sample's; NaN where undefined."""
    value = wasserstein_2(heldout_u, u, weights)
    return math.nan if value is None else value


def energy_edges(heldout_u: np.ndarray, bins: int = 50) -> np.ndarray:
    """Shared histogram bins of the energy figures: the held-out energies' 0.5-99.5 percentiles,
    widened by a tenth on each side."""
    finite = heldout_u[np.isfinite(heldout_u)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    pad = 0.1 * (hi - lo) if hi > lo else 1.0
    return np.linspace(lo - pad, hi + pad, bins + 1)


def _weighted_density(u: np.ndarray, weights: np.ndarray | None, edges: np.ndarray) -> np.ndarray:
    """The (weighted) histogram of u on `edges` as a density over all of u's weight (mass outside
    the bins is left out of the picture, not renormalised into it); zeros when there is none."""
    keep = np.isfinite(u) if weights is None else np.isfinite(u) & np.isfinite(weights)
    w = np.ones(int(keep.sum())) if weights is None else weights[keep]
    total = w.sum()
    counts, _ = np.histogram(u[keep], edges, weights=w)
    return counts / (total * np.diff(edges)) if total > 0 else np.zeros(len(edges) - 1)


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def mcmc_from_data(target, data: Tensor, budget: int, settings: SMCSettings, seed: int,
                   heldout_u: np.ndarray | None = None) -> dict[str, Any]:
    """The equal-budget MCMC baseline: `settings.kernel` chains in x on exp(-u), started from
    training frames (n_particles chains, or fewer frames), run for `budget` energy evaluations in
    all; the first fifth of the steps adapt the step size and are excluded. Delta F(a -> b) =
    -ln(p_b / p_a) from the time-averaged state populations; the chains are split into
    n_replicates groups and the groups' estimates give a Student-t interval (chains started in a
    state they never leave make that interval honest about the start, not about equilibrium). With
    held-out energies, the energy W2 of the chains' final states (n_particles chains: as many
    configurations as one SMC replicate has particles)."""
    n_chains = min(int(settings.n_particles), int(data.shape[0]))
    kernel = KERNELS[settings.kernel](target.space, step_size=float(settings.step_size))
    n_steps = int(budget) // (n_chains * kernel.evals_per_step)
    if n_steps < 5:
        return {"skipped": f"a budget of {budget} energy evaluations gives {n_steps} steps of {n_chains} chains"}
    generator = torch.Generator().manual_seed(int(seed))
    x = data[torch.randperm(data.shape[0], generator=generator)[:n_chains]].to(torch.get_default_dtype())
    names, start = list(target.states), time.perf_counter()

    def log_density(y: Tensor) -> Tensor:
        return -target.energy(y)

    state = kernel.warmup(x, log_density, n_steps // 5, generator=generator)
    counts = torch.zeros(n_chains, len(names), dtype=torch.float64)
    for _ in range(n_steps - n_steps // 5):
        state, _ = kernel.step(state, log_density, generator)
        with torch.no_grad():
            counts += torch.stack([target.states[k](state.y).double() for k in names], -1)
    groups = torch.arange(n_chains) % int(settings.n_replicates)
    delta_f = {}
    for b in names[1:]:
        key = f"{names[0]}->{b}"
        values = [float(-(torch.log(counts[groups == g, names.index(b)].sum())
                          - torch.log(counts[groups == g, 0].sum()))) for g in range(int(settings.n_replicates))]
        reference = target.reference.delta_f.get(key) if target.reference else None
        delta_f[key] = _interval(values, settings.confidence, reference)
    out = {"delta_f": delta_f, "n_chains": n_chains, "n_steps": n_steps, "step_size": kernel.step_size,
           "n_energy_evals": n_chains * n_steps * kernel.evals_per_step, "wall_s": time.perf_counter() - start,
           "populations": {k: float(counts[:, i].sum() / counts.sum()) for i, k in enumerate(names)}}
    if heldout_u is not None:
        final_u = (-state.log_prob).double().cpu().numpy()
        out["energy_w2"] = _energy_w2(heldout_u, final_u)
        out["energy_histogram"] = _weighted_density(final_u, None, energy_edges(heldout_u)).tolist()
    return out


def equal_budget(settings: SMCSettings, budget: int, target, space: Space) -> SMCSettings:
    """The settings of SMC from the prior at the flow's budget: `budget` energy evaluations (the
    flow's training + evaluation + SMC) shared over its runs (replicates, times states when per
    state), each run's cap no higher than ``settings.max_energy_evals`` and no lower than one level
    (the initial evaluation and one level of moves on `space`, where its kernel moves: the least
    an SMC run can do); the `final_sweeps` of each run come out of its share. A run that reaches its
    cap reweights straight to b = 1 (bgexp.samplers.smc) and counts in `budget_stops`."""
    per_state = settings.per_state if settings.per_state is not None else len(target.states) > 1
    n_runs = int(settings.n_replicates) * (len(target.states) if per_state else 1)
    evals_per_step = _kernel(settings, space).evals_per_step
    one_level = int(settings.n_particles) * (1 + int(settings.n_steps_per_level) * evals_per_step)
    sweeps = 0 if not settings.final_sweeps else int(settings.n_particles) * (
        1 + int(settings.final_sweeps) * int(settings.n_steps_per_level) * evals_per_step)
    cap = max(int(budget) // n_runs - sweeps, one_level)
    if settings.max_energy_evals is not None:
        cap = min(cap, int(settings.max_energy_evals))
    return replace(settings, max_energy_evals=cap)


@torch.no_grad()
def data_energy_w2(target, data: Tensor, heldout_u: np.ndarray, settings: SMCSettings, seed: int) -> dict[str, Any]:
    """The energy W2 of `n_replicates` disjoint sets of n_particles training frames against the
    held-out frames: with equilibrium data, what an exact sampler of one replicate's size gets (the
    floor set by the two samples' finite size, against which the samplers' W2 is read); with
    biased data, how far the data themselves are."""
    n = min(int(settings.n_particles), int(data.shape[0]) // int(settings.n_replicates))
    if n < 2:
        return {"skipped": f"{data.shape[0]} training frames for {settings.n_replicates} sets"}
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(int(seed) + 1))
    values = [_energy_w2(heldout_u, target.energy(data[order[r * n:(r + 1) * n]]).double().cpu().numpy())
              for r in range(int(settings.n_replicates))]
    return {"n_frames": n, **_interval(values, settings.confidence, None)}


def smc_figures(block: dict[str, Any], figure_dir, target=None) -> dict[str, str]:
    """The annealing (b and ESS against the level, first replicate) of every SMC in the block; the
    energies against held-out data; the bidirectional works; with the `target`, its profiles and
    surfaces after SMC from the flow (replicates pooled) against its reference."""
    from pathlib import Path

    from bgexp.evaluation.plots import plot_energy_densities, plot_smc_history, plot_work_distributions

    figures = {}
    for name in ("flow", *(b for b in block["settings"]["baselines"] if b != "mcmc")):
        path = Path(figure_dir) / f"smc_{name}.png"
        title = f"SMC from the {name}" + (" (per state)" if block[name]["mode"] == "per_state" else "")
        figures[f"smc_{name}"] = str(plot_smc_history(block[name]["history"] or {}, path, title=title))
    energies = energy_histograms_of(block)
    if energies:
        path = Path(figure_dir) / "smc_energies.png"
        figures["smc_energies"] = str(plot_energy_densities(energies, path, title="Energies after SMC against held-out data"))
    histograms = block["flow"].get("bidirectional", {}).get("work_histograms")
    if histograms:
        path = Path(figure_dir) / "smc_works.png"
        figures["smc_works"] = str(plot_work_distributions(histograms, path, title="Bidirectional AIS: works per state"))
    observables = block["flow"].get("observables")
    if target is not None and observables:
        # "profile/phi/rmse" -> "phi RMSE 0.86", "surface/ramachandran/kl" -> "ramachandran KL 0.061"
        label = ", ".join(f"{k.split('/')[1]} {k.split('/')[2].upper()} {v:.3g}"
                          for k, v in observables["pooled"].items())
        figures.update(observable_figures(target, observables["curves"], figure_dir, label))
    return figures


def energy_histograms_of(block: dict[str, Any]) -> dict[str, Any] | None:
    """{"edges", then one density per curve}: the held-out frames' and each sampler's final
    energies (SMC pooled over replicates, weighted), as results.json keeps them."""
    shared = block.get("energy_histograms")
    if not shared:
        return None
    labels = {"flow": "SMC from the flow", "prior": "SMC from the prior", "mcmc": "MCMC from the data"}
    curves = {"edges": shared["edges"], "held-out data": shared["held-out"]}
    for source, label in labels.items():
        density = (block.get(source) or {}).get("energy_histogram")
        if density is not None:
            curves[label] = density
    return curves


def _check_bidirectional(path: Pullback, data: Tensor | None, which: str) -> None:
    """Refuse the bidirectional estimate, before any energy is evaluated, where it cannot work."""
    if data is None or data.shape[0] < 2:
        raise SamplerSettingError(f"smc.bidirectional needs equilibrium data of the target (smc.reverse_frames="
                                  f"{which}: the {which} frames); none were given")
    if isinstance(path, WeightedStart):
        raise SamplerSettingError("smc.bidirectional needs a flow with an inverse (z = F^-1(x)); a continuous "
                                  "flow starts SMC from weighted samples in x instead")


def _canonical(target, data: Tensor) -> Tensor:
    """The data relabelled into the canonical region when the target relabels interchangeable
    particles (idempotent: training data are relabelled already)."""
    relabelling = target.relabelling
    return data if relabelling is None else relabelling.canonicalize(data)


def smc_block(model, settings: SMCSettings, seed: int, data: Tensor | None = None,
              heldout: Tensor | None = None) -> dict[str, Any]:
    """results.json's `smc` block: the refinement from the flow, the configured SMC baselines and,
    with training `data` and "mcmc" among the baselines, MCMC from the data at the flow's whole
    budget (training + importance-sampling evaluation + SMC energy evaluations). With `heldout`
    frames, each gains `energy_w2`: W2 between the held-out energies and its final configurations'
    (weighted). The model is in evaluation mode meanwhile."""
    was_training = model.training
    model.eval()
    block: dict[str, Any] = {"settings": asdict(settings)}
    try:
        paths = pullbacks(model)
        heldout_u = None if heldout is None else model.target.energy(heldout).double().cpu().numpy()
        if heldout_u is not None:
            edges = energy_edges(heldout_u)
            block["energy_histograms"] = {"edges": edges.tolist(),
                                          "held-out": _weighted_density(heldout_u, None, edges).tolist()}
        reverse = None
        if settings.bidirectional:
            reverse = heldout if settings.reverse_frames == "heldout" else data
            _check_bidirectional(paths["flow"], reverse, settings.reverse_frames)
            reverse = _canonical(model.target, reverse)
            data = _canonical(model.target, data) if data is not None else None
        block["flow"] = refine(paths["flow"], model.target, settings, seed, model.target.reference, data=reverse,
                               heldout_u=heldout_u)
        budget = model.n_energy_evals_train + model.n_energy_evals_eval + block["flow"]["n_energy_evals"]
        if "prior" in settings.baselines:
            capped = equal_budget(settings, budget, model.target, paths["prior"].space)
            block["prior"] = {"budget": int(budget), "max_energy_evals_per_run": capped.max_energy_evals,
                              **refine(paths["prior"], model.target, capped, seed, model.target.reference,
                                       heldout_u=heldout_u)}
        if "mcmc" in settings.baselines and data is not None:
            block["mcmc"] = {"budget": int(budget), **mcmc_from_data(model.target, data, budget, settings, seed, heldout_u)}
        if heldout_u is not None and data is not None:
            block["data_energy_w2"] = data_energy_w2(model.target, data, heldout_u, settings, seed)
    finally:
        model.train(was_training)
    return block


__all__ = ["SMCSettings", "Pullback", "WeightedStart", "pullbacks", "refine", "smc_block", "smc_figures", "draw_in_state"]
