"""Parameters of bgexp callables read from their source without importing them
(bgexp/training/static_signature.py): equal to inspect.signature for every `_target_` of conf/,
None whenever the source cannot tell for sure."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from bgexp.training.static_signature import static_parameters
from bgexp.training.validation import _Problems, _parameters

CONF = Path(__file__).resolve().parents[1] / "conf"


def _targets(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            found.add(node["_target_"])
        for value in node.values():
            _targets(value, found)
    elif isinstance(node, list):
        for value in node:
            _targets(value, found)
    return found


TARGETS = sorted(set().union(*(_targets(doc, set()) for path in CONF.rglob("*.yaml")
                               for doc in yaml.safe_load_all(path.read_text()))))


@pytest.mark.parametrize("target", TARGETS)
def test_static_parameters_agree_with_the_imported_signature(target):
    static = static_parameters(target)
    if static is None:
        return  # not readable for sure: the second pass imports it
    assert static == _parameters(target, "k", _Problems())


def test_most_bgexp_targets_are_read_statically():
    bgexp_targets = [t for t in TARGETS if t.startswith("bgexp.")]
    readable = [t for t in bgexp_targets if static_parameters(t) is not None]
    assert len(readable) >= len(bgexp_targets) - 3, sorted(set(bgexp_targets) - set(readable))


def test_what_cannot_be_read_for_sure_is_none():
    assert static_parameters("torch.optim.Adam") is None  # not a bgexp callable
    assert static_parameters("bgexp.targets.ice.IceTarget.from_config") is None  # a method
    assert static_parameters("bgexp.training.nowhere.Thing") is None
    assert static_parameters("bgexp.targets.NoSuchTarget") is None
    # a dataclass: its fields
    from bgexp.targets.dynamics import MDSettings

    assert static_parameters("bgexp.targets.dynamics.MDSettings") == set(inspect.signature(MDSettings).parameters)
