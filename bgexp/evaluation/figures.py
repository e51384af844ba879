"""The figures of an evaluation, drawn in a step of their own from the samples and the metrics.

`draw_figures` writes, into one folder (file names end in `_<tag>` when a tag is given):
- profile_<observable>.png: the reweighted free-energy profile with its reference, if any;
- surface_<name>.png: each 2-D surface (reweighted, with the reference panel), KL in the title;
- histogram_<distribution>.png: pooled values of each multi-valued observable (data, flow samples,
  reweighted samples);
- energies.png: reduced energies of data, flow samples and reweighted samples;
- histogram_<observable>.png: each observable, data vs flow samples vs reweighted samples.
It returns figure key -> path (the keys without the tag). The curves come from the same functions
the metrics use (bgexp.evaluation.metrics), the titles from the metrics (ESS, KL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bgexp.evaluation import plots
from bgexp.evaluation.metrics import distribution_values, profile_curve, surface_histogram
from bgexp.evaluation.samples import SampleSet


def profile_figures(samples: SampleSet, target: Any, metrics: dict[str, float], fig_dir: Path, suffix: str,
                    bins: int = 40, max_f_ref: float = 10.0) -> dict[str, str]:
    figures = {}
    for name in target.observables:
        curve = profile_curve(samples, target, name, bins, max_f_ref)
        path = plots.plot_free_energy_profile(
            curve.centres, curve.f, fig_dir / f"profile_{name}{suffix}.png", reference=curve.reference,
            xlabel=name.replace("_", " "), title=f"reweighted profile, ESS {100 * metrics['ess']:.1f}%",
        )
        figures[f"profile_{name}"] = str(path)
    return figures


def surface_figures(samples: SampleSet, target: Any, metrics: dict[str, float], fig_dir: Path, suffix: str,
                    bins: int = 40) -> dict[str, str]:
    figures = {}
    for name in target.surfaces:
        s = surface_histogram(samples, target, name, bins)
        kl = metrics.get(f"surface/{name}/kl")
        title = f"reweighted, ESS {100 * metrics['ess']:.1f}%" + (f", KL {kl:.3f}" if kl is not None else "")
        path = plots.plot_free_energy_surface(s.x_edges, s.y_edges, s.p, fig_dir / f"surface_{name}{suffix}.png",
                                              reference=s.p_ref, xlabel=s.observables[0], ylabel=s.observables[1],
                                              title=title)
        figures[f"surface_{name}"] = str(path)
    return figures


def distribution_figures(samples: SampleSet, target: Any, fig_dir: Path, suffix: str) -> dict[str, str]:
    figures = {}
    for name in target.distributions:
        values, repeated = distribution_values(samples, target, name)
        values["reweighted samples"] = values["flow samples"]
        path = plots.plot_observable_histogram(
            values, fig_dir / f"histogram_{name}{suffix}.png", xlabel=name.replace("_", " "),
            weights={"reweighted samples": repeated}, clip_quantile=0.999,
            title=f"{name.replace('_', ' ')}, all pairs pooled",
        )
        figures[f"histogram_{name}"] = str(path)
    return figures


def energy_figure(samples: SampleSet, fig_dir: Path, suffix: str) -> dict[str, str]:
    energies = {"flow samples": samples.energies}
    weights = {"flow samples": np.ones(samples.n)}
    if samples.has_data:
        energies = {"data": samples.data_u, **energies}
        weights = {"data": np.ones(len(samples.data_u)), **weights}
    energies["reweighted samples"] = energies["flow samples"]
    weights["reweighted samples"] = samples.weights
    path = plots.plot_energy_histograms(energies, fig_dir / f"energies{suffix}.png", weights=weights,
                                        title="reduced energies", range_from="data" if samples.has_data else None)
    return {"energies": str(path)}


def observable_figures(samples: SampleSet, target: Any, fig_dir: Path, suffix: str) -> dict[str, str]:
    figures = {}
    for name, obs in target.observables.items():
        values = {"flow samples": samples.observed[name]}
        if samples.has_data:
            values = {"data": obs(samples.data_head).double().cpu().numpy(), **values}
        values["reweighted samples"] = values["flow samples"]
        path = plots.plot_observable_histogram(
            values, fig_dir / f"histogram_{name}{suffix}.png", xlabel=name.replace("_", " "),
            weights={"reweighted samples": samples.weights}, clip_quantile=0.995,
        )
        figures[f"histogram_{name}"] = str(path)
    return figures


def draw_figures(samples: SampleSet, target: Any, metrics: dict[str, float], figure_dir: str | Path, tag: str = "",
                 profile_bins: int = 40, profile_max_f_ref: float = 10.0) -> dict[str, str]:
    """Every figure of an evaluation into `figure_dir` (module docstring); figure key -> path."""
    fig_dir = Path(figure_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    return {
        **profile_figures(samples, target, metrics, fig_dir, suffix, profile_bins, profile_max_f_ref),
        **surface_figures(samples, target, metrics, fig_dir, suffix, profile_bins),
        **distribution_figures(samples, target, fig_dir, suffix),
        **energy_figure(samples, fig_dir, suffix),
        **observable_figures(samples, target, fig_dir, suffix),
    }


__all__ = ["draw_figures", "profile_figures", "surface_figures", "distribution_figures", "energy_figure",
           "observable_figures"]
