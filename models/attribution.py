"""Token attributions with Captum Integrated Gradients, and the explanation-fidelity metrics built
on them: ERASER comprehensiveness and sufficiency (with AOPC over several removal fractions) and
agreement between two attribution maps (Spearman rank correlation, top-k overlap)."""

from __future__ import annotations

import math

import numpy as np
import torch

from models.encoded import EncodedData
from models.tokenizer import content_positions

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


def integrated_gradients(model, data: EncodedData, targets: np.ndarray | None = None, n_steps: int = 16,
                         batch_size: int = 16) -> list[np.ndarray]:
    """Signed IG attribution per token (summed over the representation), one array per example,
    aligned with ``data.ids``. The baseline is the all-zeros representation; ``targets`` default
    to the model's own predictions (what ERASER explains)."""
    from captum.attr import IntegratedGradients

    model.eval()
    out: list[np.ndarray | None] = [None] * len(data)

    def forward(emb, mask):
        return model.classify(emb, mask)

    ig = IntegratedGradients(forward)
    for batch in data.batches(batch_size, shuffle=False):
        mask = batch.mask
        with torch.no_grad():
            emb = model.embed(batch.ids)
            target = (torch.from_numpy(targets[batch.index.numpy()]) if targets is not None
                      else model.classify(emb, mask).argmax(-1))
        attr = ig.attribute(emb, baselines=torch.zeros_like(emb), target=target,
                            additional_forward_args=(mask,), n_steps=n_steps,
                            internal_batch_size=batch_size * n_steps)
        attr = (attr.sum(-1) * mask).detach().numpy()
        for row, index in enumerate(batch.index.numpy()):
            out[index] = attr[row, : len(data.ids[index])].astype(np.float32)
    return out  # type: ignore[return-value]


def random_attributions(data: EncodedData, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(len(ids)).astype(np.float32) for ids in data.ids]


def top_tokens(attr: np.ndarray, ids: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The k real tokens with the most *signed* support for the explained (predicted) class, as
    ERASER defines rationales: a token with negative attribution is evidence against the
    prediction, so removing it should not count as removing the rationale."""
    positions = content_positions(ids)
    k = min(len(positions), max(1, math.ceil(fraction * len(positions))))
    ranked = positions[np.argsort(-attr[positions], kind="stable")]
    return ranked[:k], positions


@torch.no_grad()
def eraser_scores(model, data: EncodedData, attributions: list[np.ndarray],
                  fractions=FRACTIONS, batch_size: int = 128) -> dict:
    """ERASER (DeYoung et al., 2020) for the model's predicted class y on each example:
    comprehensiveness = p(y|x) - p(y|x without its top-k% tokens) (higher: the attribution found
    tokens the model needs); sufficiency = p(y|x) - p(y|only the top-k% tokens) (lower: those
    tokens alone suffice). AOPC averages each over ``fractions``. Removed tokens are deleted.
    ``attributions`` must be signed attributions for y (``integrated_gradients`` with its default
    targets): the top tokens are ranked by signed support, not by magnitude.
    """
    from models.training import predict_logits

    model.eval()
    probs = torch.softmax(torch.from_numpy(predict_logits(model, data, batch_size)), -1).numpy()
    predicted = probs.argmax(1)
    variants, owners = [], []
    for i, (ids, attr) in enumerate(zip(data.ids, attributions)):
        for fraction in fractions:
            top, positions = top_tokens(attr, ids, fraction)
            keep_without = np.setdiff1d(np.arange(len(ids)), top)
            keep_only = np.sort(np.concatenate([np.setdiff1d(np.arange(len(ids)), positions), top]))
            variants += [ids[keep_without], ids[keep_only]]
            owners.append(i)
    labels = np.repeat(predicted, 2 * len(fractions))
    variant_data = EncodedData(variants, labels, [""] * len(variants))
    variant_probs = torch.softmax(torch.from_numpy(predict_logits(model, variant_data, batch_size)), -1).numpy()
    picked = variant_probs[np.arange(len(variants)), labels].reshape(len(data), len(fractions), 2)
    base = probs[np.arange(len(data)), predicted][:, None]
    comp = base - picked[:, :, 0]
    suff = base - picked[:, :, 1]
    result = {"comprehensiveness": float(comp.mean()), "sufficiency": float(suff.mean())}
    for j, fraction in enumerate(fractions):
        result[f"comprehensiveness@{fraction:g}"] = float(comp[:, j].mean())
        result[f"sufficiency@{fraction:g}"] = float(suff[:, j].mean())
    return result


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def attribution_agreement(first: list[np.ndarray], second: list[np.ndarray], ids_list: list[np.ndarray],
                          top_fraction: float = 0.2) -> dict:
    """Mean Spearman correlation of |attribution| over content tokens, and mean overlap of the
    top-k tokens (k = top_fraction of content tokens, at least 1). Examples with fewer than two
    content tokens count for the overlap only."""
    spearman, overlap = [], []
    for a, b, ids in zip(first, second, ids_list):
        positions = content_positions(ids)
        if len(positions) == 0:
            continue
        x, y = np.abs(a[positions]), np.abs(b[positions])
        if len(positions) >= 2 and x.std() > 0 and y.std() > 0:
            spearman.append(float(np.corrcoef(_ranks(x), _ranks(y))[0, 1]))
        k = max(1, math.ceil(top_fraction * len(positions)))
        top_a = set(positions[np.argsort(-x, kind="stable")[:k]])
        top_b = set(positions[np.argsort(-y, kind="stable")[:k]])
        overlap.append(len(top_a & top_b) / k)
    return {"spearman": float(np.mean(spearman)) if spearman else float("nan"),
            "topk_overlap": float(np.mean(overlap)) if overlap else float("nan")}
