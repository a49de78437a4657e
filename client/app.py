"""The FedREX ClientApp (Flower Message API).

``query``: who am I (partition id, client id, data sizes) — lets the server sample clients by
partition id, reproducibly. ``train``: one round of local work (see ``client/local.py``).
``evaluate``: global and personal model metrics on the client's held-out rows.

Imports stay light (torch, tokenizers, datasets, flwr; Captum and Opacus only when used), so the
same module runs under the simulation engine and alone on a SuperNode on a small ARM device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import load_local_data
from client.evaluate import client_profile, full_attr_list, model_metrics
from client.local import personal_model, round_seed, train_round
from client.state import restore
from models.errors import FedrexError
from models.networks import build_network
from models.personalization import get_mode
from models.protocol import ARRAYS, CONFIG, DETAILS, FROZEN, METRICS, NUM_EXAMPLES, metric_key
from models.run_settings import RunSettings
from models.tokenizer import WordPieceTokenizer


def _setup(msg: Message, context: Context, overrides: dict):
    settings = RunSettings.from_flower({**context.run_config, **overrides})
    if settings.dp and settings.dp_reproducible_noise and "data-file" in context.node_config:
        raise FedrexError("dp-reproducible-noise is for simulations: on a real device the server could replay "
                          "the noise; run without it")
    # One core per simulated client by default: the engine runs several clients at once.
    torch.set_num_threads(settings.client_threads)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    network = json.loads(str(config["network"])) if "network" in config else None
    round_number = int(config.get("global-round", config.get("server-round", 0)))
    # Where personal state is mirrored: a device names its own folder; in simulation the run dir.
    state_dir = context.node_config.get("state-dir") or config.get("run-dir")
    run_dir = Path(str(state_dir)) if state_dir else None
    local = load_local_data(context.node_config, settings, network["num_labels"] if network else 2)
    return settings, config, network, round_number, run_dir, local


def _reply(msg: Message, details: dict, num_examples: int, arrays: ArrayRecord | None = None) -> Message:
    """Flower's strategies need one MetricRecord with the same keys from every client, so it holds
    only the weighting count; the per-client details (which vary: DP, tiny clients) travel as JSON."""
    clean = {k: float(v) for k, v in details.items() if isinstance(v, (int, float)) and v == v}
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples)}),
                          DETAILS: ConfigRecord({"json": json.dumps(clean)})})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=msg)


def received_model(msg: Message, build, mode) -> dict:
    """The global model as received: the artifact's frozen tensors plus the shared ones, which
    must be exactly the tensors this client's mode shares (else the two sides disagree on the run)."""
    records = msg.content.array_records
    shared = records[ARRAYS].to_torch_state_dict()
    frozen = records[FROZEN].to_torch_state_dict() if FROZEN in records else {}
    expected = set(mode.shared_keys(build()))
    if set(shared) != expected:
        raise FedrexError(f"the server sent tensors {sorted(set(shared) ^ expected)[:3]}... that mode {mode.name} "
                          "does not share: server and client disagree on the run's mode or network")
    return {**frozen, **shared}


def build_client_app(overrides: dict | None = None) -> ClientApp:
    """A ClientApp whose settings are ``context.run_config`` with ``overrides`` on top (the
    simulation entry point passes the resolved run settings this way)."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        settings, _, _, _, _, local = _setup(msg, context, overrides)
        info = ConfigRecord({"client-id": local.client_id, "partition-id": local.partition_id,
                             "n-train": len(local.train), "n-test": len(local.test)})
        return Message(RecordDict({"info": info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings, config, network, round_number, run_dir, local = _setup(msg, context, overrides)
        if settings.crashes(local.partition_id):
            raise RuntimeError(f"injected crash of partition {local.partition_id} (crash-clients)")
        build = lambda: build_network(network)  # noqa: E731
        received = received_model(msg, build, get_mode(settings.mode))
        state = restore(context, run_dir, local.partition_id, round_number)
        sent, metrics = train_round(build, received, local.train, settings, state, round_number, local.partition_id,
                                    float(config.get("proximal-mu", 0.0)))
        state.to_context(context)
        if run_dir is not None:
            state.save(run_dir, local.partition_id, round_number)
        metrics.update(partition_id=local.partition_id, n_train=len(local.train))
        return _reply(msg, metrics, len(local.train), ArrayRecord(sent))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings, config, network, round_number, run_dir, local = _setup(msg, context, overrides)
        build = lambda: build_network(network)  # noqa: E731
        global_state = received_model(msg, build, get_mode(settings.mode))
        state = restore(context, run_dir, local.partition_id, round_number + 1)
        metrics = {"partition_id": local.partition_id, **client_profile(local, state, settings.delta)}
        if len(local.test) > 0:
            tokenizer = WordPieceTokenizer(settings.max_length)
            seed = round_seed(settings, round_number, local.partition_id, salt=7)
            global_model = build()
            global_model.load_state_dict(global_state)
            global_model.eval()
            global_metrics, global_attr = model_metrics(global_model, local, settings, tokenizer, seed)
            reference = (full_attr_list(global_attr, len(local.test), settings.fidelity_examples, seed)
                         if global_attr is not None else None)
            personal = personal_model(build, global_state, state, settings, local.train, seed)
            personal_metrics, _ = model_metrics(personal, local, settings, tokenizer, seed, reference)
            if hasattr(personal, "chosen_alpha"):  # modes mix/select: the weight the user's rows chose
                personal_metrics["mix_alpha"] = personal.chosen_alpha
            metrics.update({metric_key("global", k): v for k, v in global_metrics.items()})
            metrics.update({metric_key("personal", k): v for k, v in personal_metrics.items()})
        return _reply(msg, metrics, len(local.test))

    return app


app = build_client_app()
