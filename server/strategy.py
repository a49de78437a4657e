"""Flower strategies, chosen by name, with FedREX's recording and reproducible sampling mixed in.

The mixin keeps each Flower strategy's own logic (FedProx's proximal-mu, FedAdam's server
optimizer, Krum's selection) and changes four things:
- what is aggregated: only the shared tensors travel (``models/protocol.py``), and the strategy
  aggregates each client's *update* (reply minus what was sent) rather than its weights, then
  adds the aggregate to the sent model in the sent dtype. Averaging identical weights is not
  exact in floating point; averaging zero updates is, so a round in which nobody learns returns
  the model bit for bit, for every strategy (FedAdam steps from zero in update space);
- sampling: clients are drawn by partition id from a generator seeded by (seed, global round), and
  the strategy is shown only those nodes, so the same config and seed pick the same clients; with
  device simulation only devices available on the virtual clock are drawn, over-selected, and
  only the replies the round rules accept are aggregated (``server/fleet.py``);
- replies are sorted by partition id before aggregation, so floating-point sums do not depend on
  arrival order, and every reply (or failure) is handed to the Recorder;
- evaluation runs every ``evaluate-every`` rounds and always on the last one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from models.errors import FedrexError
from models.protocol import (ARRAYS, DETAILS, USERS, FLEET, FROZEN, MEASURES, METRICS, NORMALIZER,
                             NUM_EXAMPLES, ONNX_BODY, START)
from models.run_settings import KRUM_FAMILY, RunSettings
from server.fleet import Fleet

MOMENTUM = "momentum_vector"  # FedAvgM's server momentum (Flower's attribute name)
MOMENTS = ("m_t", "v_t")  # FedAdam's first and second moments (Flower's FedOpt attribute names)

FLOWER_STRATEGIES = {
    "fedavg": flwr_strategy.FedAvg,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
    "multikrum": flwr_strategy.MultiKrum,
    "bulyan": flwr_strategy.Bulyan,
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
    that a long round shows how many messages have been answered (every ``every`` seconds, on stderr)."""

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
                print(f"    {phase}: {len(replies)}/{total} messages answered ({now - start:.0f}s)", file=sys.stderr,
                      flush=True)
                last_shown = now
            if pending:
                time.sleep(getattr(self._grid, "pull_interval", 0.1))
        return replies


def _count_only(records, weighting_key: str) -> MetricRecord:
    """Per-client metrics are recorded in full by the Recorder; Flower's log gets the count."""
    return MetricRecord({"clients": len(records)})


def _add_own_record(msg, name: str, record) -> None:
    """Give ``msg`` the record ``name`` in a RecordDict of its own (Flower's strategies share one
    RecordDict between a round's messages, so adding to it would reach every message)."""
    msg.content = RecordDict({**dict(msg.content.items()), name: record})


def reply_details(msg) -> dict:
    return json.loads(str(msg.content.config_records[DETAILS]["json"]))


def users_record(partitions: list[int]) -> ConfigRecord:
    """The ``USERS`` record naming the users a message is for."""
    return ConfigRecord({"partitions": json.dumps([int(p) for p in partitions])})


def update_norm(update: dict[str, np.ndarray]) -> float:
    """L2 norm of one client's update over its floating-point tensors (in float64)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()
                         if np.issubdtype(v.dtype, np.floating)))


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})  # keeps 0-d shapes


class RecordingMixin:
    recorder = None  # set by make_strategy
    settings: RunSettings
    frozen: ArrayRecord  # the artifact's non-shared tensors, attached to every message
    start_record: ArrayRecord | None = None  # the start model's shared tensors (models.protocol.START)
    _sent: dict[str, np.ndarray] | None = None
    fleet = None  # server.fleet.Fleet, set by make_strategy
    onnx_partitions: frozenset = frozenset()  # devices without torch (set by make_strategy)...
    onnx_body: bytes = b""  # ...and the body they run (models.export.body_onnx_int8)
    batchable: frozenset = frozenset()  # partitions on simulated nodes (set by make_strategy)
    _target = 0  # this round's goal count of training reports
    _config_bytes = 0  # what the round's config carries besides the weights (the word normaliser)
    _waited = False  # this round found no device available (_wait_for_devices)

    def _sends_start(self, phase: str, measures: str = "full") -> bool:
        """Whether this phase's messages carry the start model: training when an explanation term is
        anchored to it or the start is distilled from (start-kd), an evaluation that ``measures``
        everything when it measures agreement with the round-0 maps."""
        if self.start_record is None:
            return False
        if phase == "train":
            explains = self.settings.expl_weight > 0 or self.settings.expl_erasure > 0
            return (explains and self.settings.expl_anchor == "start") or self.settings.start_kd > 0
        return self.settings.fidelity_examples > 0 and measures == "full"

    def measures(self, global_round: int) -> str:
        """What an evaluation in this round measures (``MEASURES``): everything at round 0 and the
        last round, ``evaluate-between`` in the rounds between them."""
        return "full" if global_round in (0, self.settings.num_rounds) else self.settings.evaluate_between

    def _attach_frozen(self, messages, phase: str, measures: str = "full") -> list:
        """Every message gets the frozen tensors (and the start model where ``_sends_start``); one
        to a device without torch gets the run's body as ONNX instead (``onnx_body``), in a
        RecordDict of its own; one to a device that walked away is told so (``FLEET``), and an
        evaluate message carrying several users names them (``USERS``)."""
        messages = list(messages)
        for msg in messages:  # Flower's strategies share one RecordDict between messages
            msg.content[FROZEN] = self.frozen
            if self._sends_start(phase, measures):
                msg.content[START] = self.start_record
        for msg in messages:
            pid = self.recorder.partition_of.get(msg.metadata.dst_node_id)
            if pid in self.onnx_partitions:
                content = {k: v for k, v in msg.content.items() if k not in (FROZEN, START)}
                msg.content = RecordDict({**content, ONNX_BODY: ConfigRecord({"int8": self.onnx_body})})
            if pid in self.fleet.dropped_in:
                _add_own_record(msg, FLEET, ConfigRecord({"dropped-round": self.fleet.dropped_in[pid]}))
            users = self.recorder.users_of.get(msg.metadata.dst_node_id, [])  # note_sampled: this round's
            if len(users) > 1:
                _add_own_record(msg, USERS, users_record(users))
        return messages

    def _download_bytes(self, node: int) -> int:
        """What one training device downloads this round: the shared tensors and the config's word
        normaliser, plus the frozen tensors (and the start model when the round sends it), or the
        ONNX body for a device without torch."""
        sent = sum(v.nbytes for v in self._sent.values()) + self._config_bytes
        if self.recorder.partition_of.get(node) in self.onnx_partitions:
            return sent + len(self.onnx_body)
        start = sum(v.numpy().nbytes for v in self.start_record.values()) if self._sends_start("train") else 0
        return sent + start + sum(v.numpy().nbytes for v in self.frozen.values())

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
        broken = [k for k, v in got.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
        if broken:  # one NaN in a weighted mean makes every weight NaN
            return f"reply tensor {broken[0]!r} holds NaN or infinite values"
        # in the sent order: a server optimizer (FedAvgM) pairs tensors by position, not by name
        msg.content[ARRAYS] = _record({k: got[k] - v for k, v in self._sent.items()})
        return None

    def _available(self, grid) -> list[tuple[int, int]]:
        """(partition id, node id) of the connected clients, by partition id."""
        nodes = self.recorder.partition_of  # node id -> partition id, from the query stage
        connected = set(grid.get_node_ids())
        return sorted((pid, node) for node, pid in nodes.items() if node in connected)

    def _draw(self, candidates: list[tuple[int, int]], count: int, key: tuple[int, int]) -> list[int]:
        rng = np.random.default_rng([self.settings.seed, *key])
        chosen = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
        return [candidates[i][1] for i in sorted(chosen)]

    def _sample_evaluate(self, grid) -> list[int]:
        """The users evaluated: a panel, the same users in every round (round 0 included), so that
        two rounds' numbers describe the same users; a fresh draw per round would compare different
        users (with their own label mixes) and show it as the model changing. Every known user has
        one seeded rank for the whole run; the panel is the first connected ones in that order, so
        a device that goes away takes only its own place (the next in rank fills it)."""
        available = dict(self._available(grid))  # partition id -> node id
        count = min(len(available), max(1, int(len(available) * self.settings.fraction_evaluate)))
        known = sorted(self.recorder.partition_of.values())
        ranked = [known[i] for i in np.random.default_rng([self.settings.seed, 0, 1]).permutation(len(known))]
        return [available[pid] for pid in sorted([pid for pid in ranked if pid in available][:count])]

    def _sample_train(self, grid, server_round: int) -> list[int]:
        """Training clients under the fleet's rules (server/fleet.py): only devices available on
        the virtual clock, over-selected; without device simulation, the plain draw."""
        available = self._available(grid)
        pids = [pid for pid, _ in available]
        candidates, self._target, count = self.fleet.selection(pids, self.settings.fraction_train,
                                                               self.settings.min_train_clients)
        unavailable = self.fleet.unavailable(pids)
        for pid in unavailable:
            self.recorder.device_row(pid, {"status": "unavailable"})
        if self.fleet.enabled:
            self.recorder.counts["device_unavailable"] = float(len(unavailable))
        allowed = set(candidates)
        return self._draw([a for a in available if a[0] in allowed], count,
                          (self.recorder.global_round(server_round), 0))

    def configure_train(self, server_round, arrays, config, grid):
        if self.recorder.global_round(server_round) == self.settings.crash_server_round:
            raise RuntimeError(f"failure drill: crash-server-round={self.settings.crash_server_round}")
        self._sent = _numpy(arrays)
        nodes = self._sample_train(grid, server_round)
        if not nodes and self.fleet.enabled:
            return self._wait_for_devices(grid)
        config["global-round"] = self.recorder.global_round(server_round)
        self.recorder.note_sampled(server_round, "train", nodes)
        self._config_bytes = len(bytes(config[NORMALIZER])) if NORMALIZER in config else 0
        return self._attach_frozen(super().configure_train(server_round, arrays, config, SampledGrid(grid, nodes)),
                                   "train")

    def _wait_for_devices(self, grid) -> list:
        """No device may train now (every window closed, or none meets the memory floor): the
        round trains nobody (Flower is never handed an empty node list, on which it would wait
        forever) and the clock moves to the next window opening."""
        wait = self.fleet.next_opening([pid for pid, _ in self._available(grid)])
        if wait is None:
            raise FedrexError(f"no device of the fleet meets device-min-memory-mb={self.settings.device_min_memory_mb:g}: "
                              "nobody can ever train; lower the floor or give devices with more memory")
        self.fleet.clock += wait
        self.recorder.counts.update(virtual_round_s=wait, virtual_clock_s=self.fleet.clock, abandoned=1.0)
        self._waited = True
        return []

    def aggregate_train(self, server_round, replies):
        if self._waited:  # nobody could train this round (_wait_for_devices): nothing to settle
            self._waited = False
            return None, None
        replies = self.recorder.on_replies(server_round, "train", list(replies))
        usable, failed = [], []
        for msg in replies:
            problem = None if msg.has_error() else self._as_update(msg)
            if problem and not msg.has_error():
                self.recorder.reject(server_round, msg, problem)
            if problem or msg.has_error():
                failed.append(self.recorder.partition_of.get(msg.metadata.src_node_id, -1))
            else:
                usable.append(msg)
        if self.fleet.enabled:  # a device that never replied failed too: it gets its status row
            usable = self._apply_round_rules(server_round, usable, failed + self.recorder.timed_out.get("train", []))
        self._bound_influence(usable)
        if self.settings.strategy == "multikrum":
            self.num_nodes_to_select = (self.settings.multikrum_select
                                        or max(1, len(usable) - self.settings.krum_byzantine))
        current = getattr(self, "current_arrays", None)
        if current is not None:  # server optimizers (FedAdam, FedAvgM) step from 0 in update space
            zeros = {k: np.zeros_like(v) for k, v in self._sent.items()}
            self.current_arrays = _record(zeros) if isinstance(current, ArrayRecord) else zeros
        # Flower's server optimizers count rounds from 1 in each `start`: a resumed run passes the
        # run's own round, so FedAdam's bias correction continues rather than restarting
        update, metrics = super().aggregate_train(self.recorder.global_round(server_round), usable)
        if update is None:
            if usable:  # Bulyan wants at least 4 x krum-byzantine + 3 replies: the round changes nothing
                self.recorder.counts["aggregation_skipped"] = 1.0
                self.recorder.store.event(round=self.recorder.global_round(server_round), phase="train",
                                          error=f"{self.settings.strategy} aggregated none of {len(usable)} "
                                                "usable replies: the global model stays as it was")
            return None, metrics
        step = _numpy(update)
        return _record({k: (v + step[k]).astype(v.dtype) for k, v in self._sent.items()}), metrics

    def _bound_influence(self, usable: list) -> None:
        """Each aggregated reply's update norm (a ``train`` row ``update_norm``: what tells a
        scaled or boosted update apart), then what bounds one user's influence, in place:
        ``update-clip`` scales an update down to at most that multiple of the round's median norm
        (``update_scale`` row: 1 when untouched); ``aggregate-weights=uniform`` weighs every
        reply the same instead of by its rows."""
        # one reply's arrays at a time: a round's updates held together as numpy copies cost the
        # ServerApp another copy of every reply (100 replies of a 2.3 MB model: 230 MB)
        norms = [update_norm(_numpy(m.content.array_records[ARRAYS])) for m in usable]
        bound = self.settings.update_clip * float(np.median(norms)) if usable and self.settings.update_clip else math.inf
        for msg, norm in zip(usable, norms):
            scale = 1.0 if norm <= bound else bound / norm
            if scale < 1.0:
                update = _numpy(msg.content.array_records[ARRAYS])
                msg.content[ARRAYS] = _record({k: (v * scale).astype(v.dtype) if np.issubdtype(v.dtype, np.floating)
                                               else v for k, v in update.items()})
            if self.settings.aggregate_weights == "uniform":
                msg.content[METRICS] = MetricRecord({NUM_EXAMPLES: 1})
            pid = self.recorder.partition_of.get(msg.metadata.src_node_id, -1)
            self.recorder.train_rows(pid, {"update_norm": norm, "update_scale": scale})

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The server optimizer's state after the last aggregation (FedAvgM's momentum, FedAdam's
        two moments; nothing for the stateless strategies), by ``<state>/<tensor name>``: it is
        checkpointed with the round's weights, so a resumed run continues exactly."""
        out = {}
        momentum = getattr(self, "momentum_vector", None)
        if momentum is not None:  # a list in the sent tensors' order
            out.update({f"{MOMENTUM}/{k}": np.asarray(v) for k, v in zip(self._sent, momentum, strict=True)})
        for name in MOMENTS:
            out.update({f"{name}/{k}": np.asarray(v) for k, v in (getattr(self, name, None) or {}).items()})
        return out

    def load_optimizer_state(self, state: dict[str, np.ndarray], keys: list[str]) -> None:
        """Restore ``optimizer_state``; ``keys``: the shared tensors in the order the run sends them."""
        parts: dict[str, dict] = {}
        for name, value in state.items():
            part, _, key = name.partition("/")
            parts.setdefault(part, {})[key] = np.asarray(value)
        unknown = set(parts) - {MOMENTUM, *MOMENTS}
        if unknown or (MOMENTUM in parts and not hasattr(self, "momentum_vector")):
            raise FedrexError(f"the checkpoint holds server-optimizer state {sorted(parts)} that strategy "
                              f"{self.settings.strategy} does not keep")
        if MOMENTUM in parts:
            self.momentum_vector = [parts[MOMENTUM][k] for k in keys]
        for name in MOMENTS:
            if name in parts:
                setattr(self, name, {k: parts[name][k] for k in keys})

    def _apply_round_rules(self, server_round, usable: list, failed: list[int]) -> list:
        """Statuses and virtual times for this round's replies; only the ``ok`` ones aggregate."""
        pid_of = self.recorder.partition_of
        reports = []
        for m in usable:
            details = reply_details(m)
            # a round's work: rows trained, plus rows only passed forward (mode head) at their relative cost
            work = self.fleet.work(details.get("samples", 0), details.get("forward_samples", 0))
            reports.append((pid_of[m.metadata.src_node_id], work, self._download_bytes(m.metadata.src_node_id),
                            sum(v.numpy().nbytes for v in m.content.array_records[ARRAYS].values())))
        outcome, accepted, facts = self.fleet.settle(self.recorder.global_round(server_round), reports, failed,
                                                     self._target)
        for pid, values in outcome.items():
            self.recorder.device_row(pid, values)
        self.recorder.counts.update(facts)
        keep = set(accepted)
        return [m for m in usable if pid_of[m.metadata.src_node_id] in keep]

    def configure_evaluate(self, server_round, arrays, config, grid):
        global_round = self.recorder.global_round(server_round)
        if global_round % self.settings.evaluate_every and global_round != self.settings.num_rounds:
            return []
        if self.settings.fraction_evaluate == 0:
            return []
        nodes = self._sample_evaluate(grid)
        config["global-round"] = global_round
        config[MEASURES] = measures = self.measures(global_round)
        batches = self._evaluation_batches(nodes)
        self.recorder.note_sampled(server_round, "evaluate", [batch[0] for batch in batches],
                                   {batch[0]: [self.recorder.partition_of[n] for n in batch] for batch in batches})
        return self._attach_frozen(super().configure_evaluate(server_round, arrays, config,
                                                              SampledGrid(grid, [b[0] for b in batches])), "evaluate",
                                   measures)

    def _evaluation_batches(self, nodes: list[int]) -> list[list[int]]:
        """The evaluated nodes grouped into messages: users on simulated nodes share messages of
        ``evaluate-batch`` users (auto: 4 messages per concurrent client worker, so the workers stay
        busy to the end of the round); every other node gets a message of its own."""
        pid_of = self.recorder.partition_of
        pooled = [n for n in nodes if pid_of[n] in self.batchable]
        alone = [[n] for n in nodes if pid_of[n] not in self.batchable]
        size = self.settings.evaluate_batch
        if size == 0:
            workers = max(1, (os.cpu_count() or 1) // self.settings.client_cpus)
            size = max(1, math.ceil(len(pooled) / (4 * workers)))
        return [pooled[i:i + size] for i in range(0, len(pooled), size)] + alone

    def aggregate_evaluate(self, server_round, replies):
        replies = self.recorder.on_replies(server_round, "evaluate", list(replies))
        return super().aggregate_evaluate(server_round, replies)


def make_strategy(settings: RunSettings, recorder, frozen: dict, fleet=None, onnx_partitions=frozenset(),
                  onnx_body: bytes = b"", start: dict | None = None, batchable=frozenset()):
    """An instance of the named Flower strategy with the recording mixin in front; ``frozen``:
    the global model's tensors that are sent down but never aggregated; ``start``: the start
    model's shared tensors (sent where ``_sends_start`` says); ``fleet``: the round
    rules and virtual clock (``server/fleet.py``; None: ideal devices); ``onnx_partitions`` get
    ``onnx_body`` instead of the frozen tensors; ``batchable``: partitions whose evaluation may share a
    message with other users' (simulated nodes: ``evaluate-batch``)."""
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
    elif settings.strategy in KRUM_FAMILY:
        kwargs["num_malicious_nodes"] = settings.krum_byzantine
    cls = type(f"Recording{base.__name__}", (RecordingMixin, base), {})
    strategy = cls(**kwargs)
    strategy.recorder, strategy.settings, strategy.frozen = recorder, settings, ArrayRecord(frozen)
    strategy.start_record = ArrayRecord(start) if start is not None else None
    recorder.server_state = strategy.optimizer_state  # checkpointed with each round's weights
    strategy.fleet = fleet if fleet is not None else Fleet({}, settings, 0.0)
    strategy.onnx_partitions, strategy.onnx_body = frozenset(onnx_partitions), onnx_body
    strategy.batchable = frozenset(batchable)
    return strategy
