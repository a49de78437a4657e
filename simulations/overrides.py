"""`--set key=value` overrides for any dataclass config: one mechanism for every command.

Values are parsed by the type of the field's current value (bool, int, float, str, tuple of str),
and dotted keys reach into nested dataclasses (``objective.kd=0``). Unknown keys and unparsable
values are errors that name the valid choices.
"""

from __future__ import annotations

import dataclasses

from models.errors import FedrexError


def parse_value(raw: str, current, key: str):
    try:
        if isinstance(current, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise FedrexError(f"{key}={raw!r}: expected a {type(current).__name__}") from None
    return None if raw.lower() == "none" and current is None else raw


def apply_overrides(config, pairs: list[str]):
    """Return a copy of the dataclass ``config`` with ``key=value`` pairs applied."""
    for pair in pairs or []:
        if "=" not in pair:
            raise FedrexError(f"override {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        config = _set(config, key.strip().replace("-", "_").split("."), raw.strip(), key)
    return config


def _set(config, path: list[str], raw: str, full_key: str):
    names = {f.name for f in dataclasses.fields(config)}
    head = path[0]
    if head not in names:
        raise FedrexError(f"unknown setting {full_key!r}; valid: {', '.join(sorted(names))}")
    current = getattr(config, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise FedrexError(f"{full_key!r}: {head} has no sub-settings")
        return dataclasses.replace(config, **{head: _set(current, path[1:], raw, full_key)})
    return dataclasses.replace(config, **{head: parse_value(raw, current, full_key)})
