"""Closed-form label-shift corrections of the start model, per user, on FedREX's split.

    python benchmarks/label_shift.py [--datasets rt_critics,sent140_users]

The reference "start model + user label prior" (``references.with_label_prior``: log p(y|x) plus
the log of the user's add-one smoothed training label frequencies) is the row no federated mode
has beaten on tweets. This script asks whether a better closed form exists before anything is
trained: the same correction with the prior weighted (0.5-3), the prior counted over the user's
most recent training rows only (the labels drift over time: Sentiment140's training tweets are
65.5% positive, the later held-out ones 50.5%) or with recency-decayed counts, the Bayes form
that also divides out the model's own mean prediction on the user's training rows, and the
EM re-estimate of the prior from the model's posteriors on the held-out rows themselves
(Saerens et al., 2002; transductive: it reads the unlabelled held-out texts, as a device could
read its user's new messages), with the training prior as a Dirichlet prior of a given strength.
Every row is per-user mean accuracy on the same held-out rows as the personalization table.
Results: results/label_shift.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.load import ci95  # noqa: E402
from analysis.report import markdown_table  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.encoded import EncodedData  # noqa: E402
from models.training import predict_logits  # noqa: E402
from personalization import DATASETS  # noqa: E402
from references import start_tokenizer, user_splits, with_label_prior  # noqa: E402
from server.app import global_model  # noqa: E402
from simulations.simulate import load_settings  # noqa: E402


def weighted_log_prior(labels: np.ndarray, weights: np.ndarray | None = None, num_labels: int = 2) -> np.ndarray:
    """log of the (weighted) label counts plus one each: ``log_label_prior`` when unweighted."""
    weights = np.ones(len(labels)) if weights is None else weights
    counts = np.array([weights[labels == k].sum() for k in range(num_labels)]) + 1.0
    return np.log(counts / counts.sum())


def em_prior(log_probs_test: np.ndarray, log_prior_train: np.ndarray, model_log_prior: np.ndarray,
             strength: float, iterations: int = 100) -> np.ndarray:
    """Saerens-Latinne-Decaestecker EM: the label prior of the held-out rows that makes the
    corrected posteriors' mean equal to it, MAP with a Dirichlet prior centred on the training
    prior worth ``strength`` x (held-out rows + 2) pseudo-rows. Returns corrected log-posteriors."""
    pseudo = strength * (len(log_probs_test) + 2)
    prior = np.exp(log_prior_train)
    for _ in range(iterations):
        scores = log_probs_test - model_log_prior + np.log(prior)
        posterior = np.exp(scores - scores.max(1, keepdims=True))
        posterior /= posterior.sum(1, keepdims=True)
        prior = (posterior.sum(0) + pseudo * np.exp(log_prior_train)) / (len(log_probs_test) + pseudo)
    return log_probs_test - model_log_prior + np.log(prior)


def corrections() -> dict[str, callable]:
    """name -> f(train labels, log-probs on train rows, log-probs on held-out rows) -> scores."""
    rows = {"start model": lambda y, train, test: test,
            "start model + user label prior (the reference)": lambda y, train, test: with_label_prior(test, y)}
    for weight in (0.5, 2.0, 3.0):
        rows[f"prior weighted x{weight:g}"] = lambda y, train, test, w=weight: test + w * weighted_log_prior(y)
    for last in (5, 10):
        rows[f"prior of the last {last} training rows"] = lambda y, train, test, k=last: test + weighted_log_prior(y[-k:])
    for half_life in (5, 20):
        rows[f"prior with recency decay (half-life {half_life} rows)"] = (
            lambda y, train, test, h=half_life: test + weighted_log_prior(y, 0.5 ** (np.arange(len(y))[::-1] / h)))
    rows["Bayes: / model's mean prediction on the training rows"] = (
        lambda y, train, test: test + weighted_log_prior(y) - np.log(np.exp(train).mean(0)))
    for strength in (0.3, 1.0):
        rows[f"EM on the held-out rows (transductive), Dirichlet strength {strength:g}"] = (
            lambda y, train, test, s=strength: em_prior(test, weighted_log_prior(y), np.log(np.exp(train).mean(0)), s))
    return rows


def measure(dataset: str) -> dict[str, dict[str, float]]:
    settings = load_settings(None, DATASETS[dataset])
    model, _ = global_model(settings)
    tokenizer = start_tokenizer(settings)
    per_user: dict[str, dict[str, float]] = {name: {} for name in corrections()}
    for client_id, train_x, train_y, test_x, test_y in user_splits(settings):
        def log_probs(texts, labels):
            logits = predict_logits(model, EncodedData.from_texts(texts, labels, tokenizer))
            return torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
        train, test = log_probs(train_x, train_y), log_probs(test_x, test_y)
        for name, correct in corrections().items():
            per_user[name][client_id] = float((correct(train_y, train, test).argmax(1) == test_y).mean())
    return per_user


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="rt_critics,sent140_users")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    results, body = {}, []
    for dataset in args.datasets.split(","):
        print(f"[label-shift] {dataset}", file=sys.stderr, flush=True)
        results[dataset] = measure(dataset)
        for name, accuracy in results[dataset].items():
            values = np.array(list(accuracy.values()))
            body.append([dataset, name, str(values.size), f"{values.mean():.3f} ± {ci95(values):.3f}"])
    out = Path(args.out)
    atomic_write_json(out / "label_shift.json", results)
    md = markdown_table(pd.DataFrame(body, columns=["dataset", "correction of the start model", "users",
                                                    "per-user acc mean ± 95% CI"]))
    atomic_write_bytes(out / "label_shift.md", (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
