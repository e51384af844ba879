"""Benchmark: the E(n)-equivariant CNF on DW4, LJ13, LJ55 (Equivariant Flows, 2020), maximum
likelihood against flow matching at equal wall time, on the CPU.

    python scripts/benchmark_ecnf.py dw4  [--minutes 8] [--variants ml fm fm_ot] [hydra overrides ...]
    python scripts/benchmark_ecnf.py lj13 [--minutes 12] ...

Each variant trains `experiment=<system>_ecnf` through the real CLI (`bgexp-train`) for the same
training budget (Lightning's `trainer.max_time`; the budget includes the validation NLL, every
`--val-every` epochs on one batch), then the same final evaluation with the experiment's solver
(dopri5 with the exact divergence): ESS of `--samples` flow samples, NLL of held-out data, the
1-Wasserstein distances of the energy and pooled pair-distance distributions from the data's
(unweighted and reweighted), the field evaluations per sample and the sampling time. Variants:

- `ml`: maximum likelihood (loss=nll), an ODE solve with the divergence in every step;
- `fm`: flow matching (loss=flow_matching), one field evaluation per step, no solve;
- `fm_ot`: equivariant OT flow matching (loss=flow_matching_ot: minibatch OT, then rotation and
  permutation alignment).

Writes outputs/benchmarks/ecnf_<system>.json and .md with the machine named; the figures of each
run (energy and pair-distance histograms) stay in its run folder, linked from the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmark_common import fmt, machine, run_and_read

VARIANTS = {
    "ml": ("maximum likelihood", ["loss=nll"]),
    "fm": ("flow matching", ["loss=flow_matching"]),
    "fm_ot": ("equivariant OT flow matching", ["loss=flow_matching_ot"]),
}
GOALS = {"dw4": 0.5, "lj13": 0.2, "lj55": None}
DEFAULT_MINUTES = {"dw4": 8.0, "lj13": 12.0, "lj55": 20.0}
ROWS = [
    ("ESS %", "ess_percent", 2), ("NLL held-out", "nll_test", 3),
    ("energy W1 (flow / reweighted) kT", "energy_w1", 3), ("pair-distance W1 (flow / reweighted)", "distance_w1", 4),
    ("field evaluations per sample", "nfe_per_sample", 1), ("sampling s / 1000 samples", "sampling_s_per_1000", 2),
    ("training steps", "steps", 0), ("s / training step", "step_s", 3), ("training + evaluation wall min", "wall_min", 1),
]


def summarize(results: dict, results_path: Path, wall: float) -> dict:
    m = results["metrics"]
    training = results.get("training", {})
    return {
        "ess_percent": 100 * results["ess"],
        "nll_test": results.get("nll_test"),
        "energy_w1": (m.get("energy_w1_flow"), m.get("energy_w1_reweighted")),
        "distance_w1": (m.get("distribution/pair_distance/w1_flow"), m.get("distribution/pair_distance/w1_reweighted")),
        "nfe_per_sample": m.get("nfe_per_sample"),
        "sampling_s_per_1000": m.get("sampling_s_per_1000"),
        "steps": training.get("steps"),
        "step_s": training.get("step_s"),
        "n_parameters": training.get("n_parameters"),
        "wall_min": wall / 60,
        "n_samples": results["n_samples"],
        "run_dir": str(results_path.parent),
        "figures": results.get("figures", {}),
    }


def cell(value, digits: int) -> str:
    if isinstance(value, (tuple, list)):
        return " / ".join(fmt(v, digits) for v in value)
    return fmt(value, digits)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=sorted(GOALS))
    parser.add_argument("--minutes", type=float, default=None, help="training budget per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=5000, help="flow samples of the final evaluation")
    parser.add_argument("--data", type=int, default=2000, help="held-out frames of the final evaluation")
    parser.add_argument("--val-every", type=int, default=5, help="validation NLL every this many epochs")
    parser.add_argument("--out", default="outputs/benchmarks")
    args, overrides = parser.parse_known_args(argv)
    minutes = args.minutes if args.minutes is not None else DEFAULT_MINUTES[args.system]
    seconds = int(round(60 * minutes))
    budget = f"00:{seconds // 3600:02d}:{(seconds % 3600) // 60:02d}:{seconds % 60:02d}"
    common = [
        "logger=csv", "trainer.max_epochs=100000", f"+trainer.max_time={budget}",
        f"trainer.check_val_every_n_epoch={args.val_every}", "++trainer.limit_val_batches=1",
        "evaluation.every_n_epochs=100000", f"evaluation.final_n_samples={args.samples}",
        f"evaluation.final_n_data={args.data}", "evaluation.batch_size=1000",
    ]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / f"ecnf_{args.system}.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update({"benchmark": f"ecnf_{args.system}", "machine": machine(), "budget_min": minutes,
                   "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                   "date": time.strftime("%Y-%m-%d")})
    variants = report.setdefault("variants", {})
    for name in args.variants:
        label, loss = VARIANTS[name]
        try:
            results, results_path, wall = run_and_read(f"{args.system}_ecnf", [*loss, *common, *overrides])
            variants[name] = {"label": label, **summarize(results, results_path, wall)}
        except SystemExit as err:  # a diverged or failed run is a result, not the end of the benchmark
            variants[name] = {"label": label, "failed": str(err)}
        variants[name]["evaluation"] = {"samples": args.samples, "data": args.data, "budget_min": minutes,
                                        "command": report["command"]}
        # re-read before writing: another invocation may have added variants meanwhile
        current = json.loads(report_path.read_text()) if report_path.is_file() else report
        current.setdefault("variants", {})[name] = variants[name]
        report = {**current, **{k: v for k, v in report.items() if k != "variants"}, "variants": current["variants"]}
        variants = report["variants"]
        report_path.write_text(json.dumps(report, indent=2))
    write_markdown(report, out_dir / f"ecnf_{args.system}.md", GOALS[args.system])
    return report


def write_markdown(report: dict, path: Path, goal: float | None) -> None:
    names = list(report["variants"])
    md = [f"# E(n)-equivariant CNF, {report['benchmark'].split('_', 1)[1].upper()} ({report['date']})", "",
          f"Machine: {report['machine']}", f"Command: `{report['command']}`",
          f"Training budget per variant: {report['budget_min']:g} min (trainer.max_time); evaluation: the "
          "experiment's solver (dopri5, exact divergence)." + (f" Goal: ESS >= {100 * goal:.0f}%." if goal else ""),
          "", "| | " + " | ".join(report["variants"][n]["label"] for n in names) + " |",
          "|---|" + "---|" * len(names)]
    for title, key, digits in ROWS:
        cells = []
        for n in names:
            v = report["variants"][n]
            cells.append("failed" if "failed" in v else cell(v.get(key), digits))
        md.append(f"| {title} | " + " | ".join(cells) + " |")
    md.append("")
    for n in names:
        v = report["variants"][n]
        md.append(f"- {v['label']}: " + (v["failed"] if "failed" in v else f"run folder {v['run_dir']}"))
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
