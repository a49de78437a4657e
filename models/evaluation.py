"""Evaluation shared by the server (distillation cards, benchmarks) and every client:
accuracy, accuracy under attack, and explanation fidelity."""

from __future__ import annotations

import numpy as np

from models.attacks import attack_dataset
from models.attribution import attribution_agreement, eraser_scores, integrated_gradients, random_attributions
from models.encoded import EncodedData
from models.tokenizer import WordPieceTokenizer


def take(n_rows: int, limit: int, seed: int) -> np.ndarray:
    """A seeded subset of at most ``limit`` row indices (all rows when limit is 0 or large)."""
    if limit <= 0 or limit >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=limit, replace=False))


def robustness(model, tokenizer: WordPieceTokenizer, data: EncodedData, attacks=("char",),
               budget: float = 0.2, limit: int = 200, seed: int = 0, candidates=None, victim=None) -> dict:
    """{attack: summary} on a seeded subset of at most ``limit`` examples, none (``{}``) when limit
    is 0, as every caller's "0 attacked rows" means (``candidates``: HotFlip's token set;
    ``victim``: a defence the black-box recipes query instead of the model)."""
    if limit <= 0:  # not ``take``'s "every row": turning attacks off must not attack the whole split
        return {}
    rows = take(len(data), limit, seed)
    texts, labels = [data.texts[i] for i in rows], data.labels[rows]
    return {name: attack_dataset(name, model, tokenizer, texts, labels, budget, seed, candidates, victim)[0]
            for name in attacks}


def fidelity(model, data: EncodedData, references: dict | None = None, ig_steps: int = 8,
             limit: int = 200, seed: int = 0, eraser: bool = True) -> tuple[dict, list[np.ndarray]]:
    """ERASER scores of the model's own IG attributions on a seeded subset, the comprehensiveness
    of random maps on the same rows (``comprehensiveness_random``: what ranking tokens at random
    buys, so the score can be read), and agreement with each reference (``{prefix: maps by row}``,
    e.g. the teacher's, the global or the start model's maps; None values are skipped), keyed
    ``<prefix>agreement_<measure>``. Returns (metrics, the model's attributions for those rows).
    ``eraser=False``: the attributions only."""
    rows = take(len(data), limit, seed)
    subset = data.subset(rows)
    attr = integrated_gradients(model, subset, n_steps=ig_steps)
    if not eraser:
        return {}, attr
    metrics = eraser_scores(model, subset, attr)
    metrics["comprehensiveness_random"] = eraser_scores(model, subset,
                                                        random_attributions(subset, seed))["comprehensiveness"]
    for prefix, reference in (references or {}).items():
        if reference is not None:
            agreement = attribution_agreement(attr, [reference[i] for i in rows], subset.ids)
            metrics.update({f"{prefix}agreement_{k}": v for k, v in agreement.items()})
    return metrics, attr
