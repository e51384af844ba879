"""Validate before work: `validate_config(cfg, mode="train"|"eval")`, a typed check of a composed
config that runs first in `bgexp-train` (`run_experiment`, so for every member of a sweep and after
a resume's merge) and in `bgexp-eval`, before any data generation, MD or training, in well under 5 s.
Every problem found is reported together in one `ConfigError`, one line each, naming the key, the
bad value and what is allowed.

What is checked (mode "train", the config of conf/config.yaml):

- unknown keys, also those added with `+` (`+evaluation.final_n_sample=5000`, `+sed=5`): refused
  with the nearest known key (difflib);
- `_target_` nodes (task, target, flow.transform, flow.prior, flow.layers.*, loss, optim, scheduler,
  trainer, logger, callbacks.*) are the declared extension points: their `_target_` must pass the
  allow-list (bgexp/training/allowlist.py; a ForbiddenTargetError first) and be importable, and
  every other key must be a parameter of the callable it names (`+target.k_dimer=5` is a parameter
  of DimerTarget, `+target.k_dimr=5` is not; a callable with **kwargs takes any key). Hydra's
  `_partial_`, `_recursive_`, `_convert_`, `_args_` and what the builders strip (`target.name`,
  `flow.transform.dim`) pass;
- values and ranges: evaluation sizes >= 1 (n_samples, batch_size, n_bootstrap, final_n_samples,
  final_n_bootstrap, final_n_data, every_n_epochs), 0 < evaluation.confidence < 1, seed,
  max_consecutive_nonfinite >= 1; data (the parameters of TargetDataModule: val_fraction in (0, 1),
  batch_size >= 1, split, generate by method: the parameters of the MC sampler or n_samples/seed
  of exact sampling, md: the fields of MDSettings with their ranges); the smc block (the fields of
  SMCSettings with their ranges); the tfep block (temperatures > 0, val_fraction in (0, 1), sizes,
  data_a/data_b, references); inside `_target_` nodes, by parameter name: flow sizes (n_couplings,
  n_blocks, n_layers, n_heads, n_bins, n_components*, steps, hidden widths) >= 1, a known
  activation, bound/max_log_scale/atol/rtol > 0; target temperature(_kelvin) > 0 and n_workers;
  optim lr > 0, weight_decay >= 0; loss weights >= 0, step counts >= 0, batch sizes >= 1, rc_range;
  trainer max_epochs >= 1 or -1, max_steps >= 1 or -1, check_val_every_n_epoch >= 1,
  gradient_clip_val >= 0, accumulate_grad_batches >= 1;
- cross-field rules: `optimized_metric` is a path that can hold a number in this run's results.json
  (the `Results` schema of bgexp/training/artifacts.py and `objective`: "ess", "nll_test",
  "delta_f.<name>.<field>", "metrics.<name>", "training.<field>", "n_energy_evals.<field>",
  "smc.*" only with an smc block, "tfep.*" only for task=tfep, "abs_delta_f_error", an "abs:"
  prefix); task=tfep needs a `tfep` block and task=bg a `data` block; loss.rc_weight > 0 needs
  loss.rc_observable; loss.force_weight > 0 needs data.forces=true;
- the flow can act on the target's space: for targets that are cheap to build (every target
  without an OpenMM system: dimer, particles, torus) the target is built and the flow recipe is
  built on its space without data (`build_flow(..., data=None)`, milliseconds), so a bad flow value
  or a flow/target mismatch (a torus flow on a Cartesian space, a wrong flow.transform.dim) fails
  here, not after the MC data generation. OpenMM targets (ala2, bpti, ice) take seconds and worker
  processes to build; for them the flow is checked by the values above, and built on the target's
  space without data by the task (`check_flow_on_target`, bgexp/training/tasks/bg.py) right after
  the target is built, before any MD data are generated.

Mode "eval" checks the settings of conf/eval.yaml (bgexp-eval, bgexp-sample): run_dir given,
n_samples, batch_size, n_bootstrap, n_data >= 1, 0 < confidence < 1, the smc block, unknown keys.

Why a declared schema rather than comparing with the config composed without the `+` overrides:
a schema needs neither the command line nor a second composition, so the same check holds for a
sweep member (whose overrides come from the sweeper), a resumed run (a stored, resolved config
merged with new overrides), an experiment file that misspells a key and a config built in Python;
and it checks values, which a key comparison cannot. The schema is declared where the values are
consumed, so it cannot drift from the code: the keys conf/config.yaml and conf/eval.yaml declare
(top level and `evaluation`, with the ranges declared here), the `paths` and `tfep` sections here,
the signatures of the consumers for data (TargetDataModule), data.generate
(sample_states), data.md and tfep.data_*.md (MDSettings) and smc (SMCSettings), the signature of
the named callable for every `_target_` node, and for `flow` the keys that the files of conf/flow
declare (a new flow file that adds a top-level key for its interpolations extends it).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bgexp.training.errors import ConfigError
from bgexp.training.static_signature import static_parameters

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
MODES = ("train", "eval")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNRESOLVED = _Sentinel("<unresolved interpolation>")  # e.g. ${hydra:...} outside a Hydra app
MISSING = _Sentinel("???")


def _plain(node: Any) -> Any:
    """Python containers of a config node, each value resolved where it can be (UNRESOLVED where an
    interpolation cannot be resolved here, MISSING for `???`)."""
    from omegaconf.errors import MissingMandatoryValue

    def get(container, key):
        try:
            return _plain(container[key])
        except MissingMandatoryValue:
            return MISSING
        except Exception:  # noqa: BLE001 (an interpolation this process cannot resolve: not checked)
            return UNRESOLVED

    if isinstance(node, DictConfig):
        return None if node._is_none() else {str(k): get(node, k) for k in node.keys()}
    if isinstance(node, ListConfig):
        return None if node._is_none() else [get(node, i) for i in range(len(node))]
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Problems(list):
    def add(self, key: str, value: Any, allowed: str) -> None:
        self.append(f"{key}={_short(value)}: {allowed}")

    def unknown(self, section: str, key: str, value: Any, known) -> None:
        name = key.rsplit(".", 1)[-1]
        known = sorted(str(k) for k in known)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        prefix = key[: -len(name)]
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        self.append(f"{section or 'config'}: unknown key {key}={_short(value)}{hint} "
                    f"(known keys of {section or 'the top level'}: {', '.join(known)})")


# value checks: each returns None when the value is allowed, else what is allowed ---------------------
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, none: bool = False, also: tuple = ()) -> Check:
    def check(v):
        if (v is None and none) or v in also and _is_int(v):
            return None
        ok = _is_int(v) and (lo is None or v >= lo)
        if ok:
            return None
        what = "an integer" + (f" >= {lo}" if lo is not None else "")
        what += "".join(f" or {a}" for a in also) + (" or null" if none else "")
        if _is_num(v) and float(v).is_integer() and (lo is None or v >= lo):
            what += f" (write {int(v)}, not a float)"
        return f"must be {what}"
    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = True, hi_open: bool = True,
           none: bool = False) -> Check:
    def check(v):
        if v is None and none:
            return None
        ok = _is_num(v) and math.isfinite(float(v))
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if ok:
            return None
        if lo is not None and hi is not None:
            what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            what = f"a number {'>' if lo_open else '>='} {lo:g}"
        else:
            what = "a finite number"
        return f"must be {what}" + (" or null" if none else "")
    return check


def choice(*options: Any, none: bool = False) -> Check:
    def check(v):
        if (v is None and none) or v in options:
            return None
        return f"must be one of {', '.join(repr(o) for o in options)}" + (" or null" if none else "")
    return check


def boolean(none: bool = False) -> Check:
    return lambda v: None if isinstance(v, bool) or (v is None and none) else "must be true or false"


def text(none: bool = False) -> Check:
    return lambda v: None if isinstance(v, str) or (v is None and none) else \
        "must be a string" + (" or null" if none else "")


def widths(v: Any) -> str | None:
    if _is_int(v) and v >= 1:
        return None
    if isinstance(v, list) and all(_is_int(h) and h >= 1 for h in v):
        return None
    return "must be a width >= 1 or a list of widths >= 1"


def anything(v: Any) -> None:
    return None


def _activations() -> Check:
    from bgexp.flows.nn import ACTIVATIONS

    return choice(*sorted(ACTIVATIONS))


# schema nodes -------------------------------------------------------------------------------------
class _Node:
    """A schema node that checks a whole value (a section, a mapping, a `_target_` node, ...);
    plain checks are functions value -> what is allowed (None when the value is)."""

    def check(self, value: Any, key: str, problems: _Problems) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Section(_Node):
    """A plain (non-`_target_`) mapping with declared keys; `nullable`: null (switched off) allowed."""

    def __init__(self, keys: Mapping[str, Any], nullable: bool = False, required: tuple[str, ...] = ()):
        self.keys, self.nullable, self.required = dict(keys), nullable, required

    def check(self, value: Any, key: str, problems: _Problems) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, dict):
            problems.add(key, value, "must be a mapping" + (" or null" if self.nullable else ""))
            return
        for name in self.required:
            if name not in value or value[name] is MISSING:
                problems.append(f"{_join(key, name)}: required (missing)")
        for name, sub in value.items():
            path = _join(key, name)
            if name not in self.keys:
                problems.unknown(key, path, sub, self.keys)
            elif sub is not UNRESOLVED and sub is not MISSING:
                _check(self.keys[name], sub, path, problems)


class MapOf(_Node):
    """A mapping of free names to entries of one kind (callbacks, flow.layers, tfep.references)."""

    def __init__(self, entry: Any, nullable: bool = True):
        self.entry, self.nullable = entry, nullable

    def check(self, value: Any, key: str, problems: _Problems) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, dict):
            problems.add(key, value, "must be a mapping")
            return
        for name, sub in value.items():
            if sub is not UNRESOLVED:
                _check(self.entry, sub, _join(key, name), problems)


class OneOrList(_Node):
    """One entry or a list of entries (data.md: one MD setting per data.path)."""

    def __init__(self, entry: Any):
        self.entry = entry

    def check(self, value: Any, key: str, problems: _Problems) -> None:
        for i, sub in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if sub is not UNRESOLVED:
                _check(self.entry, sub, key if i is None else f"{key}[{i}]", problems)


class TargetNode(_Node):
    """A `_target_` node: allowed and importable target, keys that are parameters of the callable
    (module docstring), values by parameter name (`rules`)."""

    def __init__(self, rules: Mapping[str, Check] | None = None, extra: tuple[str, ...] = (), nullable: bool = False,
                 empty_ok: bool = False, passed: tuple[str, ...] = (), resolve: bool = True):
        self.rules, self.extra, self.nullable, self.empty_ok = dict(rules or {}), extra, nullable, empty_ok
        self.passed = passed  # keywords the builder passes at build time (callbacks: run_dir)
        # False (the first, import-free pass): the callable is not imported; its keys are checked
        # against the parameters read from a bgexp callable's source (bgexp/training/static_signature.py)
        # where that is certain, by name only (`rules`) otherwise; the second pass imports it
        self.resolve = resolve

    def check(self, value: Any, key: str, problems: _Problems) -> None:
        if value is None and self.nullable or (value == {} and self.empty_ok):
            return
        if not isinstance(value, dict) or "_target_" not in value:
            problems.add(key, value, "must be a mapping with a `_target_`" + (" or null" if self.nullable else ""))
            return
        # the first pass reads a bgexp callable's parameters from its source (no import), when it can
        params = (_parameters(value["_target_"], _join(key, "_target_"), problems) if self.resolve
                  else static_parameters(value["_target_"]))
        for name in self.passed:
            if params is not None and name not in params:
                problems.add(_join(key, "_target_"), value["_target_"], f"must accept `{name}` (bgexp passes it)")
        for name, sub in value.items():
            path = _join(key, name)
            if name in HYDRA_KEYS or name in self.extra:
                continue
            if params is not None and name not in params:
                problems.unknown(key, path, sub, [p for p in params if p != "*"] + list(self.extra))
                continue
            if sub is UNRESOLVED or sub is MISSING:
                continue
            if isinstance(sub, dict) and "_target_" in sub:
                TargetNode(resolve=self.resolve).check(sub, path, problems)
            elif name in self.rules:
                _check(self.rules[name], sub, path, problems)


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def _check(spec: Any, value: Any, key: str, problems: _Problems) -> None:
    if isinstance(spec, _Node):
        spec.check(value, key, problems)
    else:
        allowed = spec(value)
        if allowed:
            problems.add(key, value, allowed)


def _resolve_target(target: Any):
    from hydra._internal.utils import _locate

    return _locate(target) if isinstance(target, str) else target


# callables whose **kwargs are handed on to another one: their keys are that one's parameters too
FORWARDED_KWARGS = {"lightning.pytorch.loggers.WandbLogger": "wandb.init",
                    "lightning.pytorch.loggers.wandb.WandbLogger": "wandb.init"}


def _parameters(target: Any, key: str, problems: _Problems) -> set[str] | None:
    """The keyword parameters of the callable `target` names (None: it takes any keyword; for the
    callables of FORWARDED_KWARGS, the parameters of the one their **kwargs go to are added)."""
    if target is UNRESOLVED:
        return None
    try:
        obj = _resolve_target(target)
    except Exception as err:  # noqa: BLE001
        problems.add(key, target, f"cannot be imported ({type(err).__name__}: {err})")
        return None
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    own = {name for name, p in signature.parameters.items()
           if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        forwarded = FORWARDED_KWARGS.get(target) if isinstance(target, str) else None
        if forwarded is None:
            return None
        onward = _parameters(forwarded, key, _Problems())
        return None if onward is None else own | onward
    return own


def _signature_keys(fn: Callable, drop: tuple[str, ...] = ()) -> list[str]:
    return [n for n in inspect.signature(fn).parameters if n not in ("self", *drop)]


# the declared schema ------------------------------------------------------------------------------
def _md_settings(nullable: bool = False) -> Section:
    """MDSettings' fields; `nullable`: null allowed (data.md: null reads the data.path folders as they
    are, without generating or checking them)."""
    from bgexp.targets.dynamics import MDSettings

    rules = {"n_frames": integer(1), "report_interval": integer(1), "chunk_frames": integer(1),
             "timestep_fs": number(0), "friction_per_ps": number(0), "equilibration_steps": integer(0),
             "seed": integer(), "minimize": boolean(), "temperature": number(0, none=True)}
    return Section({f.name: rules.get(f.name, anything) for f in dataclass_fields(MDSettings)}, nullable=nullable)


class _SMC(Section):
    """The smc block: the fields of SMCSettings with their types and the ranges SMCSettings does not
    check itself; then SMCSettings(**block), whose own checks (n_particles, n_replicates, kernel,
    confidence, baselines, max_draw_factor) give their own messages."""

    def check(self, value: Any, key: str, problems: _Problems) -> None:
        from bgexp.evaluation.refinement import SMCSettings

        before = len(problems)
        super().check(value, key, problems)
        if value is None or len(problems) > before or any(v is UNRESOLVED for v in value.values()):
            return
        try:
            SMCSettings(**value)
        except Exception as err:  # noqa: BLE001 (SamplerSettingError and friends: their message names the key)
            problems.append(f"smc: {err}")


def _smc_settings() -> Section:
    from bgexp.evaluation.refinement import SMCSettings

    rules = {"enabled": boolean(), "n_particles": integer(), "n_replicates": integer(), "kernel": text(), "step_size": number(0),
             "n_steps_per_level": integer(1), "cess_target": number(0, 1), "resample_threshold": number(0, 1, False, False),
             "max_energy_evals": integer(1, none=True), "per_state": boolean(none=True), "max_draw_factor": integer(),
             "confidence": number(), "batch_size": integer(1), "progress": boolean(),
             "bidirectional": boolean(), "n_bidirectional": integer(none=True), "reverse_steps": integer(0),
             "reverse_frames": choice("training", "heldout"), "q_draws": integer(0), "final_sweeps": integer(0)}
    return _SMC({f.name: rules.get(f.name, anything) for f in dataclass_fields(SMCSettings)}, nullable=True)


class _Generate(_Node):
    """data.generate by method: mc takes the parameters of the MC sampler, exact n_samples and seed."""

    def check(self, value: Any, key: str, problems: _Problems) -> None:
        from bgexp.targets.md import sample_states
        from bgexp.training.data import GENERATION_METHODS

        if value is None:
            return
        if not isinstance(value, dict):
            problems.add(key, value, "must be a mapping or null")
            return
        method = value.get("method", "mc")
        if method not in GENERATION_METHODS:
            problems.add(_join(key, "method"), method, f"must be one of {', '.join(GENERATION_METHODS)}")
            return
        if method == "exact":
            keys = {"method": anything, "n_samples": integer(1), "seed": integer()}
        else:
            rules = {"states": anything, "n_chains": integer(1), "n_steps": integer(1), "burn_in": integer(0),
                     "thin": integer(1), "step_size": number(0), "seed": integer()}
            keys = {"method": anything, **{n: rules.get(n, anything)
                                           for n in _signature_keys(sample_states, ("target", "progress"))}}
        Section(keys).check(value, key, problems)


def _data() -> Section:
    from bgexp.training.data import TargetDataModule

    rules = {"path": anything, "cache_dir": text(), "generate": _Generate(), "val_fraction": number(0, 1),
             "batch_size": integer(1), "num_workers": integer(0), "split_seed": integer(), "progress": boolean(),
             "md": OneOrList(_md_settings(nullable=True)), "topology": text(none=True), "split": choice("random", "tail", "chains"),
             "forces": boolean()}
    keys = _signature_keys(TargetDataModule.__init__, ("target", "target_config"))
    return Section({n: rules.get(n, anything) for n in keys})


def _tfep() -> Section:
    state = Section({"path": text(), "md": _md_settings(), "max_frames": integer(1, none=True)}, required=("path",))
    state_b = Section(dict(state.keys), nullable=True)
    reference = Section({"value": number(), "std": number(0, lo_open=False, none=True), "source": text(none=True)},
                        required=("value",))
    return Section({"temperature_a": number(0), "data_a": state, "data_b": state_b,
                    "random_translations": boolean(), "val_fraction": number(0, 1), "batch_size": integer(1),
                    "eval_batch_size": integer(1), "n_bootstrap": integer(1), "references": MapOf(reference)},
                   nullable=True, required=("temperature_a", "data_a"))


FLOW_RULES: dict[str, Check] = {
    **{n: integer(1) for n in ("n_couplings", "n_blocks", "n_layers", "n_heads", "n_bins", "n_components",
                               "n_components_rotation", "n_components_translation", "steps", "max_nfe",
                               "spatial_dim")},
    "divergence_chunk": integer(1, none=True), "hidden": widths, "bound": number(0), "max_log_scale": number(0),
    "min_slope": number(0, 1), "atol": number(0), "rtol": number(0), "temperature": number(0),
}
TARGET_RULES: dict[str, Check] = {"temperature": number(0), "temperature_kelvin": number(0),
                                  "n_workers": integer(0, none=True), "n_particles": integer(2)}
LOSS_RULES: dict[str, Check] = {
    # null: the schedule's default, or set by loss.stages (bgexp/training/losses.py)
    **{n: number(0, lo_open=False, none=True) for n in ("alpha", "beta", "rc_weight")},
    **{n: number(0, lo_open=False) for n in ("force_weight", "sigma")},
    **{n: integer(0, none=True) for n in ("nll_warmup_steps", "kl_ramp_steps")},
    "kl_batch_size": integer(1), "rc_bins": integer(2), "alignment_iterations": integer(1),
    "energy_max": number(0),
}
OPTIM_RULES: dict[str, Check] = {"lr": number(0), "weight_decay": number(0, lo_open=False)}
TRAINER_RULES: dict[str, Check] = {
    "max_epochs": integer(1, none=True, also=(-1,)), "max_steps": integer(1, also=(-1,)),
    "min_epochs": integer(0, none=True), "check_val_every_n_epoch": integer(1, none=True),
    "gradient_clip_val": number(0, lo_open=False, none=True), "accumulate_grad_batches": integer(1),
    "log_every_n_steps": integer(1, none=True),
}


def _declared(name: str, section: str | None = None) -> set[str]:
    """The keys conf/<name>.yaml declares (at the top level, or in `section`)."""
    node = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    node = node if section is None else node.get(section) or {}
    return {str(k) for k in node.keys() if k != "defaults"}


def _with_declared(rules: dict[str, Any], declared: set[str]) -> dict[str, Any]:
    return {**{k: anything for k in declared}, **rules}


def _flow_keys() -> set[str]:
    """`layers`, `prior`, `transform` and the top-level keys the files of conf/flow declare."""
    keys = {"layers", "prior", "transform"}
    for path in sorted((CONFIG_DIR / "flow").glob("*.yaml")):
        try:
            keys |= {str(k) for k in OmegaConf.load(path).keys() if k != "defaults"}
        except Exception:  # noqa: BLE001 (a broken flow file is Hydra's error when it is chosen)
            continue
    return keys


def _flow(quick: bool = False) -> Section:
    flow_rules = FLOW_RULES if quick else {**FLOW_RULES, "activation": _activations()}  # activations: torch
    resolve = not quick
    node = TargetNode(flow_rules, extra=("dim",), resolve=resolve)
    keys = {k: anything for k in _flow_keys()}
    keys.update(layers=MapOf(TargetNode(flow_rules, nullable=True, resolve=resolve)),
                prior=TargetNode(flow_rules, nullable=True, resolve=resolve), transform=node, spatial_dim=integer(1))
    return Section(keys, required=("transform",))


DIVERGENCE = Section({"enabled": boolean(), "window": integer(1), "growth": number(0), "floor": number(0),
                      "min_steps": integer(1), "zero_weight_evaluations": integer(0)}, nullable=True)


def train_schema(quick: bool = False) -> Section:
    """The declared schema of a training config (conf/config.yaml and its groups). `quick`: the
    first pass of `validate_config`, which imports nothing: `_target_` nodes checked by key name
    only (their callables are not imported) and the blocks whose schema is read from their
    consumers' signatures (data, smc, tfep) left to the second pass."""
    node = (lambda *a, **k: TargetNode(*a, resolve=False, **k)) if quick else TargetNode
    evaluation = Section(_with_declared({"every_n_epochs": integer(1), "n_samples": integer(1), "batch_size": integer(1),
                          "n_bootstrap": integer(1), "final_n_samples": integer(1), "final_n_bootstrap": integer(1),
                          "final_n_data": integer(1, none=True), "confidence": number(0, 1)},
                                        _declared("config", "evaluation")))
    return Section(_with_declared({
        "task": node(), "target": node(TARGET_RULES, extra=("name",)), "data": anything if quick else _data(),
        "flow": _flow(quick), "loss": node(LOSS_RULES), "trainer": node(TRAINER_RULES),
        "logger": node(nullable=True, empty_ok=True),
        "paths": Section({"output_dir": text(), "data_dir": text()}),
        "callbacks": MapOf(node(nullable=True, passed=("run_dir",))),
        "smc": anything if quick else _smc_settings(), "tfep": anything if quick else _tfep(),
        "experiment_name": text(), "seed": integer(), "tags": anything, "optim": node(OPTIM_RULES),
        "scheduler": node(nullable=True), "max_consecutive_nonfinite": integer(1), "evaluation": evaluation,
        "divergence": DIVERGENCE,
        "optimized_metric": text(), "save_samples": boolean(), "ckpt_path": text(none=True),
        "resume": text(none=True), "hydra": anything,
    }, _declared("config")), required=("task", "target", "flow", "evaluation"))


def eval_schema(quick: bool = False) -> Section:
    """The declared schema of conf/eval.yaml (bgexp-eval, bgexp-sample); `quick`: without the smc
    block (its schema imports the SMC code)."""
    return Section(_with_declared({
        "run_dir": text(), "checkpoint": text(), "n_samples": integer(1), "batch_size": integer(1),
        "n_data": integer(1, none=True), "n_bootstrap": integer(1), "confidence": number(0, 1), "seed": integer(),
        "out": text(none=True), "smc": anything if quick else _smc_settings(), "hydra": anything}, _declared("eval")), required=("run_dir",))


# cross-field rules --------------------------------------------------------------------------------
RESULT_NUMBERS = ("ess", "n_samples", "nll_test", "wall_s", "seed", "n_nonfinite_energies")
RESULT_MAPPINGS = ("delta_f", "n_energy_evals", "metrics", "training", "tfep", "smc")


def check_optimized_metric(metric: Any, cfg: Mapping[str, Any], problems: _Problems) -> None:
    """`optimized_metric` must name a number results.json of this run can hold (module docstring)."""
    key, task = "optimized_metric", _task_name(cfg)
    if metric is None or metric is UNRESOLVED or not isinstance(metric, str):
        return
    path = metric[4:] if metric.startswith("abs:") else metric
    head, _, rest = path.partition(".")
    forms = (f"\"abs_delta_f_error\", a number of results.json ({', '.join(RESULT_NUMBERS)}), a path into one "
             f"of its blocks ({', '.join(b + '.<name>' for b in RESULT_MAPPINGS)}), optionally prefixed by \"abs:\"")
    if path == "abs_delta_f_error":
        return
    if head in RESULT_NUMBERS and not rest:
        if head == "nll_test" and task == "tfep":
            problems.add(key, metric, "a task=tfep run has no nll_test (null); use e.g. abs:tfep.estimates.lfep.error")
        return
    if head in RESULT_MAPPINGS and rest:
        if head == "smc" and (not cfg.get("smc") or cfg["smc"].get("enabled", True) is False):
            problems.add(key, metric, "results.json has an `smc` block only with an smc group (smc=default) "
                                      "that is enabled")
        elif head == "tfep" and task != "tfep":
            problems.add(key, metric, f"results.json has a `tfep` block only for task=tfep (this run: task={task})")
        elif head == "metrics" and task == "tfep":
            problems.add(key, metric, "a task=tfep run has no `metrics` block; use a path under tfep.")
        return
    close = difflib.get_close_matches(head, [*RESULT_NUMBERS, *RESULT_MAPPINGS, "abs_delta_f_error"], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    problems.add(key, metric, f"is not a path that can exist in results.json{hint}. Allowed: {forms}")


def _task_name(cfg: Mapping[str, Any]) -> str:
    task = cfg.get("task")
    target = str(task.get("_target_", "")) if isinstance(task, dict) else ""
    return "tfep" if target.endswith("TargetedFEPTask") or (not task and cfg.get("tfep")) else "bg"


def _cross_field(cfg: Mapping[str, Any], problems: _Problems) -> None:
    check_optimized_metric(cfg.get("optimized_metric"), cfg, problems)
    task = _task_name(cfg)
    if task == "tfep" and not cfg.get("tfep"):
        problems.append("tfep: task=tfep needs a `tfep` block (states A and B; see conf/experiment/ice16_rigid.yaml)")
    if task == "bg" and not isinstance(cfg.get("data"), dict):
        problems.append("data: task=bg needs a `data` block (the target's group provides one)")
    loss = cfg.get("loss") if isinstance(cfg.get("loss"), dict) else {}
    rc_weight = loss.get("rc_weight")
    if _is_num(rc_weight) and rc_weight > 0 and loss.get("rc_observable") is None:
        problems.add("loss.rc_observable", None, f"must name an observable of the target when loss.rc_weight={rc_weight} > 0")
    rc_range = loss.get("rc_range")
    if rc_range is not None and rc_range is not UNRESOLVED and not (
            isinstance(rc_range, list) and len(rc_range) == 2 and all(_is_num(v) for v in rc_range)
            and rc_range[0] < rc_range[1]):
        problems.add("loss.rc_range", rc_range, "must be [low, high] with low < high")
    force_weight = loss.get("force_weight")
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    if task == "bg" and _is_num(force_weight) and force_weight > 0 and data.get("forces") is False:
        problems.add("data.forces", False, f"must be true when loss.force_weight={force_weight} > 0 (force matching "
                                           f"needs the data's forces)")


def _cheap_target(node: Mapping[str, Any]) -> bool:
    """Whether the target can be built here in milliseconds: anything without an OpenMM system."""
    from bgexp.targets.openmm import OpenMMTarget

    try:
        obj = _resolve_target(node.get("_target_"))
    except Exception:  # noqa: BLE001 (reported by the schema)
        return False
    owner = getattr(obj, "__self__", obj)
    return isinstance(owner, type) and not issubclass(owner, OpenMMTarget)


def check_flow_fits_target(cfg: DictConfig, problems: _Problems) -> None:
    """Build the target (cheap ones only) and the flow recipe on its space without data."""
    from bgexp.training.assemble import build_target

    plain_target = _plain(cfg.get("target"))
    if not isinstance(plain_target, dict) or not _cheap_target(plain_target):
        return
    try:
        target = build_target(cfg)
    except Exception as err:  # noqa: BLE001
        problems.append(f"target: cannot be built ({type(err).__name__}: {err})")
        return
    try:
        _flow_on_target(cfg, target, problems)
    finally:
        target.close()


def _flow_on_target(cfg: DictConfig, target, problems: _Problems) -> None:
    from bgexp.training.assemble import build_flow

    name = OmegaConf.select(cfg, "target._target_", default=type(target).__name__)
    try:
        built = build_flow(cfg.flow, target, data=None)
    except Exception as err:  # noqa: BLE001
        problems.append(f"flow: cannot act on target {name} "
                        f"(space of dimension {target.space.dim}): {type(err).__name__}: {err}")
        return
    _torus_flow_without_angles(built, name, problems)
    _bidirectional_without_inverse(cfg, built, problems)


def _bidirectional_without_inverse(cfg: DictConfig, built, problems: _Problems) -> None:
    """smc.bidirectional pulls data back by F^-1: refused for a continuous flow (its SMC starts
    from weighted samples in x and has no latent path to pull back into)."""
    from bgexp.flows.base import ContinuousFlow

    if OmegaConf.select(cfg, "smc.bidirectional", default=False) and isinstance(built.flow, ContinuousFlow):
        problems.append("smc.bidirectional: needs a flow with an inverse pass (a coupling flow); "
                        f"{type(built.flow).__name__} is continuous: set smc.bidirectional=false")


def _torus_flow_without_angles(built, name: str, problems: _Problems) -> None:
    """A flow for circular coordinates (a torus prior or a smooth torus transform) on a space with
    no circular feature: it would run as an affine flow on raw coordinates (no standardization), almost
    surely not what was meant (e.g. flow=smooth_torus with the dimer)."""
    from bgexp.flows import TorusPrior
    from bgexp.flows.torus import SmoothTorusFlow

    if built.latent_space.has_circular:
        return
    torus = [m for m in built.flow.modules() if isinstance(m, SmoothTorusFlow)]
    if isinstance(built.prior, TorusPrior) or torus:
        problems.append(f"flow: a flow for circular coordinates ({type(built.prior).__name__} prior"
                        f"{', SmoothTorusFlow' if torus else ''}) on target {name}, whose space has no angle: choose a flow "
                        f"for Cartesian coordinates (e.g. flow=realnvp) or a target with torsions")


def check_flow_on_target(cfg: DictConfig, target) -> None:
    """The flow recipe of `cfg` built on the space of the built `target` without data (its layers
    take their data-fitted parameters later): InvalidConfigError if it cannot act on that space.
    For the targets `validate_config` does not build (OpenMM ones), run by the task before any data
    or MD is generated."""
    problems = _Problems()
    _flow_on_target(cfg, target, problems)
    if problems:
        _raise("train", problems, complete=True)


# the entry point ----------------------------------------------------------------------------------
class InvalidConfigError(ConfigError):
    """What `validate_config` raises: every problem found, one "key=value: what is allowed" line each
    (`problems`), so that a sweep can tell whether the keys it varies are involved."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems

    def keys(self) -> list[str]:
        """The config keys named by the problems (the text before `=` or `:`)."""
        return [re.split(r"[=:\s]", problem, maxsplit=1)[0] for problem in self.problems]


def validate_config(cfg: DictConfig | Mapping[str, Any], *, mode: str = "train", quick: bool = False) -> None:
    """Raise ConfigError listing every problem of `cfg` (module docstring); `mode`: "train" for
    bgexp-train's config, "eval" for bgexp-eval's and bgexp-sample's. Two passes: the first imports
    nothing (values, ranges, unknown keys outside `_target_` nodes, cross-field rules, the optimized
    metric) and reports what it finds at once; the second (skipped with `quick=True`) imports the
    `_target_`s and the consumers whose signatures declare the rest, and builds the flow on the target."""
    from bgexp.training.allowlist import check_config

    if mode not in MODES:
        raise ValueError(f"validate_config: mode must be one of {MODES}, got {mode!r}")
    plain = _plain(cfg)
    check_config(cfg, resolve=False)  # a forbidden `_target_` by name: ForbiddenTargetError before anything else
    for full in (False,) if quick else (False, True):
        if full:  # a _target_ outside the allow-list: ForbiddenTargetError before anything is imported from it
            check_config(cfg)  # (it imports the allowed ones, to check what they resolve to)
        problems = _Problems()
        (train_schema(quick=not full) if mode == "train" else eval_schema(quick=not full)).check(plain, "", problems)
        if mode == "train":
            _cross_field(plain, problems)
            if full and not problems and _task_name(plain) == "bg":
                check_flow_fits_target(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), problems)
        if problems:
            _raise(mode, problems, complete=full)


def _raise(mode: str, problems: _Problems, complete: bool) -> None:
    where = "bgexp-train" if mode == "train" else "bgexp-eval"
    head = f"invalid configuration for {where} ({len(problems)} problem{'s' if len(problems) > 1 else ''}; " \
           f"nothing was run):"
    tail = "" if complete else ("\n(the parameters of `_target_` nodes, the data, smc and tfep blocks and the flow on "
                                "the target are checked once these are fixed)")
    raise InvalidConfigError(head + "\n  " + "\n  ".join(problems) + tail, problems=list(problems))


__all__ = ["validate_config", "InvalidConfigError", "check_optimized_metric", "check_flow_fits_target",
           "check_flow_on_target", "train_schema", "eval_schema",
           "UNRESOLVED", "MISSING"]
