"""Flower strategies, chosen by name, with FedREX's recording and reproducible sampling mixed in.

The mixin keeps each Flower strategy's own logic (FedProx's proximal-mu, FedAdam's server
optimizer, Krum's selection) and changes three things:
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
from flwr.app import MetricRecord
from flwr.serverapp import strategy as flwr_strategy

from models.run_settings import RunSettings

FLOWER_STRATEGIES = {
    "fedavg": flwr_strategy.FedAvg,
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
    return json.loads(str(msg.content.config_records["details"]["json"]))


class RecordingMixin:
    recorder = None  # set by make_strategy
    settings: RunSettings

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
        return super().configure_train(server_round, arrays, config, SampledGrid(grid, nodes))

    def aggregate_train(self, server_round, replies):
        replies = self.recorder.on_replies(server_round, "train", list(replies))
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        global_round = self.recorder.global_round(server_round)
        if global_round % self.settings.evaluate_every and global_round != self.settings.num_rounds:
            return []
        if self.settings.fraction_evaluate == 0:
            return []
        nodes = self._sample(grid, server_round, self.settings.fraction_evaluate, 1, 1)
        config["global-round"] = global_round
        self.recorder.note_sampled(server_round, "evaluate", nodes)
        return super().configure_evaluate(server_round, arrays, config, SampledGrid(grid, nodes))

    def aggregate_evaluate(self, server_round, replies):
        replies = self.recorder.on_replies(server_round, "evaluate", list(replies))
        return super().aggregate_evaluate(server_round, replies)


def make_strategy(settings: RunSettings, recorder):
    """An instance of the named Flower strategy with the recording mixin in front."""
    base = FLOWER_STRATEGIES[settings.strategy]
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1, train_metrics_aggr_fn=_count_only, evaluate_metrics_aggr_fn=_count_only)
    if settings.strategy == "fedprox":
        kwargs["proximal_mu"] = settings.proximal_mu
    elif settings.strategy == "fedadam":
        kwargs.update(eta=settings.server_lr, eta_l=settings.lr)
    elif settings.strategy == "fedtrimmedavg":
        kwargs["beta"] = settings.trimmed_beta
    elif settings.strategy == "krum":
        kwargs["num_malicious_nodes"] = settings.krum_byzantine
    cls = type(f"Recording{base.__name__}", (RecordingMixin, base), {})
    strategy = cls(**kwargs)
    strategy.recorder, strategy.settings = recorder, settings
    return strategy
