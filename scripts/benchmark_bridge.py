"""Benchmark: throughput of the OpenMM bridge on a batch of BPTI configurations.

The physical limit of a pool of W workers is W times the rate of one context (one CPU thread,
measured as a pool of one worker, so that both go through the same path), both measured in this
run on the same batch; the rate of one context in the main process is reported too. Reported: configurations per second of a single
in-process context, of the worker pool, the limit, and the pool's fraction of it (goal >= 0.8),
with the machine named. Energies of the pool are checked against the single context.

    python scripts/benchmark_bridge.py [--batch 256] [--workers 2] [--repeats 3] [--out-dir outputs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmark_common import machine


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default="outputs/data/structures")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()

    import openmm

    from bgexp.targets.openmm import OpenMMBridge
    from bgexp.targets.peptides import BPTI

    target = BPTI(cache_dir=args.cache_dir, n_workers=0)
    rng = np.random.default_rng(0)
    x = target.positions.reshape(1, -1) + 0.002 * rng.standard_normal((args.batch, target.dim))
    with OpenMMBridge(target.system, target.temperature, platform="CPU", n_workers=0) as local:
        local.evaluate(x[:2])
        t_local = best_time(lambda: local.evaluate(x), args.repeats)
    # the single-context rate through the same path as the pool: one worker process
    with OpenMMBridge(target.system, target.temperature, platform="CPU", n_workers=1) as single:
        single.evaluate(x[:2])
        t_single = best_time(lambda: single.evaluate(x), args.repeats)
        u_single, _ = single.evaluate(x)
    with OpenMMBridge(target.system, target.temperature, platform="CPU", n_workers=args.workers) as pool:
        pool.evaluate(x[:2 * args.workers])
        t_pool = best_time(lambda: pool.evaluate(x), args.repeats)
        u_pool, _ = pool.evaluate(x)
    rate_single = args.batch / t_single
    rate_pool = args.batch / t_pool
    limit = args.workers * rate_single
    result = {
        "system": "BPTI (5PTI, 892 atoms), amber99sbildn + amber99_obc, no cutoff, OpenMM CPU platform, 1 thread per context",
        "batch": args.batch,
        "workers": args.workers,
        "single_context_per_s": rate_single,
        "single_context_in_process_per_s": args.batch / t_local,
        "single_context_ms_per_call": 1000 / rate_single,
        "pool_per_s": rate_pool,
        "limit_per_s": limit,
        "fraction_of_limit": rate_pool / limit,
        "goal_fraction": 0.8,
        "max_abs_energy_difference_kT": float(np.max(np.abs(u_pool - u_single))),
        "openmm": openmm.version.version,
        "machine": machine(),
        "repeats": args.repeats,
        "timing": "best of repeats, wall clock",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bridge.json").write_text(json.dumps(result, indent=2))
    md = [
        "# OpenMM bridge throughput (BPTI, batch of %d)" % args.batch,
        "",
        "| single context | pool of %d workers | limit (%d x single) | fraction of limit | goal |" % (args.workers, args.workers),
        "|---|---|---|---|---|",
        f"| {rate_single:.1f} conf/s ({1000 / rate_single:.1f} ms each) | {rate_pool:.1f} conf/s | {limit:.1f} conf/s "
        f"| {rate_pool / limit:.2f} | >= 0.8 |",
        "",
        f"One context in the main process (no pipe): {args.batch / t_local:.1f} conf/s.",
        "",
        f"Machine: {result['machine']}; OpenMM {result['openmm']}; {result['timing']} of {args.repeats}.",
    ]
    (args.out_dir / "bridge.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    target.close()


if __name__ == "__main__":
    main()
