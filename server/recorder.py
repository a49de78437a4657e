"""Turns every client's reply (or failure) into tidy rows and commits each round to the RunStore.

Flower calls ``commit`` (as the strategy's ``evaluate_fn``) after each round's training and
evaluation: that is the moment a round is complete, so it is the one place outputs are persisted.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from models.protocol import DETAILS, DEVICE, DEVICE_STATUSES, split_metric_key
from server.aggregate import ci95
from server.strategy import reply_details
from server.store import RunStore


def evaluation_summary(rows: pd.DataFrame) -> list[str]:
    """Per model: pooled accuracy over every evaluated row, mean per-user accuracy with its 95%
    interval, and (binary tasks) the share of rows called positive against the true share.
    Per-user medians of 1-2 test rows are noise; these are not."""
    n_test = rows[(rows["model"] == "client") & (rows["metric"] == "n_test")].set_index("client_id")["value"]
    truth = rows[(rows["model"] == "client") & (rows["metric"] == "test_positive")].set_index("client_id")["value"]
    parts = []
    for model in ("global", "personal"):
        acc = rows[(rows["model"] == model) & (rows["metric"] == "acc")].set_index("client_id")["value"].dropna()
        if not len(acc):
            continue
        weights = n_test.reindex(acc.index).fillna(0).to_numpy()
        pooled = float(np.average(acc, weights=weights)) if weights.sum() else float("nan")
        text = f"{model} pooled {pooled:.3f} mean {acc.mean():.3f}±{ci95(acc.to_numpy()):.3f}"
        pos = rows[(rows["model"] == model) & (rows["metric"] == "pred_positive")].set_index("client_id")["value"]
        if len(pos) and len(truth) and weights.sum():
            w = n_test.reindex(pos.index).fillna(0).to_numpy()
            text += (f" positive {np.average(pos, weights=w):.2f}"
                     f" (true {np.average(truth.reindex(pos.index).fillna(0), weights=w):.2f})")
        parts.append(text)
    return parts


class Recorder:
    def __init__(self, store: RunStore, settings, offset: int, partition_of: dict[int, int],
                 client_of: dict[int, str], frozen: dict, show_progress: bool = True):
        self.store, self.settings, self.offset = store, settings, offset
        self.frozen = frozen  # the artifact's non-shared tensors: checkpoints hold the whole model
        self.partition_of, self.client_of = partition_of, client_of
        self.show_progress = show_progress
        self.server_state = dict  # the strategy's optimizer_state (set by make_strategy)
        self._reset()

    def _reset(self) -> None:
        """A new round: no rows, no counts, and nobody expected to answer yet (a round whose
        evaluation is skipped must not wait for the last evaluated round's clients)."""
        self.rows: list[dict] = []
        self.counts: dict[str, float] = {}
        self.expected: dict[str, set] = {}
        self.users_of: dict[int, list[int]] = {}  # node -> the users its evaluate message carries
        self.timed_out: dict[str, list[int]] = {}  # per phase: sampled pids that never replied
        self.started = time.time()

    def global_round(self, server_round: int) -> int:
        return self.offset + server_round

    def note_sampled(self, server_round: int, phase: str, nodes: list[int],
                     users_of: dict[int, list[int]] | None = None) -> None:
        """``nodes``: those sent a message; ``users_of``: the users each one's message carries
        (several in a simulation's evaluation; by default each node's own)."""
        self.users_of = users_of or {}
        self.counts[f"{phase}_sampled"] = sum(len(self._users(node)) for node in nodes)
        self.counts[f"{phase}_messages"] = len(nodes)
        self.expected[phase] = set(nodes)
        self.store.progress(self.global_round(server_round), phase, users=int(self.counts[f"{phase}_sampled"]),
                            messages=len(nodes))

    def _users(self, node: int) -> list[int]:
        return self.users_of.get(node) or [self.partition_of.get(node, -1)]

    def device_row(self, partition_id: int, outcome: dict) -> None:
        """One client's device status (a position in DEVICE_STATUSES) and virtual times this round."""
        for metric, value in outcome.items():
            self._row(partition_id, DEVICE, metric,
                      DEVICE_STATUSES.index(value) if metric == "status" else value)

    def train_rows(self, partition_id: int, values: dict) -> None:
        """What the server measured of one client's training reply this round (server/strategy.py)."""
        for metric, value in values.items():
            self._row(partition_id, "train", metric, value)

    def profile_rows(self, rows_by_pid: dict[int, dict]) -> None:
        """Each client's device profile (server.fleet.profile_rows), written with the run's first round."""
        for pid, values in rows_by_pid.items():
            for metric, value in values.items():
                self._row(pid, "profile", metric, value)

    def _row(self, partition_id: int, model: str, metric: str, value: float) -> None:
        self.rows.append({"client_id": self.client_of.get(partition_id, f"partition-{partition_id}"),
                          "partition_id": int(partition_id), "model": model, "metric": metric, "value": float(value)})

    def on_replies(self, server_round: int, phase: str, replies: list) -> list:
        """Record replies and failures; return replies sorted by partition id (errors last)."""
        ok, failed, users_ok = [], [], 0
        workers: dict[str, int] = {}  # Ray node id -> users it served (simulation; devices send none)
        for msg in replies:
            node = msg.metadata.src_node_id
            carried = self._users(node)
            if msg.has_error():
                failed.append(msg)
                for pid in carried:
                    self._failed(server_round, phase, pid, msg.error.reason)
                continue
            ok.append((self.partition_of.get(node, -1), msg))
            worker = str(msg.content.config_records[DETAILS].get("worker", ""))
            if worker:
                workers[worker] = workers.get(worker, 0) + len(carried)
            details = reply_details(msg)
            # several users (USERS): each names its partition, one of those the message carried
            per_user = ([(int(d.get("partition_id", -1)), d) for d in details] if isinstance(details, list)
                        else [(self.partition_of.get(node, -1), details)])
            answered_for = set()
            for pid, user in per_user:
                if pid not in carried or pid in answered_for:
                    self.store.event(round=self.global_round(server_round), phase=phase, partition_id=pid,
                                     error=f"node {node} answered for a user it was not sent, or twice: ignored")
                    continue
                answered_for.add(pid)
                users_ok += 1
                for key, value in user.items():
                    if key == "partition_id":
                        continue
                    model, metric = split_metric_key(key)
                    self._row(pid, model or (phase if phase == "train" else "client"), metric, value)
            for pid in carried:
                if pid not in answered_for:  # the reply left a user it carried out
                    self._failed(server_round, phase, pid, "the reply carried no result for this user")
        if workers:
            self.store.event(kind="workers", round=self.global_round(server_round), phase=phase, workers=workers)
        answered = {m.metadata.src_node_id for m in replies}
        self.timed_out[phase] = []
        for node in sorted(self.expected.get(phase, set()) - answered):  # timed out: slow or gone
            for pid in self._users(node):
                self.timed_out[phase].append(pid)
                self._failed(server_round, phase, pid, "no reply before round-timeout")
        self.counts[f"{phase}_replied"] = users_ok
        self.counts[f"{phase}_failed"] = self.counts.get(f"{phase}_sampled", len(replies)) - users_ok
        return [m for _, m in sorted(ok, key=lambda item: item[0])] + failed

    def _failed(self, server_round: int, phase: str, pid: int, reason: str) -> None:
        """A user that failed this phase: its ``failed`` row and an event saying why."""
        self._row(pid, phase, "failed", 1.0)
        self.store.event(round=self.global_round(server_round), phase=phase, partition_id=pid,
                         client_id=self.client_of.get(pid), error=reason)

    def reject(self, server_round: int, msg, reason: str) -> None:
        """A train reply that cannot be aggregated (wrong tensors): recorded as failed, dropped."""
        self._failed(server_round, "train", self.partition_of.get(msg.metadata.src_node_id, -1),
                     f"reply not aggregated: {reason}")
        self.counts["train_replied"] = self.counts.get("train_replied", 1) - 1
        self.counts["train_failed"] = self.counts.get("train_failed", 0) + 1

    def commit(self, server_round: int, arrays):
        """Flower's evaluate_fn: persist the finished round. Flower also calls it with round 0
        before training; round 0 (the starting model) is committed by ``commit_round`` instead."""
        if server_round == 0:
            return None
        return self.commit_round(self.global_round(server_round), arrays)

    def commit_round(self, number: int, arrays):
        rows = pd.DataFrame(self.rows, columns=["client_id", "partition_id", "model", "metric", "value"])
        n_test = rows[(rows["model"] == "client") & (rows["metric"] == "n_test")]
        weights = n_test.groupby("client_id")["value"].last() if len(n_test) else None
        self.counts["seconds"] = time.time() - self.started
        extra = [{"model": "round", "metric": k, "stat": "value", "value": float(v)} for k, v in self.counts.items()]
        self.store.commit_round(number, {**self.frozen, **arrays.to_torch_state_dict()}, rows, weights, extra,
                                server_state=self.server_state())
        self.store.progress(number, "committed")
        if self.show_progress:
            print(self.progress_line(number, rows), file=sys.stderr, flush=True)
        self._reset()
        return None

    def progress_line(self, number: int, rows: pd.DataFrame) -> str:
        c = self.counts
        line = (f"[round {number}/{self.settings.num_rounds}] trained {c.get('train_replied', 0)}/"
                f"{c.get('train_sampled', 0)}")
        if c.get("train_failed"):
            line += f" ({c['train_failed']} failed)"
        if (rows["metric"] == "acc").any():
            failed = f" ({c['evaluate_failed']:.0f} failed: see events.jsonl)" if c.get("evaluate_failed") else ""
            line += f", evaluated {c.get('evaluate_replied', 0)}{failed}: " + "; ".join(evaluation_summary(rows))
        if "virtual_clock_s" in c:
            line += (f", virtual round {c['virtual_round_s']:.1f}s (clock {c['virtual_clock_s'] / 3600:.2f}h): "
                     + " ".join(f"{s} {int(c[f'device_{s}'])}" for s in DEVICE_STATUSES if c.get(f"device_{s}"))
                     + (" ABANDONED" if c.get("abandoned") else ""))
        eps = rows[(rows["metric"] == "epsilon") & (rows["model"] == "train")]
        if len(eps):
            line += f", epsilon max {np.max(eps['value']):.2f}"
        return line + f" ({c['seconds']:.1f}s)"
