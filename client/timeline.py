"""Where a message's time goes on a device: one DEBUG line of Flower's log per step of the
ClientApp's work ("[fedrex] train: rows read and encoded"), which ``FLWR_LOG_LEVEL=DEBUG`` prints
with a timestamp beside Flower's own steps (the SuperNode receiving the message, the
``flwr-clientapp`` process starting, the app loading, the reply leaving). At any other level a mark
costs one level check. ``benchmarks/device_shape.py`` reads them into its per-message profile.
On a device a message is one user's; a simulated pool node's evaluation for several users marks
each user's steps in turn."""

from __future__ import annotations

from logging import DEBUG

from flwr.common.logger import log

PREFIX = "[fedrex]"


def mark(kind: str, step: str) -> None:
    """``step`` of a ``kind`` (query, train, evaluate) message is done."""
    log(DEBUG, "%s %s: %s", PREFIX, kind, step)
