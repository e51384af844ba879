"""Benchmark: RealNVP on internal coordinates for alanine dipeptide (SYSTEMS.md section 3), CPU.

Runs `bgexp-train experiment=ala2_realnvp` (or --experiment ala2_nsf; override anything with extra `key=value` arguments,
e.g. the MD folders with 'data.path=[...]' data.md=null), or re-evaluates a finished run with
--run-dir, then writes outputs/benchmarks/<name>.json and .md with: ESS, the KL divergence
KL(reference || reweighted flow) of the 36 x 36 phi/psi histograms, Delta F(C7eq -> C7ax) with
its 95% bootstrap CI against the reference, held-out NLL, energy evaluations and wall time with
the machine named. The reference (bgexp/targets/references/ala2.json) comes from
scripts/reference_ala2.py. Goals (issue): ESS >= 30%, KL <= 0.05, training under 60 minutes.

    python scripts/benchmark_ala2.py [--name ala2] [hydra overrides ...]
    python scripts/benchmark_ala2.py --run-dir <finished run> [--n-samples 50000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark_common import fmt, machine, run_and_read, write_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="outputs/benchmarks")
    parser.add_argument("--name", default="ala2")
    parser.add_argument("--experiment", default="ala2_realnvp", help="ala2_realnvp or ala2_nsf")
    parser.add_argument("--run-dir", default=None, help="re-evaluate this finished run instead of training")
    parser.add_argument("--n-samples", type=int, default=50000, help="samples for --run-dir")
    args, overrides = parser.parse_known_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, results_path, wall = run_and_read(args.experiment, overrides, args.run_dir, args.n_samples)
    df = results["delta_f"]["C7eq->C7ax"]
    ref = df.get("reference")
    kl = results["metrics"].get("surface/ramachandran/kl")
    row = {
        "benchmark": args.name,
        "command": " ".join(["python", "scripts/benchmark_ala2.py", *sys.argv[1:]]),
        "machine": machine(),
        "ess": results["ess"],
        "n_samples": results["n_samples"],
        "ramachandran_kl": kl,
        "delta_f": df["value"],
        "delta_f_ci95": [df["ci_low"], df["ci_high"]],
        "reference": ref,
        "reference_ci": df.get("reference_ci"),
        "reference_source": df.get("reference_source"),
        "population_c7ax": results["metrics"].get("population/C7ax"),
        "nll_test": results.get("nll_test"),
        "n_energy_evals_training": results["n_energy_evals"]["training"],
        "wall_s_total": wall,
        "run_dir": str(results_path.parent),
        "goals": {"ess_ge_0.30": results["ess"] >= 0.30, "kl_le_0.05": None if kl is None else kl <= 0.05,
                  "under_60_min": wall < 3600},
    }
    write_report(out_dir, "Alanine dipeptide benchmark", row, [
        ("ESS", f"{100 * row['ess']:.2f}% of {row['n_samples']}", ">= 30%"),
        ("KL(reference, reweighted) phi/psi 36x36", fmt(kl), "<= 0.05"),
        ("Delta F(C7eq->C7ax) [kT]", f"{fmt(df['value'])} [{fmt(df['ci_low'])}, {fmt(df['ci_high'])}]", ""),
        ("reference [kT]", fmt(ref), ""),
        ("NLL held-out", fmt(row["nll_test"]), ""),
    ])
    return row


if __name__ == "__main__":
    main()
