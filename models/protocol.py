"""The client <-> server message layout: record names that both apps (and tests) use.

A train or evaluate message from the server carries
- ``ARRAYS``: the shared tensors of the global model (the mode's ``shared_keys``: trainable
  floating-point parameters), the only tensors a strategy aggregates;
- ``FROZEN``: the rest of the global model exactly as the artifact defines it (integer lookup
  buffers, and the head in modes that keep it personal), sent down, never back, never averaged;
- ``CONFIG``: the round's configuration (network JSON, round numbers, run dir).
A reply carries ``ARRAYS`` (train only: the same keys and dtypes as sent), ``METRICS`` (the
weighting count Flower's strategies read) and ``DETAILS`` (every per-client metric, as JSON).
"""

ARRAYS = "arrays"
FROZEN = "frozen"
CONFIG = "config"
METRICS = "metrics"
DETAILS = "details"
NUM_EXAMPLES = "num-examples"


def split_state(state: dict, shared_keys) -> tuple[dict, dict]:
    """(shared, frozen) parts of a full state dict."""
    shared_keys = set(shared_keys)
    return ({k: v for k, v in state.items() if k in shared_keys},
            {k: v for k, v in state.items() if k not in shared_keys})
