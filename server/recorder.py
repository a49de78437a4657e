"""Turns every client's reply (or failure) into tidy rows and commits each round to the RunStore.

Flower calls ``commit`` (as the strategy's ``evaluate_fn``) after each round's training and
evaluation: that is the moment a round is complete, so it is the one place outputs are persisted.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from server.strategy import reply_details
from server.store import RunStore


class Recorder:
    def __init__(self, store: RunStore, settings, offset: int, partition_of: dict[int, int],
                 client_of: dict[int, str], show_progress: bool = True):
        self.store, self.settings, self.offset = store, settings, offset
        self.partition_of, self.client_of = partition_of, client_of
        self.show_progress = show_progress
        self._reset()

    def _reset(self) -> None:
        self.rows: list[dict] = []
        self.counts: dict[str, float] = {}
        self.started = time.time()

    def global_round(self, server_round: int) -> int:
        return self.offset + server_round

    def note_sampled(self, server_round: int, phase: str, nodes: list[int]) -> None:
        self.counts[f"{phase}_sampled"] = len(nodes)
        self._expected = getattr(self, "_expected", {})
        self._expected[phase] = set(nodes)

    def _row(self, partition_id: int, model: str, metric: str, value: float) -> None:
        self.rows.append({"client_id": self.client_of.get(partition_id, f"partition-{partition_id}"),
                          "partition_id": int(partition_id), "model": model, "metric": metric, "value": float(value)})

    def on_replies(self, server_round: int, phase: str, replies: list) -> list:
        """Record replies and failures; return replies sorted by partition id (errors last)."""
        ok, failed = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            pid = self.partition_of.get(node, -1)
            if msg.has_error():
                failed.append(msg)
                self._row(pid, phase, "failed", 1.0)
                self.store.event(round=self.global_round(server_round), phase=phase, partition_id=pid,
                                 client_id=self.client_of.get(pid), error=msg.error.reason)
                continue
            ok.append((pid, msg))
            for key, value in reply_details(msg).items():
                if key == "partition_id":
                    continue
                model, _, metric = key.rpartition(".") if "." in key else (phase if phase == "train" else "client", "", key)
                self._row(pid, model, metric, value)
        answered = {m.metadata.src_node_id for m in replies}
        for node in getattr(self, "_expected", {}).get(phase, set()) - answered:  # timed out: slow or gone
            pid = self.partition_of.get(node, -1)
            self._row(pid, phase, "failed", 1.0)
            self.store.event(round=self.global_round(server_round), phase=phase, partition_id=pid,
                             client_id=self.client_of.get(pid), error="no reply before round-timeout")
        self.counts[f"{phase}_replied"] = len(ok)
        self.counts[f"{phase}_failed"] = self.counts.get(f"{phase}_sampled", len(replies)) - len(ok)
        return [m for _, m in sorted(ok, key=lambda item: item[0])] + failed

    def commit(self, server_round: int, arrays):
        """Flower's evaluate_fn: persist the finished round (round 0 is the starting model)."""
        if server_round == 0:
            return None
        number = self.global_round(server_round)
        rows = pd.DataFrame(self.rows, columns=["client_id", "partition_id", "model", "metric", "value"])
        n_test = rows[(rows["model"] == "client") & (rows["metric"] == "n_test")]
        weights = n_test.groupby("client_id")["value"].last() if len(n_test) else None
        self.counts["seconds"] = time.time() - self.started
        extra = [{"model": "round", "metric": k, "stat": "value", "value": float(v)} for k, v in self.counts.items()]
        self.store.commit_round(number, arrays.to_torch_state_dict(), rows, weights, extra)
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
        acc = rows[rows["metric"] == "acc"]
        if len(acc):
            med = acc.groupby("model")["value"].median()
            line += f", evaluated {c.get('evaluate_replied', 0)}: median client acc " + "  ".join(
                f"{m} {v:.3f}" for m, v in med.items())
        eps = rows[(rows["metric"] == "epsilon") & (rows["model"] == "train")]
        if len(eps):
            line += f", epsilon max {np.max(eps['value']):.2f}"
        return line + f" ({c['seconds']:.1f}s)"
