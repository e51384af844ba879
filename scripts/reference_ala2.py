"""Reference values for alanine dipeptide from the project's own long MD (SYSTEMS.md section 3).

Reads every complete MD folder given (scripts/generate_md.py target=ala2 ...), computes the
backbone torsions phi and psi with mdtraj and writes, for the MD temperature:

- Delta F(C7eq -> C7ax) = -ln(P(phi >= 0) / P(phi < 0)), with a block-bootstrap 95% interval
  (blocks of --block-ps picoseconds resampled within each run, so time correlation is respected);
- free-energy profiles F(phi) and F(psi) (kT, minimum zero) on 36 bins over [-pi, pi);
- the phi/psi probability histogram (36 x 36 bins) for the Ramachandran KL divergence.

into bgexp/targets/references/ala2.json (keyed by temperature; the force field is stored and
checked by the target), together with the settings and total length of the MD it came from.

    python scripts/reference_ala2.py outputs/data/md/ala2/seed0 outputs/data/md/ala2/seed1 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bgexp.targets.dynamics import load_md

N_BINS = 36
REFERENCE = Path(__file__).resolve().parents[1] / "bgexp" / "targets" / "references" / "ala2.json"


def torsions(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import mdtraj

    data = load_md(folder)
    top = mdtraj.load_topology(str(data.topology_path))
    traj = mdtraj.Trajectory(data.x.reshape(len(data.x), -1, 3), top)
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    return phi[:, 0], psi[:, 0], data.metadata


def delta_f(phi: np.ndarray) -> float:
    p_ax = np.mean(phi >= 0)
    return float(-np.log(p_ax / (1 - p_ax)))


def block_bootstrap(runs: list[np.ndarray], block: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = [r[: len(r) // block * block].reshape(-1, block) for r in runs]
    values = []
    for _ in range(n_boot):
        sample = np.concatenate([b[rng.integers(0, len(b), len(b))].ravel() for b in blocks])
        values.append(delta_f(sample))
    return np.array(values)


def profile(values: np.ndarray, edges: np.ndarray) -> list[float | None]:
    counts, _ = np.histogram(values, bins=edges)
    with np.errstate(divide="ignore"):
        f = -np.log(counts / counts.sum())
    f -= f[np.isfinite(f)].min()
    return [None if not np.isfinite(v) else float(v) for v in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--block-ps", type=float, default=250.0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REFERENCE)
    args = parser.parse_args()

    phis, psis, metas = [], [], []
    for folder in args.folders:
        phi, psi, meta = torsions(folder)
        phis.append(phi)
        psis.append(psi)
        metas.append(meta)
    temps = {m["temperature_kelvin"] for m in metas}
    ffs = {tuple(m["forcefield"]) for m in metas}
    if len(temps) != 1 or len(ffs) != 1:
        raise SystemExit(f"MD folders disagree on temperature {temps} or force field {ffs}")
    frame_ps = metas[0]["frame_interval_ps"]
    block = max(1, int(round(args.block_ps / frame_ps)))
    phi_all, psi_all = np.concatenate(phis), np.concatenate(psis)
    value = delta_f(phi_all)
    boot = block_bootstrap(phis, block, args.n_boot, seed=0)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    edges = np.linspace(-np.pi, np.pi, N_BINS + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    hist, _, _ = np.histogram2d(phi_all, psi_all, bins=[edges, edges])
    total_ns = sum(m["length_ps"] for m in metas) / 1000
    settings = metas[0]["settings"]
    source = (
        f"bgexp MD: {len(metas)} Langevin runs (LangevinMiddle, {settings['timestep_fs']} fs, friction "
        f"{settings['friction_per_ps']}/ps), {total_ns:g} ns in all at {temps.pop():g} K, "
        f"{'+'.join(ffs.pop())}; scripts/reference_ala2.py, block bootstrap {args.block_ps:g} ps"
    )
    temperature = metas[0]["temperature_kelvin"]
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table[f"{temperature:g}"] = {
        "forcefield": list(metas[0]["forcefield"]),
        "source": source,
        "n_frames": int(len(phi_all)),
        "delta_f": {"C7eq->C7ax": {"value": value, "ci_low": float(lo), "ci_high": float(hi)}},
        "profiles": {
            "phi": {"x": centres.tolist(), "bin_edges": edges.tolist(), "f": profile(phi_all, edges)},
            "psi": {"x": centres.tolist(), "bin_edges": edges.tolist(), "f": profile(psi_all, edges)},
        },
        "surfaces": {
            "ramachandran": {"observables": ["phi", "psi"], "x_edges": edges.tolist(), "y_edges": edges.tolist(),
                             "p": (hist / hist.sum()).tolist()},
        },
    }
    args.out.write_text(json.dumps(table, indent=1))
    print(f"Delta F(C7eq->C7ax) = {value:.3f} kT, 95% CI [{lo:.3f}, {hi:.3f}] from {len(phi_all)} frames "
          f"({total_ns:g} ns); P(C7ax) = {np.mean(phi_all >= 0):.4f}; written to {args.out}")


if __name__ == "__main__":
    main()
