"""Figures shared by training callbacks and evaluation (the drawing primitives; which figures an
evaluation draws is bgexp.evaluation.figures). (Formerly bgexp/plots.py.)

Every function draws one figure, saves it as a PNG at `path` (parent folders are created),
releases it and returns the `Path`. Figures are built with `matplotlib.figure.Figure` on an Agg
canvas, never through pyplot's global figure manager: nothing is shown, no GUI backend is
touched, the process-wide backend is left alone, and a callback running in a training loop leaks
no open figures.

Inputs may contain NaN or infinite values (flow samples with exploding energies, empty bins of
a free-energy profile): they are skipped, and histogram legends say how many were dropped, so
that nothing is silently hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_energy_histograms", "plot_energy_densities", "plot_free_energy_profile", "plot_free_energy_surface", "plot_observable_histogram",
           "plot_smc_history"]

ArrayLike = np.ndarray | Sequence[float]


# ---------------------------------------------------------------------------------------------
# helpers


def new_figure(figsize: tuple[float, float] = (6.0, 4.0)) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    fig.clear()
    return path


def _as_array(values: ArrayLike) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _finite(values: ArrayLike, weights: ArrayLike | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Values (and weights) where both are finite (and weights >= 0); also the number dropped."""
    v = _as_array(values)
    keep = np.isfinite(v)
    w = None
    if weights is not None:
        w = _as_array(weights)
        if w.shape != v.shape:
            raise ValueError(f"weights of shape {w.shape} do not match values of shape {v.shape}")
        keep &= np.isfinite(w) & (w >= 0)
        w = w[keep]
    return v[keep], w, int(v.size - keep.sum())


def _histograms(
    ax,
    values: Mapping[str, ArrayLike],
    weights: Mapping[str, ArrayLike] | None,
    bins: int,
    clip_quantile: float,
    range_from: str | None = None,
) -> None:
    """Overlaid density histograms on a common binning; the x range spans, over all sets (or over
    the set `range_from` alone, widened by half its span), the quantiles [1 - q, q] of the finite
    values (q = clip_quantile; q = 1 takes the full range)."""
    if not 0.5 < clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile must be in (0.5, 1], got {clip_quantile}")
    weights = weights or {}
    unknown = set(weights) - set(values)
    if unknown:
        raise ValueError(f"weights given for unknown sets {sorted(unknown)}; sets are {sorted(values)}")
    sets = {name: _finite(v, weights.get(name)) for name, v in values.items()}
    if range_from is not None and range_from not in sets:
        raise ValueError(f"range_from={range_from!r} is not one of the sets {sorted(sets)}")
    lows, highs = [], []
    for name, (v, _, _) in sets.items():
        if range_from is not None and name != range_from:
            continue
        if v.size:
            lows.append(np.quantile(v, 1.0 - clip_quantile))
            highs.append(np.quantile(v, clip_quantile))
    if not lows:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        return
    lo, hi = min(lows), max(highs)
    if hi <= lo:  # all values equal
        lo, hi = lo - 0.5, hi + 0.5
    if range_from is not None:
        lo, hi = lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo)
    margin = 0.02 * (hi - lo)
    edges = np.linspace(lo - margin, hi + margin, int(bins) + 1)
    for name, (v, w, n_dropped) in sets.items():
        notes = []
        if n_dropped:
            notes.append(f"{n_dropped} non-finite")
        inside = (v >= edges[0]) & (v <= edges[-1])
        n_out = int(v.size - inside.sum())
        if n_out:
            notes.append(f"{n_out} outside range")
        label = name + (f" ({', '.join(notes)})" if notes else "")
        v_in = v[inside]
        w_in = None if w is None else w[inside]
        if v_in.size == 0 or (w_in is not None and not w_in.sum() > 0):
            ax.plot([], [], label=label + " [empty]")
            continue
        _, _, filled = ax.hist(v_in, bins=edges, weights=w_in, density=True, histtype="stepfilled",
                               alpha=0.25)
        color = filled[0].get_facecolor()[:3]
        ax.hist(v_in, bins=edges, weights=w_in, density=True, histtype="step", linewidth=1.5,
                color=color, label=label)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylabel("density")
    ax.legend(fontsize="small")


# ---------------------------------------------------------------------------------------------
# figures


def plot_energy_histograms(
    energies: Mapping[str, ArrayLike],
    path: str | Path,
    title: str | None = None,
    bins: int = 80,
    clip_quantile: float = 0.99,
    weights: Mapping[str, ArrayLike] | None = None,
    range_from: str | None = None,
) -> Path:
    """Overlaid density histograms of reduced energies, e.g. {"data": u_md, "flow samples": u_bg,
    "reweighted": u_bg} with weights={"reweighted": w}. The x range is clipped to the
    [1 - clip_quantile, clip_quantile] quantiles so that a few huge energies do not squash the
    plot; values outside it are counted in the legend. `range_from="data"` takes the range from
    that set alone (so an untrained flow's energies do not set the scale)."""
    fig = new_figure()
    ax = fig.add_subplot()
    _histograms(ax, energies, weights, bins, clip_quantile, range_from)
    ax.set_xlabel("energy u(x) [kT]")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_observable_histogram(
    values: Mapping[str, ArrayLike],
    path: str | Path,
    xlabel: str,
    weights: Mapping[str, ArrayLike] | None = None,
    bins: int = 80,
    clip_quantile: float = 1.0,
    title: str | None = None,
) -> Path:
    """Overlaid density histograms of an observable (e.g. the dimer distance of data vs flow
    samples, optionally reweighted). The full finite range is shown unless clip_quantile < 1."""
    fig = new_figure()
    ax = fig.add_subplot()
    _histograms(ax, values, weights, bins, clip_quantile)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def _profile(x: ArrayLike, f: ArrayLike, err: ArrayLike | None, what: str):
    """A profile sorted by x, shifted so that min F = 0; F NaN where not finite (so that the drawn
    line breaks at an empty bin instead of bridging it); err NaN where not given/finite."""
    x, f = _as_array(x), _as_array(f)
    if x.shape != f.shape:
        raise ValueError(f"{what}: x has shape {x.shape} but f has shape {f.shape}")
    e = np.full_like(f, np.nan) if err is None else _as_array(err)
    if e.shape != f.shape:
        raise ValueError(f"{what}: the error has shape {e.shape} but f has shape {f.shape}")
    keep = np.isfinite(x)
    x, f, e = x[keep], f[keep].astype(float), e[keep].astype(float)
    order = np.argsort(x)
    x, f, e = x[order], f[order], e[order]
    gap = ~np.isfinite(f)
    f[gap], e[gap] = np.nan, np.nan
    if (~gap).any():
        f = f - np.nanmin(f)
    return x, f, e


def _band(ax, x, f, e, color) -> None:
    ok = np.isfinite(e)
    if ok.any():
        ax.fill_between(x, np.where(ok, f - e, f), np.where(ok, f + e, f), where=ok,
                        color=color, alpha=0.25, linewidth=0)


def plot_free_energy_profile(
    x: ArrayLike,
    f: ArrayLike,
    path: str | Path,
    f_err: ArrayLike | None = None,
    reference: Mapping[str, ArrayLike | str] | None = None,
    xlabel: str = "dimer distance d",
    states: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
    label: str = "estimate",
) -> Path:
    """Free-energy profile F(x) in kT, shifted so that its minimum is 0, with an error band
    (f_err, one standard deviation or any half-width the caller chooses). `reference` is a dict
    with keys "x", "f", optional "f_std" and "label", drawn the same way (its own minimum at 0).
    `states` maps a state name to an interval (lo, hi) shaded behind the curves; infinite ends
    reach the edge of the plot. Non-finite points are skipped, and the line breaks there."""
    fig = new_figure()
    ax = fig.add_subplot()
    xs, fs, es = _profile(x, f, f_err, "profile")
    all_x = [xs]
    if reference is not None:
        missing = {"x", "f"} - set(reference)
        if missing:
            raise ValueError(f"reference needs keys 'x' and 'f' (optional 'f_std', 'label'); missing {sorted(missing)}")
        rx, rf, re = _profile(reference["x"], reference["f"], reference.get("f_std"), "reference")
        ref_label = str(reference.get("label", "reference"))
        if np.isfinite(rf).any():
            ax.plot(rx, rf, "--", color="k", linewidth=1.5, label=ref_label)
            _band(ax, rx, rf, re, "0.5")
        all_x.append(rx)
    if np.isfinite(fs).any():
        line = ax.plot(xs, fs, "o-", markersize=3, linewidth=1.5, label=label)[0]
        _band(ax, xs, fs, es, line.get_color())
    else:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    finite_x = np.concatenate(all_x)
    if states:
        if finite_x.size:
            x_lo, x_hi = float(finite_x.min()), float(finite_x.max())
        else:
            x_lo, x_hi = 0.0, 1.0
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
        for k, (name, (lo, hi)) in enumerate(states.items()):
            lo = x_lo if not np.isfinite(lo) else float(lo)
            hi = x_hi if not np.isfinite(hi) else float(hi)
            ax.axvspan(lo, hi, color=colors[k % len(colors)], alpha=0.08, label=name)
        if x_hi > x_lo:
            ax.set_xlim(x_lo, x_hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("free energy F [kT]")
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_free_energy_surface(
    x_edges: ArrayLike,
    y_edges: ArrayLike,
    p: np.ndarray,
    path: str | Path,
    reference: np.ndarray | None = None,
    xlabel: str = "phi",
    ylabel: str = "psi",
    title: str | None = None,
    max_f: float = 10.0,
) -> Path:
    """F = -ln p (kT, minimum at zero, empty bins blank) of a 2-D histogram p[x, y] as a colour
    map; with `reference`, a second panel shows the reference histogram on the same scale."""
    panels = [("estimate", np.asarray(p, dtype=float))]
    if reference is not None:
        panels.append(("reference", np.asarray(reference, dtype=float)))
    fig = new_figure((5.0 * len(panels) + 0.8, 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (name, hist) in zip(axes, panels):
        with np.errstate(divide="ignore"):
            f = -np.log(hist)
        finite = np.isfinite(f)
        if finite.any():
            f = f - f[finite].min()
        f = np.where(finite & (f <= max_f), f, np.nan)
        image = ax.pcolormesh(_as_array(x_edges), _as_array(y_edges), f.T, vmin=0, vmax=max_f, cmap="viridis")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name if title is None or name == "reference" else title, fontsize="small")
    fig.colorbar(image, ax=list(axes), label="free energy F [kT]")
    return save_figure(fig, path)


def plot_smc_history(histories: dict[str, dict[str, list]], path: str | Path, title: str = "") -> Path:
    """The annealing of SMC runs: b (top) and the ESS fraction after each reweighting (bottom)
    against the level, one line per run (e.g. per state); resampled levels marked."""
    fig = new_figure((6.0, 5.0))
    ax_b, ax_ess = fig.subplots(2, 1, sharex=True)
    for name, table in histories.items():
        levels, b, ess = table.get("level", []), table.get("b", []), table.get("ess", [])
        line = ax_b.plot(levels, b, marker=".", label=name)[0]
        ax_ess.plot(levels, ess, marker=".", color=line.get_color())
        marked = [(lv, e) for lv, e, r in zip(levels, ess, table.get("resampled", [])) if r]
        if marked:
            ax_ess.scatter(*zip(*marked), marker="x", color=line.get_color())
    ax_b.set_ylabel("b")
    ax_ess.set_ylabel("ESS / N (x: resampled)")
    ax_ess.set_xlabel("level")
    ax_ess.set_ylim(0, 1.05)
    if histories:
        ax_b.legend(fontsize=8)
    if title:
        ax_b.set_title(title)
    return save_figure(fig, path)


def plot_work_distributions(histograms: dict[str, dict[str, list]], path: str | Path, title: str = "") -> Path:
    """Forward works W_F and negated reverse works -W_R of the bidirectional estimate, one panel per
    state, with BAR's Delta f marked: Crooks' theorem puts both densities' crossing at Delta f, and
    BAR is reliable where they overlap (Shirts et al., PRL 91, 140601 (2003))."""
    fig = new_figure((4.0 * max(len(histograms), 1), 3.4))
    axes = fig.subplots(1, max(len(histograms), 1), squeeze=False)[0]
    for ax, (name, h) in zip(axes, histograms.items()):
        edges = np.asarray(h["edges"])
        centres, width = 0.5 * (edges[1:] + edges[:-1]), np.diff(edges)
        for key, label in (("forward", "W_F (from the flow)"), ("reverse", "-W_R (from the data)")):
            counts = np.asarray(h[key], dtype=float)
            if counts.sum() > 0:
                ax.step(centres, counts / (counts.sum() * width), where="mid", label=label)
        if h.get("delta_f") is not None:
            ax.axvline(h["delta_f"], color="k", ls="--", lw=1, label="BAR Delta f")
        ax.set_title(name)
        ax.set_xlabel("work [kT]")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_energy_densities(curves: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Energy densities on shared bins (`curves["edges"]`; every other entry one density): the
    held-out frames' filled, each sampler's final configurations' as a line."""
    edges = np.asarray(curves["edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    fig = new_figure((5.6, 3.8))
    ax = fig.subplots()
    for name, density in curves.items():
        if name == "edges":
            continue
        if name == "held-out data":
            ax.fill_between(centres, density, step="mid", alpha=0.3, color="grey", label=name)
        else:
            ax.step(centres, density, where="mid", label=name)
    ax.set_xlabel("reduced energy u [kT]")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
