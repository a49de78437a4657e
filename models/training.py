"""One training loop for every network and objective: server distillation and client
fine-tuning both call ``fit``."""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from typing import Callable

import numpy as np
import torch

from models.encoded import EncodedData
from models.errors import FedrexError
from models.linear_head import log_label_prior
from models.objectives import ObjectiveConfig, objective_loss
from models.training_config import OPTIMIZERS


def _without_compiler_guards(optimizer_class: type) -> type:
    """``optimizer_class`` with its ``step``, ``zero_grad`` and ``add_param_group`` called as they
    are, not through the guards torch wraps them in for its compiler: the first guard to run imports
    ``torch._dynamo`` (1.6 s of CPU, 68 MiB and 820 modules on the 2-core machine; more on a phone)
    in a process that compiles nothing, which every simulated client and every device message that
    trains or fits a personal model paid. The arithmetic is torch's own, bit for bit
    (tests/test_learning.py); ``step`` runs under no_grad, as torch's wrapper runs a
    non-differentiable optimizer's."""
    step = inspect.unwrap(optimizer_class.step)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)

    class Unguarded(optimizer_class):
        def step(self, closure=None):
            with torch.no_grad():
                return step(self, closure)

        def zero_grad(self, set_to_none: bool = True) -> None:
            return zero_grad(self, set_to_none)

        def add_param_group(self, param_group: dict) -> None:
            return add_param_group(self, param_group)

    Unguarded.__name__ = Unguarded.__qualname__ = optimizer_class.__name__
    return Unguarded


AdamW = _without_compiler_guards(torch.optim.AdamW)
SGD = _without_compiler_guards(torch.optim.SGD)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def fit(model, data: EncodedData, objective: ObjectiveConfig, *, epochs: float = 1.0,
        max_steps: int | None = None, batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 0.0,
        seed: int = 0, extra_loss: Callable[[], torch.Tensor] | None = None, grad_clip: float | None = 1.0,
        balanced: bool = False, optimizer: str = "adamw", privacy=None, progress: str | None = None,
        log_every: int = 50, augment: Callable[[EncodedData, int], EncodedData] | None = None,
        candidates=None) -> dict:
    """Train ``model`` in place. Returns {"steps", "samples" (rows processed: the work a device
    does, which the virtual clock charges), "seconds", "loss": mean total, parts...}.

    ``epochs`` may be fractional; ``max_steps`` caps it. ``extra_loss`` adds a term computed from
    the model alone (FedProx/Ditto proximal terms). ``balanced``: logit-adjusted cross-entropy
    (``label_log_prior``), so a client whose rows are mostly one label does not teach the shared
    model its own label prior. ``privacy`` (``client.privacy.PrivateTraining``) makes this loop
    DP-SGD: it supplies the batches and the optimizer step and nothing else changes.
    ``optimizer``: "adamw", or "sgd" (plain SGD, whose step is proportional to the gradient: with
    the one or two local steps a tiny client takes, a fresh Adam steps +-lr on every parameter the
    batch touches whatever the gradient's size, and averaging such sign steps over clients pushes
    the shared model toward the majority label). ``progress`` names the run in progress lines.
    ``augment(data, epoch)`` returns the rows to train on in that epoch (``models.augment``:
    perturbed text drawn fresh each epoch). ``candidates``: each token's substitution candidates
    (``models.robust.synonym_hull``): the ADV term's adversary searches their hull, not a ball.
    """
    objective.validate()
    if len(data) == 0:
        raise FedrexError("cannot train on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer not in OPTIMIZERS:
        raise FedrexError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    optimizer = (AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw"
                 else SGD(params, lr=lr, weight_decay=weight_decay))
    adjust = label_log_prior(data.labels, _num_labels(model)) if balanced else None
    steps_per_epoch = max(1, -(-len(data) // batch_size))
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    guard = contextlib.nullcontext
    if privacy is not None:
        if extra_loss is not None:
            raise FedrexError("a proximal term has no per-sample gradients: it cannot be trained under DP")
        if augment is not None:
            raise FedrexError("perturbed-text training is not supported under DP (its rows change every epoch)")
        batches, optimizer = privacy.attach(model, optimizer, data, batch_size, total_steps)
        guard = privacy.hooks_off
    else:
        batches = _shuffled_epochs(data, batch_size, seed, augment)
    rng = np.random.default_rng(seed)
    model.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    samples = 0
    start = time.time()
    for step in range(1, total_steps + 1):
        batch = next(batches)
        samples += len(batch.labels)
        if len(batch.labels) == 0:  # only a Poisson (DP) draw can be empty
            loss, parts = privacy.empty_batch_loss(model, batch), {}
        else:
            use_adv = objective.adv > 0 and rng.random() < objective.adv_ratio
            loss, parts = objective_loss(model, batch, objective, use_adv=use_adv, logit_adjust=adjust,
                                         attack_guard=guard, candidates=candidates)
            if extra_loss is not None:
                extra = extra_loss()
                loss, parts["prox"] = loss + extra, extra.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if privacy is not None:
            privacy.step()
        else:
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        parts["loss"] = loss.item()
        for key, value in parts.items():  # a part's mean is over the steps that computed it (adv: some)
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
        if progress and (step % log_every == 0 or step == total_steps):
            shown = "  ".join(f"{k} {v / counts[k]:.4f}" for k, v in sums.items())
            print(f"[{progress}] step {step}/{total_steps}  {shown}  ({time.time() - start:.0f}s)",
                  file=sys.stderr, flush=True)
    model.eval()
    result = {"steps": total_steps, "samples": samples, "seconds": time.time() - start,
              **{k: v / counts[k] for k, v in sums.items()}}
    if privacy is not None:
        result.update(privacy.finish())
        # Poisson batches vary with the draw, which is the device's own (not reproducible unless
        # dp-reproducible-noise): the device clock charges the expected rows, the same in every replay
        result["drawn_samples"] = samples
        result["samples"] = int(round(total_steps * result["sample_rate"] * len(data)))
    return result


def _shuffled_epochs(data: EncodedData, batch_size: int, seed: int, augment=None):
    """Shuffled, length-bucketed batches, epoch after epoch (epoch e shuffled with seed + e)."""
    epoch = 0
    while True:
        rows = data if augment is None else augment(data, epoch)
        yield from rows.batches(batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def label_log_prior(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    """log of the add-one smoothed label distribution of ``labels``. Added to the logits inside
    the cross-entropy (logit adjustment, Menon et al. 2021), it absorbs a skewed local prior so the
    weights learn what separates the labels rather than which label this client sees most."""
    return torch.from_numpy(log_label_prior(labels, num_labels)).float()


def _num_labels(model) -> int:
    head = getattr(model, "head", None)
    if head is None:
        raise FedrexError(f"{type(model).__name__} has no head: balanced loss needs the number of labels")
    return head.out_features


@torch.no_grad()
def predict_logits(model, data: EncodedData, batch_size: int = 128) -> np.ndarray:
    """Logits in the original row order (batches are length-bucketed internally)."""
    return _predict(model, model, data, batch_size)


def predict_features(model, data: EncodedData, batch_size: int = 128) -> np.ndarray:
    """The body's features (what the head reads), in the original row order."""
    return _predict(model, model.features, data, batch_size)


@torch.no_grad()
def _predict(model, function, data: EncodedData, batch_size: int) -> np.ndarray:
    model.eval()
    out = np.zeros((len(data), 0), dtype=np.float32)
    rows = []
    for batch in data.batches(batch_size, shuffle=False, bucket=True):
        rows.append((batch.index.numpy(), function(batch.ids).float().numpy()))
    if not rows:
        return out
    width = rows[0][1].shape[1]
    out = np.zeros((len(data), width), dtype=np.float32)
    for index, logits in rows:
        out[index] = logits
    return out


def accuracy(model, data: EncodedData, batch_size: int = 128) -> float:
    if len(data) == 0:
        return float("nan")
    return float((predict_logits(model, data, batch_size).argmax(1) == data.labels).mean())
