"""Named errors of the training floor (a leaf: imported by the builders, the artifacts and the tasks)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing or inconsistent (the message names the key and what was expected)."""


class ResultsError(ValueError):
    """A results.json does not follow the results schema (bgexp.training.artifacts.Results)."""


class UnsupportedOperationError(ValueError):
    """A run of this task cannot do what was asked (e.g. `bgexp-sample` on a targeted-FEP run)."""


__all__ = ["ConfigError", "ResultsError", "UnsupportedOperationError"]
