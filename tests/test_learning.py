"""Learning invariants: only trainable floats travel and are aggregated; a round that cannot learn
(learning rate 0) returns the global model bit for bit, for every network, strategy and mode; every
personalization mode's train step; unsupported combinations are rejected before anything starts.

The strategy tests drive Flower's real strategies and FedREX's real client code path on real
critics' reviews, without Ray: the messages are built in-process (Flower's TaskIdentity set by
hand), which is what lets every network x strategy pair run in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from client.app import _reply
from client.faults import corrupted
from client.local import personal_model, train_round
from client.state import ClientState
from client.torch_client import received_model
from models.encoded import EncodedData
from models.errors import FedrexError
from models.networks import VocabMap, build_network
from models.linear_head import fit_logit_bias
from models.personalization import HEAD_PREFIX, MODES, get_mode
from models.protocol import split_state
from models.run_settings import STRATEGIES, RunSettings
from models.tokenizer import WordPieceTokenizer
from models.training import label_log_prior
from server.recorder import Recorder
from server.store import RunStore
from server.strategy import make_strategy

NETWORKS = {
    "student": {"kind": "student", "num_labels": 2, "dim": 16, "hidden": 16},
    "fastgrnn": {"kind": "fastgrnn", "num_labels": 2, "dim": 16, "hidden": 16},
    "prado": {"kind": "prado", "num_labels": 2, "features": 64, "dim": 16, "channels": 16},
}
CLIENTS = 7  # Krum needs more than 2f + 2 replies, Bulyan at least 4f + 3 (f = krum-byzantine = 1)


@pytest.fixture(scope="module")
def critics(data_dir):
    """The reviews of the first CLIENTS critics, 24 each, tokenized: real text, real labels."""
    frame = pd.read_parquet(data_dir / "rt_critics" / "reviews.parquet")
    tok = WordPieceTokenizer(32)
    users = sorted(frame["user_id"].unique())[:CLIENTS]
    return [EncodedData.from_texts(g["text"].tolist()[:24], g["label"].to_numpy()[:24], tok)
            for _, g in frame[frame["user_id"].isin(users)].groupby("user_id")]


def network(name: str, critics) -> tuple[torch.nn.Module, dict]:
    """A network as an artifact defines it: the student's and FastGRNN's int16 vocabulary map
    prunes to the tokens the critics use (so a corrupted map changes predictions)."""
    config = dict(NETWORKS[name])
    torch.manual_seed(0)
    if name == "prado":
        return build_network(config), config
    kept = np.unique(np.concatenate([i for data in critics for i in data.ids]))
    vocab = VocabMap.pruned(30522, torch.from_numpy(kept))
    config["vocab_size"] = vocab.size
    return build_network(config, vocab), config


class Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def federated_round(tmp_path, critics, net: str, tamper=None, **settings_kw):
    """One train round of the named strategy over CLIENTS real clients; returns (start, after, store).
    ``tamper`` may rewrite what partition 0 sends (a misbehaving device)."""
    settings = RunSettings(local_max_steps=2, batch_size=8, attack_examples=0, fidelity_examples=0,
                           min_train_clients=CLIENTS, fraction_train=1.0, krum_byzantine=1, **settings_kw)
    settings.validate()
    model, config = network(net, critics)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    mode = get_mode(settings.mode)
    shared, frozen = split_state(start, mode.shared_keys(model))
    nodes = {100 + i: i for i in range(CLIENTS)}
    store = RunStore.create(tmp_path, settings.to_flower(), f"{net}-{settings.strategy}-{settings.lr}")
    recorder = Recorder(store, settings, 0, nodes, {i: f"critic-{i}" for i in range(CLIENTS)}, frozen,
                        show_progress=False)
    strategy = make_strategy(settings, recorder, frozen)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    messages = strategy.configure_train(1, ArrayRecord(shared), ConfigRecord({"network": json.dumps(config)}),
                                        Grid(nodes))
    replies = []
    build = lambda: build_network(config)  # noqa: E731  (what a client builds: no vocabulary yet)
    for msg in messages:
        pid = nodes[msg.metadata.dst_node_id]
        received = received_model(msg, config, mode)
        sent, metrics = train_round(build, received, critics[pid], settings, ClientState(), 1, pid, 0.0)
        if tamper is not None and pid == 0:
            sent = tamper(sent)
        TaskIdentity.node_id = msg.metadata.dst_node_id
        replies.append(_reply(msg, {**metrics, "partition_id": pid}, len(critics[pid]), ArrayRecord(sent)))
        TaskIdentity.node_id = 0
    aggregated, _ = strategy.aggregate_train(1, replies)
    return start, {**frozen, **aggregated.to_torch_state_dict()}, store


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("net", list(NETWORKS))
def test_a_round_that_cannot_learn_returns_the_model_bit_for_bit(tmp_path, critics, net, strategy):
    start, after, _ = federated_round(tmp_path, critics, net, strategy=strategy, lr=0.0, adv_weight=0.5)
    assert set(after) == set(start)
    for key, tensor in start.items():
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor), key


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedmedian"])
@pytest.mark.parametrize("net", ["student", "prado"])
def test_a_learning_round_changes_weights_but_never_buffers(tmp_path, critics, net, strategy):
    start, after, _ = federated_round(tmp_path, critics, net, strategy=strategy, lr=1e-2, adv_weight=0.0)
    model, _ = network(net, critics)
    buffers = dict(model.named_buffers())
    assert buffers, "every network here has an integer buffer"
    for key in buffers:
        assert after[key].dtype == start[key].dtype and torch.equal(after[key], start[key]), key
    changed = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(after[k], v)]
    assert "head.weight" in changed and len(changed) >= len(start) // 2


def test_the_vocabulary_survives_a_round_trip_through_flower_records(critics):
    model, _ = network("student", critics)
    state = model.state_dict()
    back = ArrayRecord(state).to_torch_state_dict()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())
    assert back["vocab.table"].dtype == torch.int16


@pytest.mark.parametrize("mode_name", list(MODES))
def test_every_mode_trains_and_keeps_its_personal_part_at_home(critics, mode_name):
    mode = get_mode(mode_name)
    model, config = network("student", critics)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    build = lambda: build_network(config)  # noqa: E731
    shared_keys = mode.shared_keys(model)
    assert "vocab.table" not in shared_keys
    assert any(k.startswith(HEAD_PREFIX) for k in shared_keys) == (mode_name not in ("fedper", "fedrep"))
    base = RunSettings(mode=mode_name, local_max_steps=3, batch_size=8)

    frozen_round = ClientState()
    sent, _ = train_round(build, received, critics[0], base.replace(lr=0.0), frozen_round, 1, 0, 0.0)
    assert set(sent) == set(shared_keys) and all(torch.equal(sent[k], received[k]) for k in sent)

    state = ClientState()
    sent, metrics = train_round(build, received, critics[0], base.replace(lr=1e-2), state, 1, 0, 0.0)
    trained = "head.weight" if mode_name == "head" else "conv1.weight"  # head: only the head is shared
    assert metrics["steps"] == 3 and not torch.equal(sent[trained], received[trained])
    # the device's work: rows trained; mode head trains numpy steps on one forward pass per row
    if mode_name == "head":
        assert metrics["samples"] == 0 and metrics["forward_samples"] == len(critics[0]) and metrics["head_samples"] > 0
    else:
        assert metrics["samples"] > 0 and "forward_samples" not in metrics
    if mode_name in ("fedper", "fedrep"):
        assert set(state.personal) == {"head.weight", "head.bias"}
    elif mode_name == "ditto":
        assert not torch.equal(state.personal["head.weight"], received["head.weight"])
    else:
        assert state.personal is None

    personal = personal_model(build, received, state, base.replace(lr=1e-2), critics[0], seed=1)
    assert set(personal.state_dict()) == set(received)
    if mode_name in ("mix", "select"):
        assert personal.chosen_alpha in mode.alphas
    if mode_name in ("prior", "prior-shift", "head"):
        assert not torch.equal(personal.head.bias, received["head.bias"])
        assert torch.equal(personal.head.weight, received["head.weight"])


@pytest.mark.parametrize("pairs, message", [
    ({"mode": "fedrep", "dp": True}, "mode fedrep does not support dp"),
    ({"mode": "nope"}, "mode must be one of"),
    ({"strategy": "fedsgd"}, "strategy must be one of"),
    ({"lr": -1.0}, "lr >= 0"),
    ({"dp": True, "expl_weight": 1.0}, "not supported"),
    ({"mode": "head", "adv_weight": 0.0, "start_kd": 1.0}, "mode head does not support expl-weight, expl-erasure or start-kd"),
    ({"dp": True, "start_kd": 1.0}, "dp with start-kd"),
    ({"perturb_share": 0.5, "perturb_words": 1.5}, "perturb-words must be in"),
    ({"adv_space": "hull"}, "adv-space must be one of"),
    ({"dp": True, "adv_space": "synonyms"}, "dp with adv-space synonyms"),
])
def test_unsupported_combinations_are_rejected_before_anything_starts(pairs, message):
    with pytest.raises(FedrexError, match=message):
        RunSettings(**pairs).validate()


def test_logit_bias_solves_its_regularised_problem():
    logits = np.zeros((4, 2), np.float32)
    labels = np.array([1, 1, 1, 0])
    bias = torch.from_numpy(fit_logit_bias(logits, labels, l2=1.0))
    # stationarity: mean(softmax(b) - onehot) + l2 * b = 0
    p = torch.softmax(bias, 0)
    grad = p - torch.tensor([0.25, 0.75], dtype=torch.float64) + bias
    assert torch.allclose(grad, torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert bias[1] > bias[0]


def test_the_label_shift_bias_swaps_the_models_prior_for_the_users():
    """Hand computation: the model calls these rows positive with mean probability 0.8; the user's
    3 of 4 positive rows smooth to 4/6: bias = log([2/6, 4/6]) - log([0.2, 0.8])."""
    from models.personalization import label_shift_bias

    logits = np.log(np.array([[0.1, 0.9], [0.3, 0.7], [0.2, 0.8], [0.2, 0.8]]))
    bias = label_shift_bias(logits, np.array([1, 1, 1, 0]))
    assert np.allclose(bias, np.log([2 / 6, 4 / 6]) - np.log([0.2, 0.8]))
    shifted = torch.softmax(torch.from_numpy(logits + bias), -1).numpy().mean(0)
    assert shifted[1] < 0.8  # the user's rows are called positive less often than the model's prior said


def test_label_log_prior_is_the_smoothed_label_share():
    prior = label_log_prior(np.array([1, 1, 1, 0]), 2)
    assert torch.allclose(prior, torch.log(torch.tensor([2 / 6, 4 / 6])))


def test_the_balanced_loss_adjusts_every_cross_entropy_the_adversarial_one_too(critics):
    """With a zero PGD budget the adversarial rows are the clean rows, so the adversarial term must
    equal the clean cross-entropy, both against logits + the client's log prior, hand computed.
    (It once kept plain logits: at adv-weight 0.5 it taught every client's label prior anyway.)"""
    import torch.nn.functional as F

    from models.objectives import objective_loss
    from models.training_config import ObjectiveConfig

    model, _ = network("student", critics)
    model.eval()
    batch = next(critics[0].batches(8, shuffle=False))
    prior = label_log_prior(critics[0].labels, 2)
    assert abs(float(prior[0] - prior[1])) > 0.1  # the critic's labels are skewed: the test can tell
    _, parts = objective_loss(model, batch, ObjectiveConfig(adv=0.5, adv_epsilon=0.0), logit_adjust=prior)
    with torch.no_grad():
        logits = model.classify(model.embed(batch.ids), batch.mask)
    adjusted = F.cross_entropy(logits + prior, batch.labels).item()
    assert parts["ce"] == pytest.approx(adjusted, rel=1e-5)
    assert parts["adv"] == pytest.approx(adjusted, rel=1e-5)
    assert adjusted != pytest.approx(F.cross_entropy(logits, batch.labels).item(), rel=1e-3)


def test_fedper_heads_never_leave_the_device(tmp_path, critics):
    """Only the body travels: the global head stays the artifact's, however much clients train."""
    start, after, _ = federated_round(tmp_path, critics, "student", strategy="fedavg", lr=1e-2, adv_weight=0.0,
                                   mode="fedper")
    assert torch.equal(after["head.weight"], start["head.weight"]) and torch.equal(after["head.bias"], start["head.bias"])
    assert not torch.equal(after["conv1.weight"], start["conv1.weight"])


@pytest.mark.parametrize("tamper, reason", [
    (lambda sent: {k: v for k, v in sent.items() if k != "head.bias"}, "differ from the sent ones"),
    (lambda sent: {**sent, "head.bias": sent["head.bias"].double()}, "another shape or dtype"),
    (lambda sent: {**sent, "head.bias": sent["head.bias"] * float("nan")}, "NaN or infinite"),
    (lambda sent: {**sent, "conv1.weight": sent["conv1.weight"] + float("inf")}, "NaN or infinite"),
    (lambda sent: corrupted("nan", sent), "NaN or infinite"),  # what fault-rates' faults reply
    (lambda sent: corrupted("shape", sent), "another shape or dtype"),
])
def test_a_reply_with_other_tensors_is_dropped_and_recorded(tmp_path, critics, tamper, reason):
    start, after, store = federated_round(tmp_path, critics, "student", tamper=tamper, strategy="fedavg", lr=0.0)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in start.items())
    events = (store.folder / "events.jsonl").read_text()
    assert "reply not aggregated" in events and reason in events


def _scripted_round(strategy, server_round: int, weights: dict, updates: list[dict],
                    examples: list[int] | None = None) -> dict:
    """One round of ``strategy`` whose CLIENTS replies are ``weights + updates[i]`` (no training:
    the server's arithmetic alone), each weighing ``examples[i]`` (8 by default), committed
    through the recorder as a real round is."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    messages = strategy.configure_train(server_round, ArrayRecord(weights), ConfigRecord({}),
                                        Grid(strategy.recorder.partition_of))
    replies = []
    for msg in messages:
        pid = strategy.recorder.partition_of[msg.metadata.dst_node_id]
        TaskIdentity.node_id = msg.metadata.dst_node_id
        # a device may list its tensors in another order than the server sent them
        sent = {k: weights[k] + updates[pid][k] for k in reversed(list(weights))}
        count = examples[pid] if examples else 8
        replies.append(_reply(msg, {"partition_id": pid, "samples": count}, count, ArrayRecord(sent)))
        TaskIdentity.node_id = 0
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    if aggregated is None:  # as Flower's Strategy.start: an aggregation that failed keeps the model
        aggregated = ArrayRecord(weights)
    strategy.recorder.commit(server_round, aggregated)
    return aggregated.to_torch_state_dict()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_resumed_strategy_continues_exactly_as_an_uninterrupted_one(tmp_path, strategy):
    """Three rounds of fixed client updates, uninterrupted; then the same run stopped after round 2
    and resumed from its checkpoint in a new strategy object (as a new ServerApp process does):
    the server optimizer's state (FedAvgM's momentum, FedAdam's moments and its round count) is
    checkpointed, so round 3 gives the same weights, bit for bit. The tensors are stored in another
    order than the model's (safetensors sorts names) to catch optimizers that pair by position."""
    settings = RunSettings(min_train_clients=CLIENTS, fraction_train=1.0, krum_byzantine=1, strategy=strategy,
                           server_lr=0.1, fraction_evaluate=0)
    start = {"z.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}  # not in name order
    gen = torch.Generator().manual_seed(0)
    updates = [[{k: torch.randn(v.shape, generator=gen) for k, v in start.items()} for _ in range(CLIENTS)]
               for _ in range(3)]
    nodes, names = {100 + i: i for i in range(CLIENTS)}, {i: f"c{i}" for i in range(CLIENTS)}

    def strategy_for(store, offset):
        return make_strategy(settings, Recorder(store, settings, offset, nodes, names, {}, show_progress=False), {})

    whole = strategy_for(RunStore.create(tmp_path, settings.to_flower(), "whole"), 0)
    weights = dict(start)
    for rnd in (1, 2, 3):
        weights = _scripted_round(whole, rnd, weights, updates[rnd - 1])
    store = RunStore.create(tmp_path, settings.to_flower(), "resumed")
    first = strategy_for(store, 0)
    resumed_weights = dict(start)
    for rnd in (1, 2):
        resumed_weights = _scripted_round(first, rnd, resumed_weights, updates[rnd - 1])
    store = RunStore.open(store.folder)
    saved = store.load_checkpoint(2)
    assert list(saved) == sorted(saved)  # the file's order is not the model's
    second = strategy_for(store, 2)
    second.load_optimizer_state(store.load_server_state(2), list(start))
    has_state = strategy in ("fedavgm", "fedadam")
    assert bool(store.load_server_state(2)) == has_state
    after = _scripted_round(second, 1, {k: saved[k] for k in start}, updates[2])
    for key, tensor in weights.items():
        assert torch.equal(after[key], tensor), (strategy, key)
    if has_state:  # the test can fail: without the optimizer state the resumed round differs
        fresh = strategy_for(RunStore.open(store.folder), 2)
        differs = _scripted_round(fresh, 1, {k: saved[k] for k in start}, updates[2])
        assert not all(torch.equal(differs[k], weights[k]) for k in weights)


def test_a_loss_part_is_averaged_over_the_steps_that_computed_it(critics):
    """adv-ratio 0.5 computes the adversarial term on about half the steps: its reported mean is
    over those steps (the same batches as with every step adversarial, lr 0), not halved."""
    from models.objectives import ObjectiveConfig
    from models.training import fit

    model, _ = network("student", critics)
    every = fit(model, critics[0], ObjectiveConfig(adv=0.5, adv_ratio=1.0), max_steps=12, batch_size=8, lr=0.0, seed=0)
    some = fit(model, critics[0], ObjectiveConfig(adv=0.5, adv_ratio=0.5), max_steps=12, batch_size=8, lr=0.0, seed=0)
    assert 0.75 * every["adv"] < some["adv"] < 1.25 * every["adv"]
    assert some["ce"] == pytest.approx(every["ce"], rel=0.25)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_steps_torchs_optimizer_bit_for_bit_without_importing_its_compiler(critics, monkeypatch, optimizer):
    """``fit``'s optimizers skip the compiler guards torch wraps around them (importing
    torch._dynamo costs a device 1.6 s and 68 MiB at its first step): the weights after adversarial
    steps with clipping and weight decay are torch's own optimizer's, bit for bit, and a process
    that trains never imports the compiler, where torch's own optimizer does."""
    import subprocess
    import sys

    import models.training as training

    def trained(optimizer_classes) -> dict:
        for name, cls in optimizer_classes.items():
            monkeypatch.setattr(training, name, cls)
        model, _ = network("student", critics)
        training.fit(model, critics[0], training.ObjectiveConfig(adv=0.5), max_steps=6, batch_size=8, lr=3e-3,
                     weight_decay=0.01, seed=0, optimizer=optimizer)
        return model.state_dict()

    start = network("student", critics)[0].state_dict()
    ours = trained({"AdamW": training.AdamW, "SGD": training.SGD})
    torchs = trained({"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD})
    assert all(ours[k].dtype == torchs[k].dtype and torch.equal(ours[k], torchs[k]) for k in ours)
    assert not torch.equal(ours["head.weight"], start["head.weight"])  # it learnt: the comparison says something
    name = {"adamw": "AdamW", "sgd": "SGD"}[optimizer]
    script = ("import sys, torch; from {module} import {name} as Optimizer; m = torch.nn.Linear(3, 2); "
              "o = Optimizer(m.parameters(), lr=0.1); m(torch.ones(1, 3)).sum().backward(); o.step(); o.zero_grad(); "
              "print('torch._dynamo' in sys.modules)")
    imported = {}
    for module in ("models.training", "torch.optim"):
        out = subprocess.run([sys.executable, "-c", script.format(module=module, name=name)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        imported[module] = out.stdout.strip()
    assert imported == {"models.training": "False", "torch.optim": "True"}


def _fixed_updates(scale_last: float = 1.0) -> tuple[dict, list[dict]]:
    """A zero start and CLIENTS seeded updates, the last one multiplied by ``scale_last``."""
    start = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    gen = torch.Generator().manual_seed(1)
    updates = [{k: torch.randn(v.shape, generator=gen) for k, v in start.items()} for _ in range(CLIENTS)]
    updates[-1] = {k: v * scale_last for k, v in updates[-1].items()}
    return start, updates


def _one_round(tmp_path, name: str, examples: list[int] | None = None, scale_last: float = 1.0, **settings_kw):
    settings = RunSettings(min_train_clients=CLIENTS, fraction_train=1.0, fraction_evaluate=0, **settings_kw)
    settings.validate()
    nodes, names = {100 + i: i for i in range(CLIENTS)}, {i: f"c{i}" for i in range(CLIENTS)}
    store = RunStore.create(tmp_path, settings.to_flower(), name)
    strategy = make_strategy(settings, Recorder(store, settings, 0, nodes, names, {}, show_progress=False), {})
    start, updates = _fixed_updates(scale_last)
    after = _scripted_round(strategy, 1, start, updates, examples)
    return after, updates, pd.read_parquet(store.folder / "clients.parquet")


def _norm(update: dict) -> float:
    return float(np.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values())))


def test_update_clip_scales_each_update_to_the_rounds_median_norm(tmp_path):
    """By hand: every update's norm, the bound (clip x their median), the clipped updates' mean."""
    after, updates, rows = _one_round(tmp_path, "clip", scale_last=50.0, update_clip=1.0)
    norms = [_norm(u) for u in updates]
    bound = float(np.median(norms))
    scales = [min(1.0, bound / n) for n in norms]
    expected = {k: sum(s * u[k].double() for s, u in zip(scales, updates)) / CLIENTS for k in after}
    for key, value in expected.items():
        assert torch.allclose(after[key].double(), value, atol=1e-6), key
    train = rows[rows["model"] == "train"].pivot_table(index="partition_id", columns="metric", values="value")
    assert np.allclose(train["update_norm"].to_numpy(), norms, rtol=1e-6)
    assert np.allclose(train["update_scale"].to_numpy(), scales, rtol=1e-6)
    assert train["update_scale"].iloc[-1] < 0.1 and (train["update_scale"] == 1.0).sum() >= CLIENTS // 2
    unclipped, _, _ = _one_round(tmp_path, "no-clip", scale_last=50.0)  # the test can fail: off, the outlier dominates
    assert _norm(unclipped) > 3 * _norm(after)


def test_uniform_weights_average_the_updates_whatever_each_users_rows(tmp_path):
    examples = [1, 2, 3, 4, 50, 60, 70]
    weighted, updates, _ = _one_round(tmp_path, "examples", examples)
    uniform, _, _ = _one_round(tmp_path, "uniform", examples, aggregate_weights="uniform")
    for key in uniform:
        plain = sum(u[key].double() for u in updates) / CLIENTS
        by_rows = sum(n * u[key].double() for n, u in zip(examples, updates)) / sum(examples)
        assert torch.allclose(uniform[key].double(), plain, atol=1e-6), key
        assert torch.allclose(weighted[key].double(), by_rows, atol=1e-6), key


def test_multikrum_and_bulyan_leave_a_boosted_update_out(tmp_path):
    """One reply boosted x100: MultiKrum (all but krum-byzantine replies) averages exactly the other
    six; Bulyan's result stays, coordinate by coordinate, inside the honest replies' range."""
    multi, updates, _ = _one_round(tmp_path, "multikrum", scale_last=100.0, strategy="multikrum", krum_byzantine=1)
    honest = updates[:-1]
    for key in multi:
        assert torch.allclose(multi[key].double(), sum(u[key].double() for u in honest) / len(honest), atol=1e-6)
    bulyan, _, _ = _one_round(tmp_path, "bulyan", scale_last=100.0, strategy="bulyan", krum_byzantine=1)
    for key in bulyan:
        stacked = torch.stack([u[key] for u in honest])
        assert (bulyan[key] >= stacked.min(0).values - 1e-6).all() and (bulyan[key] <= stacked.max(0).values + 1e-6).all()
    plain, _, _ = _one_round(tmp_path, "fedavg", scale_last=100.0)
    assert _norm(plain) > 5 * _norm(multi)


def test_bulyan_with_too_few_replies_keeps_the_model_and_says_why(tmp_path):
    after, _, _ = _one_round(tmp_path, "bulyan-few", strategy="bulyan", krum_byzantine=2)  # needs 11 of 7
    assert all(torch.equal(v, torch.zeros_like(v)) for v in after.values())  # the model Flower keeps
    rounds = pd.read_parquet(tmp_path / "bulyan-few" / "rounds.parquet")
    skipped = rounds[(rounds["model"] == "round") & (rounds["metric"] == "aggregation_skipped")]["value"]
    assert skipped.tolist() == [1.0]  # the strategy aggregated nothing (its None), and the round says so
    events = (tmp_path / "bulyan-few" / "events.jsonl").read_text()
    assert "aggregated none of 7 usable replies" in events
