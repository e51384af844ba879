"""Benchmark: targeted free-energy perturbation for ice XI with rigid-body flows (Rigid Body Flows,
Köhler et al., ICML 2023; Wirnsberger et al., J. Chem. Phys. 2020), on the CPU.

    python scripts/benchmark_ice.py [--experiment ice16_rigid] [--temperatures 100 50] [--seeds 0 1 2]
                                    [hydra overrides ...]

For each target temperature, `bgexp-train experiment=<experiment> target.temperature_kelvin=<T>`
(the real CLI): MD of 250 K and of T (generated on the first run, cached under outputs/data/md),
the flow trained by the mapped work, then LFEP (held-out 250 K frames) and LBAR (with the frames at
T) against the plain FEP and BAR of the same frames without a map, each with its bootstrap 2-sigma
error bar, against the MBAR reference of SYSTEMS.md section 5. Also the ESS of the mapped samples
(and of the plain works), the energy evaluations and the wall time. Writes
outputs/benchmarks/<experiment>.json and .md with the machine named. Further `--seeds` retrain with
another `seed` (flow initialisation, train/validation split, batches, bootstrap) on the same MD; the
Markdown then ends with the spread of each estimator over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmark_common import fmt, machine, run_and_read

ESTIMATORS = [("lfep", "LFEP (flow)"), ("lbar", "LBAR (flow)"), ("fep", "FEP (no flow)"), ("bar", "BAR (no flow)")]


def row(results: dict, wall: float, results_path: Path) -> dict:
    tfep = results["tfep"]
    return {
        "estimates": tfep["estimates"],
        "reference": tfep.get("reference"),
        "ess_mapped": tfep["ess_mapped"],
        "ess_plain": tfep["ess_plain"],
        "work_forward": tfep["work_forward"], "work_forward_plain": tfep["work_forward_plain"],
        "work_reverse": tfep.get("work_reverse"),
        "n_samples_a": tfep["n_samples_a"], "n_samples_b": tfep.get("n_samples_b"),
        "n_energy_evals": results["n_energy_evals"],
        "training": results["training"],
        "wall_min": wall / 60,
        "run_dir": str(results_path.parent),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ice16_rigid")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[100.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--reevaluate", action="store_true",
                        help="re-evaluate the runs already in the report (bgexp-eval of their checkpoints) "
                             "instead of training")
    parser.add_argument("--out", default="outputs/benchmarks")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Hydra overrides (key=value) may follow the options anywhere: take them out before argparse,
    # whose nargs="+" would otherwise swallow them as temperatures
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.experiment}.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update({"benchmark": args.experiment, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                   "command": " ".join([Path(sys.argv[0]).name, *argv])})
    runs = report.setdefault("temperatures", {})
    for temperature in args.temperatures:
        for seed in args.seeds:
            key = run_key(temperature, seed)
            previous = runs.get(key, {}).get("run_dir")
            if args.reevaluate and not previous:
                print(f"no run of {key} in the report to re-evaluate", flush=True)
                continue
            try:
                if args.reevaluate:  # the run folder of the training, not of an earlier re-evaluation
                    run_dir = previous.split("/eval/")[0]
                    results, results_path, wall = run_and_read(args.experiment, [f"seed={seed}", *overrides],
                                                               run_dir=run_dir)
                else:
                    results, results_path, wall = run_and_read(
                        args.experiment, [f"target.temperature_kelvin={temperature}", f"seed={seed}", "logger=csv",
                                          *overrides])
                runs[key] = {**row(results, wall, results_path), "seed": seed}
            except SystemExit as err:
                runs[key] = {"failed": str(err), "seed": seed}
            path.write_text(json.dumps(report, indent=2))
    write_markdown(report, out_dir / f"{args.experiment}.md")
    return report


def run_key(temperature: float, seed: int) -> str:
    """'100' for seed 0 (the key of the first reports), '100/seed1' for the others."""
    return f"{temperature:g}" if seed == 0 else f"{temperature:g}/seed{seed}"


def seed_spread(runs: dict) -> list[str]:
    """Markdown rows: per temperature and estimator, the mean, the standard deviation over the seeds and
    the mean of the bootstrap 2 sigma, to compare the seed-to-seed scatter with the bars."""
    by_temperature: dict[str, list[dict]] = {}
    for key, run in runs.items():
        if "failed" not in run:
            by_temperature.setdefault(key.split("/")[0], []).append(run)
    rows = []
    for temperature, group in by_temperature.items():
        if len(group) < 2:
            continue
        for name, label in ESTIMATORS:
            values = [r["estimates"][name]["value"] for r in group if name in r["estimates"]]
            bars = [2 * r["estimates"][name]["std"] for r in group
                    if name in r["estimates"] and r["estimates"][name]["std"] is not None]
            if len(values) < 2:
                continue
            reference = (group[0].get("reference") or {}).get("value")
            errors = [v - reference for v in values] if reference is not None else []
            rows.append(f"| {temperature} | {label} | {len(values)} | {fmt(statistics.fmean(values), 3)} | "
                        f"{fmt(statistics.stdev(values), 3)} | {fmt(statistics.fmean(bars) if bars else None, 3)} | "
                        f"{fmt(max(errors, key=abs) if errors else None, 3)} |")
    if not rows:
        return []
    return ["## Over seeds", "",
            "| T (K) | estimator | seeds | mean Delta f | std over seeds | mean bootstrap 2 sigma | largest error |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def write_markdown(report: dict, path: Path) -> None:
    md = [f"# Targeted FEP, {report['benchmark']} ({report['date']})", "", f"Machine: {report['machine']}",
          f"Command: `{report['command']}`", ""]
    for temperature, run in report["temperatures"].items():
        temperature, _, seed = temperature.partition("/")
        md.append(f"## 250 K -> {temperature} K" + (f" ({seed.replace('seed', 'seed ')})" if seed else ""))
        if "failed" in run:
            md += [f"failed: {run['failed']}", ""]
            continue
        ref = run.get("reference") or {}
        md.append(f"Reference: {fmt(ref.get('value'), 3)} +- {fmt(2 * ref.get('std', float('nan')), 3)} (2 sigma), "
                  f"{ref.get('source', 'n/a')}. Goal: |error| <= 0.5 with the 2-sigma bar covering the reference. "
                  "2 sigma: bootstrap over the works, widened by sqrt(g), g the statistical inefficiency of the "
                  "works in trajectory order (forward / reverse).")
        md += ["", "| estimator | Delta f | 2 sigma | 2 sigma if independent | g of the works | error | covers the reference |",
               "|---|---|---|---|---|---|---|"]
        for name, label in ESTIMATORS:
            e = run["estimates"].get(name)
            if e is None:
                continue
            iid = e.get("std_iid")
            g = e.get("statistical_inefficiency")
            md.append(f"| {label} | {fmt(e['value'], 3)} | {fmt(2 * e['std'] if e['std'] is not None else None, 3)} | "
                      f"{fmt(2 * iid if iid is not None else None, 3)} | "
                      f"{' / '.join(f'{x:.1f}' for x in g) if g else 'n/a'} | "
                      f"{fmt(e.get('error'), 3)} | {'yes' if e.get('covered_2sigma') else 'no'} |")
        md += ["",
               f"- ESS of the mapped samples: {100 * run['ess_mapped']:.2f}% of {run['n_samples_a']} "
               f"(plain works: {100 * run['ess_plain']:.3g}%)",
               f"- forward work: mapped {fmt(run['work_forward']['mean'], 2)} +- {fmt(run['work_forward']['std'], 2)} kT, "
               f"plain {fmt(run['work_forward_plain']['mean'], 2)} +- {fmt(run['work_forward_plain']['std'], 2)} kT",
               f"- energy evaluations: training {run['n_energy_evals']['training']:.3g}, "
               f"evaluation {run['n_energy_evals']['evaluation']:.3g} (plain FEP/BAR use the MD energies only)",
               f"- training: {run['training']['steps']} steps, {fmt(run['training']['step_s'], 3)} s/step, "
               f"{run['training']['n_parameters']} parameters; wall {run['wall_min']:.1f} min (MD included when generated)",
               f"- run folder: {run['run_dir']}", ""]
    md += seed_spread(report["temperatures"])
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
