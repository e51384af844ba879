"""Benchmark: the paper-sized Boltzmann generator on the bistable dimer, trained on CPU.

Runs `bgexp-train experiment=dimer_benchmark` (8 RealNVP couplings, 3 x 200 tanh, joint loss
KL + NLL; override anything with extra `key=value` arguments), then reads the run's
results.json and writes outputs/benchmarks/dimer.json and dimer.md with: ESS, Delta F(closed ->
open) at T = 1 with its 95% bootstrap CI and the umbrella-sampling/MBAR reference, whether the CI
covers the reference, the RMSE of the free-energy profile along the dimer distance, the number of
target energy evaluations used in training, and the wall time with the machine named.
Goals (issue): |Delta F - reference| <= 0.3 kT with the CI covering it, ESS >= 5%, < 60 min.

    python scripts/benchmark_dimer.py [--out-dir outputs/benchmarks] [hydra overrides ...]
    python scripts/benchmark_dimer.py --run-dir <finished run>   # re-evaluate, then summarise
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark_common import fmt, machine, run_and_read, write_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="outputs/benchmarks")
    parser.add_argument("--name", default="dimer")
    parser.add_argument("--run-dir", default=None,
                        help="re-evaluate this finished run with bgexp-eval instead of training")
    parser.add_argument("--n-samples", type=int, default=50000, help="samples for --run-dir")
    args, overrides = parser.parse_known_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, results_path, wall = run_and_read("dimer_benchmark", overrides, args.run_dir, args.n_samples)
    df = results["delta_f"]["closed->open"]
    ref = df.get("reference")
    covered = None if ref is None or df["ci_low"] is None else bool(df["ci_low"] <= ref <= df["ci_high"])
    error = None if ref is None or df["value"] is None else df["value"] - ref
    row = {
        "benchmark": args.name,
        "command": " ".join(["python", "scripts/benchmark_dimer.py", *sys.argv[1:]]),
        "overrides": overrides,
        "machine": machine(),
        "ess": results["ess"],
        "n_samples": results["n_samples"],
        "delta_f": df["value"],
        "delta_f_ci95": [df["ci_low"], df["ci_high"]],
        "reference": ref,
        "reference_source": df.get("reference_source"),
        "error": error,
        "ci_covers_reference": covered,
        "profile_rmse": results["metrics"].get("profile/dimer_distance/rmse"),
        "nll_test": results.get("nll_test"),
        "n_energy_evals_training": results["n_energy_evals"]["training"],
        "wall_s_total": wall,
        "wall_s_run": results["wall_s"],
        "run_dir": str(results_path.parent),
        "goals": {"abs_error_le_0.3": None if error is None else abs(error) <= 0.3,
                  "ci_covers_reference": covered, "ess_ge_0.05": results["ess"] >= 0.05,
                  "under_60_min": wall < 3600},
    }
    write_report(out_dir, "Dimer benchmark", row, [
        ("ESS", f"{100 * row['ess']:.2f}% of {row['n_samples']}", ">= 5%"),
        ("Delta F(closed->open) [kT]", f"{fmt(row['delta_f'])} [{fmt(df['ci_low'])}, {fmt(df['ci_high'])}]", ""),
        ("reference [kT]", fmt(ref), ""),
        ("error [kT]", fmt(error), f"abs <= 0.3, CI covers: {covered}"),
        ("profile RMSE [kT]", fmt(row["profile_rmse"]), ""),
        ("NLL held-out", fmt(row["nll_test"]), ""),
    ])
    return row


if __name__ == "__main__":
    main()
