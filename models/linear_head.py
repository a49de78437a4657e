"""The linear head over a frozen body's features, in numpy: trained with the loop ``fit`` runs (AdamW
or SGD, gradient clipping at 1, shuffled epochs capped by max-steps; no dropout: the features come
from the body in eval mode), and
the per-user logit bias of the ``prior`` and ``head`` modes (a convex problem, solved by Newton's
method with a line search). The one implementation for torch and torch-less devices alike: a device without a torch
wheel computes the body's features with onnxruntime, every other with torch, and from the features
on everything is this module. numpy only.
"""

from __future__ import annotations

import numpy as np

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults
GRAD_CLIP = 1.0  # fit's global gradient-norm clip


def log_label_prior(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """log of the add-one smoothed label distribution: the balanced loss adds it to the logits
    (logit adjustment, Menon et al. 2021; ``models.training.label_log_prior`` is its torch form)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def head_logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return features @ weight.T + bias


def _batches(n: int, batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def train_head(weight: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray, *, lr: float,
               epochs: float, max_steps: int, batch_size: int, seed: int, optimizer: str = "adamw",
               logit_adjust: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cross-entropy training of ``features @ weight.T + bias``; returns new (weight, bias) in
    their dtypes and {"steps", "samples", "loss"} as ``fit`` reports them. ``logit_adjust``: the
    balanced loss's log label prior, added to the logits in training only."""
    n = len(labels)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = min(max(1, int(round(epochs * steps_per_epoch))), max_steps)
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    moments = [np.zeros_like(w), np.zeros_like(b)], [np.zeros_like(w), np.zeros_like(b)]
    batches, samples, loss_sum = _batches(n, batch_size, seed), 0, 0.0
    for step in range(1, total + 1):
        rows = next(batches)
        x, y = features[rows].astype(np.float64), labels[rows]
        logits = x @ w.T + b + (logit_adjust if logit_adjust is not None else 0.0)
        p = softmax(logits)
        loss_sum += float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-300)).mean())
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        grads = [p.T @ x, p.sum(axis=0)]
        norm = np.sqrt(sum(float((g ** 2).sum()) for g in grads))
        if norm > GRAD_CLIP:
            grads = [g * (GRAD_CLIP / (norm + 1e-6)) for g in grads]
        for i, (param, grad) in enumerate(zip((w, b), grads)):
            if optimizer == "sgd":
                param -= lr * grad
                continue
            first, second = moments[0][i], moments[1][i]
            first[:] = ADAM_BETAS[0] * first + (1 - ADAM_BETAS[0]) * grad
            second[:] = ADAM_BETAS[1] * second + (1 - ADAM_BETAS[1]) * grad ** 2
            corrected = first / (1 - ADAM_BETAS[0] ** step)
            scale = np.sqrt(second / (1 - ADAM_BETAS[1] ** step)) + ADAM_EPS
            param -= lr * corrected / scale
        samples += len(rows)
    return (w.astype(weight.dtype), b.astype(bias.dtype),
            {"steps": total, "samples": samples, "loss": loss_sum / total})


def bias_objective(logits: np.ndarray, labels: np.ndarray, l2: float, b: np.ndarray) -> float:
    """mean CE(logits + b, y) + (l2 / 2) ||b||^2: what ``fit_logit_bias`` minimises."""
    z = np.asarray(logits, dtype=np.float64) + b
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean() + 0.5 * l2 * (b @ b))


def fit_logit_bias(logits: np.ndarray, labels: np.ndarray, l2: float, max_iter: int = 200) -> np.ndarray:
    """argmin_b mean CE(logits + b, y) + (l2 / 2) ||b||^2, by Newton's method with a backtracking
    (Armijo) line search: the problem is strictly convex in C numbers, but a full Newton step
    overshoots when the model strongly disagrees with a user's labels and the L2 weight is small
    (the curvature vanishes where the softmax saturates), and undamped it oscillates. Few rows ->
    the L2 term keeps b near 0 (the model's own prior)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    c = z.shape[1]
    onehot = np.eye(c)[y]
    b = np.zeros(c)
    value = bias_objective(z, y, l2, b)
    for _ in range(max_iter):
        p = softmax(z + b)
        grad = (p - onehot).mean(axis=0) + l2 * b
        if np.abs(grad).max() < 1e-12:
            break
        hessian = (np.diag(p.sum(axis=0)) - p.T @ p) / len(y) + l2 * np.eye(c)
        step = np.linalg.solve(hessian, grad)
        t, decrease = 1.0, float(grad @ step)  # > 0: the Hessian is positive definite
        while t > 1e-12:
            candidate = bias_objective(z, y, l2, b - t * step)
            if candidate <= value - 1e-4 * t * decrease:
                break
            t *= 0.5
        else:  # no decrease left at machine precision: b is the minimum
            break
        b, value = b - t * step, candidate
        if np.abs(t * step).max() < 1e-12:
            break
    return b


def head_work(metrics: dict, rows: int) -> dict:
    """Mode head's work for the device clock: one forward pass of the frozen body per row
    (``forward_samples``); the numpy head's steps (``head_samples``) cost next to nothing (about
    3 ms for 200 rows against 77 ms for the body), so they are not charged as training samples."""
    return {**metrics, "samples": 0, "head_samples": metrics.get("samples", 0), "forward_samples": rows}


def train_linear_head(settings, weight: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray,
                      seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """``train_head`` with a run's local-training settings (RunSettings): the one call both kinds
    of device make in mode ``head``."""
    adjust = log_label_prior(labels, weight.shape[0]) if settings.balanced_loss else None
    return train_head(weight, bias, features, labels, lr=settings.lr, epochs=settings.local_epochs,
                      max_steps=settings.local_max_steps, batch_size=settings.batch_size, seed=seed,
                      optimizer=settings.client_optimizer, logit_adjust=adjust)
