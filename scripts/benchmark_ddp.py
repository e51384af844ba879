"""Benchmark: data-parallel throughput on CPU, 1 process against 2 DDP processes (ddp_spawn, gloo).

Both are measured in one run on the same machine, with the dimer target and the default
dimer_realnvp model (8 RealNVP couplings, 3 x 200 tanh; `--small` for 4 x [64, 64]):
- training: optimiser steps per second of the joint loss (NLL on a data batch + KL on a latent
  batch of the same size, per process), timed from batch start to batch end after a warm-up
  (gradient all-reduce included, validation and epoch boundaries excluded). Each process makes
  the same number of steps, so steps/s is per process; the global samples per second count both
  batches of every process (2 processes handle 2x the samples per step).
- sampling: flow samples with their target energies, without gradients; every process draws
  `--n-samples` from its own generator between two barriers; global samples/s = all samples of
  all processes / the slowest process's time.
The 1-process baseline is the plain single-device trainer (trainer=cpu); each process gets
`--threads` torch threads (OMP_NUM_THREADS, default 1). Writes <out-dir>/ddp.json and ddp.md.

    python scripts/benchmark_ddp.py [--steps 40] [--warmup 5] [--batch-size 256] [--n-samples 8192]
                                    [--small] [--out-dir outputs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before torch is imported; spawned workers inherit the environment
    _threads = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
    os.environ["OMP_NUM_THREADS"] = str(_threads)

import lightning.pytorch as pl
import torch

from benchmark_common import machine

REPO = Path(__file__).resolve().parents[1]


class ThroughputProbe(pl.Callback):
    """Times the training batches after `warmup` steps, then the no-grad sampling, per rank; each
    rank writes rank<r>.json into `out_dir`."""

    def __init__(self, out_dir: str, warmup: int, n_samples: int, sample_batch: int):
        self.out_dir, self.warmup = out_dir, warmup
        self.n_samples, self.sample_batch = n_samples, sample_batch
        self.step_seconds: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None and trainer.global_step > self.warmup:
            self.step_seconds.append(time.perf_counter() - self._start)
        self._start = None

    def on_train_end(self, trainer, pl_module) -> None:
        generator = pl_module.make_generator(offset=1000)
        with torch.no_grad():
            x, _ = pl_module.sample(min(self.sample_batch, self.n_samples), generator=generator)  # warm-up
            pl_module.target.energy(x)
            trainer.strategy.barrier()
            start = time.perf_counter()
            done = 0
            while done < self.n_samples:
                n = min(self.sample_batch, self.n_samples - done)
                x, log_q = pl_module.sample(n, generator=generator)
                u = pl_module.target.energy(x)
                done += n
            sample_s = time.perf_counter() - start
            assert torch.isfinite(log_q).all() and u.shape == (n,)
            trainer.strategy.barrier()
        row = {"rank": trainer.global_rank, "world_size": trainer.world_size,
               "threads": torch.get_num_threads(), "step_seconds": self.step_seconds,
               "sample_s": sample_s, "n_samples": done}
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))


def compose_cfg(args, output_dir: Path):
    from hydra import compose, initialize_config_dir

    overrides = [
        f"paths.output_dir={output_dir}", f"data.cache_dir={args.cache_dir}", "logger=none",
        "data.generate.n_chains=32", "data.generate.burn_in=300", "data.generate.n_steps=800",
        "data.generate.thin=10", f"data.batch_size={args.batch_size}", f"loss.kl_batch_size={args.batch_size}",
        "loss.nll_warmup_steps=0", "loss.kl_ramp_steps=0", f"seed={args.seed}",
    ]
    if args.small:
        overrides += ["flow.transform.n_couplings=4", "flow.transform.hidden=[64,64]"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def measure(args, processes: int, work: Path) -> dict:
    from bgexp.training.assemble import build_datamodule, build_model, build_target

    out = work / f"p{processes}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose_cfg(args, work)
    pl.seed_everything(args.seed, verbose=False)
    target = build_target(cfg)
    datamodule = build_datamodule(cfg, target)
    datamodule.progress = False
    datamodule.setup()
    model = build_model(cfg, target, data=datamodule.x_train)
    strategy = "ddp_spawn" if processes > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=processes, strategy=strategy,
                         max_steps=args.warmup + args.steps, max_epochs=-1, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ThroughputProbe(str(out), args.warmup, args.n_samples, args.sample_batch)])
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    per_rank_step_s = [sum(r["step_seconds"]) / len(r["step_seconds"]) for r in rows]
    step_s = max(per_rank_step_s)  # the processes step together; the slowest sets the pace
    steps_per_s = 1.0 / step_s
    samples_per_step = processes * (cfg.data.batch_size + cfg.loss.kl_batch_size)
    sample_s = max(r["sample_s"] for r in rows)
    return {
        "processes": processes,
        "strategy": strategy if processes > 1 else "single device (trainer=cpu)",
        "threads_per_process": rows[0]["threads"],
        "timed_steps": len(rows[0]["step_seconds"]),
        "step_ms": 1000 * step_s,
        "steps_per_s_per_process": steps_per_s,
        "train_samples_per_step_global": samples_per_step,
        "train_samples_per_s_global": steps_per_s * samples_per_step,
        "sampling_samples_per_process": rows[0]["n_samples"],
        "sampling_samples_per_s_global": sum(r["n_samples"] for r in rows) / sample_s,
        "sampling_samples_per_s_per_process": rows[0]["n_samples"] / sample_s,
        "fit_wall_s": wall,
        "n_parameters": sum(p.numel() for p in model.flow.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--batch-size", type=int, default=256, help="data and KL batch, per process")
    parser.add_argument("--n-samples", type=int, default=8192, help="samples drawn per process")
    parser.add_argument("--sample-batch", type=int, default=2048)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--small", action="store_true", help="4 couplings x [64, 64] instead of the default model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="outputs/data")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir = str(Path(args.cache_dir).resolve())

    start = time.time()
    load_before = os.getloadavg()[0]  # other work on the machine skews the 2-process numbers
    with tempfile.TemporaryDirectory(prefix="bgexp-ddp-bench-") as tmp:
        runs = [measure(args, p, Path(tmp)) for p in args.processes]
    base = runs[0]
    for run in runs:
        run["train_speedup_global"] = run["train_samples_per_s_global"] / base["train_samples_per_s_global"]
        run["sampling_speedup_global"] = run["sampling_samples_per_s_global"] / base["sampling_samples_per_s_global"]
    model = "4 couplings x [64, 64]" if args.small else "dimer_realnvp default (8 couplings x [200, 200, 200])"
    command = "python scripts/benchmark_ddp.py " + " ".join(sys.argv[1:])
    result = {
        "benchmark": "ddp",
        "target": "dimer (76 dims)",
        "model": model,
        "loss": "joint (NLL + KL at full weight)",
        "batch_size_per_process": args.batch_size,
        "kl_batch_size_per_process": args.batch_size,
        "machine": machine(),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "command": command.strip(),
        "runs": runs,
        "wall_s_total": time.time() - start,
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
    }
    (args.out_dir / "ddp.json").write_text(json.dumps(result, indent=2))
    md = [f"# DDP on CPU: 1 vs {runs[-1]['processes']} processes ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {result['machine']} ({result['cpu_cores_available']} cores available)",
          f"Command: `{result['command']}`",
          f"Model: {model}, {base['n_parameters']} parameters; target dimer; joint loss; data batch = KL batch = "
          f"{args.batch_size} per process; {args.threads} torch thread(s) per process; gloo, ddp_spawn.", "",
          "| processes | step (ms) | steps/s per process | training samples/s (global) | sampling samples/s (global) "
          "| speedup training | speedup sampling |",
          "|---|---|---|---|---|---|---|"]
    for run in runs:
        md.append(f"| {run['processes']} | {run['step_ms']:.1f} | {run['steps_per_s_per_process']:.2f} | "
                  f"{run['train_samples_per_s_global']:.0f} | {run['sampling_samples_per_s_global']:.0f} | "
                  f"{run['train_speedup_global']:.2f}x | {run['sampling_speedup_global']:.2f}x |")
    md += ["", "Training samples per step: data batch + KL batch of every process (2 processes handle twice "
           "the samples per step). Sampling: flow samples with target energies, no gradients, "
           f"{args.n_samples} per process, timed between barriers.",
           f"Total wall time: {result['wall_s_total']:.0f} s; 1-min load average {load_before:.2f} before, "
           f"{result['load_average_1min_after']:.2f} after (a load near the core count means the processes "
           "shared the cores with other work)."]
    (args.out_dir / "ddp.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
