"""Differential privacy that holds against the server: noise it cannot replay, accounting at the
sample rate Opacus really uses, a padding row that stays zero, and one training loop (DP changes
nothing but batches, clipping and noise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.local import round_seed, train_round
from client.privacy import epsilon_of, poisson_sample_rate
from client.state import ClientState
from models.encoded import EncodedData
from models.errors import FedrexError
from models.networks import VocabMap, build_network
from models.run_settings import RunSettings
from models.tokenizer import WordPieceTokenizer

NETWORK = {"kind": "student", "num_labels": 2, "dim": 16, "hidden": 16}


@pytest.fixture(scope="module")
def critic(data_dir):
    """One critic's first 37 reviews: 37 rows, batch 16 -> Opacus samples at 1/3, not 16/37."""
    frame = pd.read_parquet(data_dir / "rt_critics" / "reviews.parquet")
    sizes = frame.groupby("user_id").size()
    rows = frame[frame["user_id"] == sorted(sizes[sizes >= 37].index)[0]].head(37)
    assert len(rows) == 37
    return EncodedData.from_texts(rows["text"].tolist(), rows["label"].to_numpy(), WordPieceTokenizer(32))


@pytest.fixture(scope="module")
def start(critic):
    torch.manual_seed(0)
    kept = np.unique(np.concatenate(critic.ids))
    vocab = VocabMap.pruned(30522, torch.from_numpy(kept))
    model = build_network({**NETWORK, "vocab_size": vocab.size}, vocab)
    return {k: v.clone() for k, v in model.state_dict().items()}, {**NETWORK, "vocab_size": vocab.size}


def dp_round(start, critic, **kw):
    state, config = ClientState(), start[1]
    settings = RunSettings(dp=True, noise_multiplier=1.0, local_epochs=2.0, local_max_steps=6, batch_size=16,
                           adv_weight=0.5, **kw)
    settings.validate()
    sent, metrics = train_round(lambda: build_network(config), start[0], critic, settings, state, 1, 7, 0.0)
    return sent, metrics, state


def test_the_server_cannot_replay_the_noise(start, critic):
    first, first_metrics, _ = dp_round(start, critic)
    second, second_metrics, _ = dp_round(start, critic)  # everything the server knows is the same
    assert not torch.equal(first["conv1.weight"], second["conv1.weight"])
    # the device clock's work is the expected Poisson rows (6 steps x 37 rows x 1/3), not the draws
    assert first_metrics["samples"] == second_metrics["samples"] == 74
    replay_a, _, _ = dp_round(start, critic, dp_reproducible_noise=True)
    replay_b, _, _ = dp_round(start, critic, dp_reproducible_noise=True)
    assert all(torch.equal(replay_a[k], replay_b[k]) for k in replay_a)  # the named, simulation-only option


def test_the_ledger_uses_the_rate_opacus_samples_at(start, critic):
    from opacus.accountants import RDPAccountant

    _, metrics, state = dp_round(start, critic)
    assert poisson_sample_rate(37, 16) == pytest.approx(1 / 3)
    assert state.dp_history == [(1.0, pytest.approx(1 / 3), 6)]
    independent = RDPAccountant()
    for _ in range(6):
        independent.step(noise_multiplier=1.0, sample_rate=1 / 3)
    assert metrics["epsilon"] == pytest.approx(independent.get_epsilon(1e-5))
    assert metrics["epsilon"] < epsilon_of([(1.0, 16 / 37, 6)], 1e-5)  # what the old ledger overstated


def test_the_padding_row_stays_zero_under_dp(start, critic):
    sent, _, _ = dp_round(start, critic)
    assert torch.count_nonzero(sent["embedding.weight"][0]) == 0
    assert torch.count_nonzero(sent["embedding.weight"][1:] - start[0]["embedding.weight"][1:]) > 0


def test_dp_with_learning_rate_zero_changes_nothing(start, critic):
    sent, metrics, _ = dp_round(start, critic, lr=0.0)  # noise moves nothing the optimizer does not apply
    assert all(torch.equal(v, start[0][k]) for k, v in sent.items()) and metrics["epsilon"] > 0


def test_dp_and_a_proximal_term_are_refused_not_silently_dropped():
    with pytest.raises(FedrexError, match="proximal term has no per-sample gradients"):
        RunSettings(dp=True, strategy="fedprox").validate()


def test_round_seeds_are_what_the_server_could_compute():
    """The reproducible option's seed is public: (run seed, round, partition) -> same number."""
    assert round_seed(RunSettings(seed=3), 2, 5) == round_seed(RunSettings(seed=3), 2, 5)


def test_a_device_keys_its_state_by_run_and_counts_the_update_it_may_have_sent(tmp_path):
    """Two runs on one device with the same state-dir keep apart (a new run does not read the last
    run's privacy ledger); after an interrupted round, a resumed device restores its personal
    weights from the last completed round but counts the budget of the round in flight, whose
    update it may already have sent."""
    from client.app import state_folder
    from client.state import ClientState

    node = {"state-dir": str(tmp_path)}
    first, second = state_folder(node, {"run-id": "run-a"}), state_folder(node, {"run-id": "run-b"})
    assert first != second and state_folder({}, {"run-dir": "/runs/x"}) == Path("/runs/x")
    with pytest.raises(FedrexError, match="sent no run id"):
        state_folder(node, {})
    ClientState({"w": torch.ones(1)}, [(1.0, 0.1, 5)], 1).save(first, 3, 1)
    ClientState({"w": torch.full((1,), 2.0)}, [(1.0, 0.1, 5), (1.0, 0.1, 5)], 2).save(first, 3, 2)  # in flight
    assert ClientState.load(second, 3, 2) is None
    resumed = ClientState.load(first, 3, 2)  # the server redoes round 2
    assert torch.equal(resumed.personal["w"], torch.ones(1)) and resumed.last_round == 1
    assert resumed.dp_history == [(1.0, 0.1, 5), (1.0, 0.1, 5)]
    only_in_flight = ClientState.load(first, 3, 1)
    assert only_in_flight.personal is None and len(only_in_flight.dp_history) == 2


def test_a_checkpoint_or_personal_state_changed_after_its_round_is_refused(tmp_path):
    """run.json records each kept checkpoint's SHA-256 when the round commits, and a device's state
    file names its weights' SHA-256: a file changed since (still valid safetensors) is refused on
    resume with a clear error, never loaded; pruned checkpoints leave run.json too."""
    from server.store import RunStore

    store = RunStore.create(tmp_path, {"seed": 0}, "tamper")
    for number in (1, 2, 3):
        store.commit_round(number, {"w": torch.full((4,), float(number))}, pd.DataFrame(
            columns=["client_id", "partition_id", "model", "metric", "value"]))
    reopened = RunStore.open(store.folder)
    assert sorted(reopened.meta["checkpoint_sha256"]) == ["round-0002.safetensors", "round-0003.safetensors"]
    assert torch.equal(reopened.load_checkpoint(3)["w"], torch.full((4,), 3.0))
    path = store.checkpoint_path(3)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FedrexError, match="run.json"):
        reopened.load_checkpoint(3)
    with pytest.raises(FedrexError, match="changed or truncated"):
        reopened.load_server_state(3)
    meta = json.loads((store.folder / "run.json").read_text())
    del meta["checkpoint_sha256"]["round-0003.safetensors"]  # the digest deleted too: still refused
    (store.folder / "run.json").write_text(json.dumps(meta))
    with pytest.raises(FedrexError, match="run.json records no SHA-256 for round-0003.safetensors"):
        RunStore.open(store.folder).load_checkpoint(3)

    ClientState({"w": torch.ones(2)}, [], 1).save(tmp_path, 7, 1)
    weights = ClientState.folder(tmp_path, 7) / "round-0001.safetensors"
    assert torch.equal(ClientState.load(tmp_path, 7, 2).personal["w"], torch.ones(2))
    weights.write_bytes(weights.read_bytes()[:-4] + bytes(4))
    with pytest.raises(FedrexError, match="round-0001.json"):
        ClientState.load(tmp_path, 7, 2)
