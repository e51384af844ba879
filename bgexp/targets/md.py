"""Reference data for analytic targets: vectorised Metropolis Monte Carlo over many chains.

Each chain proposes x' = x + sigma_c * N(0, I) for all coordinates at once and accepts with
probability min(1, exp(-(u(x') - u(x)))) (Metropolis et al. 1953). Chains are independent and
run as one batch. During burn-in each chain's step size sigma_c is adapted towards a target
acceptance rate; after burn-in it is frozen, so the kept samples come from a proper Markov chain.

An optional `constraint(x) -> bool` rejects every proposal that leaves the allowed region; with
the target's states it keeps runs inside one state, as in the Boltzmann Generators paper, whose
dimer data came from separate MC runs in the open and the closed state without transitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

EnergyFn = Callable[[Tensor], Tensor]


@dataclass
class MCResult:
    samples: Tensor  # [n_kept, n_chains, dim]
    energies: Tensor  # [n_kept, n_chains]
    acceptance: float  # mean acceptance rate after burn-in
    step_size: Tensor  # [n_chains], the frozen step sizes


@torch.no_grad()
def metropolis(
    energy: EnergyFn,
    x0: Tensor,
    n_steps: int,
    step_size: float = 0.05,
    burn_in: int = 0,
    thin: int = 1,
    generator: torch.Generator | None = None,
    constraint: Callable[[Tensor], Tensor] | None = None,
    target_acceptance: float = 0.4,
    adapt_every: int = 50,
    progress: bool = False,
    desc: str = "MC",
) -> MCResult:
    """Run `burn_in + n_steps` Metropolis steps on every chain of x0 [n_chains, dim]; keep every
    `thin`-th state after burn-in. Energies are reduced (kT)."""
    if x0.dim() != 2:
        raise ValueError(f"x0 must be [n_chains, dim], got {tuple(x0.shape)}")
    if n_steps < 1 or thin < 1 or burn_in < 0 or thin > n_steps:
        raise ValueError(f"need n_steps >= 1, thin >= 1, burn_in >= 0 (got {n_steps}, {thin}, {burn_in})")
    x = x0.clone()
    u = energy(x)
    if not bool(torch.isfinite(u).all()):
        n_bad = int((~torch.isfinite(u)).sum())
        raise ValueError(f"non-finite energy at {n_bad} of {len(u)} starting configurations")
    if constraint is not None and not bool(constraint(x).all()):
        raise ValueError("some starting configurations violate the MC constraint")
    n_chains = x.shape[0]
    sigma = torch.full((n_chains,), float(step_size), dtype=x.dtype, device=x.device)
    accepted_window = torch.zeros(n_chains, device=x.device)
    accepted_total = 0.0
    kept_x, kept_u = [], []
    total = burn_in + n_steps
    for step in tqdm(range(total), desc=desc, disable=not progress, mininterval=1.0):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        proposal = x + sigma[:, None] * noise
        u_new = energy(proposal)
        log_uniform = torch.log(torch.rand(n_chains, generator=generator, dtype=x.dtype, device=x.device))
        accept = torch.isfinite(u_new) & (log_uniform < (u - u_new))
        if constraint is not None:
            accept &= constraint(proposal)
        x = torch.where(accept[:, None], proposal, x)
        u = torch.where(accept, u_new, u)
        if step < burn_in:
            accepted_window += accept
            if (step + 1) % adapt_every == 0:
                rate = accepted_window / adapt_every
                sigma = sigma * torch.exp(rate - target_acceptance)
                accepted_window.zero_()
        else:
            accepted_total += accept.float().mean().item()
            if (step - burn_in + 1) % thin == 0:
                kept_x.append(x.clone())
                kept_u.append(u.clone())
    return MCResult(
        samples=torch.stack(kept_x),
        energies=torch.stack(kept_u),
        acceptance=accepted_total / n_steps,
        step_size=sigma,
    )


@dataclass
class StateSamples:
    """MC data started in, and confined to, each named state of a target."""

    x: Tensor  # [n, dim]
    state: Tensor  # [n] index into `states`
    states: list[str]
    acceptance: dict[str, float]
    chain: Tensor  # [n] the Markov chain each frame comes from, numbered 0.. over all states


def sample_states(
    target,
    states: list[str],
    n_chains: int,
    n_steps: int,
    burn_in: int,
    thin: int,
    step_size: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> StateSamples:
    """Deliberately biased data as in Boltzmann Generators (2019): separate Metropolis runs
    started in each of `states`, each confined to its state (no transitions). `target` is any
    object with `energy`, `states` and `initial_configurations` (the Target contract)."""
    unknown = [s for s in states if s not in target.states]
    if unknown:
        raise ValueError(f"unknown states {unknown}; {type(target).__name__} has {sorted(target.states)}")
    generator = torch.Generator().manual_seed(int(seed))
    xs, labels, chains, acceptance = [], [], [], {}
    for k, name in enumerate(states):
        x0 = target.initial_configurations(name, n_chains, generator)
        result = metropolis(
            target.energy,
            x0,
            n_steps=n_steps,
            step_size=step_size,
            burn_in=burn_in,
            thin=thin,
            generator=generator,
            constraint=target.states[name],
            progress=progress,
            desc=f"MC data ({name})",
        )
        x = result.samples.reshape(-1, x0.shape[-1])
        xs.append(x)
        labels.append(torch.full((x.shape[0],), k, dtype=torch.long))
        # samples are [kept, chain, dim] flattened: frame i of this state is from chain i mod n_chains
        chains.append(k * n_chains + torch.arange(x.shape[0]) % n_chains)
        acceptance[name] = result.acceptance
    return StateSamples(x=torch.cat(xs), state=torch.cat(labels), states=list(states), acceptance=acceptance,
                        chain=torch.cat(chains))
