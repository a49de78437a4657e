"""Local work of one client in one round, for every personalization mode in
``models/personalization.py``: this module supplies the ``Trainer`` the modes call.

- ``Trainer.shared`` trains weights that leave the device: adversarial hardening, the
  explanation-preserving term, the FedProx proximal term and DP-SGD apply here.
- ``Trainer.personal`` trains weights that stay on the device (plain cross-entropy, optionally
  pulled toward an anchor, as Ditto does).

Only the mode's shared tensors are sent back; everything else (artifact buffers, personal heads,
personal models) stays where it is.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch

from client.data import round_seed
from models.encoded import EncodedData
from models.errors import FedrexError
from models.linear_head import head_work, train_linear_head
from models.objectives import ObjectiveConfig, saliency
from models.personalization import RoundInputs, get_mode
from models.run_settings import RunSettings
from models.attribution import FRACTIONS, top_tokens
from models.tokenizer import content_mask
from models.training import fit, predict_logits, seed_everything


def proximal_term(model, anchor: dict[str, torch.Tensor] | None, weight: float):
    if weight <= 0 or not anchor:
        return None
    params = dict(model.named_parameters())

    def term() -> torch.Tensor:
        return 0.5 * weight * sum(((params[k] - anchor[k]) ** 2).sum() for k in anchor if k in params)

    return term


def with_reference_saliency(model, data: EncodedData, erasure_seed: int | None = None) -> EncodedData:
    """Attach ``model``'s saliency maps (for its own predictions) as the EXPL target: local
    training then keeps attributions close to that model's while it adapts. The reference is the
    start model (``expl-anchor=start``: it does not drift) or the received global model.

    With ``erasure_seed``, also each row's erased variant for the erasure term: the row without
    the reference map's top tokens (a share drawn per row from ERASER's fractions, as the
    comprehensiveness metric deletes them), and the reference model's probabilities on it."""
    maps: list = [None] * len(data)
    explained = np.zeros(len(data), dtype=np.int64)
    model.eval()
    for batch in data.batches(64):
        predicted = model(batch.ids).argmax(-1)
        sal = saliency(model, model.embed(batch.ids), batch.mask, predicted, create_graph=False,
                       real=content_mask(batch.ids))
        for row, index in enumerate(batch.index.numpy()):
            maps[index] = sal[row, : len(data.ids[index])].detach().numpy()
            explained[index] = int(predicted[row])
    out = data.subset(np.arange(len(data)))
    out.teacher_attr, out.attr_labels = maps, explained
    if erasure_seed is not None:
        rng = np.random.default_rng(erasure_seed)
        out.erased_ids = [erase_top(ids, attr, float(rng.choice(FRACTIONS))) for ids, attr in zip(data.ids, maps)]
        erased = EncodedData(out.erased_ids, data.labels, [""] * len(data))
        out.erased_probs = torch.softmax(torch.from_numpy(predict_logits(model, erased)), -1).numpy()
    return out


def erase_top(ids: np.ndarray, attr: np.ndarray, fraction: float) -> np.ndarray:
    """``ids`` without the tokens ERASER's comprehensiveness deletes: the ceil(fraction x content
    tokens) of highest ``attr`` (``models.attribution.top_tokens``; special tokens stay)."""
    return np.delete(ids, top_tokens(attr, ids, fraction)[0])


@lru_cache(maxsize=4)
def _synonym_candidates(tokenizer):
    from models.robust.synonym_hull import SynonymCandidates  # imports WordNet: only runs that search synonyms

    return SynonymCandidates(tokenizer)


def local_fit(model, data: EncodedData, settings: RunSettings, objective: ObjectiveConfig, seed: int,
              epochs: float, lr: float, extra_loss=None, trainable=None, privacy=None,
              optimizer: str = "adamw", augment=None, candidates=None) -> dict:
    """``fit`` restricted to the ``trainable`` parameters (all when None). Seeds torch first:
    dropout draws from the global generator, whose state would otherwise depend on whatever the
    same Ray actor ran before."""
    seed_everything(seed)
    if trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(trainable(name))
    try:
        return fit(model, data, objective, epochs=epochs, max_steps=settings.local_max_steps,
                   batch_size=settings.batch_size, lr=lr, seed=seed, extra_loss=extra_loss,
                   balanced=settings.balanced_loss, optimizer=optimizer, privacy=privacy, augment=augment,
                   candidates=candidates)
    finally:
        for param in model.parameters():
            param.requires_grad_(True)


class ClientTrainer:
    """The ``Trainer`` of ``models.personalization`` on this client."""

    def __init__(self, settings: RunSettings, state, proximal_mu: float = 0.0, anchor: dict | None = None,
                 tokenizer=None, start_model=None):
        self.settings, self.state = settings, state
        self.proximal_mu, self.anchor = proximal_mu, anchor
        self.start_model = start_model  # the run's start (models.protocol.START), when the round sent it
        self.tokenizer = tokenizer  # the client's (``client.data.client_tokenizer``): perturbed rows are re-encoded by it
        self.samples = 0  # rows processed by every fit of the round (shared and personal): the device's work
        self.forward_samples = 0  # rows only passed forward (mode head's body, the start model's answers)

    def _count(self, result: dict) -> dict:
        self.samples += int(result.get("samples", 0))
        self.forward_samples += int(result.get("forward_samples", 0))
        return result

    def shared(self, model, data: EncodedData, seed: int, trainable=None) -> dict:
        objective = self.settings.objective()
        if objective.kd > 0:  # start-kd: the start model's answers on these rows are the KD targets
            data = data.subset(np.arange(len(data)))
            data.teacher_logits = predict_logits(self.required_start(), data)
            self.forward_samples += len(data)
        if objective.expl > 0 or objective.erasure > 0:
            data = with_reference_saliency(self.explanation_reference(model), data,
                                           erasure_seed=seed if objective.erasure > 0 else None)
            # the device's work: a saliency map per row (forward + backward), the erased rows' answers
            self.samples += len(data)
            self.forward_samples += len(data) if objective.erasure > 0 else 0
        privacy = None
        if self.settings.dp:  # the same loop; DP changes batches, clipping and noise only
            from client.privacy import PrivateTraining

            privacy = PrivateTraining(self.settings, self.state, seed)
        return self._count(local_fit(model, data, self.settings, objective, seed, self.settings.local_epochs,
                                     self.settings.lr, extra_loss=proximal_term(model, self.anchor, self.proximal_mu),
                                     trainable=trainable, privacy=privacy, optimizer=self.settings.client_optimizer,
                                     augment=self.perturbed_text(seed), candidates=self.synonym_candidates()))

    def explanation_reference(self, model):
        """The model whose maps the explanation term keeps: the start (``expl-anchor=start``) or
        the one being trained, as received."""
        if self.settings.expl_anchor == "received":
            return model
        return self.required_start()

    def required_start(self):
        if self.start_model is None:
            raise FedrexError("this run's local objective needs the start model (expl-anchor=start or start-kd), "
                              "but the round's message carries none")
        return self.start_model

    def synonym_candidates(self):
        """What the ADV term's adversary mixes each token with under ``adv-space=synonyms``: the
        synonyms the client's own tokenizer reads as one token (remembered per tokenizer, so an
        actor or a device looks each word up once per process)."""
        if not self.settings.searches_synonym_hull():
            return None
        if self.tokenizer is None:
            raise FedrexError("adv-space synonyms needs the client's tokenizer")
        return _synonym_candidates(self.tokenizer)

    def perturbed_text(self, seed: int):
        """Perturbed-text hardening of the shared weights (``perturb-share``): each local epoch a
        seeded share of the rows is replaced by a copy with the attacks' own edits, labels kept;
        the round's seed makes them fresh every round."""
        if self.settings.perturb_share <= 0:
            return None
        if self.tokenizer is None:
            raise FedrexError("perturbed-text hardening needs the client's tokenizer")
        from models.augment import PerturbedText

        return PerturbedText(self.tokenizer, row_share=self.settings.perturb_share,
                             word_share=self.settings.perturb_words or self.settings.attack_budget,
                             kinds=self.settings.perturbations(), seed=seed)

    def head(self, model, data: EncodedData, seed: int) -> dict:
        """Mode ``head``: the linear head trained in numpy on the frozen body's features, the same
        ``train_head`` a device without torch runs on its ONNX body's features."""
        from models.training import predict_features

        weight, bias, metrics = train_linear_head(self.settings, model.head.weight.detach().numpy(),
                                                  model.head.bias.detach().numpy(), predict_features(model, data),
                                                  data.labels, seed)
        with torch.no_grad():
            model.head.weight.copy_(torch.from_numpy(weight))
            model.head.bias.copy_(torch.from_numpy(bias))
        return self._count(head_work(metrics, len(data)))

    def personal(self, model, data: EncodedData, seed: int, trainable=None, anchor=None, weight: float = 0.0) -> dict:
        return self._count(local_fit(model, data, self.settings, ObjectiveConfig(), seed,
                                     self.settings.personal_epochs, self.settings.personal_lr,
                                     extra_loss=proximal_term(model, anchor, weight), trainable=trainable))


def round_inputs(build, received: dict[str, torch.Tensor], data: EncodedData, settings: RunSettings, state,
                 seed: int, proximal_mu: float = 0.0, tokenizer=None, start_model=None) -> RoundInputs:
    anchor = {k: v.detach().clone() for k, v in received.items() if v.is_floating_point()}
    return RoundInputs(build, received, data, seed, settings,
                       ClientTrainer(settings, state, proximal_mu, anchor, tokenizer, start_model))


def personal_model(build, received: dict[str, torch.Tensor], state, settings: RunSettings, data: EncodedData,
                   seed: int):
    """The user's personal model for evaluation, as the run's mode defines it."""
    model = get_mode(settings.mode).personal_model(round_inputs(build, received, data, settings, state, seed),
                                                   state.personal)
    model.eval()
    return model


def train_round(build, received: dict[str, torch.Tensor], data: EncodedData, settings: RunSettings,
                state, round_number: int, partition_id: int, proximal_mu: float, tokenizer=None, start_model=None):
    """One round of local work. Returns (the mode's shared tensors to send, metrics) and updates
    ``state`` with the personal part, which never leaves the device. ``start_model``: the run's
    start, when the round sent it (the explanation term's anchor)."""
    if len(data) == 0:
        raise FedrexError(f"client {partition_id} has no training rows")
    start = time.time()
    seed = round_seed(settings, round_number, partition_id)
    seed_everything(seed)
    mode = get_mode(settings.mode)
    inputs = round_inputs(build, received, data, settings, state, seed, proximal_mu, tokenizer, start_model)
    model, state.personal, metrics = mode.train_round(inputs, state.personal)
    weights = model.state_dict()
    sent = {k: weights[k].detach().clone() for k in mode.shared_keys(model)}
    state.last_round = round_number
    state.train_seconds = time.time() - start
    metrics = {**{k: v for k, v in metrics.items() if k != "seconds"}, "train_seconds": state.train_seconds,
               "samples": inputs.trainer.samples}
    if inputs.trainer.forward_samples:
        metrics["forward_samples"] = inputs.trainer.forward_samples
    return sent, metrics
