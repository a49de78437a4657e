"""What a client keeps between rounds: its personal weights and its privacy ledger.

Kept in Flower's ``Context.state`` (the native place, alive for the whole run) and mirrored to
``<run dir>/client_state/p<partition>/round-<r>.safetensors`` so that a resumed run, whose
contexts start empty, continues from exactly the state the interrupted run had after the last
completed round. Files are versioned by round and written atomically: a crash mid-round leaves
newer files that a resume from an earlier round ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.artifact import load_weights, save_weights
from models.files import atomic_write_json

KEEP_VERSIONS = 3


class ClientState:
    def __init__(self, personal: dict[str, torch.Tensor] | None = None, dp_history: list | None = None,
                 last_round: int = 0, train_seconds: float = 0.0):
        self.personal = personal
        self.dp_history = dp_history or []  # [(noise_multiplier, sample_rate, steps), ...] for Opacus' RDP
        self.last_round = last_round
        self.train_seconds = train_seconds

    # ---- Flower Context.state --------------------------------------------------------------
    @classmethod
    def from_context(cls, context) -> "ClientState | None":
        if "fedrex" not in context.state.config_records:
            return None
        meta = json.loads(context.state.config_records["fedrex"]["meta"])
        personal = None
        if "personal" in context.state.array_records:
            personal = context.state.array_records["personal"].to_torch_state_dict()
        return cls(personal, [tuple(h) for h in meta["dp_history"]], meta["last_round"], meta["train_seconds"])

    def to_context(self, context, replace: bool = False) -> None:
        """Into Context.state; ``replace``: also forget personal weights this state does not have."""
        from flwr.app import ArrayRecord, ConfigRecord

        context.state.config_records["fedrex"] = ConfigRecord({"meta": json.dumps(self._meta())})
        if self.personal is not None:
            context.state.array_records["personal"] = ArrayRecord(self.personal)
        elif replace and "personal" in context.state.array_records:
            del context.state.array_records["personal"]

    def _meta(self) -> dict:
        return {"dp_history": [list(h) for h in self.dp_history], "last_round": self.last_round,
                "train_seconds": self.train_seconds}

    # ---- disk mirror -------------------------------------------------------------------------
    @staticmethod
    def folder(run_dir: Path, partition_id: int) -> Path:
        return Path(run_dir) / "client_state" / f"p{partition_id:05d}"

    def save(self, run_dir: Path, partition_id: int, round_number: int) -> None:
        folder = self.folder(run_dir, partition_id)
        digest = (save_weights(folder / f"round-{round_number:04d}.safetensors", self.personal)
                  if self.personal is not None else None)
        # the JSON is written last and names its weights' SHA-256: a weights file changed since is refused
        atomic_write_json(folder / f"round-{round_number:04d}.json",
                          {**self._meta(), "has_personal": self.personal is not None, "sha256": digest})
        for old in sorted(folder.glob("round-*.json"))[:-KEEP_VERSIONS]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)

    @classmethod
    def load(cls, run_dir: Path, partition_id: int, before_round: int) -> "ClientState | None":
        """The newest saved state from a round before ``before_round`` (None when there is none),
        with the privacy ledger of the newest saved round of all: a file of the round in flight
        (or later) means the device trained in it and may have sent that update before the run
        was interrupted, so its budget counts as spent."""
        saved = sorted(cls.folder(run_dir, partition_id).glob("round-*.json"))
        if not saved:
            return None
        spent = [tuple(h) for h in json.loads(saved[-1].read_text())["dp_history"]]
        candidates = [p for p in saved if int(p.stem.split("-")[1]) < before_round]
        if not candidates:
            return cls(dp_history=spent) if spent else None
        meta = json.loads(candidates[-1].read_text())
        personal = (load_weights(candidates[-1].with_suffix(".safetensors"), meta.get("sha256"), str(candidates[-1]))
                    if meta["has_personal"] else None)
        return cls(personal, spent, meta["last_round"], meta["train_seconds"])


def restore(context, run_dir: Path | None, partition_id: int, current_round: int,
            dropped_round: int | None = None) -> ClientState:
    """Context.state first; after a resume (empty context) the disk mirror; else a fresh state.

    ``dropped_round``: the server says this device walked away from that training round (device
    simulation: ``server/fleet.py``), so it never finished it: the personal weights it computed
    there are dropped for those of the round before (from the disk mirror). Its privacy ledger
    keeps the round (the noisy update may have left before it walked away: counted, conservatively)."""
    state = ClientState.from_context(context)
    if state is None and run_dir is not None:
        state = ClientState.load(run_dir, partition_id, current_round)
    state = state or ClientState()
    if dropped_round is not None and state.last_round == dropped_round and run_dir is not None:
        before = ClientState.load(run_dir, partition_id, dropped_round) or ClientState()
        state = ClientState(before.personal, state.dp_history, before.last_round, state.train_seconds)
        state.to_context(context, replace=True)
    return state
