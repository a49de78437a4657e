"""Personalization modes: one class per algorithm, in one registry.

A mode says four things (as Flower's fedper/fedrep baselines do with their body/head split):
- ``shared_keys(model)``: the tensors that leave the device and are aggregated. Only trainable
  floating-point parameters ever travel: integer lookup buffers (the student's vocabulary map,
  PRADO's hash coefficients) are part of the artifact, never averaged. A mode can keep more at
  home (fedper and fedrep keep the head).
- ``train_round``: the round's local work, returning the model whose shared part is sent back and
  the personal state the device keeps (never sent).
- ``personal_model``: the model the user gets, from the received global model and that state.
- which of the proximal term (FedProx), DP-SGD and adversarial hardening it supports, so that
  ``RunSettings.validate`` rejects an unsupported combination before anything starts.

The modes are pure recipes over a ``Trainer`` the client supplies: ``trainer.shared`` trains
weights that leave the device (DP, hardening and the proximal term apply there), and
``trainer.personal`` trains weights that stay on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from models.encoded import EncodedData
from models.linear_head import fit_logit_bias
from models.protocol import HEAD_PREFIX

if TYPE_CHECKING:
    import torch


def predict_logits(model, data: EncodedData):
    from models.training import predict_logits as predict  # torch: imported when a mode runs, not to list modes

    return predict(model, data)


def trainable_float_names(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters: what may travel. Buffers never do."""
    return [name for name, param in model.named_parameters() if param.is_floating_point()]


class Trainer(Protocol):
    def shared(self, model, data: EncodedData, seed: int, trainable: Callable[[str], bool] | None = None) -> dict: ...

    def personal(self, model, data: EncodedData, seed: int, trainable: Callable[[str], bool] | None = None,
                 anchor: dict | None = None, weight: float = 0.0) -> dict: ...

    def head(self, model, data: EncodedData, seed: int) -> dict: ...


@dataclass
class RoundInputs:
    build: Callable[[], torch.nn.Module]  # a fresh network of the run's architecture
    received: dict[str, torch.Tensor]  # the global model as received: artifact buffers + shared weights
    data: EncodedData  # the client's own training rows
    seed: int
    settings: object  # RunSettings (mode knobs: personal-epochs, ditto-lambda, prior-l2, ...)
    trainer: Trainer

    def global_model(self) -> torch.nn.Module:
        model = self.build()
        model.load_state_dict(self.received)
        return model


def held_in_split(data: EncodedData, fraction: float) -> tuple[EncodedData, EncodedData]:
    """The client's training rows cut into (fit, validation): the last ``fraction`` of them (in
    their chronological order), at least one row when there are two or more."""
    n = len(data)
    n_val = min(n - 1, max(1, int(round(fraction * n)))) if n >= 2 else 0
    return data.subset(np.arange(n - n_val)), data.subset(np.arange(n - n_val, n))


def interpolate(first: dict, second: dict, alpha: float) -> dict:
    """alpha * first + (1 - alpha) * second for floating tensors; others from ``second``."""
    return {k: (alpha * first[k] + (1 - alpha) * v).to(v.dtype) if v.is_floating_point() else v
            for k, v in second.items()}


class Mode:
    name = "base"
    supports_proximal = True
    supports_dp = True
    supports_hardening = True
    description = ""

    def shared_keys(self, model) -> list[str]:
        return trainable_float_names(model)

    def start_model(self, inputs: RoundInputs, personal: dict | None):
        return inputs.global_model()

    def train_round(self, inputs: RoundInputs, personal: dict | None):
        """Returns (model to send, personal state to keep or None, training metrics)."""
        model = self.start_model(inputs, personal)
        return model, personal, inputs.trainer.shared(model, inputs.data, inputs.seed)

    def personal_model(self, inputs: RoundInputs, personal: dict | None):
        return inputs.global_model()


class Finetune(Mode):
    name = "finetune"
    description = "send the locally trained global model; the personal model is the global one fine-tuned locally"

    def personal_model(self, inputs, personal):
        model = inputs.global_model()
        if len(inputs.data):
            inputs.trainer.personal(model, inputs.data, inputs.seed)
        return model


class FedPer(Mode):
    name = "fedper"
    description = "body shared, classification head personal (Arivazhagan et al., 2019)"

    def shared_keys(self, model):
        return [k for k in trainable_float_names(model) if not k.startswith(HEAD_PREFIX)]

    def start_model(self, inputs, personal):
        model = inputs.global_model()
        if personal is not None:
            model.load_state_dict({**inputs.received, **personal})
        return model

    def train_round(self, inputs, personal):
        model, _, metrics = super().train_round(inputs, personal)
        return model, _head(model), metrics

    def personal_model(self, inputs, personal):
        return self.start_model(inputs, personal)


class FedRep(FedPer):
    name = "fedrep"
    supports_dp = False  # two differently-frozen phases per round; Opacus accounts one model
    description = "personal head trained with the body frozen, then the shared body (Collins et al., 2021)"

    def train_round(self, inputs, personal):
        model = self.start_model(inputs, personal)
        inputs.trainer.personal(model, inputs.data, inputs.seed + 1, trainable=lambda n: n.startswith(HEAD_PREFIX))
        metrics = inputs.trainer.shared(model, inputs.data, inputs.seed,
                                        trainable=lambda n: not n.startswith(HEAD_PREFIX))
        return model, _head(model), metrics


class Ditto(Mode):
    name = "ditto"
    description = "a separate personal model pulled toward the global one by (lambda/2)||w - w_g||^2 (Li et al., 2021)"

    def train_round(self, inputs, personal):
        model, _, metrics = super().train_round(inputs, personal)
        mine = inputs.build()
        mine.load_state_dict(personal if personal is not None else inputs.received)
        anchor = {k: v.clone() for k, v in inputs.received.items() if v.is_floating_point()}
        inputs.trainer.personal(mine, inputs.data, inputs.seed + 2, anchor=anchor,
                                weight=inputs.settings.ditto_lambda)
        return model, {k: v.detach().clone() for k, v in mine.state_dict().items()}, metrics

    def personal_model(self, inputs, personal):
        model = inputs.build()
        model.load_state_dict(personal if personal is not None else inputs.received)
        return model


class LabelPrior(Mode):
    name = "prior"
    description = "one per-user logit bias vector fitted on local rows with the global model frozen (L2 prior-l2)"

    def personal_model(self, inputs, personal):
        model = inputs.global_model()
        if len(inputs.data):
            import torch

            bias = self.user_bias(predict_logits(model, inputs.data), inputs.data.labels, inputs.settings)
            with torch.no_grad():
                model.head.bias.add_(torch.from_numpy(bias).to(model.head.bias.dtype))
        return model

    def user_bias(self, logits: np.ndarray, labels: np.ndarray, settings) -> np.ndarray:
        return fit_logit_bias(logits, labels, settings.prior_l2)


class LabelShift(LabelPrior):
    """A label-shift correction in closed form: the global model's logits + log(user's add-one
    smoothed label frequencies) - log(the model's mean predicted probabilities on the user's rows),
    the prior ratio of Saerens et al. (2002) with the user's labelled prior in place of their EM
    estimate. One step, not a fit: it moves the model's prior on the user's rows toward the user's
    (not all the way: on rows where the model is confident the mean moves less), and it cannot
    overfit rows the shared update has just seen. A model that calls 80% of everyone's rows
    positive is pulled toward each user's share."""

    name = "prior-shift"
    description = ("the global model's prior on the user's rows moved toward the user's label prior by their "
                   "ratio (closed form, after Saerens et al. 2002)")

    def user_bias(self, logits, labels, settings):
        return label_shift_bias(logits, labels)


def label_shift_bias(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log(user label prior, add-one smoothed) - log(mean softmax of ``logits``): the logit bias
    that moves the model's prior on these rows toward the user's (one step: see ``LabelShift``)."""
    from models.linear_head import log_label_prior, softmax

    shown = softmax(np.asarray(logits, dtype=np.float64)).mean(axis=0)
    return log_label_prior(labels, shown.size) - np.log(np.clip(shown, 1e-12, None))


class Head(LabelPrior):
    """Only the linear head is federated; the body stays as the artifact made it (sent in the
    frozen record). The round's training is ``models.linear_head.train_head`` on the body's
    features (eval mode, no dropout): the same numpy code on a device that computes the features
    with torch and on one that computes them with onnxruntime (``client/onnx_client.py``), so both
    kinds take part in one run. The personal model adds the user's logit bias (as ``prior``)."""

    name = "head"
    supports_dp = False  # DP-SGD is Opacus' (torch) and numpy has no per-sample clipping here
    supports_proximal = False
    supports_hardening = False  # embedding PGD needs the body's gradients
    description = ("only the linear head is shared and trained, on the frozen body's features (devices without "
                   "torch run the body as ONNX int8); personal = + per-user logit bias")

    def shared_keys(self, model):
        return [k for k in trainable_float_names(model) if k.startswith(HEAD_PREFIX)]

    def train_round(self, inputs, personal):
        model = inputs.global_model()
        return model, None, inputs.trainer.head(model, inputs.data, inputs.seed)


class Interpolate(Mode):
    """APFL-style mixture w = alpha * w_local + (1 - alpha) * w_global, with alpha chosen per user
    on held-in validation rows (the last ``holdout`` of the user's training rows, by validation
    loss, ties to the smaller alpha). alpha = 0 is the global model, so a user whose own rows
    say personalization does not help keeps the global model: never worse by design on held-in
    data. ``select`` is the same mechanism with alphas (0, 1)."""

    name = "mix"
    alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
    description = "APFL-style interpolation of local and global weights, alpha chosen on held-in rows"

    def personal_model(self, inputs, personal):
        global_model = inputs.global_model()
        fit_rows, val_rows = held_in_split(inputs.data, inputs.settings.holdout)
        if len(val_rows) == 0 or len(fit_rows) == 0:
            return global_model
        local = inputs.global_model()
        inputs.trainer.personal(local, fit_rows, inputs.seed)
        local_state, global_state = local.state_dict(), global_model.state_dict()
        best_alpha, best_loss = 0.0, _loss(global_model, val_rows)
        for alpha in self.alphas:
            if alpha == 0.0:
                continue
            candidate = inputs.build()
            candidate.load_state_dict(interpolate(local_state, global_state, alpha))
            loss = _loss(candidate, val_rows)
            if loss < best_loss - 1e-9:
                best_alpha, best_loss = alpha, loss
        model = inputs.build()
        model.load_state_dict(interpolate(local_state, global_state, best_alpha))
        model.chosen_alpha = best_alpha
        return model


class Select(Interpolate):
    name = "select"
    alphas = (0.0, 1.0)
    description = "the locally fine-tuned model only when held-in rows say it beats the global one, else global"


def _head(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)}


def _loss(model, data: EncodedData) -> float:
    import torch
    from torch.nn import functional as F

    logits = torch.from_numpy(predict_logits(model, data))
    return float(F.cross_entropy(logits, torch.from_numpy(data.labels)))


MODES: dict[str, Mode] = {mode.name: mode for mode in
                          (Finetune(), FedPer(), FedRep(), Ditto(), LabelPrior(), LabelShift(), Head(), Interpolate(),
                           Select())}


def get_mode(name: str) -> Mode:
    return MODES[name]
