"""The FedREX ClientApp (Flower Message API), the same on every device.

``query``: who am I (partition id, client id, data sizes, device profile) — lets the server sample
clients by partition id, reproducibly, and run its fleet rules. ``train``: one round of local work.
``evaluate``: global and personal model metrics on the client's held-out rows.

Each device computes with its runtime (its profile, ``client/device.py``): torch
(``client/torch_client.py``: every mode, attacks, fidelity, DP), or, on a device without a torch
wheel, onnxruntime + numpy (``client/onnx_client.py``: mode ``head``). This module imports neither
torch nor onnxruntime itself, so it loads on both; Captum, Opacus and NLTK only when a run uses them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import data_profile, federation, load_local_data, round_seed
from client.device import profile_for
from client.faults import before_training, corrupted, drawn_fault
from client.poisoned import poison_of, poisoned_local, poisoned_reply
from client.timeline import mark
from models.errors import FedrexError
from models.protocol import ARRAYS, CONFIG, DETAILS, DEVICE, USERS, METRICS, NORMALIZER, NUM_EXAMPLES
from models.run_settings import RunSettings


# Packages a device installs only when its runtime and its runs use them (pyproject's extras):
# (module, extra, what needs it, whether this run on this runtime does). A missing one is one
# clear error, not an ImportError deep inside a round. The ONNX path measures neither fidelity
# nor attacks and has no DP, so it needs none of those.
OPTIONAL_PACKAGES = (
    ("torch", "client", "the torch runtime", lambda s, runtime: runtime == "torch"),
    ("onnxruntime", "onnx", "the ONNX runtime (a device without torch)", lambda s, runtime: runtime == "onnx"),
    ("captum", "fidelity", "fidelity-examples > 0 (explanation fidelity)",
     lambda s, runtime: runtime == "torch" and s.fidelity_examples > 0),
    ("opacus", "dp", "dp=true (DP-SGD)", lambda s, runtime: runtime == "torch" and s.dp),
    ("nltk", "synonyms", "the synonym attacks, synonym perturbations or adv-space synonyms", lambda s, runtime: runtime == "torch"
     and ((s.attack_examples > 0 and any(a.startswith("synonym") for a in s.attacks()))
          or (s.perturb_share > 0 and "synonym" in s.perturbations())
          or s.searches_synonym_hull())),
)


@lru_cache(maxsize=8)
def check_packages(settings: RunSettings, runtime: str) -> None:
    for module, extra, purpose, needed in OPTIONAL_PACKAGES:
        if needed(settings, runtime) and importlib.util.find_spec(module) is None:
            raise FedrexError(f"this run needs the package {module!r} for {purpose}: pip install -e .[{extra}] "
                              "on this device, or run without it")


def _setup(msg: Message, context: Context):
    settings = RunSettings.from_flower(context.run_config)
    if settings.dp and settings.dp_reproducible_noise and "data-file" in context.node_config:
        raise FedrexError("dp-reproducible-noise is for simulations: on a real device the server could replay "
                          "the noise; run without it")
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    network = json.loads(str(config["network"])) if "network" in config else None
    round_number = int(config.get("global-round", config.get("server-round", 0)))
    run_dir = state_folder(context.node_config, config)
    normalizer = config.get(NORMALIZER)  # the start model's word normaliser, when the run defends with it
    kind = msg.metadata.message_type
    mark(kind, "entered the handler (client.app imported)")
    local = load_local_data(context.node_config, settings, network["num_labels"] if network else 2,
                            bytes(normalizer) if normalizer else None)
    mark(kind, "rows read and encoded")
    profile = profile_for(settings, local.partition_id, context.node_config)
    check_packages(settings, profile.runtime)
    return settings, config, network, round_number, run_dir, local, profile


def state_folder(node_config, config) -> Path | None:
    """Where this client mirrors its personal state: in simulation the run dir; on a device the
    folder its node config names (``state-dir``), one subfolder per FedREX run (the server's run
    id, the same across resumes), so a new run never reads an earlier run's heads or privacy
    ledger from a reused folder."""
    if "state-dir" in node_config:
        if "run-id" not in config:
            raise FedrexError("the server sent no run id: a device with a state-dir needs a FedREX server of the same version")
        return Path(str(node_config["state-dir"])) / str(config["run-id"])
    return Path(str(config["run-dir"])) if "run-dir" in config else None


def _reply(msg: Message, details: dict | list[dict], num_examples: int, arrays: ArrayRecord | None = None) -> Message:
    """Flower's strategies need one MetricRecord with the same keys from every client, so it holds
    only the weighting count; the per-client details (which vary: DP, tiny clients) travel as JSON
    (a list of them when the message carried several users: ``USERS``)."""
    def clean(values: dict) -> dict:
        return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v == v}

    body = [clean(d) for d in details] if isinstance(details, list) else clean(details)
    record = {"json": json.dumps(body)}
    worker = worker_node()
    if worker:
        record["worker"] = worker
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples)}), DETAILS: ConfigRecord(record)})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=msg)


def simulated_node(node_config) -> bool:
    """A node of a simulation: it reads any partition (neither a device's own data file nor its
    own state folder), so it can evaluate other users too (``USERS``)."""
    return not {"data-file", "state-dir"} & set(node_config)


def worker_node() -> str:
    """The Ray node a simulated client runs on (its node id), so a run on a Ray cluster shows where
    its clients ran; "" on a device, where Ray is not even imported."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    return str(ray.get_runtime_context().get_node_id())


app = ClientApp()


def named_users(msg: Message, context: Context) -> list[int] | None:
    """The users a message names (``USERS``), or None: it is for the node's own user."""
    users = msg.content.config_records.get(USERS)
    if users is None:
        return None
    if not simulated_node(context.node_config):
        raise FedrexError("the server asked a device to work for other users: only simulated nodes can")
    return [int(pid) for pid in json.loads(str(users["partitions"]))]


def _who(msg: Message, context: Context) -> dict:
    settings, _, _, _, _, local, profile = _setup(msg, context)
    positive = float((local.train.labels == 1).mean()) if len(local.train) else 0.0
    info = {"client-id": local.client_id, "partition-id": local.partition_id, "n-train": len(local.train),
            "n-test": len(local.test), "train-positive": positive, "simulated": int(simulated_node(context.node_config)),
            DEVICE: profile.as_record()}
    if info["simulated"]:  # how many users the run's dataset holds: what a pool of nodes serves
        info["num-users"] = federation(settings).num_partitions
    return info


def _pool_user(settings: RunSettings, partition_id: int, node_config) -> dict:
    """Who a user a pool node serves is (a user of the run's dataset): its id and device, from the
    dataset's partitioner and the seed alone. Its rows are read only when the server assigns
    devices by label (``train-positive``), so discovering 100,000 users costs no tokenizing."""
    fed = federation(settings)
    fed.check_partition_id(partition_id)
    info = {"client-id": fed.client_id(partition_id), "partition-id": partition_id, "simulated": 1,
            DEVICE: profile_for(settings, partition_id, {**node_config, "partition-id": partition_id}).as_record()}
    if settings.device_assign == "label":
        labels = [int(label) for label in fed.client(partition_id).train["label"]]
        info["train-positive"] = sum(label == 1 for label in labels) / len(labels) if labels else 0.0
    return info


@app.query()
def query(msg: Message, context: Context) -> Message:
    users = named_users(msg, context)
    if users is None:
        return Message(RecordDict({"info": ConfigRecord(_who(msg, context))}), reply_to=msg)
    settings = RunSettings.from_flower(context.run_config)
    infos = [_pool_user(settings, pid, context.node_config) for pid in users]
    return Message(RecordDict({"info": ConfigRecord({"users": json.dumps(infos)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    users = named_users(msg, context)
    if users is not None:
        if len(users) != 1:
            raise FedrexError(f"a train message is for one user; this one names {len(users)}")
        context = _user_context(context, users[0])
    settings, config, network, round_number, run_dir, local, profile = _setup(msg, context)
    if profile.crashes:
        raise RuntimeError(f"injected crash of partition {local.partition_id} (crash-clients)")
    fault = drawn_fault(settings, round_number, local.partition_id)
    before_training(fault, settings, local.partition_id)
    poison = poison_of(settings, simulated_node(context.node_config), local.partition_id)
    local = poisoned_local(poison, settings, local, round_seed(settings, round_number, local.partition_id, salt=9))
    if profile.runtime == "onnx":
        from client import onnx_client

        mark("train", "runtime imported (onnxruntime)")
        sent, metrics = onnx_client.train(msg, settings, local, round_seed(settings, round_number, local.partition_id))
    else:
        from client import torch_client

        mark("train", "runtime imported (torch)")
        sent, metrics = torch_client.train(msg, context, settings, config, network, round_number, run_dir, local)
        if poison is not None:
            received = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
            sent = poisoned_reply(poison, settings, received, sent)
    metrics.update(partition_id=local.partition_id, n_train=len(local.train))
    reply = _reply(msg, metrics, len(local.train), ArrayRecord(corrupted(fault, sent)))
    mark("train", "reply built")
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    users = named_users(msg, context)
    if users is None:
        reply = _reply(msg, *_evaluate_user(msg, context))
    else:
        measured = [_evaluate_user(msg, _user_context(context, pid)) for pid in users]
        reply = _reply(msg, [details for details, _ in measured], sum(count for _, count in measured))
    mark("evaluate", "reply built")
    return reply


def _user_context(context: Context, partition_id: int) -> Context:
    """A context for a user a message names (``USERS``): that user's partition, and no state in
    memory, so the user's personal state and privacy ledger come from their saved copy in the run
    folder (``client.state.restore``), which every simulated round writes. Never the node's own
    context, even for the node's own partition: in a pool, another node may have served the user
    since, and the state this node's context holds would be stale (a shorter DP ledger)."""
    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config={**context.node_config, "partition-id": partition_id}, state=RecordDict(),
                   run_config=context.run_config)


def _evaluate_user(msg: Message, context: Context) -> tuple[dict, int]:
    settings, _, network, round_number, run_dir, local, profile = _setup(msg, context)
    if profile.runtime == "onnx":
        from client import onnx_client

        mark("evaluate", "runtime imported (onnxruntime)")
        metrics = {**data_profile(local), **(onnx_client.evaluate(msg, settings, local) if len(local.test) else {})}
    else:
        from client import torch_client

        mark("evaluate", "runtime imported (torch)")
        metrics = torch_client.evaluate(msg, context, settings, network, round_number, run_dir, local)
    if settings.malicious_fraction > 0:  # the user's role, so analyses can keep to the benign users
        metrics["malicious"] = float(poison_of(settings, simulated_node(context.node_config), local.partition_id)
                                     is not None)
    return {"partition_id": local.partition_id, **metrics}, len(local.test)
