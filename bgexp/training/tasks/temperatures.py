"""One trained flow evaluated at several temperatures (`evaluation.temperatures`).

Boltzmann generators transfer a flow F trained at temperature T to tau * T by scaling the prior
(Noe, Olsson, Koehler, Wu, Science 2019, Fig. 3): z ~ N(0, tau I), x = F(z), so
    log q_tau(x) = log N(F^-1(x); 0, tau I) + log|det dF^-1/dx|,
and the target at tau * T has the reduced energy u_tau(x) = u(x) / tau. Importance weights
log w = -u_tau(x) - log q_tau(x) correct whatever F does not get right at tau; a flow trained with
the KL at several temperatures (`loss.kl_temperatures`) keeps them usable over the range.

`evaluate_at_temperatures` repeats the importance-sampling evaluation at each relative temperature
tau: the target is rebuilt from the run's config at tau x its temperature (so its references are
those of that temperature, or none), the prior's temperature is scaled by tau, and the held-out
data (sampled at T) are not used. The block `temperatures` of results.json maps tau to its ESS,
free-energy differences with CIs against the references, profile RMSE, and figures.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

from bgexp.evaluation import evaluate
from bgexp.flows.priors import NormalPrior
from bgexp.training.assemble import build_target
from bgexp.training.errors import ConfigError


def relative_temperatures(cfg: DictConfig) -> list[float]:
    """`evaluation.temperatures` as positive floats (empty when unset), checked."""
    values = cfg.evaluation.get("temperatures") or []
    taus = []
    for value in values:
        try:
            tau = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"evaluation.temperatures: {value!r} is not a number (relative temperatures, "
                              f"e.g. [0.5, 1, 2])") from None
        if not tau > 0:
            raise ConfigError(f"evaluation.temperatures: {value!r} must be > 0 (a temperature relative to "
                              f"target.temperature)")
        taus.append(tau)
    return taus


@contextmanager
def at_temperature(model, target, tau: float, prior_temperature: float) -> Iterator[None]:
    """`model` with `target` and its prior at `prior_temperature * tau`; restored on exit."""
    old_target, old_t = model.target, model.prior.temperature
    model.target, model.prior.temperature = target, prior_temperature * tau
    try:
        yield
    finally:
        model.target, model.prior.temperature = old_target, old_t


def evaluate_at_temperatures(cfg: DictConfig, model, figure_dir: Path) -> dict[str, Any]:
    """The `temperatures` block (module docstring); {} when `evaluation.temperatures` is unset."""
    taus = relative_temperatures(cfg)
    if not taus:
        return {}
    if not isinstance(model.prior, NormalPrior):
        raise ConfigError(f"evaluation.temperatures needs a Gaussian prior whose width scales with the "
                          f"temperature (NormalPrior); this flow has {type(model.prior).__name__}")
    ev, base, prior_t = cfg.evaluation, float(cfg.target.temperature), float(model.prior.temperature)
    block: dict[str, Any] = {}
    for tau in taus:
        target_cfg = OmegaConf.create(OmegaConf.to_container(cfg.target, resolve=True))
        with open_dict(target_cfg):
            target_cfg.temperature = base * tau
        target = build_target(OmegaConf.create({"target": target_cfg}))
        try:
            with at_temperature(model, target, tau, prior_t):
                result = evaluate(model, n_samples=ev.final_n_samples, batch_size=ev.batch_size,
                                  n_bootstrap=ev.final_n_bootstrap, confidence=ev.confidence,
                                  figure_dir=figure_dir, tag=f"T{tau:g}")
        finally:
            target.close()
        metrics = result.metrics
        block[f"{tau:g}"] = {
            "temperature": base * tau, "ess": metrics["ess"], "delta_f": result.delta_f,
            "profile_rmse": {k.split("/")[1]: v for k, v in metrics.items()
                             if k.startswith("profile/") and k.endswith("/rmse")},
            "outside_canonical_region": metrics.get("outside_canonical_region"),
            "problem": result.problem, "figures": result.figures,
        }
    return block


__all__ = ["evaluate_at_temperatures", "relative_temperatures", "at_temperature"]
