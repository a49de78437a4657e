"""The virtual clock and the round rules of a simulated fleet of unequal devices.

Each client reported its device profile (``client/device.py``) when the server discovered it. A
training round then runs as production systems run them (Bonawitz et al. 2019; FedScale):

- **who may be selected**: devices available at the round's start on the virtual clock (inside an
  availability window of their trace) with at least ``device-min-memory-mb`` of memory;
- **over-selection**: the round's goal is ``target`` = max(min-train-clients, fraction-train x
  clients) reports; ``over-selection`` x target devices are selected, because some drop out;
- **each device's round time** = latency + download of what the server sent + compute (the
  samples it actually trained x the reference ms per sample x its slowdown) + upload of the bytes
  it actually sent back (FedScale's formula with measured inputs; bytes x 8 / kbit/s);
- **statuses**: ``dropped`` when its per-round dropout draw fires or its window closes before it
  finishes; ``straggler`` when it finishes after ``round-deadline`` or after the first ``target``
  reports; ``ok`` for the first ``target`` on time, the only ones aggregated; ``failed`` when its
  ClientApp raised. With fewer than ``min-report-share`` x target ok reports the round is
  ``abandoned``: nothing is aggregated and the global model stays as it was;
- **the clock** advances by the round's duration: the finish time of the target-th report when
  the goal is met, else the deadline (the server waits for it), else the slowest report.

The wall time of the simulation does not change: every selected client really trains; the clock
decides which updates count. Evaluation is the experimenter's instrument, not the devices' work,
and does not advance the clock. Without ``device-mix``/``device-trace`` none of this applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np

from models.protocol import DEVICE_STATUSES, DEVICE_TIERS


def is_active(profile: dict, t: float) -> bool:
    """Inside one of the profile's [start, end) windows of its repeating period at clock time t
    (FedScale's reading of its behaviour traces)."""
    offset = t % float(profile["period_s"])
    return any(start <= offset < end for start, end in profile["active"])


def available_share(profile: dict) -> float:
    covered = sum(max(0.0, min(end, profile["period_s"]) - max(start, 0.0)) for start, end in profile["active"])
    return covered / float(profile["period_s"])


def transfer_seconds(num_bytes: float, kbps) -> float:
    return 0.0 if kbps is None or math.isinf(kbps) else num_bytes * 8 / 1000 / float(kbps)


def parse_profile(text: str) -> dict:
    profile = json.loads(text)
    for key in ("down_kbps", "up_kbps", "memory_mb"):
        if profile.get(key) is None:
            profile[key] = math.inf
    return profile


def measure_ms_per_sample(model, settings, steps: int = 4) -> dict[str, float]:
    """The reference device's costs on one thread of this machine, measured once per run and kept
    in run.json: milliseconds per training sample of the run's model with the run's local
    objective ("train"), and per sample of a forward pass alone ("forward": what mode ``head``'s
    frozen body costs). A training step is adversarial with probability ``adv-ratio``, so clean and
    adversarial steps are timed apart and mixed in that share (timing a few steps of the mix
    would charge whatever share their draws happened to pick). Rows of max-length / 2 random token
    ids: the cost does not depend on which tokens they are."""
    import copy

    import torch

    from models.encoded import EncodedData
    from models.training import fit, predict_logits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = copy.deepcopy(model)  # the run's model stays untouched
    try:
        rng = np.random.default_rng(0)
        rows = settings.batch_size * (steps + 1)
        length = max(4, settings.max_length // 2)
        ids = [rng.integers(1000, 20000, size=length) for _ in range(rows)]
        data = EncodedData(ids, rng.integers(0, 2, size=rows), [""] * rows)
        # what the local objective's terms read (start-kd's targets, the explanation terms' maps and
        # erased rows), so each term costs what it costs in a round
        classes = model.head.out_features
        data.teacher_logits = rng.normal(size=(rows, classes)).astype(np.float32)
        data.teacher_attr, data.attr_labels = [rng.random(length).astype(np.float32) for _ in range(rows)], data.labels
        data.erased_ids, data.erased_probs = [i[: length // 2] for i in ids], np.full((rows, classes), 1 / classes, np.float32)
        objective = settings.objective()
        candidates = None
        if settings.searches_synonym_hull():  # ASCC mixes each token with its synonyms
            from models.robust.synonym_hull import SynonymCandidates
            from models.tokenizer import WordPieceTokenizer

            candidates = SynonymCandidates(WordPieceTokenizer(settings.max_length))

        def per_sample(config, candidates=None) -> float:  # the warm-up also looks the tokens' synonyms up
            fit(model, data, config, max_steps=1, batch_size=settings.batch_size, lr=0.0, candidates=candidates)
            start = time.perf_counter()
            result = fit(model, data, config, max_steps=steps, batch_size=settings.batch_size, lr=0.0,
                         candidates=candidates)
            return 1000 * (time.perf_counter() - start) / max(1, result["samples"])

        clean = per_sample(dataclasses.replace(objective, adv=0.0))
        train = clean
        if objective.adv > 0 and objective.adv_ratio > 0:
            adversarial = per_sample(dataclasses.replace(objective, adv_ratio=1.0), candidates)
            train = (1 - objective.adv_ratio) * clean + objective.adv_ratio * adversarial
        predict_logits(model, data, settings.batch_size)  # warm-up
        start = time.perf_counter()
        predict_logits(model, data, settings.batch_size)
        return {"train": train, "forward": 1000 * (time.perf_counter() - start) / rows}
    finally:
        torch.set_num_threads(threads)


class Fleet:
    """Round rules over the clients' profiles (partition id -> profile dict) on a virtual clock."""

    def __init__(self, profiles: dict[int, dict], settings, ms_per_sample: float, clock: float = 0.0,
                 ms_per_forward: float = 0.0):
        self.profiles, self.settings = profiles, settings
        self.ms_per_sample, self.clock = float(ms_per_sample), float(clock)
        self.ms_per_forward = float(ms_per_forward)  # a forward pass alone (mode head's body)
        self.enabled = bool(settings.device_mix or settings.device_trace)
        # partition id -> the round in which the device walked away (or went offline) mid-round;
        # the server tells it, and it drops the personal state it computed in that round
        self.dropped_in: dict[int, int] = {}

    # ------------------------------------------------------------------------------ selection
    def eligible(self, pid: int) -> bool:
        profile = self.profiles.get(pid)
        if profile is None:
            return True
        return profile["memory_mb"] >= self.settings.device_min_memory_mb and is_active(profile, self.clock)

    def selection(self, pids: list[int], fraction: float, minimum: int) -> tuple[list[int], int, int]:
        """(the pids that may be selected now, the round's goal count, how many to select)."""
        target = min(len(pids), max(minimum, int(len(pids) * fraction)))
        if not self.enabled:
            return list(pids), target, target
        candidates = [p for p in pids if self.eligible(p)]
        return candidates, target, min(len(candidates), math.ceil(target * self.settings.over_selection))

    # -------------------------------------------------------------------------------- timing
    def round_time(self, pid: int, samples: int, down_bytes: int, up_bytes: int) -> dict:
        profile = self.profiles[pid]
        return {"download_s": profile["latency_s"] + transfer_seconds(down_bytes, profile["down_kbps"]),
                "compute_s": samples * self.ms_per_sample * float(profile["slowdown"]) / 1000,
                "upload_s": transfer_seconds(up_bytes, profile["up_kbps"])}

    def work(self, samples: float, forward_samples: float = 0.0) -> float:
        """A round's work in training samples of the reference: rows trained (forward + backward)
        plus rows only passed forward (mode head's frozen body), at their measured relative cost."""
        ratio = self.ms_per_forward / self.ms_per_sample if self.ms_per_sample > 0 else 0.0
        return float(samples) + float(forward_samples) * ratio

    def settle(self, global_round: int, reports: list[tuple[int, int, int, int]], failed: list[int],
               target: int) -> tuple[dict[int, dict], list[int], dict]:
        """Statuses for one training round. ``reports``: (pid, samples trained, bytes it
        downloaded, bytes it sent back) of clients that answered; ``failed``: pids whose ClientApp
        raised. Returns (per pid: status and times, the pids to aggregate, round facts), and
        advances the clock."""
        start, outcome, finishers = self.clock, {}, []
        for pid, samples, down_bytes, up_bytes in reports:
            times = self.round_time(pid, samples, down_bytes, up_bytes)
            total = sum(times.values())
            draw = np.random.default_rng([self.settings.seed, global_round, pid, 0xD709]).random()
            walked_away = draw < float(self.profiles[pid]["dropout"])
            left = not is_active(self.profiles[pid], start + total)
            outcome[pid] = {**times, "round_s": total, "finish_clock_s": start + total,
                            "status": "dropped" if walked_away or left else "pending"}
            if outcome[pid]["status"] == "pending":
                finishers.append((total, pid))
        for pid in failed:
            outcome[pid] = {"status": "failed"}
        for pid, values in outcome.items():
            if values["status"] == "dropped":
                self.dropped_in[pid] = global_round
            elif values["status"] != "failed":  # it finished a later round: its state is that round's
                self.dropped_in.pop(pid, None)
        deadline = self.settings.round_deadline or math.inf
        on_time = [(t, p) for t, p in sorted(finishers) if t <= deadline]
        accepted = on_time[:target]
        for t, pid in sorted(finishers):
            outcome[pid]["status"] = "ok" if (t, pid) in accepted else "straggler"
        needed = math.ceil(self.settings.min_report_share * target)
        abandoned = len(accepted) < needed
        if len(accepted) == target and target > 0:
            duration = accepted[-1][0]
        elif math.isfinite(deadline):
            duration = deadline
        else:
            duration = max((t for t, _ in finishers), default=0.0)
        if abandoned:
            for _, pid in accepted:
                outcome[pid]["status"] = "abandoned"
        self.clock = start + duration
        facts = {"virtual_round_s": duration, "virtual_clock_s": self.clock, "abandoned": float(abandoned),
                 **{f"device_{s}": float(sum(o["status"] == s for o in outcome.values()))
                    for s in DEVICE_STATUSES if s != "unavailable"}}
        return outcome, ([] if abandoned else [p for _, p in accepted]), facts

    def next_opening(self, pids: list[int]) -> float | None:
        """Virtual seconds until the first of ``pids`` that meets the memory floor is available
        (0 if one is now); None when none ever will (no device meets the floor)."""
        waits = []
        for pid in pids:
            profile = self.profiles.get(pid)
            if profile is None:
                return 0.0
            if profile["memory_mb"] < self.settings.device_min_memory_mb:
                continue
            period = float(profile["period_s"])
            offset = self.clock % period
            for start, end in profile["active"]:
                # + 1 us past the opening: floating point may land the clock a hair before it
                waits.append(0.0 if start <= offset < end else (float(start) - offset) % period + 1e-6)
        return min(waits) if waits else None

    def unavailable(self, pids: list[int]) -> list[int]:
        return [p for p in pids if not self.eligible(p)] if self.enabled else []


DEVICE_FIELDS = ("tier", "slowdown", "down_kbps", "up_kbps", "latency_s", "memory_mb", "dropout", "period_s", "active")


def assign_by_label(profiles: dict[int, dict], positive: dict[int, float]) -> dict[int, dict]:
    """``device-assign=label``: the same devices, re-dealt so that the fastest go to the users with
    the most positive training rows and the slowest to the harshest: slow tiers then hold
    different users, the setting in which round rules bias who the model learns from. Only the
    device fields move; each client keeps its own runtime and drills."""
    by_speed = sorted(profiles, key=lambda pid: (profiles[pid]["slowdown"], pid))
    by_label = sorted(profiles, key=lambda pid: (-positive.get(pid, 0.0), pid))
    return {user: {**profiles[user], **{k: profiles[device][k] for k in DEVICE_FIELDS}}
            for user, device in zip(by_label, by_speed)}


def profile_rows(profile: dict) -> dict[str, float]:
    """A profile as the numeric ``profile`` rows of clients.parquet (models/protocol.py)."""
    tier = profile["tier"] if profile["tier"] in DEVICE_TIERS else "fedscale"
    return {"tier": float(DEVICE_TIERS.index(tier)), "slowdown": profile["slowdown"],
            "down_kbps": profile["down_kbps"], "up_kbps": profile["up_kbps"], "latency_s": profile["latency_s"],
            "memory_mb": profile["memory_mb"], "dropout": profile["dropout"],
            "available_share": available_share(profile)}
