"""The small simulated federation the simulation tests share (tests/test_federated.py,
tests/test_flower_app.py): 8 critics with >= 300 reviews, each round to seconds, through Flower's
real simulation engine."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from simulations.simulate import load_settings, simulate

# tiny per-client evaluation to keep each round to seconds
SMALL = ["dataset=rt_critics", "min-samples=300", "num-rounds=3", "evaluate-every=1", "fraction-train=0.5",
         "local-max-steps=10", "attack-examples=5", "fidelity-examples=5", "ig-steps=4", "seed=3",
         "simulation-nodes=3",  # fewer nodes than its 8 users: a pool serves them
         # every round measured alike, so a shorter run's rows are the longer run's first rounds (with
         # the default, `clean`, the last round of a shorter run measures attacks that the longer skips)
         "evaluate-between=full"]


def run(tmp: Path, *pairs, control=None) -> Path:
    settings = load_settings(None, [*SMALL, *pairs, f"runs-dir={tmp}"])
    return simulate(settings, control)


def tidy(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "clients.parquet")
    timing = frame["metric"].isin(["train_seconds", "seconds"])
    return frame[~timing].drop(columns="run_id").sort_values(["round", "partition_id", "model", "metric"]).reset_index(drop=True)
