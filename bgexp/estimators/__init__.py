"""Estimators: pure float64 functions of energies and log-densities (never of models).

Log-weights and ESS (``weights``), state free-energy differences, FEP/BAR/MBAR (``free_energy``),
bootstrap confidence intervals (``bootstrap``), statistical inefficiency of correlated series
(``correlation``) and free-energy profiles (``profiles``).  Inputs may
be numpy arrays or torch tensors; outputs are Python floats or numpy arrays.  This package imports
neither Lightning, Hydra, ``bgexp.flows`` nor ``bgexp.targets``.
"""

from bgexp.estimators.bootstrap import BootstrapResult, bootstrap, bootstrap_independent
from bgexp.estimators.correlation import inflate_for_correlation, statistical_inefficiency
from bgexp.estimators.free_energy import bar, fep, free_energy_difference, mbar
from bgexp.estimators.profiles import (
    align_profiles,
    free_energy_profile,
    histogram_kl,
    quadrature_kl,
    weighted_histogram2d,
)
from bgexp.estimators.weights import as_float64, ess, log_weights, normalized_weights

__all__ = [
    "as_float64",
    "log_weights",
    "normalized_weights",
    "ess",
    "free_energy_difference",
    "fep",
    "bar",
    "mbar",
    "BootstrapResult",
    "bootstrap",
    "bootstrap_independent",
    "statistical_inefficiency",
    "inflate_for_correlation",
    "free_energy_profile",
    "align_profiles",
    "weighted_histogram2d",
    "histogram_kl",
    "quadrature_kl",
]
