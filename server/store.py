"""A run's folder and its atomic, per-round persistence.

    runs/<run-id>/
      run.json              resolved settings, seed, status, last completed round, the SHA-256 of
                            each kept checkpoint (a checkpoint changed since is refused on resume)
      clients/round-NNNN.parquet   tidy per-client rows of one round (the source of truth)
      clients.parquet       all rounds, tidy: run_id, round, client_id, partition_id, model, metric, value
      rounds.parquet        per-round summaries: run_id, round, model, metric, stat, value
      checkpoints/round-NNNN.safetensors   global weights after each round, and the server
                            optimizer's state (tensors named ``server-optimizer/...``)
      client_state/...      each client's personal state, versioned by round (client/state.py)
      events.jsonl          failures and notes, one JSON object per line
      progress.json         where the run is now: ``starting`` (after the last committed round), the
                            round and phase under way (train, evaluate), or the round last
                            committed; advisory, for people and tests watching a run (nothing
                            reads it back: run.json's ``completed_rounds`` decides)

A round is committed in this order: checkpoint, its clients part, the rebuilt clients.parquet and
rounds.parquet, then run.json's ``completed_rounds``. Every file is written to a temporary name and
renamed, so a crash leaves either the old or the new file, and ``completed_rounds`` never points at
a round whose outputs are incomplete; parts from a round after it are ignored and rewritten, and
readers (``analysis.load``, the resume) keep only rows up to ``completed_rounds``: a kill between
the rewritten clients.parquet and run.json leaves that round's rows there until the resume
rewrites them (tests/test_data.py kills a commit at each rename).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.files import atomic_write_bytes, atomic_write_json
from models.run_settings import new_run_id
from models.errors import FedrexError
from server.aggregate import summarize

SERVER_STATE = "server-optimizer/"  # checkpoint tensors that are the server optimizer's, not the model's

CLIENT_COLUMNS = ["run_id", "round", "client_id", "partition_id", "model", "metric", "value"]
ROUND_COLUMNS = ["run_id", "round", "model", "metric", "stat", "value"]


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class RunStore:
    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @property
    def completed_rounds(self) -> int:
        return int(self.meta.get("completed_rounds", 0))

    # -------------------------------------------------------------------------------- open
    @classmethod
    def create(cls, runs_dir: Path, settings: dict, run_id: str = "") -> "RunStore":
        run_id = run_id or new_run_id()
        folder = Path(runs_dir) / run_id
        if (folder / "run.json").exists():
            raise FedrexError(f"{folder} already holds a run; use --resume {folder} or another run id")
        meta = {"run_id": run_id, "settings": settings, "completed_rounds": 0, "status": "running",
                "created": dt.datetime.now(dt.timezone.utc).isoformat()}
        store = cls(folder, meta)
        store._write_meta()
        return store

    @classmethod
    def open(cls, folder: Path) -> "RunStore":
        path = Path(folder) / "run.json"
        if not path.exists():
            raise FedrexError(f"{folder} is not a FedREX run (no run.json)")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise FedrexError(f"{path} is corrupted") from None
        return cls(Path(folder), meta)

    def _write_meta(self) -> None:
        atomic_write_json(self.folder / "run.json", self.meta)

    # ------------------------------------------------------------------------------- rounds
    def checkpoint_path(self, round_number: int) -> Path:
        return self.folder / "checkpoints" / f"round-{round_number:04d}.safetensors"

    def has_checkpoint(self, round_number: int) -> bool:
        return self.checkpoint_path(round_number).exists()

    def _load_checkpoint_file(self, round_number: int) -> dict:
        """The checkpoint's tensors, checked against the SHA-256 run.json recorded when the round
        was committed (a checkpoint edited or truncated since is refused, not resumed from)."""
        from models.artifact import load_weights  # torch: not for the `fedrex` command, which only reads run.json

        path = self.checkpoint_path(round_number)
        digest = self.meta.get("checkpoint_sha256", {}).get(path.name)
        return load_weights(path, digest, str(self.folder / "run.json"))

    def load_checkpoint(self, round_number: int) -> dict:
        """The model's weights after ``round_number``."""
        return {k: v for k, v in self._load_checkpoint_file(round_number).items() if not k.startswith(SERVER_STATE)}

    def load_server_state(self, round_number: int) -> dict[str, np.ndarray]:
        """The server optimizer's state after ``round_number`` (empty for a stateless strategy)."""
        return {k[len(SERVER_STATE):]: v.numpy() for k, v in self._load_checkpoint_file(round_number).items()
                if k.startswith(SERVER_STATE)}

    def commit_round(self, round_number: int, weights: dict, rows: pd.DataFrame, weights_by_client=None,
                     extra_summary: list[dict] | None = None, keep_checkpoints: int = 2,
                     server_state: dict | None = None) -> None:
        """Persist a finished round: its weights and the server optimizer's state (one checkpoint
        file, written atomically), its client rows, the round summary, then run.json."""
        import torch

        from models.artifact import save_weights

        state = {f"{SERVER_STATE}{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in (server_state or {}).items()}
        digest = save_weights(self.checkpoint_path(round_number), {**weights, **state})
        rows = rows.assign(run_id=self.run_id, round=round_number)[CLIENT_COLUMNS]
        write_parquet(self.folder / "clients" / f"round-{round_number:04d}.parquet", rows)
        clients = self.read_parts(upto=round_number)
        write_parquet(self.folder / "clients.parquet", clients)
        summary = summarize(rows, weights_by_client)
        if extra_summary:
            summary = pd.concat([summary, pd.DataFrame(extra_summary)], ignore_index=True)
        summary = summary.assign(run_id=self.run_id, round=round_number)[ROUND_COLUMNS]
        previous = self.read_rounds()
        previous = previous[previous["round"] < round_number] if len(previous) else previous
        write_parquet(self.folder / "rounds.parquet", pd.concat([previous, summary], ignore_index=True))
        kept = sorted((self.folder / "checkpoints").glob("round-*.safetensors"))
        digests = {**self.meta.get("checkpoint_sha256", {}), self.checkpoint_path(round_number).name: digest}
        # the commit point: run.json on disk first, the state in memory only once it is there (a run.json
        # that cannot be written leaves both at the round before, for whatever records the failure next)
        meta = {**self.meta, "completed_rounds": round_number,
                "checkpoint_sha256": {p.name: digests[p.name] for p in kept[-keep_checkpoints:] if p.name in digests}}
        atomic_write_json(self.folder / "run.json", meta)
        self.meta = meta
        for old in kept[:-keep_checkpoints]:
            old.unlink(missing_ok=True)

    def read_parts(self, upto: int) -> pd.DataFrame:
        parts = [p for p in sorted((self.folder / "clients").glob("round-*.parquet"))
                 if int(p.stem.split("-")[1]) <= upto]
        if not parts:
            return pd.DataFrame(columns=CLIENT_COLUMNS)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def read_rounds(self) -> pd.DataFrame:
        path = self.folder / "rounds.parquet"
        return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=ROUND_COLUMNS)

    def progress(self, round_number: int, phase: str, **details) -> None:
        """Say where the run is (progress.json, atomically): ``phase`` of ``round_number`` started,
        or ``committed``."""
        atomic_write_json(self.folder / "progress.json", {
            "round": int(round_number), "phase": phase, **details,
            "since": dt.datetime.now(dt.timezone.utc).isoformat()})

    def note(self, **values) -> None:
        """Facts of the run that must survive a resume (run.json, atomically)."""
        self.meta.update(values)
        self._write_meta()

    def finish(self, status: str = "completed") -> None:
        self.meta["status"] = status
        self.meta.pop("failure", None)
        self._write_meta()

    def resume(self) -> None:
        """A resumed run is running again: a stale ``stopped`` or ``failed`` must not outlive it."""
        self.meta["status"] = "running"
        self.meta.pop("failure", None)
        self._write_meta()

    def fail(self, reason: str, **details) -> None:
        """The run died before finishing what it was asked: run.json says ``failed`` and why (a
        deliberate ``--stop-after`` ends ``stopped`` instead); events.jsonl gets the details."""
        self.meta["status"], self.meta["failure"] = "failed", reason
        self._write_meta()
        self.event(kind="run_failed", round=self.completed_rounds + 1, reason=reason, **details)

    def event(self, **payload) -> None:
        line = json.dumps({"time": dt.datetime.now(dt.timezone.utc).isoformat(), **payload}, default=str)
        try:
            with open(self.folder / "events.jsonl", "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise FedrexError(f"cannot append to {self.folder / 'events.jsonl'}: {err.strerror or err} "
                              "(is the folder writable, the disk full?)") from None
