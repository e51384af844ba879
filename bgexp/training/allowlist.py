"""Which `_target_`s bgexp instantiates: an allow-list checked before anything is built.

A config's `_target_` names a Python callable that `hydra.utils.instantiate` imports and calls, so a
config (a command line, an experiment file, a run folder's stored config.yaml) could otherwise run
any installed function: `target._target_=builtins.print`, `optim._target_=os.system`. bgexp
therefore checks every `_target_` of a config node, recursively (nested nodes, lists, `_args_`),
before it instantiates it, and once for the whole config when it chooses the task (`build_task`,
which every entry point calls first: bgexp-train before any data generation or MD, bgexp-eval and
bgexp-sample on a run folder's stored config) and when it loads a run folder's config
(`load_run_config`). A target outside the list is a `ForbiddenTargetError` (a `ConfigError`) that
names the key, the value and how to allow it; nothing is imported beyond allowed prefixes and
nothing is called.

Allowed (`DEFAULT_ALLOWED_TARGETS`): `bgexp.`, `torch.optim.` (optimisers and LR schedulers),
`torch.nn.`, `lightning.pytorch.loggers.`, `lightning.pytorch.callbacks.` and the Trainer
(`lightning.pytorch.Trainer`). Hydra's own launcher and sweeper classes (under `hydra:`) are
instantiated by Hydra, not by bgexp, and are not checked here (hydra-core's blocklist applies).

A prefix matches a dotted name that equals it or continues it at a dot: `torch.optim` and
`torch.optim.` both allow `torch.optim.Adam`, not `torch.optimx.X`. A target must pass twice: the
name as written, and the name of the object it resolves to (`module.qualname`), so an alias through
an allowed module (`bgexp.atomic.os.system`, `torch.nn.modules.module.torch.load`) is refused.

Extending the list (only what you trust; the environment of the process decides, never a config,
so a run folder cannot allow its own targets):

- environment variable `BGEXP_ALLOWED_TARGETS`: comma-, colon- or space-separated prefixes, e.g.
  `BGEXP_ALLOWED_TARGETS=mypkg.flows.,torch.distributions.Normal bgexp-train flow.prior._target_=...`
  (read at every check, so it also works for a notebook that sets os.environ);
- in Python: `bgexp.training.allowlist.allow_targets("mypkg.")` (this process only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bgexp.training.errors import ConfigError

ENV_VAR = "BGEXP_ALLOWED_TARGETS"
DEFAULT_ALLOWED_TARGETS: tuple[str, ...] = (
    "bgexp.",
    "torch.optim.",
    "torch.nn.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.trainer.trainer.Trainer",  # what lightning.pytorch.Trainer resolves to
)
TARGET_KEY = "_target_"
_EXTRA: list[str] = []  # allow_targets()


class ForbiddenTargetError(ConfigError):
    """A `_target_` outside the allow-list (module docstring); the message names the key, the value
    and how to allow it."""


def allow_targets(*prefixes: str) -> None:
    """Allow `prefixes` (module docstring) in this process, besides the defaults and $BGEXP_ALLOWED_TARGETS."""
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise ValueError(f"allow_targets: {prefix!r} is not a dotted prefix")
        if prefix not in _EXTRA:
            _EXTRA.append(prefix)


def allowed_prefixes() -> tuple[str, ...]:
    """The defaults, then $BGEXP_ALLOWED_TARGETS, then what `allow_targets` added."""
    from_env = [p for p in re.split(r"[,:\s]+", os.environ.get(ENV_VAR, "")) if p.strip(".")]
    return (*DEFAULT_ALLOWED_TARGETS, *from_env, *_EXTRA)


def is_allowed(name: str, prefixes: Sequence[str] | None = None) -> bool:
    """Whether the dotted `name` equals a prefix or continues one at a dot."""
    for prefix in allowed_prefixes() if prefixes is None else prefixes:
        stem = prefix.rstrip(".")
        if name == stem or name.startswith(stem + "."):
            return True
    return False


def _canonical_name(obj: Any) -> str | None:
    """`module.qualname` of a class, function or method (None for other objects, e.g. a partial)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    if type(obj).__name__ == "module":
        return getattr(obj, "__name__", None)
    return None


def _refuse(key: str, value: Any, prefixes: Sequence[str], detail: str = "", hint: str = "",
            allow: str | None = None) -> ForbiddenTargetError:
    allow = allow or (value if isinstance(value, str) else "<module.name>")
    return ForbiddenTargetError(
        f"{key}={value!r} is refused{detail}: {hint or 'bgexp only instantiates targets under'} "
        f"{', '.join(prefixes)}. If you trust it, allow it explicitly: {ENV_VAR}={allow} (comma-separated "
        f"prefixes, in the environment) or bgexp.training.allowlist.allow_targets({allow!r}); "
        f"see bgexp/training/allowlist.py")


def check_target(value: Any, key: str = TARGET_KEY, hint: str = "", resolve: bool = True) -> None:
    """Raise ForbiddenTargetError unless `value` (a `_target_`) is allowed by name and by what it
    resolves to. A name under an allowed prefix that cannot be imported passes: Hydra reports that.
    `resolve=False`: the name only, nothing imported (the first pass of the config check)."""
    prefixes = allowed_prefixes()
    if not isinstance(value, str):  # a callable placed in a config from Python
        name = _canonical_name(value)
        if name is None or not is_allowed(name, prefixes):
            raise _refuse(key, value, prefixes, hint=hint)
        return
    if not is_allowed(value, prefixes):
        raise _refuse(key, value, prefixes, hint=hint)
    if not resolve:
        return
    try:
        from hydra._internal.utils import _locate

        obj = _locate(value)  # imports modules under the allowed prefix only
    except Exception:  # noqa: BLE001 (not importable: Hydra says so when it instantiates)
        return
    name = _canonical_name(obj)
    if name is not None and name != value and not is_allowed(name, prefixes):
        raise _refuse(key, value, prefixes, detail=f" (it resolves to {name})", hint=hint, allow=name)


def _items(node: Any):
    if isinstance(node, DictConfig):
        for k in node:
            try:
                yield str(k), node[k]
            except Exception:  # noqa: BLE001 (an interpolation that cannot be resolved here: check what is written)
                yield str(k), OmegaConf.to_container(node, resolve=False).get(k)
    elif isinstance(node, Mapping):
        yield from ((str(k), v) for k, v in node.items())


def check_targets(node: Any, where: str = "", hint: str = "", resolve: bool = True) -> None:
    """Check every `_target_` in `node` (a config node, dict or list, recursively); `where` is the
    node's dotted key, used in the message."""
    if isinstance(node, (DictConfig, Mapping)):
        for k, v in _items(node):
            key = f"{where}.{k}" if where else k
            if k == TARGET_KEY:
                check_target(v, key, hint=hint, resolve=resolve)
            else:
                check_targets(v, key, hint=hint, resolve=resolve)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, v in enumerate(node):
            check_targets(v, f"{where}[{i}]", hint=hint, resolve=resolve)


def check_config(cfg: DictConfig | Mapping, resolve: bool = True) -> None:
    """Every `_target_` of a whole config, except Hydra's own block (`hydra:`, launchers and sweepers);
    `resolve=False`: by name only, importing nothing."""
    for k, v in _items(cfg):
        if k != "hydra":
            check_targets(v, k, resolve=resolve)


def instantiate(node: Any, *args: Any, where: str = "", **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` after `check_targets(node)`."""
    from hydra.utils import instantiate as hydra_instantiate

    check_targets(node, where)
    return hydra_instantiate(node, *args, **kwargs)


def get_class(path: str, where: str = TARGET_KEY, hint: str = "") -> type:
    """`hydra.utils.get_class` after `check_target(path)`."""
    from hydra.utils import get_class as hydra_get_class

    check_target(path, where, hint=hint)
    return hydra_get_class(path)


__all__ = ["ForbiddenTargetError", "DEFAULT_ALLOWED_TARGETS", "ENV_VAR", "allow_targets", "allowed_prefixes",
           "is_allowed", "check_target", "check_targets", "check_config", "instantiate", "get_class"]
