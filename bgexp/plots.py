"""Moved to `bgexp.evaluation.plots`; re-exported here so that `from bgexp import plots` and
`from bgexp.plots import ...` keep working."""

from bgexp.evaluation.plots import *  # noqa: F401,F403
from bgexp.evaluation.plots import (  # noqa: F401  (helpers other modules draw with)
    __all__,
    _as_array,
    _finite,
    _histograms,
    _new_figure,
    _profile,
    _save,
)
