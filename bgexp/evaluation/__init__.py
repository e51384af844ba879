"""Evaluation of a Boltzmann generator: samples, importance weights, metrics, figures.

`evaluate(bg, ...)` draws N flow samples x_i ~ q with log-weights log w_i = -u(x_i) - log q(x_i)
(`samples.SampleSet`), computes the metrics that the target's declarations select
(`metrics`: ESS and energy statistics; free-energy differences between states with bootstrap
intervals against the reference; profiles along observables with their RMSE; 2-D surfaces with
their KL; the quadrature KL of a QuadratureTarget; with held-out data the NLL, the 1-Wasserstein
distances of energies and distributions and, with forces, the force-matching error; for continuous
flows the function evaluations per sample and the sampling time), then, in a separate step, draws
the figures from them (`figures`). Samples with non-finite energy get weight zero and are counted
(`n_nonfinite_energies`). An evaluation where every log-weight is -inf (a diverged flow) does not
fail: it reports ESS 0, no free energies, and the reason in `Evaluation.problem`.

This package imports nothing of bgexp.training: the model is duck-typed (`GeneratorModel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bgexp.evaluation import metrics as m
from bgexp.evaluation.figures import draw_figures
from bgexp.evaluation.metrics import data_nll, force_matching_error, quadrature_kl_of, wasserstein_1, wasserstein_2
from bgexp.evaluation.samples import GeneratorModel, SampleSet, draw_samples, sample_set


@dataclass
class Evaluation:
    metrics: dict[str, float]  # flat scalars for the logger
    delta_f: dict[str, dict[str, Any]]  # name -> value, ci_low, ci_high, reference, source
    figures: dict[str, str] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    # why the weights are unusable (every log-weight -inf: ESS 0, no Delta F); None when they are not
    problem: str | None = None


def _check(n_samples: int, data: torch.Tensor | None, forces: torch.Tensor | None) -> None:
    if n_samples < 2:
        raise ValueError(f"evaluation needs n_samples >= 2, got {n_samples}")
    if forces is not None and (data is None or tuple(forces.shape) != tuple(data.shape)):
        raise ValueError(f"evaluation forces of shape {tuple(forces.shape)} need data of the same shape "
                         f"(got {None if data is None else tuple(data.shape)})")


def evaluate(
    bg: GeneratorModel,
    n_samples: int = 10_000,
    batch_size: int = 2_000,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    profile_bins: int = 40,
    profile_max_f_ref: float = 10.0,
    data: torch.Tensor | None = None,
    figure_dir: str | Path | None = None,
    seed_offset: int = 10_000,
    tag: str = "",
    forces: torch.Tensor | None = None,
    quadrature_points: int = 256,
) -> Evaluation:
    """Evaluate `bg` (see the package docstring); `data` are held-out samples and `forces` their
    reduced forces (same shape, optional)."""
    _check(n_samples, data, forces)
    samples = sample_set(bg, n_samples, batch_size, seed_offset, data, forces)
    target = bg.target
    delta_f = m.free_energy_differences(samples, target, n_bootstrap, confidence, seed=bg.seed)
    metrics: dict[str, float] = {
        **m.ess_metrics(samples, target), **m.energy_stats(samples), **m.populations(samples, target),
        **m.delta_f_metrics(delta_f),
        **m.profile_rmse(samples, target, profile_bins, profile_max_f_ref),
        **m.surface_kl(samples, target, profile_bins),
        **m.quadrature_metrics(samples, target, bg, quadrature_points, batch_size),
        **m.heldout_nll(samples, target, bg),
        **m.force_matching(samples, target, bg, batch_size),
        **m.energy_w1(samples), **m.energy_w2(samples), **m.distribution_w1(samples, target),
    }
    figures = {}
    if figure_dir is not None:
        figures = draw_figures(samples, target, metrics, figure_dir, tag, profile_bins, profile_max_f_ref)
    return Evaluation(metrics=metrics, delta_f=delta_f, figures=figures, samples=samples.as_arrays(),
                      problem=samples.zero_weight_problem)


__all__ = ["evaluate", "Evaluation", "draw_samples", "data_nll", "wasserstein_1", "wasserstein_2", "quadrature_kl_of",
           "force_matching_error", "GeneratorModel", "SampleSet", "sample_set", "draw_figures"]
