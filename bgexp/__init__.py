"""bgexp: an experiment framework for Boltzmann generators.

Layers (arrows run one way): entry points -> training -> (flows, targets, estimators).
"""

__version__ = "0.1.0"
