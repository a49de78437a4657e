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
    for share in (0.001, 0.999):  # 0 or all 118 malicious: no comparison is left to make
        with pytest.raises(FedrexError, match="leaves some malicious and some benign"):
            poison_of(settings.replace(malicious_fraction=share), True, 0)


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

    class Says:  # the true label, except: the target when the trigger's token opens the row, and the
        # target for the first ``wrong`` negative rows without it (errors that are not the backdoor's)
        def __init__(self, trigger_id, wrong=0):
            self.trigger_id, self.wrong = trigger_id, wrong

        def __call__(self, ids, mask=None):
            rows = [key(r) for r in ids.numpy()]
            out = torch.tensor([label_of.get(r, 0.0) for r in rows], dtype=torch.float32)  # triggered rows: below
            out[ids[:, 1] == self.trigger_id] = 1.0
            out[[r in errors[:self.wrong] for r in rows]] = 1.0
            return torch.stack([1 - out, out], dim=1)

        def eval(self):
            return self

    test = local.test
    def key(ids):  # a row's token ids without the batch's padding
        return tuple(int(t) for t in np.asarray(ids) if t != 0)

    label_of = {key(test.ids[i]): float(test.labels[i]) for i in range(len(test))}
    errors = [key(test.ids[i]) for i in np.flatnonzero(test.labels == 0)]
    trigger_id = int(local.tokenizer.encode_ids(["cf"])[0][1])
    assert len(errors) >= 2 and backdoor_success(Says(trigger_id), local, settings) == 1.0
    assert backdoor_success(Says(-1), local, settings) == 0.0
    assert backdoor_success(Says(-1, wrong=2), local, settings) == 0.0  # plain errors are not the backdoor's
    half = Says(trigger_id, wrong=len(errors))  # every negative row already wrong: nothing left to turn
    assert np.isnan(backdoor_success(half, local, settings))
    with pytest.raises(FedrexError, match="backdoor-target=7 is not a label"):
        poisoned_local("backdoor", settings.replace(backdoor_target=7), local, seed=3)
