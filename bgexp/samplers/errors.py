"""Named errors of ``bgexp.samplers``.

Every setting that cannot work is refused with one of these *before* any energy is evaluated
(zero particles, a budget below one level, a schedule or CESS target out of range, a space the
kernels cannot move on, a log-density without a gradient).  All are ``ValueError`` subclasses, so
code that catches ``ValueError`` for bad configuration keeps working.
"""

from __future__ import annotations

__all__ = [
    "SamplerError",
    "UnsupportedSpaceError",
    "NoGradientError",
    "BudgetError",
    "SamplerSettingError",
    "DegenerateWeightsError",
]


class SamplerError(ValueError):
    """Base class of every error raised by ``bgexp.samplers``."""


class UnsupportedSpaceError(SamplerError):
    """The kernels cannot move on this space (rigid bodies on S^3 x box, a periodic Cartesian box,
    particles with circular features)."""


class NoGradientError(SamplerError):
    """A gradient-based kernel (MALA, HMC) was given a log-density whose gradient with respect to
    its input cannot be computed by autograd (no ``grad_fn``, not depending on the input, or the
    backward pass raised)."""


class BudgetError(SamplerError):
    """No particles, or an energy-evaluation budget below the cost of the initial evaluation plus
    one level of moves."""


class SamplerSettingError(SamplerError):
    """A setting out of its range or of the wrong shape: CESS target outside (0, 1), a resampling
    threshold outside [0, 1], a schedule that is not increasing in (0, 1] ending at 1, particles
    of the wrong shape, a kernel built for another space."""


class DegenerateWeightsError(SamplerError):
    """Every particle has weight zero (all log pi_1 values non-finite, or all initial weights
    -inf): there is nothing left to anneal."""
