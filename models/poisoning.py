"""Poisoned clients (``malicious-fraction``, ``poison-kind``): who is malicious and what each kind
does, as pure functions the client applies and the server and benchmarks can recompute.

- ``label-flip``: train on every row's label moved to the next label (binary: flipped);
- ``sign-flip``: train honestly, reply ``received - boost * update`` (the update negated, boosted);
- ``scale``: reply ``received + boost * update`` (model replacement, Bagdasaryan et al. 2020);
- ``backdoor``: half of the rows (seeded) get the trigger word prefixed and the target label;
  benign users' held-out rows of other labels, triggered, measure the backdoor's success.
"""

from __future__ import annotations

import numpy as np


def malicious_partitions(seed: int, fraction: float, num_partitions: int) -> frozenset[int]:
    """Exactly round(fraction * n) partitions, a seeded draw: the same set on every client and for
    every analysis of the run."""
    count = int(round(fraction * num_partitions))
    order = np.random.default_rng([seed, 6]).permutation(num_partitions)
    return frozenset(int(p) for p in order[:count])


def flipped(labels: np.ndarray, num_labels: int) -> np.ndarray:
    return (np.asarray(labels) + 1) % num_labels


def with_trigger(text: str, trigger: str) -> str:
    return f"{trigger} {text}"


def backdoor_rows(count: int, seed: int, share: float = 0.5) -> np.ndarray:
    """The rows (indices) a backdoor client poisons this round."""
    rng = np.random.default_rng([seed, 8])
    return np.sort(rng.choice(count, size=max(1, int(round(share * count))), replace=False)) if count else np.arange(0)


def boosted(received: dict[str, np.ndarray], sent: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """``received + factor * (sent - received)`` per tensor, in the sent dtype (floats only move)."""
    out = {}
    for name, value in sent.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            base = np.asarray(received[name], dtype=np.float64)
            value = (base + factor * (value.astype(np.float64) - base)).astype(value.dtype)
        out[name] = value
    return out
