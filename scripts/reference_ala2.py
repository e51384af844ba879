"""Reference values for alanine dipeptide from umbrella sampling along phi and MBAR (SYSTEMS.md section 3).

Plain MD crosses from C7eq (phi < 0) to C7ax / alpha_L (phi >= 0) too rarely to give the free-energy
difference between them (two visits in 10 ns), so the reference comes from umbrella sampling along
the backbone torsion phi = C(ACE)-N-CA-C, unbiased with MBAR.

Simulation
    K windows (default 48) with centres c_k evenly spaced on the circle, c_k = -pi + 2 pi k / K.
    Window k adds the harmonic bias on the periodic angle difference

        U_k(x) = 0.5 * kappa * d(phi(x), c_k)^2,   d(a, b) = wrapped a - b in (-pi, pi],

    (default kappa 500 kJ/mol/rad^2: sigma = sqrt(kT / kappa) = 0.071 rad against a spacing of
    0.13 rad). kappa must exceed the negative curvature of F(phi) at the barrier tops, about
    -200 kJ/mol/rad^2 near phi = +2.2 rad: with 24 windows and kappa = 100 the window at +2.09 rad
    stayed at +1.5 rad while the next one crossed to +2.9 rad, leaving a neighbouring MBAR overlap
    of 0.008. The bias goes into a copy of the unbiased system (AlanineDipeptide: Amber99SB-ILDN +
    OBC, no constraints, 300 K). In OpenMM it is a CustomTorsionForce on the phi atoms with energy
    0.5*k*dtheta^2, dtheta = min(dt, 2*pi - dt), dt = abs(theta - theta0) (pi defined in the
    expression), in a force group of its own; k and theta0 are global parameters, so one Context
    serves every window.
    The windows are run one after another around the circle, starting at the window nearest the
    minimised structure's phi and going towards increasing phi (--reverse: decreasing phi, a
    check on hysteresis in the slow orthogonal torsion psi); each starts from the previous
    window's last configuration and velocities, is equilibrated (default 20 ps) and then sampled
    (default 200 ps, a frame every 0.5 ps), with LangevinMiddleIntegrator (300 K, 1/ps, 2 fs).
    phi and psi of every frame (numpy dihedral formula, radians in [-pi, pi)) and the positions
    are stored in outputs/reference/ala2_umbrella.npz (written after every window; --resume
    continues an interrupted run), so that --analyze-only reruns the analysis without simulating.
    The bias energy that OpenMM reports for the bias force group is checked against the numpy
    bias at every frame.

Analysis (MBAR, pymbar 4)
    The unbiased Hamiltonian is the same in every window, so the reduced energies of sample n in
    state k contain only the bias, u_kn = U_k(phi_n) / kT with kT = R T (R = 0.00831446261815324
    kJ/mol/K). MBAR gives the window free energies f_k; the unbiased weight of sample n is

        w_n = exp(-log sum_k N_k exp(f_k - u_kn)) / sum_m (same),

    and averages over the unbiased ensemble are sums over all samples of all windows with w_n.
    Several umbrella runs with the same windows (several --data files, e.g. both directions) are
    pooled: frames of the same window in different runs belong to the same MBAR state.
    Optional plain-MD folders (--md) enter as one more state with u = 0 (its N_k = its frames);
    MBAR counts their frames as independent samples, so MD that stayed in C7eq biases Delta F up.
    Results:
    - Delta F(C7eq -> C7ax) = -ln(P(phi >= 0) / P(phi < 0)) in kT, P(A) = sum_{n in A} w_n;
    - F(phi), F(psi) = -ln p(bin) (kT, minimum zero, empty bins null) on 36 bins over [-pi, pi);
    - the 36 x 36 phi/psi probability histogram p (weighted, sums to one).
    Uncertainty: bootstrap over blocks (default 20 ps) resampled with replacement within every
    window (and every MD run), MBAR solved anew for every replica (started from the full f_k);
    the 95% interval is the 2.5% and 97.5% quantiles of the replicas' Delta F.
    Diagnostics printed: the smallest overlap between neighbouring windows (around the circle)
    from mbar.compute_overlap(), and the largest statistical inefficiency of phi and psi within
    a window in ps.

The result, keyed by temperature with the force field stored, goes into
bgexp/targets/references/ala2.json (the format the AlanineDipeptide target reads).

    python scripts/reference_ala2.py                   # simulate (about 5.3 M steps) and analyse
    python scripts/reference_ala2.py --analyze-only    # analyse the stored window data again
    python scripts/reference_ala2.py --reverse --seed 1 --data outputs/reference/ala2_umbrella_reverse.npz
    python scripts/reference_ala2.py --analyze-only \
        --data outputs/reference/ala2_umbrella.npz outputs/reference/ala2_umbrella_reverse.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "bgexp" / "targets" / "references" / "ala2.json"
DATA = ROOT / "outputs" / "reference" / "ala2_umbrella.npz"
N_BINS = 36
GAS_CONSTANT = 0.00831446261815324  # kJ/mol/K
BIAS_GROUP = 31


# ---------------------------------------------------------------------------------------- geometry

def wrap(angle: np.ndarray) -> np.ndarray:
    """Angles mapped into [-pi, pi)."""
    return np.mod(np.asarray(angle) + np.pi, 2 * np.pi) - np.pi


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Periodic difference a - b in (-pi, pi] (only its square enters the bias)."""
    d = np.mod(np.asarray(a) - np.asarray(b), 2 * np.pi)  # [0, 2 pi)
    return np.where(d > np.pi, d - 2 * np.pi, d)


def dihedral(xyz: np.ndarray, atoms: tuple[int, int, int, int]) -> np.ndarray:
    """Torsion angle (IUPAC sign convention, radians) of four atoms; xyz [..., n_atoms, 3]."""
    p0, p1, p2, p3 = (xyz[..., i, :] for i in atoms)
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    y = np.linalg.norm(b2, axis=-1) * np.sum(b1 * n2, axis=-1)
    x = np.sum(n1 * n2, axis=-1)
    return np.arctan2(y, x)


def bias_energy(phi: np.ndarray, centres: np.ndarray, kappa: float) -> np.ndarray:
    """U_k(phi_n) in kJ/mol, shape [K, N]."""
    d = angle_difference(np.asarray(phi)[None, :], np.asarray(centres)[:, None])
    return 0.5 * kappa * d**2


# -------------------------------------------------------------------------------------- simulation

def simulate(args, data_path: Path) -> None:
    import openmm
    from openmm import unit
    from tqdm import tqdm

    from bgexp.targets.peptides import AlanineDipeptide

    target = AlanineDipeptide(temperature=args.temperature, n_workers=0)
    try:
        system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(target.system))
        positions0 = np.asarray(target.positions, dtype=np.float64)
        phi_atoms, psi_atoms = tuple(target.phi_atoms), tuple(target.psi_atoms)
        forcefield = list(target.forcefield)
        temperature = float(target.temperature)
    finally:
        target.close()

    n_windows = args.windows
    centres = -np.pi + 2 * np.pi * np.arange(n_windows) / n_windows
    dt_fs, friction = 2.0, 1.0
    steps_per_frame = int(round(args.frame_ps * 1000 / dt_fs))
    n_equil = int(round(args.equil_ps * 1000 / dt_fs))
    n_frames = int(round(args.prod_ps / args.frame_ps))
    start = int(np.argmin(np.abs(angle_difference(dihedral(positions0, phi_atoms), centres))))
    step = -1 if args.reverse else 1
    order = [(start + step * i) % n_windows for i in range(n_windows)]
    settings = {
        "temperature_kelvin": temperature, "forcefield": forcefield, "n_windows": n_windows,
        "centres": centres.tolist(), "kappa_kj_mol_rad2": args.kappa, "equil_ps": args.equil_ps,
        "prod_ps": args.prod_ps, "frame_ps": steps_per_frame * dt_fs / 1000, "timestep_fs": dt_fs,
        "friction_per_ps": friction, "seed": args.seed, "order": order, "phi_atoms": list(phi_atoms),
        "psi_atoms": list(psi_atoms), "platform": "CPU", "threads": 1,
    }

    for force in system.getForces():
        if force.getForceGroup() == BIAS_GROUP:
            force.setForceGroup(0)
    bias = openmm.CustomTorsionForce(
        f"0.5*k*dtheta^2; dtheta = min(dt, 2*pi - dt); dt = abs(theta - theta0); pi = {np.pi!r}")
    bias.addGlobalParameter("k", args.kappa)
    bias.addGlobalParameter("theta0", float(centres[order[0]]))
    bias.addTorsion(*phi_atoms, [])
    bias.setForceGroup(BIAS_GROUP)
    system.addForce(bias)

    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                                 dt_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(args.seed + 1)
    platform = openmm.Platform.getPlatformByName("CPU")
    context = openmm.Context(system, integrator, platform, {"Threads": "1"})

    # window data: filled in simulation order, stored by window index
    phis = np.full((n_windows, n_frames), np.nan)
    psis = np.full((n_windows, n_frames), np.nan)
    xyz = np.zeros((n_windows, n_frames, len(positions0), 3), dtype=np.float32)
    done: list[int] = []
    wall = 0.0
    state_positions, state_velocities = positions0, None
    if args.resume and data_path.is_file():
        with np.load(data_path) as f:
            stored = json.loads(str(f["settings"]))
            if stored != settings:
                raise SystemExit(f"{data_path} was made with other settings; remove it or run without --resume")
            phis, psis, xyz = f["phi"], f["psi"], f["xyz"]
            done = [int(k) for k in f["done"]]
            wall = float(f["wall_s"])
            state_positions, state_velocities = f["last_positions"], f["last_velocities"]
        print(f"resuming after {len(done)} of {n_windows} windows")
    context.setPositions(state_positions)
    if state_velocities is None:
        context.setVelocitiesToTemperature(temperature * unit.kelvin, args.seed + 2)
    else:
        context.setVelocities(state_velocities)

    data_path.parent.mkdir(parents=True, exist_ok=True)
    max_bias_error = 0.0
    for k in tqdm([k for k in order if k not in done], desc="umbrella windows", initial=len(done),
                  total=n_windows):
        t0 = time.perf_counter()
        context.setParameter("theta0", float(centres[k]))
        integrator.step(n_equil)
        for i in range(n_frames):
            integrator.step(steps_per_frame)
            state = context.getState(getPositions=True, getEnergy=True, groups={BIAS_GROUP})
            pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            xyz[k, i] = pos
            phis[k, i] = dihedral(pos, phi_atoms)
            psis[k, i] = dihedral(pos, psi_atoms)
            u_openmm = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            u_numpy = bias_energy(phis[k, i:i + 1], centres[k:k + 1], args.kappa)[0, 0]
            max_bias_error = max(max_bias_error, abs(u_openmm - u_numpy))
        wall += time.perf_counter() - t0
        done.append(k)
        last = context.getState(getPositions=True, getVelocities=True)
        np.savez(data_path.with_suffix(".tmp.npz"), phi=wrap(phis), psi=wrap(psis), xyz=xyz,
                 settings=json.dumps(settings), done=np.array(done), wall_s=wall,
                 complete=len(done) == n_windows,
                 last_positions=last.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                 last_velocities=last.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))
        data_path.with_suffix(".tmp.npz").replace(data_path)
    steps = n_windows * (n_equil + n_frames * steps_per_frame)
    print(f"simulated {n_windows} windows, {steps} steps in {wall:.0f} s ({steps / max(wall, 1e-9):.0f} steps/s "
          f"including resumed windows' time); largest |OpenMM bias - numpy bias| = {max_bias_error:.2e} kJ/mol")
    print(f"window data in {data_path}")


# ---------------------------------------------------------------------------------------- analysis

def load_md_torsions(folder: Path, phi_atoms, psi_atoms) -> tuple[np.ndarray, np.ndarray, dict]:
    import mdtraj

    from bgexp.targets.dynamics import load_md

    data = load_md(folder)
    top = mdtraj.load_topology(str(data.topology_path))
    traj = mdtraj.Trajectory(data.x.reshape(len(data.x), -1, 3), top)
    phi = mdtraj.compute_dihedrals(traj, [list(phi_atoms)])[:, 0]
    psi = mdtraj.compute_dihedrals(traj, [list(psi_atoms)])[:, 0]
    return wrap(phi), wrap(psi), data.metadata


def mbar_log_weights(phi_groups: list[np.ndarray], states: list[int], centres, kappa, kT, initial_f_k=None):
    """MBAR over the groups of samples; group i was drawn from state states[i].

    States 0..K-1 are the umbrella windows (centres), state K (present only if some group has it)
    the unbiased ensemble of plain MD. Returns the normalised log unbiased weights of the
    concatenated samples (in group order), f_k and the MBAR object."""
    import pymbar

    samples = np.concatenate(phi_groups)
    u_kn = bias_energy(samples, centres, kappa) / kT
    n_states = len(centres) + (1 if max(states) == len(centres) else 0)
    if n_states > len(centres):
        u_kn = np.vstack([u_kn, np.zeros((1, len(samples)))])
    n_k = np.zeros(n_states, dtype=int)
    for g, k in zip(phi_groups, states):
        n_k[k] += len(g)
    mbar = pymbar.MBAR(u_kn, n_k, initial_f_k=initial_f_k, verbose=False)
    with np.errstate(divide="ignore"):
        log_n_k = np.log(n_k)
    log_denominator = np.logaddexp.reduce(log_n_k[:, None] + mbar.f_k[:, None] - u_kn, axis=0)
    log_w = -log_denominator
    log_w -= np.logaddexp.reduce(log_w)
    return log_w, mbar.f_k, mbar


def delta_f(phi: np.ndarray, log_w: np.ndarray) -> tuple[float, float]:
    w = np.exp(log_w)
    p_ax = float(w[phi >= 0].sum() / w.sum())
    return float(-np.log(p_ax / (1 - p_ax))), p_ax


def profile(values: np.ndarray, weights: np.ndarray, edges: np.ndarray) -> list[float | None]:
    p, _ = np.histogram(values, bins=edges, weights=weights)
    with np.errstate(divide="ignore"):
        f = -np.log(p / p.sum())
    f -= f[np.isfinite(f)].min()
    return [None if not np.isfinite(v) else float(v) for v in f]


def statistical_inefficiency(series: np.ndarray) -> float:
    from pymbar import timeseries

    try:
        return float(timeseries.statistical_inefficiency(series))
    except Exception:  # constant series
        return 1.0


def block_resample(series_list: list[np.ndarray], block: int, rng) -> list[np.ndarray]:
    """Each series resampled by non-overlapping blocks drawn with replacement (same length)."""
    out = []
    for s in series_list:
        n_blocks = max(1, len(s) // block)
        starts = rng.integers(0, n_blocks, n_blocks) * block
        idx = (starts[:, None] + np.arange(block)[None, :]).ravel()
        out.append(idx[idx < len(s)])
    return out


SAME_SETTINGS = ("temperature_kelvin", "forcefield", "centres", "kappa_kj_mol_rad2", "frame_ps", "phi_atoms",
                 "psi_atoms")


def analyse(args, data_paths: list[Path]) -> None:
    logging.getLogger("pymbar").setLevel(logging.ERROR)
    win_phi, win_psi, win_state, wall, runs = [], [], [], 0.0, []
    for path in data_paths:
        with np.load(path) as f:
            run = json.loads(str(f["settings"]))
            if not bool(f["complete"]):
                raise SystemExit(f"{path} holds {len(f['done'])} of {run['n_windows']} windows; "
                                 f"finish it with --resume")
            win_phi += list(f["phi"])
            win_psi += list(f["psi"])
            win_state += list(range(len(f["phi"])))
            wall += float(f["wall_s"])
        if runs and any(run[key] != runs[0][key] for key in SAME_SETTINGS):
            raise SystemExit(f"{path} differs from {data_paths[0]} in one of {SAME_SETTINGS}")
        runs.append(run)
    settings = runs[0]
    temperature = settings["temperature_kelvin"]
    kT = GAS_CONSTANT * temperature
    centres, kappa, frame_ps = np.array(settings["centres"]), settings["kappa_kj_mol_rad2"], settings["frame_ps"]
    n_windows = len(centres)

    md_phi, md_psi, md_meta = [], [], []
    for folder in args.md:
        phi, psi, meta = load_md_torsions(folder, settings["phi_atoms"], settings["psi_atoms"])
        if meta["temperature_kelvin"] != temperature or list(meta["forcefield"]) != settings["forcefield"]:
            raise SystemExit(f"MD in {folder} is at {meta['temperature_kelvin']} K with {meta['forcefield']}, "
                             f"the umbrella windows at {temperature} K with {settings['forcefield']}")
        md_phi.append(phi)
        md_psi.append(psi)
        md_meta.append(meta)
    groups_phi, groups_psi = win_phi + md_phi, win_psi + md_psi
    states = win_state + [n_windows] * len(md_phi)

    log_w, f_k, mbar = mbar_log_weights(groups_phi, states, centres, kappa, kT)
    phi_all, psi_all = np.concatenate(groups_phi), np.concatenate(groups_psi)
    weights = np.exp(log_w)
    value, p_ax = delta_f(phi_all, log_w)
    n_eff = 1.0 / np.sum(weights**2)

    overlap = mbar.compute_overlap()["matrix"]
    neighbours = [overlap[k, (k + 1) % n_windows] for k in range(n_windows)]
    k_min = int(np.argmin(neighbours))
    g_phi = [statistical_inefficiency(angle_difference(p, centres[k])) for p, k in zip(win_phi, win_state)]
    g_psi = [max(statistical_inefficiency(np.cos(p)), statistical_inefficiency(np.sin(p))) for p in win_psi]
    print(f"MBAR: {n_windows} windows from {len(runs)} umbrella run(s)"
          f"{f' + {len(md_phi)} MD runs' if md_phi else ''}, {len(phi_all)} samples, "
          f"Kish effective sample size of the unbiased ensemble {n_eff:.0f}")
    print(f"smallest neighbouring overlap {neighbours[k_min]:.3f} (windows at {centres[k_min]:+.3f} and "
          f"{centres[(k_min + 1) % n_windows]:+.3f} rad); median {np.median(neighbours):.3f}")
    print(f"largest statistical inefficiency within a window: phi {max(g_phi) * frame_ps:.1f} ps, "
          f"psi {max(g_psi) * frame_ps:.1f} ps (bootstrap blocks {args.block_ps:g} ps)")

    # bootstrap: blocks resampled within every window and MD run, MBAR solved anew per replica
    rng = np.random.default_rng(args.boot_seed)
    md_frame_ps = [m["frame_interval_ps"] for m in md_meta]
    blocks = ([max(1, int(round(args.block_ps / frame_ps)))] * len(win_phi)
              + [max(1, int(round(args.md_block_ps / fp))) for fp in md_frame_ps])
    boot = []
    for _ in range(args.n_boot):
        picks = [block_resample([g], b, rng)[0] for g, b in zip(groups_phi, blocks)]
        sample = [g[i] for g, i in zip(groups_phi, picks)]
        lw, _, _ = mbar_log_weights(sample, states, centres, kappa, kT, initial_f_k=f_k)
        boot.append(delta_f(np.concatenate(sample), lw)[0])
    lo, hi = np.quantile(boot, [0.025, 0.975])

    edges = np.linspace(-np.pi, np.pi, N_BINS + 1)
    centres_bins = 0.5 * (edges[1:] + edges[:-1])
    hist, _, _ = np.histogram2d(phi_all, psi_all, bins=[edges, edges], weights=weights)
    f_phi = profile(phi_all, weights, edges)
    minima = [(centres_bins[i], f_phi[i]) for i in range(N_BINS)
              if f_phi[i] is not None and all(f_phi[j] is not None and f_phi[j] >= f_phi[i]
                                              for j in ((i - 1) % N_BINS, (i + 1) % N_BINS))]
    print("local minima of F(phi): " + ", ".join(f"phi {x:+.2f} rad F {f:.2f} kT" for x, f in minima))

    window_ns = sum(len(r["centres"]) * r["prod_ps"] for r in runs) / 1000
    n_runs = f"{len(runs)} runs of " if len(runs) > 1 else ""
    directions = sorted({"decreasing" if (r["order"][1] - r["order"][0]) % n_windows != 1 else "increasing"
                         for r in runs})
    md_ns = sum(m["length_ps"] for m in md_meta) / 1000
    source = (
        f"bgexp umbrella sampling along phi + MBAR (pymbar 4): {n_runs}{n_windows} windows evenly spaced on the "
        f"circle (run in order of {' and '.join(directions)} phi), "
        f"kappa {kappa:g} kJ/mol/rad^2, {settings['equil_ps']:g} ps equilibration + {settings['prod_ps']:g} ps "
        f"production per window ({window_ns:g} ns production in all; LangevinMiddle {settings['timestep_fs']:g} fs, "
        f"friction {settings['friction_per_ps']:g}/ps), {temperature:g} K, {'+'.join(settings['forcefield'])}"
        + (f", plus {md_ns:g} ns plain MD ({len(md_meta)} runs) as unbiased samples" if md_meta else "")
        + f"; scripts/reference_ala2.py, 95% CI from a {args.n_boot}-replica bootstrap over "
        f"{args.block_ps:g} ps blocks within windows (MBAR rerun per replica)"
    )
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table[f"{temperature:g}"] = {
        "forcefield": list(settings["forcefield"]),
        "source": source,
        "n_frames": int(len(phi_all)),
        "delta_f": {"C7eq->C7ax": {"value": value, "ci_low": float(lo), "ci_high": float(hi)}},
        "profiles": {
            "phi": {"x": centres_bins.tolist(), "bin_edges": edges.tolist(), "f": f_phi},
            "psi": {"x": centres_bins.tolist(), "bin_edges": edges.tolist(), "f": profile(psi_all, weights, edges)},
        },
        "surfaces": {
            "ramachandran": {"observables": ["phi", "psi"], "x_edges": edges.tolist(), "y_edges": edges.tolist(),
                             "p": (hist / hist.sum()).tolist()},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1))
    print(f"Delta F(C7eq->C7ax) = {value:.3f} kT, 95% CI [{lo:.3f}, {hi:.3f}] from {len(phi_all)} frames "
          f"({window_ns + md_ns:g} ns); P(C7ax) = {p_ax:.5f}; simulation wall time {wall:.0f} s; written to {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=48, help="number of umbrella windows")
    parser.add_argument("--kappa", type=float, default=500.0, help="bias force constant, kJ/mol/rad^2")
    parser.add_argument("--equil-ps", type=float, default=20.0, help="equilibration per window, ps")
    parser.add_argument("--prod-ps", type=float, default=200.0, help="production per window, ps")
    parser.add_argument("--frame-ps", type=float, default=0.5, help="frame interval, ps")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--seed", type=int, default=0, help="seed of the velocities and the Langevin noise")
    parser.add_argument("--data", type=Path, nargs="+", default=[DATA],
                        help="window data (.npz): written by the simulation (one file), read by the analysis "
                             "(several runs with the same windows are pooled)")
    parser.add_argument("--reverse", action="store_true", help="run the windows in order of decreasing phi")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted simulation in --data")
    parser.add_argument("--analyze-only", action="store_true", help="skip the simulation, analyse --data")
    parser.add_argument("--md", type=Path, nargs="*", default=[],
                        help="plain-MD folders (scripts/generate_md.py) added as unbiased samples; MBAR takes "
                             "their frames as independent, so use only MD that crossed between C7eq and C7ax "
                             "many times (5 ns from C7eq with one frame at phi >= 0 pulls Delta F up by 2 kT)")
    parser.add_argument("--block-ps", type=float, default=20.0, help="bootstrap block length in the windows, ps")
    parser.add_argument("--md-block-ps", type=float, default=250.0, help="bootstrap block length in MD runs, ps")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap replicas")
    parser.add_argument("--boot-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REFERENCE, help="reference JSON to update")
    args = parser.parse_args()

    if not args.analyze_only:
        if len(args.data) != 1:
            raise SystemExit("the simulation writes one --data file")
        simulate(args, args.data[0])
    analyse(args, args.data)


if __name__ == "__main__":
    main()
