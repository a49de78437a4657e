"""One training loop for every network and objective: server distillation and client
fine-tuning both call ``fit``."""

from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np
import torch

from models.encoded import EncodedData
from models.errors import FedrexError
from models.objectives import ObjectiveConfig, objective_loss


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def fit(model, data: EncodedData, objective: ObjectiveConfig, *, epochs: float = 1.0,
        max_steps: int | None = None, batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 0.0,
        seed: int = 0, optimizer: torch.optim.Optimizer | None = None,
        extra_loss: Callable[[], torch.Tensor] | None = None, grad_clip: float | None = 1.0,
        progress: str | None = None, log_every: int = 50) -> dict:
    """Train ``model`` in place. Returns {"steps", "seconds", "loss": mean total, parts...}.

    ``epochs`` may be fractional; ``max_steps`` caps it. ``extra_loss`` adds a term computed from
    the model alone (FedProx/Ditto proximal terms). ``progress`` names the run in progress lines.
    """
    objective.validate()
    if len(data) == 0:
        raise FedrexError("cannot train on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(data) // batch_size))
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    rng = np.random.default_rng(seed)
    model.train()
    sums: dict[str, float] = {}
    step, epoch, start = 0, 0, time.time()
    while step < total_steps:
        for batch in data.batches(batch_size, shuffle=True, seed=seed + epoch):
            use_adv = objective.adv > 0 and rng.random() < objective.adv_ratio
            loss, parts = objective_loss(model, batch, objective, use_adv=use_adv)
            if extra_loss is not None:
                extra = extra_loss()
                loss, parts["prox"] = loss + extra, extra.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip and not getattr(optimizer, "is_dp", False):
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            parts["loss"] = loss.item()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            step += 1
            if progress and (step % log_every == 0 or step == total_steps):
                shown = "  ".join(f"{k} {v / step:.4f}" for k, v in sums.items())
                print(f"[{progress}] step {step}/{total_steps}  {shown}  ({time.time() - start:.0f}s)",
                      file=sys.stderr, flush=True)
            if step >= total_steps:
                break
        epoch += 1
    model.eval()
    return {"steps": step, "seconds": time.time() - start, **{k: v / max(step, 1) for k, v in sums.items()}}


@torch.no_grad()
def predict_logits(model, data: EncodedData, batch_size: int = 128) -> np.ndarray:
    """Logits in the original row order (batches are length-bucketed internally)."""
    model.eval()
    out = np.zeros((len(data), 0), dtype=np.float32)
    rows = []
    for batch in data.batches(batch_size, shuffle=False, bucket=True):
        rows.append((batch.index.numpy(), model(batch.ids).float().numpy()))
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
