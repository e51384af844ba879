"""Evaluation of a Boltzmann generator: samples, importance weights, ESS, free energies, figures.

For N flow samples x_i ~ q with log-weights log w_i = -u(x_i) - log q(x_i):
- ESS (Kish) as a fraction of N;
- Delta F(a -> b) = -ln(sum_{i in b} w_i / sum_{i in a} w_i) for every pair of the target's
  states (first state -> each other state), with a bootstrap confidence interval;
- the reweighted free-energy profile F(s) = -ln p(s) along each observable that has a reference
  profile, and its RMSE against the reference after aligning the additive constant;
- the reweighted 2-D histogram of each pair of observables the target lists in `surfaces`
  (the Ramachandran plot of ALA2) and its KL divergence KL(reference || reweighted);
- NLL of held-out data, -E[log q(x)], when data are given;
- with the data's reduced forces f = -grad u (`forces`), the force-matching error of the flow's
  score on (up to n_samples of) the held-out data: force_rmse = sqrt(mean (grad_x log q - f)^2)
  and force_rmse_relative = force_rmse / sqrt(mean f^2) (Koehler et al., NeurIPS 2021).
- with data: the 1-Wasserstein distance between the data's reduced energies and those of the flow
  samples, unweighted (`energy_w1_flow`) and reweighted (`energy_w1_reweighted`); the same for each
  multi-valued observable the target lists in `distributions` (all interparticle distances of the
  particle systems: `distribution/pair_distance/w1_flow`, `.../w1_reweighted`), with histograms;
- for continuous flows, the function evaluations per sample (`nfe_per_sample`, the field
  evaluations of the ODE solve that produced it, averaged over batches) and the sampling time
  (`sampling_s_per_1000`, with log q and energies).
Samples with non-finite energy get weight zero and are counted (`n_nonfinite_energies`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from bgexp import plots
from bgexp.estimators import (
    align_profiles,
    bootstrap,
    ess,
    free_energy_difference,
    free_energy_profile,
    histogram_kl,
    log_weights,
    quadrature_kl,
    weighted_histogram2d,
)
from bgexp.training.losses import force_matching_error
from bgexp.training.module import BoltzmannGenerator


@dataclass
class Evaluation:
    metrics: dict[str, float]  # flat scalars for the logger
    delta_f: dict[str, dict[str, Any]]  # name -> value, ci_low, ci_high, reference, source
    figures: dict[str, str] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def draw_samples(
    bg: BoltzmannGenerator, n: int, batch_size: int, generator: torch.Generator,
    stats: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n samples with log q and reduced energies, in batches; energies count as evaluation.

    If `stats` is a dict, it receives `sampling_s_per_1000` and, for flows that count their field
    evaluations (`nfe` after each solve), `nfe_per_sample`."""
    xs, log_qs, us = [], [], []
    nfe_total, counts_nfe = 0.0, hasattr(bg.flow, "nfe")
    start_time = time.perf_counter()
    with bg.counting_evaluation():
        for start in range(0, n, batch_size):
            x, log_q = bg.sample(min(batch_size, n - start), generator=generator)
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


def wasserstein_1(reference: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """W1 between the finite values of two 1-D samples (scipy), `values` optionally weighted;
    None if either side has nothing finite (or no positive weight)."""
    ref = reference[np.isfinite(reference)]
    keep = np.isfinite(values)
    if weights is not None:
        keep &= np.isfinite(weights) & (weights >= 0)
    v, w = values[keep], None if weights is None else weights[keep]
    if ref.size == 0 or v.size == 0 or (w is not None and not w.sum() > 0):
        return None
    return float(wasserstein_distance(ref, v, v_weights=w))


@torch.no_grad()
def data_nll(bg: BoltzmannGenerator, x: torch.Tensor, batch_size: int = 1024) -> float:
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(bg.device)
        total += float(-bg.log_prob(xb).double().sum())
    return total / x.shape[0]


@torch.no_grad()
def quadrature_kl_of(bg: BoltzmannGenerator, n_points: int = 256, batch_size: int = 4096) -> float:
    """KL(mu || q) = integral mu (ln mu - ln q) by the midpoint rule on the target's grid
    (`target.quadrature(n)` -> grid [n], normalised log mu [n, n], cell area), with log q from the flow."""
    grid, log_p, cell = bg.target.quadrature(n_points)
    t1, t2 = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([t1.reshape(-1), t2.reshape(-1)], -1).to(device=bg.device, dtype=torch.get_default_dtype())
    log_q = torch.cat([bg.log_prob(points[i:i + batch_size]).double().cpu()
                       for i in range(0, len(points), batch_size)])
    return quadrature_kl(log_p.reshape(-1), log_q, cell)


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def evaluate(
    bg: BoltzmannGenerator,
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
    """Evaluate `bg` (see the module docstring); `data` are held-out samples and `forces` their
    reduced forces (same shape, optional)."""
    if n_samples < 2:
        raise ValueError(f"evaluation needs n_samples >= 2, got {n_samples}")
    if forces is not None and (data is None or tuple(forces.shape) != tuple(data.shape)):
        raise ValueError(f"evaluation forces of shape {tuple(forces.shape)} need data of the same shape "
                         f"(got {None if data is None else tuple(data.shape)})")
    was_training = bg.training
    bg.eval()
    generator = bg.make_generator(offset=seed_offset)
    sampling: dict[str, float] = {}
    x, log_q, u = draw_samples(bg, n_samples, batch_size, generator, stats=sampling)
    bg.train(was_training)
    target = bg.target
    n_nonfinite = int((~torch.isfinite(u)).sum())
    log_w = log_weights(torch.where(torch.isfinite(u), u, torch.full_like(u, math.inf)), log_q)
    metrics: dict[str, float] = {
        "ess": ess(log_w),
        "n_samples": float(n_samples),
        "n_nonfinite_energies": float(n_nonfinite),
        **sampling,
    }
    finite_u = u[torch.isfinite(u)].double().cpu().numpy()
    if finite_u.size:
        metrics["energy_mean"] = float(finite_u.mean())
        metrics["energy_median"] = float(np.median(finite_u))
        metrics["energy_min"] = float(finite_u.min())

    # free-energy differences between states ------------------------------------------------
    delta_f: dict[str, dict[str, Any]] = {}
    state_names = list(target.states)
    masks = {name: target.states[name](x).cpu().numpy() for name in state_names}
    for name in state_names:
        metrics[f"population/{name}"] = float(masks[name].mean())
    reference = target.reference
    for b in state_names[1:]:
        a = state_names[0]
        key = f"{a}->{b}"
        result = bootstrap(
            free_energy_difference, log_w, masks[a], masks[b],
            n_boot=n_bootstrap, confidence=confidence, seed=bg.seed,
        )
        entry: dict[str, Any] = {
            "value": _finite_or_none(result.value),
            "ci_low": _finite_or_none(result.ci_low),
            "ci_high": _finite_or_none(result.ci_high),
            "confidence": confidence,
            "reference": None,
            "reference_source": None,
        }
        ref = reference.delta_f.get(key) if reference is not None else None
        if ref is not None:
            entry["reference"] = ref.value
            entry["reference_ci"] = [ref.ci_low, ref.ci_high]
            entry["reference_source"] = ref.source
            if entry["value"] is not None:
                entry["error"] = entry["value"] - ref.value
                metrics[f"delta_f/{key}/error"] = entry["error"]
        delta_f[key] = entry
        for k in ("value", "ci_low", "ci_high"):
            if entry[k] is not None:
                metrics[f"delta_f/{key}/{k}"] = entry[k]

    # free-energy profiles along observables ---------------------------------------------
    figures: dict[str, str] = {}
    fig_dir = Path(figure_dir) if figure_dir is not None else None
    if fig_dir is not None:
        fig_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    observed = {name: obs(x).double().cpu().numpy() for name, obs in target.observables.items()}
    for obs_name, values in observed.items():
        ref_profile = (reference.profiles.get(obs_name) if reference is not None else None) or None
        bins = np.asarray(ref_profile["bin_edges"]) if ref_profile and "bin_edges" in ref_profile else profile_bins
        centres, f = free_energy_profile(values, log_w, bins=bins)
        ref_plot = None
        if ref_profile is not None:
            f_ref = np.array([np.inf if v is None else v for v in ref_profile["f"]], dtype=float)
            _, rmse = align_profiles(f, f_ref, max_f_ref=profile_max_f_ref)
            metrics[f"profile/{obs_name}/rmse"] = float(rmse)
            ref_plot = {"x": np.asarray(ref_profile["x"]), "f": f_ref, "label": "reference"}
            if "f_std" in ref_profile:
                ref_plot["f_std"] = np.array([np.nan if v is None else v for v in ref_profile["f_std"]], dtype=float)
        if fig_dir is not None:
            path = plots.plot_free_energy_profile(
                centres, f, fig_dir / f"profile_{obs_name}{suffix}.png", reference=ref_plot,
                xlabel=obs_name.replace("_", " "), title=f"reweighted profile, ESS {100 * metrics['ess']:.1f}%",
            )
            figures[f"profile_{obs_name}"] = str(path)

    # 2-D free-energy surfaces (Ramachandran plot) and their KL divergence from the reference --
    for surf_name, (obs_a, obs_b, range_a, range_b) in getattr(target, "surfaces", {}).items():
        ref_surface = (reference.surfaces.get(surf_name) if reference is not None else None) or None
        if ref_surface is not None:
            x_edges, y_edges = np.asarray(ref_surface["x_edges"]), np.asarray(ref_surface["y_edges"])
        else:
            x_edges = np.linspace(range_a[0], range_a[1], profile_bins + 1)
            y_edges = np.linspace(range_b[0], range_b[1], profile_bins + 1)
        p = weighted_histogram2d(observed[obs_a], observed[obs_b], log_w, x_edges, y_edges)
        p_ref = np.asarray(ref_surface["p"]) if ref_surface is not None else None
        if p_ref is not None and p.sum() > 0:
            metrics[f"surface/{surf_name}/kl"] = histogram_kl(p_ref, p)
        if fig_dir is not None:
            kl = metrics.get(f"surface/{surf_name}/kl")
            title = f"reweighted, ESS {100 * metrics['ess']:.1f}%" + (f", KL {kl:.3f}" if kl is not None else "")
            path = plots.plot_free_energy_surface(x_edges, y_edges, p, fig_dir / f"surface_{surf_name}{suffix}.png",
                                                  reference=p_ref, xlabel=obs_a, ylabel=obs_b, title=title)
            figures[f"surface_{surf_name}"] = str(path)

    # low-dimensional targets with a normalised density on a grid: the exact KL(target || flow)
    if hasattr(target, "quadrature"):
        metrics["kl_quadrature"] = quadrature_kl_of(bg, quadrature_points, batch_size)

    # held-out data ---------------------------------------------------------------------------
    energies = {"flow samples": u.double().cpu().numpy()}
    weights = {"flow samples": np.ones(n_samples)}
    if data is not None and len(data) > 0:
        metrics["nll_test"] = data_nll(bg, data)
        if forces is not None:
            metrics.update(force_matching_error(bg, data[:n_samples], forces[:n_samples], batch_size=batch_size))
        with torch.no_grad(), bg.counting_evaluation():
            u_data = bg.energy(data[:n_samples].to(bg.device))
        energies = {"data": u_data.double().cpu().numpy(), **energies}
        weights = {"data": np.ones(len(u_data)), **weights}
    finite_w = np.isfinite(log_w)
    w = np.exp(log_w - np.max(log_w[finite_w])) if finite_w.any() else np.zeros(n_samples)
    energies["reweighted samples"] = energies["flow samples"]
    weights["reweighted samples"] = w
    has_data = data is not None and len(data) > 0
    if has_data:
        for key, weight in (("energy_w1_flow", None), ("energy_w1_reweighted", w)):
            value = wasserstein_1(energies["data"], energies["flow samples"], weight)
            if value is not None:
                metrics[key] = value
    for dist_name, dist in getattr(target, "distributions", {}).items():
        values = {"flow samples": dist(x).double().cpu().numpy()}
        n_per_sample = values["flow samples"].shape[1]
        repeated = np.repeat(w, n_per_sample)
        values["flow samples"] = values["flow samples"].reshape(-1)
        if has_data:
            values = {"data": dist(data[:n_samples]).double().cpu().numpy().reshape(-1), **values}
            for key, weight in (("w1_flow", None), ("w1_reweighted", repeated)):
                value = wasserstein_1(values["data"], values["flow samples"], weight)
                if value is not None:
                    metrics[f"distribution/{dist_name}/{key}"] = value
        values["reweighted samples"] = values["flow samples"]
        if fig_dir is not None:
            path = plots.plot_observable_histogram(
                values, fig_dir / f"histogram_{dist_name}{suffix}.png", xlabel=dist_name.replace("_", " "),
                weights={"reweighted samples": repeated}, clip_quantile=0.999,
                title=f"{dist_name.replace('_', ' ')}, all pairs pooled",
            )
            figures[f"histogram_{dist_name}"] = str(path)
    if fig_dir is not None:
        path = plots.plot_energy_histograms(energies, fig_dir / f"energies{suffix}.png", weights=weights,
                                            title="reduced energies",
                                            range_from="data" if "data" in energies else None)
        figures["energies"] = str(path)
        # each observable: data vs flow samples vs reweighted samples
        for obs_name, obs in target.observables.items():
            values = {"flow samples": observed[obs_name]}
            if data is not None and len(data) > 0:
                values = {"data": obs(data[:n_samples]).double().cpu().numpy(), **values}
            values["reweighted samples"] = values["flow samples"]
            path = plots.plot_observable_histogram(
                values, fig_dir / f"histogram_{obs_name}{suffix}.png", xlabel=obs_name.replace("_", " "),
                weights={"reweighted samples": w}, clip_quantile=0.995,
            )
            figures[f"histogram_{obs_name}"] = str(path)

    return Evaluation(
        metrics=metrics,
        delta_f=delta_f,
        figures=figures,
        samples={"x": x.double().cpu().numpy(), "log_q": log_q.double().cpu().numpy(),
                 "energy": u.double().cpu().numpy(), "log_w": np.asarray(log_w)},
    )
