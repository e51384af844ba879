"""Moved to `bgexp.evaluation`; this shim re-exports it so that callers keep working until they
import from there (the training engineer removes it)."""

from bgexp.evaluation import *  # noqa: F401,F403
from bgexp.evaluation import (  # noqa: F401
    Evaluation,
    GeneratorModel,
    SampleSet,
    data_nll,
    draw_samples,
    evaluate,
    force_matching_error,
    quadrature_kl_of,
    wasserstein_1,
)
