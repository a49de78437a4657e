"""A malicious client's side of ``malicious-fraction`` (the kinds: ``models/poisoning.py``): what it
trains on and what it replies. A simulation drill: a device with its own data file refuses it."""

from __future__ import annotations

import dataclasses

import numpy as np

from models.errors import FedrexError
from models.poisoning import backdoor_rows, boosted, flipped, malicious_partitions, with_trigger
from models.run_settings import RunSettings


def poison_of(settings: RunSettings, simulated: bool, partition_id: int) -> str | None:
    """This client's poisoning kind, or None for a benign one."""
    if settings.malicious_fraction <= 0:
        return None
    if not simulated:
        raise FedrexError("malicious-fraction is a simulation drill: a device with its own data file never poisons")
    from client.data import federation

    chosen = malicious_partitions(settings.seed, settings.malicious_fraction, federation(settings).num_partitions)
    return settings.poison_kind if partition_id in chosen else None


def poisoned_local(kind: str | None, settings: RunSettings, local, seed: int):
    """The rows a ``label-flip`` or ``backdoor`` client trains on this round (others: its own)."""
    if kind not in ("label-flip", "backdoor") or len(local.train) == 0:
        return local
    train = local.train.subset(np.arange(len(local.train)))
    if kind == "label-flip":
        train.labels = flipped(train.labels, local.num_labels)
    else:
        from models.augment import with_texts

        rows = backdoor_rows(len(train), seed)
        train = with_texts(train, rows, [with_trigger(train.texts[i], settings.backdoor_trigger) for i in rows],
                           local.tokenizer)
        train.labels[rows] = settings.backdoor_target
    return dataclasses.replace(local, train=train)


def poisoned_reply(kind: str | None, settings: RunSettings, received: dict, sent: dict) -> dict:
    """What a ``sign-flip`` or ``scale`` client replies: its update negated or scaled by
    ``poison-boost``, as torch tensors like ``sent`` (others: ``sent``)."""
    if kind not in ("sign-flip", "scale"):
        return sent
    import torch

    factor = -settings.poison_boost if kind == "sign-flip" else settings.poison_boost
    mine = {k: v.detach().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in sent.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in boosted(received, mine, factor).items()}


def backdoor_success(model, local, settings: RunSettings) -> float:
    """Share of this user's held-out rows of another label that the trigger turns into the target."""
    from models.encoded import EncodedData
    from models.training import predict_logits

    rows = [i for i, y in enumerate(local.test.labels) if int(y) != settings.backdoor_target]
    if not rows:
        return float("nan")
    texts = [with_trigger(local.test.texts[i], settings.backdoor_trigger) for i in rows]
    triggered = EncodedData.from_texts(texts, np.full(len(rows), settings.backdoor_target), local.tokenizer)
    return float((predict_logits(model, triggered).argmax(1) == settings.backdoor_target).mean())
