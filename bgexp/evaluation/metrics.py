"""Small metric functions of flow samples: each `(samples, target, ...) -> dict` of flat scalars.

Which ones apply follows from what the target declares (its `states`, `observables`, `surfaces`,
`distributions`, `reference`, and the abilities of bgexp.targets.base, checked with isinstance);
`evaluate` in bgexp.evaluation composes them. All sums are float64. With N samples x_i ~ q,
log-weights log w_i = -u(x_i) - log q(x_i) and self-normalised weights (bgexp.evaluation.samples):

- `ess_metrics`: Kish's effective sample size as a fraction of N,
  ESS = (sum w)^2 / (N sum w^2) (Kish 1965; Noe et al., Science 2019);
- `energy_stats`: mean, median and minimum of the finite reduced energies u(x_i);
- `populations`: the unweighted fraction of samples in each of the target's states;
- `free_energy_differences`: Delta F(a -> b) = -ln(sum_{i in b} w_i / sum_{i in a} w_i) from the
  first state to each other one, with a bootstrap percentile interval (Efron & Tibshirani 1993),
  against the target's reference;
- `profile_rmse`: the reweighted profile F(s) = -ln p(s) along each observable with a reference
  profile, and its RMSE after aligning the additive constant;
- `surface_kl`: the reweighted 2-D histogram p of each surface and KL(p_ref || p);
- `quadrature_kl`: KL(mu || q) = int mu (ln mu - ln q) by the midpoint rule (QuadratureTarget);
- `heldout_nll`: NLL = -1/M sum_j log q(y_j) of held-out data y;
- `force_matching`: the force-matching error of the flow's score on held-out data with forces
  (Koehler, Kraemer, Noe, "Smooth Normalizing Flows", NeurIPS 2021);
- `energy_w1`, `distribution_w1`: 1-Wasserstein distances W1(a, b) = int |F_a(t) - F_b(t)| dt
  between the data's values and the flow samples', unweighted and reweighted;
- `energy_w2`: the 2-Wasserstein distance of the energies, W2(a, b)^2 = int_0^1 (F_a^-1(t) -
  F_b^-1(t))^2 dt (the energy W2 of the equal-budget sampler comparisons, e.g. Midgley et al.
  ICLR 2023 and the SMC issue), unweighted and reweighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torch import Tensor

from bgexp.estimators import (
    align_profiles,
    bootstrap,
    ess,
    free_energy_difference,
    free_energy_profile,
    histogram_kl,
    quadrature_kl,
    weighted_histogram2d,
)
from bgexp.evaluation.samples import GeneratorModel, SampleSet
from bgexp.targets.base import QuadratureTarget, require


# ---------------------------------------------------------------------------------------------
# building blocks (also used on their own)


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


def wasserstein_2(reference: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None,
                  reference_weights: np.ndarray | None = None) -> float | None:
    """W2 between two weighted 1-D samples, exactly: their quantile functions are step functions,
    so W2^2 = int_0^1 (F_a^-1(t) - F_b^-1(t))^2 dt is a sum over the merged breakpoints of the two
    cumulative weights. Non-finite values (and non-finite or negative weights) are left out; None
    if either side has nothing left (or no positive weight)."""
    sides = []
    for v, w in ((np.asarray(reference, dtype=float), reference_weights), (np.asarray(values, dtype=float), weights)):
        w = np.ones_like(v) if w is None else np.asarray(w, dtype=float)
        keep = np.isfinite(v) & np.isfinite(w) & (w >= 0)
        v, w = v[keep], w[keep]
        if v.size == 0 or not w.sum() > 0:
            return None
        order = np.argsort(v, kind="stable")
        sides.append((v[order], np.cumsum(w[order]) / w.sum()))
    (a, ca), (b, cb) = sides
    t = np.union1d(ca, cb)
    t = t[(t > 0) & (t <= 1)]
    t[-1] = 1.0
    dt = np.diff(np.concatenate([[0.0], t]))
    mid = t - 0.5 * dt  # inside each segment: the quantile functions are constant there
    qa = a[np.minimum(np.searchsorted(ca, mid), a.size - 1)]
    qb = b[np.minimum(np.searchsorted(cb, mid), b.size - 1)]
    return float(math.sqrt(max(float(np.sum(dt * (qa - qb) ** 2)), 0.0)))


@torch.no_grad()
def data_nll(bg: GeneratorModel, x: torch.Tensor, batch_size: int = 1024) -> float:
    """-1/M sum_j log q(x_j) over the M configurations of x, in batches (float64 sum)."""
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(bg.device)
        total += float(-bg.log_prob(xb).double().sum())
    return total / x.shape[0]


@torch.no_grad()
def quadrature_kl_of(bg: GeneratorModel, n_points: int = 256, batch_size: int = 4096) -> float:
    """KL(mu || q) = integral mu (ln mu - ln q) by the midpoint rule on the target's grid
    (`target.quadrature(n)` -> grid [n], normalised log mu [n, n], cell area), with log q from the flow."""
    target = require(bg.target, QuadratureTarget, "the quadrature KL (quadrature_kl_of)")
    grid, log_p, cell = target.quadrature(n_points)
    t1, t2 = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([t1.reshape(-1), t2.reshape(-1)], -1).to(device=bg.device, dtype=torch.get_default_dtype())
    log_q = torch.cat([bg.log_prob(points[i:i + batch_size]).double().cpu()
                       for i in range(0, len(points), batch_size)])
    return quadrature_kl(log_p.reshape(-1), log_q, cell)


def force_matching_error(bg: GeneratorModel, x: Tensor, f: Tensor, batch_size: int = 1024) -> dict[str, float]:
    """How well the flow's score matches the data's reduced forces f = -grad_x u(x).

    force_rmse = sqrt(mean over samples and coordinates of (grad_x log q(x) - f)^2) (the square
    root of L_FM of Koehler, Kraemer, Noe, "Smooth Normalizing Flows", NeurIPS 2021), and
    force_rmse_relative = force_rmse / sqrt(mean f^2) (1 for a flow with zero score, 0 for a
    perfect one). Evaluated in batches without create_graph, sums accumulated in float64; works
    under torch.no_grad and inference mode.
    """
    if x.shape != f.shape:
        raise ValueError(f"forces of shape {tuple(f.shape)} do not match the data of shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("force_matching_error needs at least one sample")
    squared_error, squared_force = 0.0, 0.0  # Python floats: float64 sums (also safe in inference mode)
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(bg.device).clone().requires_grad_(True)
            fb = f[start : start + batch_size].to(bg.device).clone()
            (score,) = torch.autograd.grad(bg.log_prob(xb).sum(), xb)
            squared_error += float(((score.detach().double() - fb.double()) ** 2).sum())
            squared_force += float((fb.double() ** 2).sum())
    rmse = math.sqrt(squared_error / x.numel())
    scale = math.sqrt(squared_force / x.numel())
    return {"force_rmse": rmse, "force_rmse_relative": rmse / scale if scale > 0 else float("nan")}


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


# ---------------------------------------------------------------------------------------------
# weights, energies, states


def ess_metrics(samples: SampleSet, target: Any = None) -> dict[str, float]:
    """ess (Kish, fraction of N), n_samples, n_nonfinite_energies, the sampling statistics and, for
    a target with relabelled particles, the fraction of samples outside the canonical region."""
    any_weight = bool(np.isfinite(samples.log_w).any())  # else ESS 0 (SampleSet.zero_weight_problem says why)
    return {"ess": ess(samples.log_w) if any_weight else 0.0, "n_samples": float(samples.n),
            "n_nonfinite_energies": float(samples.n_nonfinite),
            "n_nonfinite_log_q": float(samples.n_nonfinite_log_q), **samples.sampling,
            **({"outside_canonical_region": samples.n_outside_region / samples.n}
               if target is not None and target.relabelling is not None else {})}


def energy_stats(samples: SampleSet, target: Any = None) -> dict[str, float]:
    """energy_mean, energy_median, energy_min of the finite reduced energies (none if none is)."""
    u = samples.u[torch.isfinite(samples.u)].double().cpu().numpy()
    if not u.size:
        return {}
    return {"energy_mean": float(u.mean()), "energy_median": float(np.median(u)), "energy_min": float(u.min())}


def state_masks(samples: SampleSet, target: Any) -> dict[str, np.ndarray]:
    """name -> bool [N]: which samples are in each of the target's states."""
    return {name: state(samples.x).cpu().numpy() for name, state in target.states.items()}


def populations(samples: SampleSet, target: Any) -> dict[str, float]:
    """population/<state>: the unweighted fraction of samples in each state."""
    return {f"population/{name}": float(mask.mean()) for name, mask in state_masks(samples, target).items()}


def free_energy_differences(samples: SampleSet, target: Any, n_bootstrap: int = 200, confidence: float = 0.95,
                            seed: int = 0) -> dict[str, dict[str, Any]]:
    """"a->b" -> {value, ci_low, ci_high, confidence, reference, reference_source[, reference_ci,
    error]} for the first state a and every other state b (module docstring); None where not finite."""
    masks = state_masks(samples, target)
    names = list(masks)
    reference = target.reference
    out: dict[str, dict[str, Any]] = {}
    weighted = np.isfinite(samples.log_w)
    for b in names[1:]:
        key = f"{names[0]}->{b}"
        if not (weighted & (masks[names[0]] | masks[b])).any():  # no weight in either state: undefined
            out[key] = {"value": None, "ci_low": None, "ci_high": None, "confidence": confidence,
                        "reference": None, "reference_source": None,
                        "reason": samples.zero_weight_problem or f"no sample in {names[0]} or {b} has weight"}
            ref = reference.delta_f.get(key) if reference is not None else None
            if ref is not None:
                out[key].update(reference=ref.value, reference_ci=[ref.ci_low, ref.ci_high], reference_source=ref.source)
            continue
        result = bootstrap(free_energy_difference, samples.log_w, masks[names[0]], masks[b],
                           n_boot=n_bootstrap, confidence=confidence, seed=seed)
        entry: dict[str, Any] = {"value": _finite_or_none(result.value), "ci_low": _finite_or_none(result.ci_low),
                                 "ci_high": _finite_or_none(result.ci_high), "confidence": confidence,
                                 "reference": None, "reference_source": None}
        ref = reference.delta_f.get(key) if reference is not None else None
        if ref is not None:
            entry.update(reference=ref.value, reference_ci=[ref.ci_low, ref.ci_high], reference_source=ref.source)
            if entry["value"] is not None:
                entry["error"] = entry["value"] - ref.value
        out[key] = entry
    return out


def delta_f_metrics(delta_f: dict[str, dict[str, Any]]) -> dict[str, float]:
    """delta_f/<a->b>/{error, value, ci_low, ci_high}: the finite numbers of each entry."""
    metrics: dict[str, float] = {}
    for key, entry in delta_f.items():
        for k in ("error", "value", "ci_low", "ci_high"):
            if entry.get(k) is not None:
                metrics[f"delta_f/{key}/{k}"] = entry[k]
    return metrics


# ---------------------------------------------------------------------------------------------
# profiles and surfaces


@dataclass
class ProfileCurve:
    """The reweighted profile F(s) at bin centres, the reference drawn with it and the RMSE."""

    centres: np.ndarray
    f: np.ndarray
    reference: dict[str, Any] | None = None
    rmse: float | None = None


def profile_curve(samples: SampleSet, target: Any, name: str, bins: int = 40, max_f_ref: float = 10.0) -> ProfileCurve:
    """F(s) = -ln p(s) of observable `name` (reweighted histogram; on the reference's bins when it
    has a profile), with RMSE to the reference over bins where F_ref <= max_f_ref after aligning
    the additive constant."""
    ref = (target.reference.profiles.get(name) if target.reference is not None else None) or None
    edges = np.asarray(ref["bin_edges"]) if ref and "bin_edges" in ref else bins
    s, log_w = _finite_observed(samples, samples.observed[name])
    if np.isfinite(log_w).any():
        centres, f = free_energy_profile(s, log_w, bins=edges)
    else:  # no sample has weight: an empty profile (+inf everywhere), no RMSE
        edges = edges if np.ndim(edges) else np.histogram_bin_edges(s if s.size else [0.0, 1.0], bins=int(edges))
        centres, f = 0.5 * (edges[:-1] + edges[1:]), np.full(len(edges) - 1, np.inf)
    if ref is None:
        return ProfileCurve(centres, f)
    f_ref = np.array([np.inf if v is None else v for v in ref["f"]], dtype=float)
    rmse = align_profiles(f, f_ref, max_f_ref=max_f_ref)[1] if _alignable(f, f_ref, max_f_ref) else None
    drawn = {"x": np.asarray(ref["x"]), "f": f_ref, "label": "reference"}
    if "f_std" in ref:
        drawn["f_std"] = np.array([np.nan if v is None else v for v in ref["f_std"]], dtype=float)
    return ProfileCurve(centres, f, drawn, None if rmse is None else float(rmse))


def _finite_observed(samples: SampleSet, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """The observable values and log-weights of the samples whose values are all finite (a diverged
    flow gives NaN or infinite coordinates; those samples have zero weight anyway)."""
    keep = np.ones(samples.n, dtype=bool)
    for v in values:
        keep &= np.isfinite(v)
    return (*(np.asarray(v)[keep] for v in values), np.asarray(samples.log_w)[keep])


def _alignable(f: np.ndarray, f_ref: np.ndarray, max_f_ref: float | None) -> bool:
    """Whether align_profiles has a bin to work with: f and f_ref finite there (and f_ref within
    max_f_ref of its minimum); not so when the flow's samples miss every low-energy bin."""
    mask = np.isfinite(f) & np.isfinite(f_ref)
    if max_f_ref is not None and np.isfinite(f_ref).any():
        mask &= np.where(np.isfinite(f_ref), f_ref - f_ref[np.isfinite(f_ref)].min(), np.inf) <= float(max_f_ref)
    return bool(mask.any())


def profile_rmse(samples: SampleSet, target: Any, bins: int = 40, max_f_ref: float = 10.0) -> dict[str, float]:
    """profile/<observable>/rmse for every observable with a reference profile."""
    out = {}
    for name in target.observables:
        curve = profile_curve(samples, target, name, bins, max_f_ref)
        if curve.rmse is not None:
            out[f"profile/{name}/rmse"] = curve.rmse
    return out


@dataclass
class Surface:
    """A reweighted 2-D histogram p [x bins, y bins] of two observables and its reference."""

    x_edges: np.ndarray
    y_edges: np.ndarray
    p: np.ndarray
    p_ref: np.ndarray | None
    observables: tuple[str, str]


def surface_histogram(samples: SampleSet, target: Any, name: str, bins: int = 40) -> Surface:
    """The reweighted histogram of surface `name` on the reference's edges (or `bins` per axis)."""
    obs_a, obs_b, range_a, range_b = target.surfaces[name]
    ref = (target.reference.surfaces.get(name) if target.reference is not None else None) or None
    if ref is not None:
        x_edges, y_edges = np.asarray(ref["x_edges"]), np.asarray(ref["y_edges"])
    else:
        x_edges = np.linspace(range_a[0], range_a[1], bins + 1)
        y_edges = np.linspace(range_b[0], range_b[1], bins + 1)
    a, b, log_w = _finite_observed(samples, samples.observed[obs_a], samples.observed[obs_b])
    p = (weighted_histogram2d(a, b, log_w, x_edges, y_edges) if np.isfinite(log_w).any()
         else np.zeros((len(x_edges) - 1, len(y_edges) - 1)))  # no sample has weight
    return Surface(x_edges, y_edges, p, np.asarray(ref["p"]) if ref is not None else None, (obs_a, obs_b))


def surface_kl(samples: SampleSet, target: Any, bins: int = 40) -> dict[str, float]:
    """surface/<name>/kl = KL(p_ref || p) for every surface with a reference and some weight."""
    out = {}
    for name in target.surfaces:
        s = surface_histogram(samples, target, name, bins)
        if s.p_ref is not None and s.p.sum() > 0:
            out[f"surface/{name}/kl"] = histogram_kl(s.p_ref, s.p)
    return out


# ---------------------------------------------------------------------------------------------
# the density: quadrature, held-out data, forces


def quadrature_metrics(samples: SampleSet, target: Any, model: GeneratorModel, n_points: int = 256,
                       batch_size: int = 4096) -> dict[str, float]:
    """kl_quadrature = KL(target || flow) on the target's grid; only for a QuadratureTarget."""
    if not isinstance(target, QuadratureTarget):
        return {}
    return {"kl_quadrature": quadrature_kl_of(model, n_points, batch_size)}


def heldout_nll(samples: SampleSet, target: Any, model: GeneratorModel) -> dict[str, float]:
    """nll_test over all held-out data (none without data)."""
    return {"nll_test": data_nll(model, samples.data)} if samples.has_data else {}


def force_matching(samples: SampleSet, target: Any, model: GeneratorModel, batch_size: int = 1024) -> dict[str, float]:
    """force_rmse, force_rmse_relative on the first N held-out configurations with forces."""
    if not samples.has_data or samples.forces is None:
        return {}
    return force_matching_error(model, samples.data_head, samples.forces[: samples.n], batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# distances between the data's and the samples' distributions


def _energy_distance(samples: SampleSet, name: str, distance) -> dict[str, float]:
    """energy_<name>_flow, energy_<name>_reweighted: `distance` between the data's reduced energies
    and the samples' (unweighted, then with the importance weights)."""
    if not samples.has_data:
        return {}
    out = {}
    for key, weight in ((f"energy_{name}_flow", None), (f"energy_{name}_reweighted", samples.weights)):
        value = distance(samples.data_u, samples.energies, weight)
        if value is not None:
            out[key] = value
    return out


def energy_w1(samples: SampleSet, target: Any = None) -> dict[str, float]:
    """energy_w1_flow, energy_w1_reweighted: W1 between the data's reduced energies and the samples'."""
    return _energy_distance(samples, "w1", wasserstein_1)


def energy_w2(samples: SampleSet, target: Any = None) -> dict[str, float]:
    """energy_w2_flow, energy_w2_reweighted: W2 between the data's reduced energies and the samples'."""
    return _energy_distance(samples, "w2", wasserstein_2)


def distribution_values(samples: SampleSet, target: Any, name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled values of the multi-valued observable `name` ({"data": ..., "flow samples": ...}, data
    first where given) and the sample weights repeated over the values of each sample."""
    dist = target.distributions[name]
    flow = dist(samples.x).double().cpu().numpy()
    repeated = np.repeat(samples.weights, flow.shape[1])
    values = {"flow samples": flow.reshape(-1)}
    if samples.has_data:
        values = {"data": dist(samples.data_head).double().cpu().numpy().reshape(-1), **values}
    return values, repeated


def distribution_w1(samples: SampleSet, target: Any) -> dict[str, float]:
    """distribution/<name>/w1_flow, .../w1_reweighted for each of the target's distributions."""
    out = {}
    if not samples.has_data:
        return out
    for name in target.distributions:
        values, repeated = distribution_values(samples, target, name)
        for key, weight in (("w1_flow", None), ("w1_reweighted", repeated)):
            value = wasserstein_1(values["data"], values["flow samples"], weight)
            if value is not None:
                out[f"distribution/{name}/{key}"] = value
    return out


__all__ = [
    "wasserstein_1", "data_nll", "quadrature_kl_of", "force_matching_error", "ess_metrics", "energy_stats",
    "state_masks", "populations", "free_energy_differences", "delta_f_metrics", "ProfileCurve", "profile_curve",
    "profile_rmse", "Surface", "surface_histogram", "surface_kl", "quadrature_metrics", "heldout_nll",
    "force_matching", "energy_w1", "energy_w2", "wasserstein_2", "distribution_values", "distribution_w1",
]
