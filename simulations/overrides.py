"""`--set key=value` overrides for any dataclass config (the distillation's `DistillConfig`).

Values are parsed by ``models.run_settings.parse_value``, the one key=value parser (by the type
of the field's current value), and dotted keys reach into nested dataclasses (``objective.kd=0``).
Unknown keys and unparsable values are errors that name the valid choices.
"""

from __future__ import annotations

import dataclasses

from models.errors import FedrexError
from models.run_settings import parse_value, split_pairs


def apply_overrides(config, pairs: list[str]):
    """Return a copy of the dataclass ``config`` with ``key=value`` pairs applied."""
    for key, raw in split_pairs(pairs, "override").items():
        config = _set(config, key.replace("-", "_").split("."), raw, key)
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
