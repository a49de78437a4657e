"""The client <-> server message layout: record names that both apps (and tests) use.

A train or evaluate message from the server carries
- ``ARRAYS``: the shared tensors of the global model (the mode's ``shared_keys``: trainable
  floating-point parameters), the only tensors a strategy aggregates;
- ``FROZEN``: the rest of the global model exactly as the artifact defines it (integer lookup
  buffers, and the head in modes that keep it personal), sent down, never back, never averaged;
- ``CONFIG``: the round's configuration (network JSON, round numbers, run dir).
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

MODELS = ("global", "personal")
# one value per attack, keyed attack_metric(name, attack); clean accuracy on the attacked rows is
# one number for all attacks (every attack runs on the same seeded rows): ACC_ATTACKED_ROWS
ATTACK_METRICS = ("adv_acc", "attack_success", "words_changed_pct", "queries")
ACC_ATTACKED_ROWS = "acc_attacked_rows"


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
