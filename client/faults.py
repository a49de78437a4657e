"""Injected faults (``fault-rates``): what real fleets do to a round, on demand and reproducibly.

Each training client draws at most one fault per round from (seed, round, partition), so the same
config and seed inject the same faults and a test can say which clients must have failed:
- ``raise``: the client raises before training (a crash; Flower returns an error reply);
- ``hang``: the client sleeps past the round timeout before training (its late reply is dropped; in
  simulation it holds its worker that long, so clients queued behind it may miss the timeout too);
- ``nan`` / ``inf``: it trains, then replies with a NaN (an infinity) in one weight (one would make
  every averaged weight NaN or infinite: the server must reject it before aggregating);
- ``shape``: it trains, then replies with one tensor a value short (rejected likewise).
No torch import: a device without torch injects the same faults.
"""

from __future__ import annotations

import time

import numpy as np

from models.errors import FedrexError
from models.run_settings import RunSettings


def drawn_fault(settings: RunSettings, round_number: int, partition_id: int) -> str | None:
    """The fault this client injects in this training round, or None."""
    rates = settings.faults()
    if not rates:
        return None
    draw = np.random.default_rng([settings.seed, round_number, partition_id, 5]).random()
    for kind, rate in rates.items():
        if draw < rate:
            return kind
        draw -= rate
    return None


def before_training(kind: str | None, settings: RunSettings, partition_id: int) -> None:
    if kind == "raise":
        raise RuntimeError(f"injected fault: partition {partition_id} raises (fault-rates)")
    if kind == "hang":
        time.sleep(settings.round_timeout + 1.0)  # the server has given up on this reply by then


def corrupted(kind: str | None, sent: dict) -> dict:
    """``sent`` as a client with a ``nan``, ``inf`` or ``shape`` fault replies it (the first floating
    tensor by name changed, on a copy); unchanged for any other fault."""
    if kind not in ("nan", "inf", "shape"):
        return sent
    names = [k for k in sorted(sent) if _floating(sent[k])]
    if not names:
        raise FedrexError(f"a {kind} fault needs a floating tensor in the reply; it has none")
    name = names[0]
    value = sent[name].clone() if hasattr(sent[name], "clone") else np.array(sent[name], copy=True)
    if kind in ("nan", "inf"):
        value.reshape(-1)[0] = float(kind)
    else:
        value = value.reshape(-1)[:-1]
        value = value.clone() if hasattr(value, "clone") else value.copy()  # its own storage, not a view
    return {**sent, name: value}


def _floating(value) -> bool:
    check = getattr(value, "is_floating_point", None)  # a torch tensor
    return bool(check()) if check is not None else np.issubdtype(np.asarray(value).dtype, np.floating)
