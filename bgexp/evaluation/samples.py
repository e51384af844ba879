"""Flow samples with their densities, energies and importance weights: the input of every metric.

For N samples x_i ~ q the log-weights are log w_i = -u(x_i) - log q(x_i) (self-normalised
importance sampling, Noe et al., "Boltzmann generators", Science 2019); samples with a non-finite
energy get weight zero (u set to +inf) and are counted in `n_nonfinite`, never dropped silently.
For a target with interchangeable particles relabelled to a canonical order (`target.relabelling`,
bgexp/targets/permutations.py) the flow is a density of the canonical region R, and
log w_i = -u(x_i) + log 1_R(x_i) - log q(x_i): samples outside R get weight zero and are counted
in `n_outside_region`.

The model is duck-typed (`GeneratorModel`): evaluation needs a sampler with a density and the
target's energy, not the Lightning module that trains it, so this package imports nothing of
bgexp.training.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from bgexp.estimators import log_weights
from bgexp.flows.base import ContinuousFlow


@runtime_checkable
class GeneratorModel(Protocol):
    """What evaluation needs of a trained Boltzmann generator (bgexp.training.module's
    BoltzmannGenerator has all of it): `sample(n, generator) -> (x, log q)`, `log_prob(x)`,
    `energy(x)` (the target's reduced energy, counted), `counting_evaluation()` (a context in which
    energy calls count as evaluation), `make_generator(offset)` (a torch.Generator seeded from
    `seed`), the `target`, the `flow`, its `device`, and the `training` flag with `train(mode)` and
    `eval()` (nn.Module)."""

    seed: int
    target: Any
    flow: Any
    device: torch.device
    training: bool

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...

    def energy(self, x: torch.Tensor) -> torch.Tensor: ...

    def counting_evaluation(self) -> AbstractContextManager: ...

    def make_generator(self, offset: int = 0) -> torch.Generator: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


@dataclass
class SampleSet:
    """N flow samples and what the metrics read of them (float64 numpy unless said otherwise).

    x [N, dim], log_q [N], u [N] (reduced energies; non-finite kept) are torch tensors as the model
    returned them; log_w [N] float64 numpy (zero weight, -inf, where u is not finite);
    `observed`: name -> values [N] of each of the target's observables on x. Held-out data, where
    given: `data` (all of it, for the NLL), `data_u` the reduced energies of its first N
    configurations, `forces` the data's reduced forces -grad u (same shape as data).
    `sampling`: timing and, for continuous flows, function evaluations per sample.
    """

    x: torch.Tensor
    log_q: torch.Tensor
    u: torch.Tensor
    log_w: np.ndarray
    n_nonfinite: int
    observed: dict[str, np.ndarray] = field(default_factory=dict)
    data: torch.Tensor | None = None
    data_u: np.ndarray | None = None
    forces: torch.Tensor | None = None
    sampling: dict[str, float] = field(default_factory=dict)
    n_outside_region: int = 0
    n_nonfinite_log_q: int = 0

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_data(self) -> bool:
        return self.data is not None and len(self.data) > 0

    @property
    def data_head(self) -> torch.Tensor | None:
        """The first N held-out configurations (those compared with the N samples)."""
        return self.data[: self.n] if self.has_data else None

    @property
    def energies(self) -> np.ndarray:
        """u [N] as float64 numpy."""
        return self.u.double().cpu().numpy()

    @property
    def weights(self) -> np.ndarray:
        """w_i = exp(log w_i - max_j log w_j) over the finite log-weights (all zero when none is)."""
        finite = np.isfinite(self.log_w)
        if not finite.any():
            return np.zeros(self.n)
        return np.exp(self.log_w - np.max(self.log_w[finite]))

    @property
    def zero_weight_problem(self) -> str | None:
        """Why no sample has weight (every log-weight -inf), with the counts; None when one has."""
        if np.isfinite(self.log_w).any():
            return None
        n_bad_x = int((~torch.isfinite(self.x)).reshape(self.n, -1).any(dim=1).sum()) if self.n else 0
        return (f"every one of the {self.n} log-weights is -inf ({self.n_nonfinite} samples with a non-finite "
                f"energy, {self.n_nonfinite_log_q} with a non-finite log q, {n_bad_x} with non-finite coordinates): "
                "no sample has weight, so the ESS is 0 and free energies, profiles and surfaces are undefined")

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The samples as saved with a run (samples.npz): x, log_q, energy, log_w."""
        return {"x": self.x.double().cpu().numpy(), "log_q": self.log_q.double().cpu().numpy(),
                "energy": self.energies, "log_w": np.asarray(self.log_w)}


@torch.no_grad()
def draw_samples(
    bg: GeneratorModel, n: int, batch_size: int, generator: torch.Generator,
    stats: dict[str, float] | None = None, progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n samples with log q and reduced energies, in batches (a progress bar with `progress`);
    energies count as evaluation.

    If `stats` is a dict, it receives `sampling_s_per_1000` and, for continuous flows
    (`ContinuousFlow`: `nfe` after each solve), `nfe_per_sample`."""
    xs, log_qs, us = [], [], []
    nfe_total, counts_nfe = 0.0, isinstance(bg.flow, ContinuousFlow)
    start_time = time.perf_counter()
    bar = tqdm(total=n, unit="sample", desc="sampling", disable=not progress)
    with bg.counting_evaluation(), bar:
        for start in range(0, n, batch_size):
            x, log_q = bg.sample(min(batch_size, n - start), generator=generator)
            bar.update(x.shape[0])
            if counts_nfe:
                nfe_total += float(bg.flow.nfe) * x.shape[0]
            xs.append(x)
            log_qs.append(log_q)
            us.append(bg.energy(x))
    if stats is not None:
        stats["sampling_s_per_1000"] = 1000.0 * (time.perf_counter() - start_time) / n
        if counts_nfe:
            stats["nfe_per_sample"] = nfe_total / n
    return torch.cat(xs), torch.cat(log_qs), torch.cat(us)


def importance_log_weights(u: torch.Tensor, log_q: torch.Tensor, inside: torch.Tensor | None = None) -> np.ndarray:
    """log w = -u - log q (float64), with -inf where u or log q is not finite (a diverged flow can
    return NaN or infinite densities) and, given a mask `inside` of the target's canonical region
    (`canonical_region`), -inf outside it."""
    keep = torch.isfinite(u) & torch.isfinite(log_q)
    if inside is not None:
        keep &= inside.to(u.device)
    return log_weights(torch.where(keep, u, torch.full_like(u, math.inf)),
                       torch.where(keep, log_q, torch.zeros_like(log_q)))


def canonical_region(target, x: torch.Tensor) -> torch.Tensor | None:
    """[N] bool: x in the canonical region of a target whose interchangeable particles are
    relabelled (`target.relabelling`); None for every other target (all of space)."""
    relabelling = target.relabelling
    return None if relabelling is None else relabelling.in_canonical_region(x)


def sample_set(
    bg: GeneratorModel, n_samples: int, batch_size: int, seed_offset: int,
    data: torch.Tensor | None = None, forces: torch.Tensor | None = None,
) -> SampleSet:
    """Draw n_samples in eval mode from the generator seeded with seed + seed_offset, weight them,
    evaluate the target's observables on them and, with data, the energies of the first n_samples
    held-out configurations (counted as evaluation)."""
    was_training = bg.training
    bg.eval()
    sampling: dict[str, float] = {}
    x, log_q, u = draw_samples(bg, n_samples, batch_size, bg.make_generator(offset=seed_offset), stats=sampling)
    bg.train(was_training)
    observed = {name: obs(x).double().cpu().numpy() for name, obs in bg.target.observables.items()}
    inside = canonical_region(bg.target, x)
    samples = SampleSet(x=x, log_q=log_q, u=u, log_w=importance_log_weights(u, log_q, inside),
                        n_nonfinite=int((~torch.isfinite(u)).sum()),
                        n_nonfinite_log_q=int((~torch.isfinite(log_q)).sum()), observed=observed,
                        data=data, forces=forces, sampling=sampling,
                        n_outside_region=0 if inside is None else int((~inside).sum()))
    if samples.has_data:
        with torch.no_grad(), bg.counting_evaluation():
            samples.data_u = bg.energy(samples.data_head.to(bg.device)).double().cpu().numpy()
    return samples


__all__ = ["GeneratorModel", "SampleSet", "canonical_region", "draw_samples", "importance_log_weights",
           "sample_set"]
