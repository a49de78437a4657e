"""The client <-> server message layout: record names that both apps (and tests) use.

A train or evaluate message from the server carries
- ``ARRAYS``: the shared tensors of the global model (the mode's ``shared_keys``: trainable
  floating-point parameters), the only tensors a strategy aggregates;
- ``FROZEN``: the rest of the global model exactly as the artifact defines it (integer lookup
  buffers, and the head in modes that keep it personal), sent down, never back, never averaged;
- ``CONFIG``: the round's configuration (network JSON, round numbers, run dir);
- ``START`` (some messages): the start model's shared tensors (round 0's global model), which do
  not drift: the anchor of the explanation term (``expl-anchor=start``, train messages) and the
  reference of the round-0 agreement metric (evaluate messages with ``fidelity-examples > 0``).
A reply carries ``ARRAYS`` (train only: the same keys and dtypes as sent), ``METRICS`` (the
weighting count Flower's strategies read) and ``DETAILS`` (every per-client metric, as JSON).

Metric names: an evaluate reply's details are keyed ``<model>.<metric>`` (model: ``global`` or
``personal``), and a metric of one attack is ``<metric>.<attack>`` (``adv_acc.char``). The client
writes them with these helpers, the server's recorder and ``analysis/`` read them with them: this
module is plain Python (no torch), so ``analysis/`` can import it on a laptop.
"""

ARRAYS = "arrays"
FROZEN = "frozen"
CONFIG = "config"
METRICS = "metrics"
DETAILS = "details"
NUM_EXAMPLES = "num-examples"
# A device without torch (client/onnx_client.py) gets the run's body as ONNX int8 bytes in this
# ConfigRecord (key "int8") and trains only the linear head, whose tensors are these.
ONNX_BODY = "onnx-body"
HEAD_PREFIX = "head."
HEAD_KEYS = ("head.weight", "head.bias")
RUNTIMES = ("torch", "onnx")  # what a device computes with (its profile says which)

MODELS = ("global", "personal")
# the attacks a client can be asked for (client-attacks): models/attacks.py's recipes plus the
# white-box HotFlip; plain names here so a device without torch validates a run (a test keeps the
# two equal)
ATTACKS = ("char", "synonym", "char-beam", "synonym-sim", "embedding", "hotflip")
# one value per attack, keyed attack_metric(name, attack); clean accuracy on the attacked rows is
# one number for all attacks (every attack runs on the same seeded rows): ACC_ATTACKED_ROWS
ATTACK_METRICS = ("adv_acc", "attack_success", "words_changed_pct", "queries")
ACC_ATTACKED_ROWS = "acc_attacked_rows"
# faults a training client can be told to inject (fault-rates; client/faults.py): raise before
# training, hang past the round timeout, reply with a NaN or an infinity in its weights, or with a
# tensor of another shape (the server must reject the last three before aggregating: server/strategy.py)
FAULTS = ("raise", "hang", "nan", "inf", "shape")
# what a malicious client does (poison-kind; models/poisoning.py): train on flipped labels, reply its
# update negated or scaled up (boosted by poison-boost), or train a trigger word into the target label
POISONINGS = ("label-flip", "sign-flip", "scale", "backdoor")
# the edits perturbed-text hardening draws from (perturb-kinds; models/augment.py's transformations)
PERTURBATIONS = ("char", "synonym")
# what travels in a round's config beside the network: the start artifact's word normaliser (its
# gzip'd word list), when the run puts one in front of the model
NORMALIZER = "normalizer"
START = "start"
# what an evaluation measures (the round's config, key MEASURES): everything the run names (attacks,
# fidelity) or the clean accuracy of the global and personal models alone (EVALUATE_BETWEEN: the
# evaluations between round 0 and the last round, by default)
MEASURES = "measures"
EVALUATE_BETWEEN = ("clean", "full")
# what the explanation term pulls a client's saliency maps toward (expl-anchor): the start model's
# maps, which do not drift, or the received global model's (which drift with it, round after round)
EXPL_ANCHORS = ("start", "received")


# Device simulation (client/device.py, server/fleet.py). The query reply's info carries the
# client's profile as JSON under DEVICE; clients.parquet holds, per client, ``profile`` rows (once
# per run) and per training round ``device`` rows whose ``status`` and ``tier`` values are
# positions in these tuples (the value column is numeric); analysis/ turns them back into names.
DEVICE = "device"
DEVICE_TIERS = ("ideal", "flagship", "low-end", "rpi4", "fedscale")
DEVICE_STATUSES = ("ok", "straggler", "dropped", "unavailable", "abandoned", "failed")
PROFILE_METRICS = ("tier", "slowdown", "down_kbps", "up_kbps", "latency_s", "memory_mb", "dropout",
                   "available_share")
DEVICE_METRICS = ("status", "download_s", "compute_s", "upload_s", "round_s", "finish_clock_s")
# a message to a device that walked away from its last training round carries this ConfigRecord
# ({"dropped-round": r}): the device never finished round r, so it keeps its personal state from before
FLEET = "fleet"
# Simulation only: a message may name the users it is for (key "partitions", a JSON list of
# partition ids): a query or an evaluate message several, a train message one. The node works for
# each in turn, with that user's rows and saved state, and answers in one reply (a query's info and
# an evaluation's DETAILS json are then lists, one dict per user, each naming its partition id).
# Without it a message is for the node's own user. A device with its own data file is never sent one.
USERS = "users"


def check_attacks(names) -> tuple[str, ...]:
    from models.errors import FedrexError

    names = tuple(names)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise FedrexError(f"unknown attack {unknown[0]!r}: use one of {', '.join(ATTACKS)}")
    return names


def metric_key(model: str, metric: str) -> str:
    return f"{model}.{metric}"


def split_metric_key(key: str) -> tuple[str, str]:
    """``global.adv_acc.char`` -> ("global", "adv_acc.char"); a key without a model prefix
    (train metrics, the client profile) -> ("", key)."""
    model, dot, metric = key.partition(".")
    return (model, metric) if dot and model in MODELS else ("", key)


def attack_metric(metric: str, attack: str) -> str:
    return f"{metric}.{attack}"


def split_state(state: dict, shared_keys) -> tuple[dict, dict]:
    """(shared, frozen) parts of a full state dict."""
    shared_keys = set(shared_keys)
    return ({k: v for k, v in state.items() if k in shared_keys},
            {k: v for k, v in state.items() if k not in shared_keys})
