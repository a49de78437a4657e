"""Flower strategies, chosen by name, with FedREX's recording and reproducible sampling mixed in.

The mixin keeps each Flower strategy's own logic (FedProx's proximal-mu, FedAdam's server
optimizer, Krum's selection) and changes four things:
- what is aggregated: only the shared tensors travel (``models/protocol.py``), and the strategy
  aggregates each client's *update* (reply minus what was sent) rather than its weights, then
  adds the aggregate to the sent model in the sent dtype. Averaging identical weights is not
  exact in floating point; averaging zero updates is, so a round in which nobody learns returns
  the model bit for bit, for every strategy (FedAdam steps from zero in update space);
- sampling: clients are drawn by partition id from a generator seeded by (seed, global round), and
  the strategy is shown only those nodes, so the same config and seed pick the same clients;
- replies are sorted by partition id before aggregation, so floating-point sums do not depend on
  arrival order, and every reply (or failure) is handed to the Recorder;
- evaluation runs every ``evaluate-every`` rounds and always on the last one.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp import strategy as flwr_strategy

from models.protocol import ARRAYS, DETAILS, FROZEN
from models.run_settings import RunSettings

FLOWER_STRATEGIES = {
    "fedavg": flwr_strategy.FedAvg,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
}


class SampledGrid:
    """The grid as the strategy sees it: only the nodes FedREX sampled for this round."""

    def __init__(self, grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self):
        return list(self._node_ids)

    def __getattr__(self, name):
        return getattr(self._grid, name)


class ProgressGrid:
    """The grid handed to the strategy: ``send_and_receive`` pushes, then pulls replies itself so
    that a long round shows how many clients have answered (every ``every`` seconds, on stderr)."""

    def __init__(self, grid, every: float = 15.0, show: bool = True):
        self._grid, self.every, self.show = grid, every, show

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        phase = messages[0].metadata.message_type
        pending = set(self._grid.push_messages(messages))
        total, replies = len(pending), []
        start = last_shown = time.time()
        end = start + timeout if timeout is not None else float("inf")
        while pending and time.time() < end:
            for reply in self._grid.pull_messages(pending):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            now = time.time()
            if self.show and pending and now - last_shown >= self.every:
                print(f"    {phase}: {len(replies)}/{total} clients answered ({now - start:.0f}s)", file=sys.stderr,
                      flush=True)
                last_shown = now
            if pending:
                time.sleep(getattr(self._grid, "pull_interval", 0.1))
        return replies


def _count_only(records, weighting_key: str) -> MetricRecord:
    """Per-client metrics are recorded in full by the Recorder; Flower's log gets the count."""
    return MetricRecord({"clients": len(records)})


def reply_details(msg) -> dict:
    return json.loads(str(msg.content.config_records[DETAILS]["json"]))


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})  # keeps 0-d shapes


class RecordingMixin:
    recorder = None  # set by make_strategy
    settings: RunSettings
    frozen: ArrayRecord  # the artifact's non-shared tensors, attached to every message
    _sent: dict[str, np.ndarray] | None = None

    def _attach_frozen(self, messages) -> list:
        messages = list(messages)
        for msg in messages:  # Flower's strategies share one RecordDict between messages
            msg.content[FROZEN] = self.frozen
        return messages

    def _as_update(self, msg) -> str | None:
        """Replace the reply's weights by its update (reply - sent), in place; a reason when the
        reply does not carry exactly the sent tensors."""
        if ARRAYS not in msg.content.array_records:
            return "reply carries no weights"
        got = _numpy(msg.content.array_records[ARRAYS])
        if set(got) != set(self._sent):
            return f"reply tensors {sorted(set(got) ^ set(self._sent))[:3]} differ from the sent ones"
        bad = [k for k, v in got.items() if v.shape != self._sent[k].shape or v.dtype != self._sent[k].dtype]
        if bad:
            return f"reply tensor {bad[0]!r} has another shape or dtype than was sent"
        msg.content[ARRAYS] = _record({k: v - self._sent[k] for k, v in got.items()})
        return None

    def _sample(self, grid, server_round: int, fraction: float, minimum: int, salt: int) -> list[int]:
        nodes = self.recorder.partition_of  # node id -> partition id, from the query stage
        available = sorted((pid, node) for node, pid in nodes.items() if node in set(grid.get_node_ids()))
        if not available:
            return []
        count = min(len(available), max(minimum, int(len(available) * fraction)))
        rng = np.random.default_rng([self.settings.seed, self.recorder.global_round(server_round), salt])
        chosen = rng.choice(len(available), size=count, replace=False)
        return [available[i][1] for i in sorted(chosen)]

    def configure_train(self, server_round, arrays, config, grid):
        nodes = self._sample(grid, server_round, self.settings.fraction_train, self.settings.min_train_clients, 0)
        config["global-round"] = self.recorder.global_round(server_round)
        self.recorder.note_sampled(server_round, "train", nodes)
        self._sent = _numpy(arrays)
        return self._attach_frozen(super().configure_train(server_round, arrays, config, SampledGrid(grid, nodes)))

    def aggregate_train(self, server_round, replies):
        replies = self.recorder.on_replies(server_round, "train", list(replies))
        usable = []
        for msg in replies:
            problem = None if msg.has_error() else self._as_update(msg)
            if problem:
                self.recorder.reject(server_round, msg, problem)
            else:
                usable.append(msg)
        current = getattr(self, "current_arrays", None)
        if current is not None:  # server optimizers (FedAdam, FedAvgM) step from 0 in update space
            zeros = {k: np.zeros_like(v) for k, v in self._sent.items()}
            self.current_arrays = _record(zeros) if isinstance(current, ArrayRecord) else zeros
        update, metrics = super().aggregate_train(server_round, usable)
        if update is None:
            return None, metrics
        step = _numpy(update)
        return _record({k: (v + step[k]).astype(v.dtype) for k, v in self._sent.items()}), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        global_round = self.recorder.global_round(server_round)
        if global_round % self.settings.evaluate_every and global_round != self.settings.num_rounds:
            return []
        if self.settings.fraction_evaluate == 0:
            return []
        nodes = self._sample(grid, server_round, self.settings.fraction_evaluate, 1, 1)
        config["global-round"] = global_round
        self.recorder.note_sampled(server_round, "evaluate", nodes)
        return self._attach_frozen(super().configure_evaluate(server_round, arrays, config, SampledGrid(grid, nodes)))

    def aggregate_evaluate(self, server_round, replies):
        replies = self.recorder.on_replies(server_round, "evaluate", list(replies))
        return super().aggregate_evaluate(server_round, replies)


def make_strategy(settings: RunSettings, recorder, frozen: dict):
    """An instance of the named Flower strategy with the recording mixin in front; ``frozen``:
    the global model's tensors that are sent down but never aggregated."""
    base = FLOWER_STRATEGIES[settings.strategy]
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1, train_metrics_aggr_fn=_count_only, evaluate_metrics_aggr_fn=_count_only)
    if settings.strategy == "fedprox":
        kwargs["proximal_mu"] = settings.proximal_mu
    elif settings.strategy == "fedavgm":
        kwargs.update(server_learning_rate=1.0, server_momentum=settings.server_momentum)
    elif settings.strategy == "fedadam":
        kwargs.update(eta=settings.server_lr, eta_l=settings.lr)
    elif settings.strategy == "fedtrimmedavg":
        kwargs["beta"] = settings.trimmed_beta
    elif settings.strategy == "krum":
        kwargs["num_malicious_nodes"] = settings.krum_byzantine
    cls = type(f"Recording{base.__name__}", (RecordingMixin, base), {})
    strategy = cls(**kwargs)
    strategy.recorder, strategy.settings, strategy.frozen = recorder, settings, ArrayRecord(frozen)
    return strategy
