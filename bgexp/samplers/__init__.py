"""MCMC kernels and annealed SMC / AIS for Boltzmann generators.

Takes energies, their gradients and a flow's log-density as small callables on coordinates y
chosen by the caller (x-space: log pi_0 = log q, log pi_1 = -u; latent z-space: log pi_0 = log
prior, log pi_1 = -u(F(z)) + log|det dF/dz|); imports neither Lightning nor Hydra.

* `paths`: the geometric annealing path, evaluation counting, non-finite handling;
* `kernels`: `MALA`, `HMC` (batched, step-size adaptation, space-aware);
* `smc`: `smc`, `ais` -> `SMCResult`;
* `replicates`: `run_replicates`, `log_normalizer_estimate`, `delta_f_estimate`;
* `errors`: the named errors (all `SamplerError`, a `ValueError`).
"""

from bgexp.samplers.errors import (
    BudgetError,
    DegenerateWeightsError,
    NoGradientError,
    SamplerError,
    SamplerSettingError,
    UnsupportedSpaceError,
)
from bgexp.samplers.kernels import HMC, MALA, Kernel
from bgexp.samplers.paths import AnnealedDensity, AnnealingPath, Density, LogDensity, PathCounters, as_density
from bgexp.samplers.replicates import (
    ReplicateEstimate,
    delta_f_estimate,
    log_normalizer_estimate,
    replicate_seeds,
    run_replicates,
    student_t_interval,
)
from bgexp.samplers.smc import LevelRecord, SMCResult, ais, next_b_by_cess, smc, systematic_resample
from bgexp.samplers.state import ChainState, SpaceGeometry, check_space

__all__ = [
    "SamplerError", "UnsupportedSpaceError", "NoGradientError", "BudgetError", "SamplerSettingError",
    "DegenerateWeightsError",
    "Kernel", "MALA", "HMC",
    "Density", "LogDensity", "AnnealingPath", "AnnealedDensity", "PathCounters", "as_density",
    "ChainState", "SpaceGeometry", "check_space",
    "smc", "ais", "SMCResult", "LevelRecord", "systematic_resample", "next_b_by_cess",
    "run_replicates", "replicate_seeds", "student_t_interval", "ReplicateEstimate",
    "log_normalizer_estimate", "delta_f_estimate",
]
