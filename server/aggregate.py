"""Per-round summaries of per-client metrics: mean with its 95% confidence half-width, weighted
mean by test rows (for accuracy: the pooled accuracy over every evaluated row), median, p10, min."""

from __future__ import annotations

import numpy as np
import pandas as pd

STATS = ("mean", "ci95", "weighted_mean", "median", "p10", "min", "max", "count")


def ci95(values: np.ndarray) -> float:
    """Half-width of the normal 95% confidence interval of the mean (nan for < 2 values)."""
    return float(1.96 * values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("nan")


def summarize(rows: pd.DataFrame, weights: pd.Series | None = None) -> pd.DataFrame:
    """``rows``: tidy (client_id, model, metric, value) for one round. ``weights``: client_id ->
    weight (test rows). Returns tidy (model, metric, stat, value)."""
    out = []
    for (model, metric), group in rows.groupby(["model", "metric"], observed=True, sort=True):
        values = group["value"].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        finite = group[np.isfinite(group["value"].to_numpy(dtype=float))]
        w = (finite["client_id"].map(weights).fillna(0).to_numpy(dtype=float) if weights is not None
             else np.ones(len(finite)))
        weighted = float(np.average(values, weights=w)) if w.sum() > 0 else float("nan")
        stats = {"mean": float(values.mean()), "ci95": ci95(values), "weighted_mean": weighted, "median": float(np.median(values)),
                 "p10": float(np.percentile(values, 10)), "min": float(values.min()), "max": float(values.max()),
                 "count": float(values.size)}
        out += [{"model": model, "metric": metric, "stat": s, "value": v} for s, v in stats.items()]
    return pd.DataFrame(out, columns=["model", "metric", "stat", "value"])
