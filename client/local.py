"""Local work of one client in one round: fine-tuning the received global model (optionally
adversarially hardened, explanation-preserving, FedProx-regularised or DP-SGD) and updating the
personal model each personalization mode keeps.

Modes (what the personal model is, and what leaves the device):
- ``finetune``: the update sent is the locally trained global model; the personal model is the
  latest global model fine-tuned on local data at evaluation time and never leaves the device.
- ``fedper``: the classification head is personal (kept in state, never averaged in); the body is
  trained jointly and shared.
- ``fedrep``: like fedper, but the round first trains the personal head with the body frozen,
  then the body with the head frozen (Collins et al., 2021).
- ``ditto``: the shared update is plain local training; a separate personal model is trained
  with a proximal pull (lambda/2)||w - w_global||^2 toward the global model (Li et al., 2021).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from models.encoded import EncodedData
from models.errors import FedrexError
from models.objectives import ObjectiveConfig, saliency
from models.run_settings import RunSettings
from models.training import fit, seed_everything

HEAD_PREFIX = "head."


def round_seed(settings: RunSettings, round_number: int, partition_id: int, salt: int = 0) -> int:
    """Every random choice of a client in a round derives from (run seed, round, partition), so
    results do not depend on which Ray actor or device runs it."""
    return int(np.random.SeedSequence([settings.seed, round_number, partition_id, salt]).generate_state(1)[0])


def proximal_term(model, anchor: dict[str, torch.Tensor], weight: float):
    if weight <= 0:
        return None
    params = dict(model.named_parameters())

    def term() -> torch.Tensor:
        return 0.5 * weight * sum(((params[k] - anchor[k]) ** 2).sum() for k in anchor if k in params)

    return term


def with_reference_saliency(model, data: EncodedData) -> EncodedData:
    """Attach the received global model's saliency maps as the EXPL target: local training then
    keeps attributions close to the global model's instead of drifting while it adapts."""
    maps: list = [None] * len(data)
    model.eval()
    for batch in data.batches(64):
        sal = saliency(model, model.embed(batch.ids), batch.mask, model(batch.ids).argmax(-1), create_graph=False)
        for row, index in enumerate(batch.index.numpy()):
            maps[index] = sal[row, : len(data.ids[index])].detach().numpy()
    out = data.subset(np.arange(len(data)))
    out.teacher_attr = maps
    return out


def local_fit(model, data: EncodedData, settings: RunSettings, objective: ObjectiveConfig, seed: int,
              epochs: float, extra_loss=None, trainable=None) -> dict:
    """``fit`` restricted to the ``trainable`` parameters (all when None). Seeds torch first:
    dropout draws from the global generator, whose state would otherwise depend on whatever the
    same Ray actor ran before."""
    seed_everything(seed)
    if trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(trainable(name))
    try:
        return fit(model, data, objective, epochs=epochs, max_steps=settings.local_max_steps,
                   batch_size=settings.batch_size, lr=settings.lr, seed=seed, extra_loss=extra_loss)
    finally:
        for param in model.parameters():
            param.requires_grad_(True)


def train_shared(model, data: EncodedData, settings: RunSettings, seed: int, proximal_mu: float,
                 global_state: dict[str, torch.Tensor], state) -> dict:
    """Train the model whose weights are sent back; returns metrics (incl. epsilon under DP)."""
    objective = settings.objective()
    if objective.expl > 0:
        data = with_reference_saliency(model, data)
    if settings.dp:
        from client.privacy import dp_fit

        return dp_fit(model, data, settings, objective, seed, state)
    anchor = {k: v.clone() for k, v in global_state.items()}
    return local_fit(model, data, settings, objective, seed, settings.local_epochs,
                     extra_loss=proximal_term(model, anchor, proximal_mu))


def personal_model(build, global_state: dict[str, torch.Tensor], state, settings: RunSettings,
                   data: EncodedData, seed: int):
    """The personal model for evaluation, per mode (see module docstring)."""
    model = build()
    model.load_state_dict(global_state)
    if settings.mode == "finetune":
        if len(data):
            local_fit(model, data, settings, ObjectiveConfig(), seed, settings.personal_epochs)
    elif state.personal is not None:
        if settings.mode in ("fedper", "fedrep"):
            model.load_state_dict({**global_state, **state.personal})
        else:
            model.load_state_dict(state.personal)
    model.eval()
    return model


def train_round(build, global_state: dict[str, torch.Tensor], data: EncodedData, settings: RunSettings,
                state, round_number: int, partition_id: int, proximal_mu: float):
    """One round of local work. Returns (weights to send, metrics) and updates ``state``."""
    if len(data) == 0:
        raise FedrexError(f"client {partition_id} has no training rows")
    start = time.time()
    seed = round_seed(settings, round_number, partition_id)
    seed_everything(seed)
    model = build()
    if settings.mode in ("fedper", "fedrep") and state.personal is not None:
        model.load_state_dict({**global_state, **state.personal})
    else:
        model.load_state_dict(global_state)
    if settings.mode == "fedrep":  # personal head first (body frozen), then the shared body
        local_fit(model, data, settings, ObjectiveConfig(), seed + 1, settings.personal_epochs,
                  trainable=lambda name: name.startswith(HEAD_PREFIX))
        metrics = local_fit(model, data, settings, settings.objective(), seed, settings.local_epochs,
                            trainable=lambda name: not name.startswith(HEAD_PREFIX))
        if settings.dp:
            raise FedrexError("dp is supported with the finetune, fedper and ditto modes")
    else:
        metrics = train_shared(model, data, settings, seed, proximal_mu, global_state, state)
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if settings.mode in ("fedper", "fedrep"):
        state.personal = {k: v for k, v in sent.items() if k.startswith(HEAD_PREFIX)}
    elif settings.mode == "ditto":
        personal = build()
        personal.load_state_dict(state.personal if state.personal is not None else global_state)
        anchor = {k: v.clone() for k, v in global_state.items()}
        local_fit(personal, data, settings, settings.objective(), seed + 2, settings.personal_epochs,
                  extra_loss=proximal_term(personal, anchor, settings.ditto_lambda))
        state.personal = {k: v.detach().clone() for k, v in personal.state_dict().items()}
    state.last_round = round_number
    state.train_seconds = time.time() - start
    metrics = {**{k: v for k, v in metrics.items() if k != "seconds"}, "train_seconds": state.train_seconds}
    return sent, metrics
