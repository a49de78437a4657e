"""The ClientApp's work on a device with torch: every mode, hardening, DP, attacks and explanation
fidelity (``client/local.py``, ``client/evaluate.py``). ``client/app.py`` sends a message here or
to ``client/onnx_client.py`` by the device's runtime."""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Message

from client.data import measurement_seed, round_seed
from client.evaluate import client_profile, full_attr_list, model_metrics, start_attributions
from client.local import personal_model, train_round
from client.state import restore
from client.timeline import mark
from models.errors import FedrexError
from models.networks import build_network
from models.personalization import get_mode
from models.protocol import ARRAYS, CONFIG, FLEET, FROZEN, MEASURES, START, metric_key


def received_model(msg: Message, network: dict, mode) -> dict:
    """The global model as received: the artifact's frozen tensors plus the shared ones, which
    must be exactly the tensors this client's mode shares (else the two sides disagree on the run)."""
    records = msg.content.array_records
    shared = records[ARRAYS].to_torch_state_dict()
    frozen = records[FROZEN].to_torch_state_dict() if FROZEN in records else {}
    expected = shared_keys(mode.name, json.dumps(network, sort_keys=True))
    if set(shared) != expected:
        raise FedrexError(f"the server sent tensors {sorted(set(shared) ^ expected)[:3]}... that mode {mode.name} "
                          "does not share: server and client disagree on the run's mode or network")
    return {**frozen, **shared}


@lru_cache(maxsize=8)
def shared_keys(mode_name: str, network_json: str) -> frozenset[str]:
    """The tensors mode ``mode_name`` shares in this network, found once per process (building a
    network to ask costs more than a small user's whole evaluation)."""
    return frozenset(get_mode(mode_name).shared_keys(build_network(json.loads(network_json))))


def dropped_round(msg: Message) -> int | None:
    """The training round this device walked away from, when the server says so (models.protocol.FLEET)."""
    records = msg.content.config_records
    return int(records[FLEET]["dropped-round"]) if FLEET in records else None


def start_model(msg: Message, build, received: dict):
    """The run's start model when the message carries it (``models.protocol.START``: its shared
    tensors; the rest is the received model's frozen part, which never changes), else None."""
    records = msg.content.array_records
    if START not in records:
        return None
    model = build()
    model.load_state_dict({**received, **records[START].to_torch_state_dict()})
    model.eval()
    return model


def train(msg: Message, context, settings, config, network, round_number, run_dir, local) -> tuple[dict, dict]:
    """One round of local work; returns (the mode's shared tensors, metrics)."""
    torch.set_num_threads(settings.client_threads)  # the simulation engine runs several clients at once
    build = lambda: build_network(network)  # noqa: E731
    received = received_model(msg, network, get_mode(settings.mode))
    state = restore(context, run_dir, local.partition_id, round_number, dropped_round(msg))
    mark("train", "model received and personal state restored")
    sent, metrics = train_round(build, received, local.train, settings, state, round_number, local.partition_id,
                                float(config.get("proximal-mu", 0.0)), local.tokenizer,
                                start_model(msg, build, received))
    mark("train", "trained")
    state.to_context(context)
    if run_dir is not None:
        state.save(run_dir, local.partition_id, round_number)
    mark("train", "personal state saved")
    return sent, metrics


def evaluate(msg: Message, context, settings, network, round_number, run_dir, local) -> dict:
    """Global and personal model metrics on the held-out rows, plus who the client is; the clean
    accuracies alone when the round asks for them only (``MEASURES``)."""
    torch.set_num_threads(settings.client_threads)
    if msg.content.config_records.get(CONFIG, ConfigRecord()).get(MEASURES, "full") == "clean":
        settings = settings.replace(attack_examples=0, fidelity_examples=0)
    build = lambda: build_network(network)  # noqa: E731
    global_state = received_model(msg, network, get_mode(settings.mode))
    state = restore(context, run_dir, local.partition_id, round_number + 1, dropped_round(msg))
    mark("evaluate", "model received and personal state restored")
    metrics = client_profile(local, state, settings)
    if len(local.test) > 0:
        tokenizer = local.tokenizer
        seed = round_seed(settings, round_number, local.partition_id, salt=7)  # this round's personal fit
        rows_seed = measurement_seed(settings, local.partition_id)  # the same rows in every round
        global_model = build()
        global_model.load_state_dict(global_state)
        global_model.eval()
        start = start_model(msg, build, global_state)
        start_attr = start_attributions(start, local, settings, rows_seed) if start is not None else None
        global_metrics, global_attr = model_metrics(global_model, local, settings, tokenizer, rows_seed,
                                                    start_attr=start_attr)
        mark("evaluate", "global model measured")
        reference = (full_attr_list(global_attr, len(local.test), settings.fidelity_examples, rows_seed)
                     if global_attr is not None else None)
        personal = personal_model(build, global_state, state, settings, local.train, seed)
        personal_metrics, _ = model_metrics(personal, local, settings, tokenizer, rows_seed, reference, start_attr)
        mark("evaluate", "personal model fitted and measured")
        if settings.poison_kind == "backdoor":  # with no malicious user: how often the trigger flips alone
            from client.poisoned import backdoor_success

            global_metrics["backdoor_success"] = backdoor_success(global_model, local, settings)
            personal_metrics["backdoor_success"] = backdoor_success(personal, local, settings)
        if hasattr(personal, "chosen_alpha"):  # modes mix/select: the weight the user's rows chose
            personal_metrics["mix_alpha"] = personal.chosen_alpha
        metrics.update({metric_key("global", k): v for k, v in global_metrics.items()})
        metrics.update({metric_key("personal", k): v for k, v in personal_metrics.items()})
    return metrics
