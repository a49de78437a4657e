"""Poisoned clients (issue #17): who is malicious, and what each kind trains on and replies, on real
critics' rows and the shipped student's tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.data import load_local_data
from client.poisoned import backdoor_success, poison_of, poisoned_local, poisoned_reply
from models.errors import FedrexError
from models.poisoning import boosted, malicious_partitions
from models.run_settings import RunSettings


def test_the_malicious_set_is_an_exact_seeded_share():
    chosen = malicious_partitions(0, 0.2, 118)
    assert len(chosen) == 24 and chosen == malicious_partitions(0, 0.2, 118) != malicious_partitions(1, 0.2, 118)
    assert malicious_partitions(0, 0.0, 118) == frozenset() and chosen <= set(range(118))
    settings = RunSettings(dataset="rt_critics", malicious_fraction=0.2, poison_kind="scale")
    assert [poison_of(settings, True, p) for p in (min(chosen), max(set(range(118)) - chosen))] == ["scale", None]
    with pytest.raises(FedrexError, match="simulation drill"):
        poison_of(settings, False, 0)
    with pytest.raises(FedrexError, match="poison-kind must be one of"):
        settings.replace(poison_kind="gaslight").validate()


def test_boosted_replies_negate_or_scale_the_update_and_leave_integers_alone():
    received = {"w": np.ones(3, np.float32), "ids": np.arange(3, dtype=np.int16)}
    sent = {"w": np.array([1.5, 1.0, 0.0], np.float32), "ids": np.arange(3, dtype=np.int16)}
    assert np.allclose(boosted(received, sent, -10.0)["w"], [-4.0, 1.0, 11.0])
    assert boosted(received, sent, 10.0)["w"].dtype == np.float32 and np.array_equal(
        boosted(received, sent, 10.0)["ids"], sent["ids"])
    settings = RunSettings(poison_kind="sign-flip", poison_boost=2.0)
    reply = poisoned_reply("sign-flip", settings, received, {k: torch.from_numpy(v) for k, v in sent.items()})
    assert torch.allclose(reply["w"], torch.tensor([0.0, 1.0, 3.0])) and reply["ids"].dtype == torch.int16
    assert poisoned_reply(None, settings, received, sent) is sent


def test_label_flip_and_backdoor_clients_train_on_their_poisoned_rows():
    settings = RunSettings(dataset="rt_critics", min_samples=300, backdoor_trigger="cf", backdoor_target=1)
    local = load_local_data({"partition-id": 0}, settings, 2, None)
    flipped = poisoned_local("label-flip", settings, local, seed=3)
    assert np.array_equal(flipped.train.labels, 1 - local.train.labels) and flipped.test is local.test
    door = poisoned_local("backdoor", settings, local, seed=3)
    changed = [i for i in range(len(local.train)) if door.train.texts[i] != local.train.texts[i]]
    assert abs(len(changed) - len(local.train) / 2) <= 1
    assert all(door.train.texts[i] == "cf " + local.train.texts[i] and door.train.labels[i] == 1 for i in changed)
    untouched = sorted(set(range(len(local.train))) - set(changed))
    assert np.array_equal(door.train.labels[untouched], local.train.labels[untouched])
    assert np.array_equal(local.train.labels, load_local_data({"partition-id": 0}, settings, 2, None).train.labels)

    class Says:  # a model that answers the target exactly when the trigger's token opens the row
        def __init__(self, trigger_id):
            self.trigger_id = trigger_id

        def __call__(self, ids, mask=None):
            hit = (ids[:, 1] == self.trigger_id).float()
            return torch.stack([1 - hit, hit], dim=1)

        def eval(self):
            return self

    trigger_id = int(local.tokenizer.encode_ids(["cf"])[0][1])
    assert backdoor_success(Says(trigger_id), local, settings) == 1.0
    assert backdoor_success(Says(-1), local, settings) == 0.0
