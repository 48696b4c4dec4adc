"""Reuse policies, one file each, registered by name (`registry.py`).

The built-ins are imported first, in the order error messages list them; every other module of
this folder is imported after them, so a new policy is one new file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Decision, ReusePolicy, RowState, StepCountPolicy
from .registry import get_policy, policy_names, register_policy, registered_policies, unregister_policy

BUILT_IN = ("fixed", "unmask_drift", "per_layer")
_NOT_POLICIES = {"base", "registry"}
for _module in BUILT_IN + tuple(sorted(m.name for m in pkgutil.iter_modules(__path__))):
    if _module not in _NOT_POLICIES:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Decision", "ReusePolicy", "RowState", "StepCountPolicy", "get_policy", "make_policy", "policy_names",
           "register_policy", "registered_policies", "unregister_policy"]


def make_policy(config, small_block_size: int, num_targets: int) -> ReusePolicy:
    """The config's policy, built for one decode."""
    return get_policy(config.policy)(config, small_block_size, num_targets)
