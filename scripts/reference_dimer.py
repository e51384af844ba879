"""Reference free-energy profile F(d) and Delta F(closed -> open) of the bistable dimer
(bgexp.targets.dimer.DimerTarget) by umbrella sampling along the dimer distance d + MBAR.

What it computes, per relative temperature T (reduced units, reference kT = 1):

* Umbrella windows k = 1..K with centres d_k = linspace(d_min, d_max, K) (default 35 windows over
  [0.5, 2.5], force constant k_u = 500, as in Noe, Olsson, Koehler & Wu, "Boltzmann generators",
  Science 365, eaaw1147 (2019): 35 windows, force constant 500, 50 000 steps each). The biased
  reduced energy of window k is

      u_k(x) = [ U(x) + 0.5 * k_u * (d(x) - d_k)^2 ] / T ,

  i.e. the bias is given in energy units at the reference kT = 1 and is divided by T like U (so
  at T = 0.5 the windows are as narrow as with k_u = 1000 at T = 1).
* All K windows x chains-per-window run as ONE vectorised Metropolis batch
  (bgexp.targets.md.metropolis): every chain carries its own bias centre. Chains start from
  DimerTarget.initial_configurations("closed") for d_k < 1.5 and ("open") otherwise; the burn-in
  (during which metropolis adapts a per-chain step size) equilibrates them under their bias.
* Decorrelation: states are stored every --thin steps; then, per window, the statistical
  inefficiency g_k of d is estimated over all chains of the window with
  pymbar.timeseries.statistical_inefficiency_multiple, and every chain of that window is
  subsampled with stride ceil(g_k) (pymbar.timeseries.subsample_correlated_data), so that MBAR's
  analytical uncertainties refer to (nearly) uncorrelated samples.
* MBAR (Shirts & Chodera, J. Chem. Phys. 129, 124105 (2008); pymbar 4) on u_kn = reduced
  energies of every retained sample in the K biased states plus the unbiased state (K+1, no
  samples). U(x)/T is common to all K+1 states at one temperature and cancels in MBAR exactly, so
  u_kn[k, n] = 0.5 k_u (d_n - d_k)^2 / T and u_kn[K, n] = 0 are used (no round-off from U).
* Unbiased expectations of indicator functions (MBAR.compute_multiple_expectations): bin probabilities p_i of d in --bins equal bins over [0.5, 2.5] and the state
  probabilities P_closed = P(d < 1.5), P_open = P(d >= 1.5). Then

      F_i  = -ln(p_i / Delta_d)                   (absolute: -ln of the probability DENSITY
                                                   per unit d; key "f"; NOT shifted)
      f_shifted_i = F_i - min_j F_j               (key "f_shifted"; minimum 0)
      std(F_i) = std(p_i) / p_i                   (key "f_std"; used for both, the shift's own
                                                   uncertainty ignored)
      Delta F(closed -> open) = -ln(P_open / P_closed),
      std = std(P_open) / (P_open P_closed)      (delta method; P_closed = 1 - P_open)
      95% CI = value +- 1.96 std.

  Bins without any weight get F = null in the JSON (no non-finite numbers are written).
* Checks (stored under "diagnostics" per temperature, printed too): Delta F from integrating
  exp(-F) of the profile over each state (bootstrap-free sanity check; equals the direct value up
  to probability mass outside [0.5, 2.5]); Delta F from the first and the second half of the
  production run (drift / burn-in check) and from two disjoint halves of the chains (independent
  replicas); the minimum MBAR overlap between neighbouring windows (mbar.compute_overlap()); the
  statistical inefficiencies and the Metropolis acceptance.

Window centres: [0.5, 2.5] as in the paper. The double well is very steep outside its minima
(U_dimer(0.5) - U_dimer(0.94) ~ 76 kT), so the outermost windows are pushed inwards (the window at
d_k = 0.5 samples d ~ 0.6-0.75); the edge bins hold F values tens of kT above the minima or are empty
(null). A wider range would only refine bins that carry no probability.

Output: --out (default bgexp/targets/references/dimer.json), read by DimerTarget:
  {"source", "command", "settings", "created",
   "temperatures": {"<T:g>": {"delta_f": {"closed->open": {"value", "std", "ci_low", "ci_high"}},
                             "profiles": {"dimer_distance": {"x", "f", "f_shifted", "f_std",
                                                             "bin_edges"}},
                             "diagnostics": {...}}}}
--figure PATH additionally writes a figure of the profiles (shifted, +-1.96 std band, both states
shaded).

Sampling cost and what it buys (measured). Metropolis moves all 76 coordinates at once, so the
step size is ~0.01 and the correlation time of d in a window is long: 150-1200 MC steps at T = 1
(median ~500; short runs underestimate it: slow solvent rearrangement), up to ~8000 at T = 0.5.
The std of Delta F scales like 1 / sqrt(windows x chains x steps) at fixed window settings.
* CPU defaults (this 2-core machine, shared with other jobs, --threads 1; 560 chains at
  ~7.5-8 ms per step): `python scripts/reference_dimer.py` (T = 1) took 14.2 min (823 s MC +
  26 s MBAR) and gave Delta F = 0.932 +- 0.106 kT; with --seed 1, 15.6 min and 1.089 +- 0.105
  (the stored GPU value: 1.156 +- 0.036; differences 2.0 and 0.6 sigma). Halves of one run differ
  by up to ~2 sigma, so the analytical std of such a short run is probably ~1.3x optimistic. A std
  below 0.05 kT would need ~4-5x the production steps (~1 h) on this machine. Keep --threads 1 on
  a shared machine: with 2 torch threads and other jobs running, each step became 10-20x slower.
* The stored file was made on one NVIDIA H200 GPU (4480 chains per temperature, ~0.65 ms per
  step, about 2 min of MC + 0.5 min of MBAR per temperature), with pymbar 4.0.3 + numexpr installed
  from wheels there:

    python scripts/reference_dimer.py --device cuda --temperatures 1 0.5 2 \
        --chains-per-window 128 --burn-in 100000 --steps 100000 --thin 40 \
        --out /root/out/dimer.json --figure /root/out/dimer.png --no-progress

  (the device's output folder; the file was copied unchanged to
  bgexp/targets/references/dimer.json). Results (kT at T): Delta F(closed -> open) =
  1.156 +- 0.036 (T = 1), 1.610 +- 0.063 (T = 0.5), 1.139 +- 0.026 (T = 2); min neighbour
  overlap 0.13-0.17. An independent run with 256 chains/window, burn-in 30 000, 50 000 steps
  gave 1.174 +- 0.036, 1.738 +- 0.057, 1.134 +- 0.026: T = 1 and 2 agree, T = 0.5 differs by
  1.5 sigma (and its two production halves by 1.4 sigma), so at T = 0.5 the quoted std is
  probably somewhat optimistic (slow solvent modes). Profile minima at d = 0.925 and 2.075 (bin
  centres), barrier at d ~ 1.5: 17.6 kT above the closed minimum at T = 1 (the bare double well
  has 15.6 kT), 33.9 kT at T = 0.5, 9.8 kT at T = 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bgexp.targets.dimer import DimerTarget
from bgexp.targets.md import metropolis

D_TRANSITION = 1.5
PROFILE_RANGE = (0.5, 2.5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0],
                   help="relative temperatures (reference kT = 1)")
    p.add_argument("--n-windows", type=int, default=35)
    p.add_argument("--k-umbrella", type=float, default=500.0,
                   help="umbrella force constant (energy at reference kT = 1; divided by T like U)")
    p.add_argument("--d-min", type=float, default=0.5, help="first window centre")
    p.add_argument("--d-max", type=float, default=2.5, help="last window centre")
    p.add_argument("--chains-per-window", type=int, default=16)
    p.add_argument("--burn-in", type=int, default=30000, help="MC steps discarded (step size adapted)")
    p.add_argument("--steps", type=int, default=80000, help="production MC steps per chain")
    p.add_argument("--thin", type=int, default=25, help="store every thin-th state")
    p.add_argument("--step-size", type=float, default=0.02, help="initial MC step size (adapted)")
    p.add_argument("--target-acceptance", type=float, default=0.4,
                   help="acceptance rate the step sizes are adapted to during burn-in")
    p.add_argument("--seed", type=int, default=0,
                   help="RNG seed; temperature T uses seed + round(1000 T)")
    p.add_argument("--bins", type=int, default=40, help="profile bins over [0.5, 2.5]")
    p.add_argument("--device", type=str, default="cpu", help="torch device for the MC (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default: on a shared 2-core machine torch's "
                        "intra-op threads slow the small per-step tensors down by 10x or more")
    p.add_argument("--out", type=str, default="bgexp/targets/references/dimer.json")
    p.add_argument("--figure", type=str, default=None, help="optional figure path (png/pdf)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _finite_list(a) -> list:
    return [_finite(v) for v in np.asarray(a, dtype=float).ravel()]


def _delta_f(p_c, p_o, std_o) -> tuple[float, float]:
    """-ln(P_o/P_c) and its delta-method std for P_c = 1 - P_o: std(P_o) / (P_o P_c)."""
    if p_c <= 0 or p_o <= 0:
        return float("nan"), float("nan")
    return -math.log(p_o / p_c), std_o / (p_o * p_c)


def mbar_analysis(pymbar, d_n, window_n, centres, k_u, T, edges, full=True) -> dict:
    """MBAR over the K biased windows + the unbiased state for samples d_n from windows window_n.
    full=False: Delta F only (no bins, no overlap)."""
    K = len(centres)
    N_k = np.append(np.bincount(window_n, minlength=K), 0)
    u_kn = np.zeros((K + 1, len(d_n)))
    u_kn[:K] = 0.5 * k_u * (d_n[None, :] - centres[:, None]) ** 2 / T
    mbar = pymbar.MBAR(u_kn, N_k, initialize="BAR" if K > 1 else "zeros")
    bin_idx = np.digitize(d_n, edges) - 1  # -1 / len(edges)-1 for out of range
    n_bins = len(edges) - 1 if full else 0
    A = np.zeros((n_bins + 2, len(d_n)))
    if full:
        inside = (bin_idx >= 0) & (bin_idx < n_bins)
        A[bin_idx[inside], np.nonzero(inside)[0]] = 1.0
    A[n_bins] = d_n < D_TRANSITION
    A[n_bins + 1] = d_n >= D_TRANSITION
    # observables with no sample at all (empty bins, or a state never visited) have probability
    # exactly 0 under any reweighting; pymbar cannot take them (log 0), so they are left out
    nonzero = A.any(axis=1)
    # (pymbar 4.0.3's compute_multiple_expectations(..., compute_covariance=True) returns the
    # covariance of the LOG expectations (Theta) under the name "covariances", so it is not used;
    # the delta method below needs only sigma(P_open), since P_closed = 1 - P_open exactly.)
    mu, sigma = np.zeros(len(A)), np.zeros(len(A))
    with np.errstate(divide="ignore", invalid="ignore"):
        res = mbar.compute_multiple_expectations(A[nonzero], u_kn[K], compute_covariance=False)
    nz = np.nonzero(nonzero)[0]
    mu[nz], sigma[nz] = res["mu"], res["sigma"]
    out = {"p_bins": mu[:n_bins], "p_bins_std": sigma[:n_bins],
           "p_closed": mu[n_bins], "p_open": mu[n_bins + 1]}
    out["delta_f"], out["delta_f_std"] = _delta_f(mu[n_bins], mu[n_bins + 1], sigma[n_bins + 1])
    if full:
        O = mbar.compute_overlap()["matrix"]
        out["neighbour_overlap"] = np.array([O[k, k + 1] for k in range(K - 1)])
    return out


def run_temperature(T: float, args, target: DimerTarget, pymbar, timeseries) -> tuple[dict, dict]:
    K, C = args.n_windows, args.chains_per_window
    centres = np.linspace(args.d_min, args.d_max, K)
    device = torch.device(args.device)
    seed = args.seed + int(round(1000 * T))
    gen_cpu = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.cat([
        target.initial_configurations("closed" if c < D_TRANSITION else "open", C, generator=gen_cpu)
        for c in centres
    ]).to(device)
    chain_centre = torch.as_tensor(np.repeat(centres, C), dtype=x0.dtype, device=device)
    k_u = args.k_umbrella

    def biased_energy(x: torch.Tensor) -> torch.Tensor:
        d = target.dimer_distance(x)
        return (target.potential(x) + 0.5 * k_u * (d - chain_centre) ** 2) / T

    n_kept = args.steps // args.thin
    mem_gb = n_kept * K * C * target.dim * x0.element_size() / 1e9
    print(f"\n=== T = {T:g}: {K} windows x {C} chains, burn-in {args.burn_in}, {args.steps} steps, "
          f"thin {args.thin} ({n_kept} stored per chain, ~{mem_gb:.2f} GB of states)", flush=True)
    t0 = time.time()
    res = metropolis(biased_energy, x0, n_steps=args.steps, step_size=args.step_size,
                     burn_in=args.burn_in, thin=args.thin, generator=gen,
                     target_acceptance=args.target_acceptance,
                     progress=not args.no_progress, desc=f"umbrella T={T:g}")
    t_mc = time.time() - t0
    # d of every stored state: [n_kept, K*C] -> [K, C, n_kept]
    d = torch.stack([target.dimer_distance(s) for s in res.samples]).double().cpu().numpy()
    del res.samples
    d = d.T.reshape(K, C, n_kept)
    print(f"MC done in {t_mc:.0f} s; acceptance {res.acceptance:.3f}; step sizes "
          f"{res.step_size.min():.4f}..{res.step_size.max():.4f}", flush=True)

    # decorrelation: per-window statistical inefficiency of d, subsample each chain
    g = np.empty(K)
    d_list, w_list, half_chain, half_time = [], [], [], []
    for k in range(K):
        try:
            g[k] = timeseries.statistical_inefficiency_multiple([d[k, c] for c in range(C)])
        except Exception:  # constant series etc.
            g[k] = 1.0
        for c in range(C):
            idx = np.asarray(timeseries.subsample_correlated_data(d[k, c], g=g[k]))
            d_list.append(d[k, c, idx])
            w_list.append(np.full(len(idx), k))
            half_chain.append(np.full(len(idx), c < C // 2))
            half_time.append(idx < n_kept // 2)
    d_n, window_n = np.concatenate(d_list), np.concatenate(w_list)
    half_chain, half_time = np.concatenate(half_chain), np.concatenate(half_time)
    print(f"statistical inefficiency of d: {g.min() * args.thin:.0f}..{g.max() * args.thin:.0f} MC "
          f"steps (median {np.median(g) * args.thin:.0f}); {len(d_n)} decorrelated samples kept "
          f"of {d.size}", flush=True)

    edges = np.linspace(*PROFILE_RANGE, args.bins + 1)
    width = np.diff(edges)
    t1 = time.time()
    main = mbar_analysis(pymbar, d_n, window_n, centres, k_u, T, edges)
    checks = {}
    splits = [("first_half_time", half_time), ("second_half_time", ~half_time)]
    if C >= 2:
        splits += [("chains_half_a", half_chain), ("chains_half_b", ~half_chain)]
    for name, mask in splits:
        r = mbar_analysis(pymbar, d_n[mask], window_n[mask], centres, k_u, T, edges,
                          full=False)
        checks[name] = (r["delta_f"], r["delta_f_std"])
    t_mbar = time.time() - t1

    p, p_std = main["p_bins"], main["p_bins_std"]
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(p > 0, -np.log(p / width), np.inf)
        f_std = np.where(p > 0, p_std / p, np.inf)
    f_shifted = f - f[np.isfinite(f)].min()
    centres_bins = 0.5 * (edges[1:] + edges[:-1])
    closed_bins = centres_bins < D_TRANSITION
    fin = np.isfinite(f)
    p_c_int = np.sum(np.exp(-f[fin & closed_bins]) * width[fin & closed_bins])
    p_o_int = np.sum(np.exp(-f[fin & ~closed_bins]) * width[fin & ~closed_bins])
    df_int = -math.log(p_o_int / p_c_int)

    v, s = main["delta_f"], main["delta_f_std"]
    ov = main["neighbour_overlap"]
    print(f"Delta F(closed->open) = {v:.4f} +- {s:.4f} kT (95% CI {v - 1.96 * s:.3f}..{v + 1.96 * s:.3f});"
          f" P_closed {main['p_closed']:.4f}, P_open {main['p_open']:.4f}")
    print(f"  from integrating exp(-F) of the profile over each state: {df_int:.4f}")
    for name, (cv, cs) in checks.items():
        print(f"  {name:17s}: {cv:.4f} +- {cs:.4f}")
    print(f"  min neighbour overlap {ov.min():.4f} (windows {ov.argmin()}-{ov.argmin() + 1}, centres "
          f"{centres[ov.argmin()]:.3f}-{centres[ov.argmin() + 1]:.3f}); median {np.median(ov):.4f}")
    i_c = np.argmin(np.where(closed_bins & fin, f, np.inf))
    i_o = np.argmin(np.where(~closed_bins & fin, f, np.inf))
    barrier_region = fin & (centres_bins > centres_bins[i_c]) & (centres_bins < centres_bins[i_o])
    i_b = np.argmax(np.where(barrier_region, f, -np.inf)) if barrier_region.any() else None
    print(f"  profile minima at d = {centres_bins[i_c]:.3f} (closed) and {centres_bins[i_o]:.3f} (open)"
          + (f"; barrier at d = {centres_bins[i_b]:.3f}, {f[i_b] - f[i_c]:.2f} kT above the closed "
             f"minimum, {f[i_b] - f[i_o]:.2f} kT above the open one" if i_b is not None else ""))
    print(f"  MBAR analysis {t_mbar:.0f} s", flush=True)

    entry = {
        "delta_f": {"closed->open": {"value": _finite(v), "std": _finite(s),
                                     "ci_low": _finite(v - 1.96 * s), "ci_high": _finite(v + 1.96 * s)}},
        "profiles": {"dimer_distance": {
            "x": _finite_list(centres_bins),
            "f": _finite_list(f),
            "f_shifted": _finite_list(f_shifted),
            "f_std": _finite_list(f_std),
            "bin_edges": _finite_list(edges),
        }},
        "diagnostics": {
            "f_key_meaning": "f = -ln p(d), p = probability density per unit d (absolute); "
                             "f_shifted = f - min(f); f_std applies to both",
            "delta_f_from_profile_integration": _finite(df_int),
            "p_closed": _finite(main["p_closed"]), "p_open": _finite(main["p_open"]),
            "delta_f_halves": {name: {"value": _finite(cv), "std": _finite(cs)}
                               for name, (cv, cs) in checks.items()},
            "min_neighbour_overlap": _finite(ov.min()),
            "neighbour_overlap": _finite_list(ov),
            "window_centres": _finite_list(centres),
            "statistical_inefficiency_steps": _finite_list(g * args.thin),
            "n_decorrelated_samples": int(len(d_n)),
            "acceptance": _finite(res.acceptance),
            "mc_wall_time_s": _finite(round(t_mc, 1)),
        },
    }
    plot = {"x": centres_bins, "f": f_shifted, "f_std": f_std}
    return entry, plot


def write_figure(path: str, plots: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axvspan(PROFILE_RANGE[0], D_TRANSITION, color="tab:blue", alpha=0.08, label="closed")
    ax.axvspan(D_TRANSITION, PROFILE_RANGE[1], color="tab:orange", alpha=0.08, label="open")
    for T, pl in plots.items():
        fin = np.isfinite(pl["f"])
        x, f, s = pl["x"][fin], pl["f"][fin], pl["f_std"][fin]
        (line,) = ax.plot(x, f, "-o", ms=3, label=f"T = {T}")
        ax.fill_between(x, f - 1.96 * s, f + 1.96 * s, color=line.get_color(), alpha=0.3)
    ax.set_xlabel("dimer distance d")
    ax.set_ylabel("F(d) - min F  [kT at T]")
    ax.set_xlim(*PROFILE_RANGE)
    ax.set_ylim(bottom=-1)
    ax.legend()
    ax.set_title("dimer: umbrella sampling + MBAR (band: 95% CI)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    print(f"figure -> {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import pymbar
    from pymbar import timeseries

    command = shlex.join(["python", "scripts/reference_dimer.py",
                          *(sys.argv[1:] if argv is None else argv)])
    target = DimerTarget(temperature=1.0).to(args.device)
    settings = {k: v for k, v in vars(args).items() if k not in ("figure", "no_progress", "threads", "out")}
    settings.update({"bias": "u_k = (U + 0.5 k_umbrella (d - d_k)^2) / T", "mc": "Metropolis, all 76 "
                     f"coordinates per move, per-chain step size adapted during burn-in to acceptance {args.target_acceptance:g}",
                     "decorrelation": "per-window statistical inefficiency of d "
                     "(pymbar.timeseries.statistical_inefficiency_multiple), chains subsampled by it",
                     "pymbar": pymbar.__version__, "torch": torch.__version__})
    source = (f"Umbrella sampling along the dimer distance ({args.n_windows} windows over "
              f"[{args.d_min:g}, {args.d_max:g}], k={args.k_umbrella:g}, bias/T; Metropolis MC, "
              f"{args.chains_per_window} chains/window, {args.burn_in} burn-in + {args.steps} steps, "
              f"thin {args.thin}, decorrelated by statistical inefficiency) + MBAR (pymbar "
              f"{pymbar.__version__}); command: {command}")
    t0 = time.time()
    temps, plots = {}, {}
    for T in args.temperatures:
        key = f"{T:g}"
        temps[key], plots[key] = run_temperature(T, args, target, pymbar, timeseries)
        # written after every temperature, so a long multi-temperature run keeps what it finished
        wall = time.time() - t0
        settings["wall_time_s"] = round(wall, 1)
        out = {"source": source, "command": command, "settings": settings,
               "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "temperatures": temps}
        text = json.dumps(out, indent=1, allow_nan=False)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"\nwrote {args.out} ({len(temps)} temperature(s); wall time so far {wall:.0f} s)",
              flush=True)
    if args.figure:
        write_figure(args.figure, plots)


if __name__ == "__main__":
    main()
