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

    users = federation(settings).num_partitions
    chosen = malicious_partitions(settings.seed, settings.malicious_fraction, users)
    if not chosen or len(chosen) == users:
        raise FedrexError(f"malicious-fraction={settings.malicious_fraction:g} makes {len(chosen)} of {users} users "
                          "malicious: give a share that leaves some malicious and some benign users")
    return settings.poison_kind if partition_id in chosen else None


def poisoned_local(kind: str | None, settings: RunSettings, local, seed: int):
    """The rows a ``label-flip`` or ``backdoor`` client trains on this round (others: its own)."""
    if kind not in ("label-flip", "backdoor") or len(local.train) == 0:
        return local
    if kind == "backdoor" and not 0 <= settings.backdoor_target < local.num_labels:
        raise FedrexError(f"backdoor-target={settings.backdoor_target} is not a label of this data "
                          f"(labels 0..{local.num_labels - 1})")
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
    """Share of this user's held-out rows that the trigger turns into the target: among the rows of
    another label that the model gets right without the trigger, those it calls the target with it
    (rows it already calls the target would count a plain error as the backdoor's). NaN without such rows."""
    from models.encoded import EncodedData
    from models.training import predict_logits

    clean = predict_logits(model, local.test).argmax(1)
    labels = np.asarray(local.test.labels)
    rows = np.flatnonzero((labels != settings.backdoor_target) & (clean == labels))
    if not len(rows):
        return float("nan")
    texts = [with_trigger(local.test.texts[i], settings.backdoor_trigger) for i in rows]
    triggered = EncodedData.from_texts(texts, np.full(len(rows), settings.backdoor_target), local.tokenizer)
    return float((predict_logits(model, triggered).argmax(1) == settings.backdoor_target).mean())
