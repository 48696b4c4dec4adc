"""Reuse policies by name, as peft registers its methods: `LayerReuseConfig(policy=name)` looks them up here."""

from __future__ import annotations

_POLICIES: dict[str, type] = {}


def register_policy(cls: type) -> type:
    """Class decorator: make `cls` selectable as `LayerReuseConfig(policy=cls.name)`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a reuse policy needs a non-empty `name`, {cls.__name__} has {name!r}")
    if name in _POLICIES and _POLICIES[name] is not cls:
        raise ValueError(f"reuse policy {name!r} is already registered by {_POLICIES[name].__name__}")
    _POLICIES[name] = cls
    return cls


def unregister_policy(name: str) -> None:
    """Forget a policy registered from outside this package (tests that register their own)."""
    _POLICIES.pop(name, None)


def get_policy(name) -> type | None:
    """The policy class registered as `name`, or None."""
    return _POLICIES.get(name) if isinstance(name, str) else None


def policy_names() -> tuple[str, ...]:
    """Registered names, in registration order (the built-ins first)."""
    return tuple(_POLICIES)


def registered_policies() -> tuple[type, ...]:
    return tuple(_POLICIES.values())
