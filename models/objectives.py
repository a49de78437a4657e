"""The three FedREX objectives added to cross-entropy: loss = CE + a*KD + b*EXPL + c*ADV.

Only the paper's abstract is public, so each term below is our interpretation, chosen so that
every term works for every network through the shared embed/classify interface:

- KD: Hinton-style temperature-scaled KL(teacher || student) * T^2.
- EXPL (explainable feature mapping): the student's token saliency, |sum_d x_d * dlogit_y/dx_d|
  (gradient x input on the token representation, differentiable with create_graph=True), is
  normalised to a distribution over real tokens and pulled toward the teacher's normalised
  |Integrated Gradients| map with a cosine distance. Gradient x input is the one-step
  approximation of IG, so the two maps estimate the same quantity while the student side stays
  cheap enough to differentiate every step; cosine distance ignores overall scale (teacher and
  student attributions live on different scales) and is bounded, so its weight is interpretable.
- ERASURE (client rounds): KL from the reference model's probabilities on each row with the
  reference's rationale (its top saliency tokens) deleted; see ``erasure_loss``.
- ADV: embedding-space PGD (L2 budget per token, relative to the mean token norm) finds a
  perturbation that pushes the student away from the teacher's clean prediction; the student
  is then trained to match the teacher's clean prediction on the perturbed input (ARD-style KL)
  plus CE on the true label. Without a teacher (client hardening) the attack and the loss use CE.
  Handed each token's substitution candidates, the adversary searches the convex hull of the
  token's and its candidates' vectors instead of a ball (ASCC; ``hull_embedding``): the directions
  a word-substitution attack can actually move a token in.
  Whether the teacher is used depends only on whether teacher logits are present, not on the KD
  weight: a "w/o KD" ablation removes the KD term and nothing else.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from models.encoded import Batch
from models.errors import FedrexError
from models.tokenizer import content_mask
from models.training_config import ObjectiveConfig  # noqa: F401  (defined without torch: run settings use it)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1),
                    reduction="batchmean") * t * t


def normalise_map(attr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|attr| over ``mask`` (the real tokens: ``content_mask``), scaled to sum to one per row
    (all-zero rows stay zero)."""
    attr = attr.abs() * mask
    return attr / attr.sum(-1, keepdim=True).clamp_min(1e-12)


def saliency(model, emb: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
             create_graph: bool, real: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient x input per token for the ``target`` logit, normalised over the real tokens
    ``real`` (default: every valid token)."""
    if not emb.requires_grad:
        emb = emb.detach().requires_grad_(True)
    logits = model.classify(emb, mask)
    picked = logits.gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(picked, emb, create_graph=create_graph)
    return normalise_map((grad * emb).sum(-1), mask if real is None else real)


def expl_loss(model, emb, mask, real, attr_labels, teacher_attr, has_attr) -> torch.Tensor:
    """Cosine distance between the student's saliency and the reference map, both over real
    tokens and both for the label the reference explains (the teacher's, or the global model's,
    prediction): explaining another label than the target map would pull toward the wrong map."""
    rows = has_attr.nonzero().view(-1)
    if rows.numel() == 0:
        return emb.new_zeros(())
    student = saliency(model, emb[rows], mask[rows], attr_labels[rows], create_graph=True, real=real[rows])
    teacher = normalise_map(teacher_attr[rows], real[rows])
    return (1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()


def erasure_loss(model, erased_ids: torch.Tensor, reference_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) on the rows with the reference's rationale deleted: the model keeps
    the reference's deletion behaviour (what removing the explained tokens does to its answer),
    which is what ERASER comprehensiveness measures, while its clean answers stay free to improve."""
    logits = model(erased_ids)
    return F.kl_div(F.log_softmax(logits, -1), reference_probs, reduction="batchmean")


def pgd_perturbation(model, emb: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                     teacher_logits: torch.Tensor | None, epsilon: float, steps: int,
                     temperature: float = 1.0) -> torch.Tensor:
    """L2-bounded per-token perturbation (detached) that maximises the attack loss.

    The budget of each token is ``epsilon`` times the mean norm of the batch's real token
    vectors, so one epsilon means the same thing for a 64-d student and the 384-d teacher.
    """
    base = emb.detach()
    radius = epsilon * base.norm(dim=-1)[mask].mean().clamp_min(1e-6)
    step = 2.5 * radius / steps
    valid = mask.unsqueeze(-1).to(base.dtype)
    delta = torch.zeros_like(base)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model.classify(base + delta, mask)
        if teacher_logits is not None:
            loss = kd_loss(logits, teacher_logits, temperature)
        else:
            loss = F.cross_entropy(logits, labels)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = delta + step * direction * valid
            norms = delta.norm(dim=-1, keepdim=True)
            delta = delta * torch.clamp(radius / norms.clamp_min(1e-12), max=1.0)
    return delta.detach()


# ASCC's search: signed steps on the mixing logits. From uniform weights, two steps of 2 put over
# 99% of a token's weight on the option the loss's gradient favours when its sign holds for both
# (one option against eight: 99.7%): close to the hull's vertices, the texts a swap attack can write
HULL_STEP = 2.0


def hull_embedding(model, ids: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   teacher_logits: torch.Tensor | None, steps: int, temperature: float = 1.0) -> torch.Tensor:
    """ASCC's adversarial input: each token's vector replaced by a convex combination of its own and
    its substitution candidates' vectors (``candidates`` [B, L, K] ids, -1 where absent: padding and
    tokens without synonyms keep their own vector), the weights climbing the attack loss from
    uniform in ``steps`` signed steps. The weights are detached; the vectors are not, so training
    on it moves the candidates' embeddings too (toward answers a swap cannot change)."""
    valid = torch.cat([torch.ones_like(ids, dtype=torch.bool).unsqueeze(-1),
                       (candidates >= 0) & mask.unsqueeze(-1)], dim=-1)  # [B, L, K + 1]
    options = model.embed(torch.cat([ids.unsqueeze(-1), candidates.clamp_min(0)], dim=-1))  # [B, L, K + 1, D]
    base = options.detach()
    logits_of_mix = base.new_zeros(valid.shape)
    for _ in range(steps):
        logits_of_mix.requires_grad_(True)
        weights = torch.softmax(logits_of_mix.masked_fill(~valid, float("-inf")), dim=-1)
        logits = model.classify((weights.unsqueeze(-1) * base).sum(-2), mask)
        if teacher_logits is not None:
            loss = kd_loss(logits, teacher_logits, temperature)
        else:
            loss = F.cross_entropy(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits_of_mix)
        logits_of_mix = (logits_of_mix + HULL_STEP * grad.sign()).detach()
    weights = torch.softmax(logits_of_mix.masked_fill(~valid, float("-inf")), dim=-1)
    return (weights.unsqueeze(-1) * options).sum(-2)


def adv_loss(model, emb, mask, labels, teacher_logits, config: ObjectiveConfig,
             attack_guard=contextlib.nullcontext, logit_adjust: torch.Tensor | None = None,
             ids: torch.Tensor | None = None, candidates=None) -> torch.Tensor:
    """``attack_guard``: a context the PGD search runs in (DP switches Opacus' hooks off there).
    ``logit_adjust``: the balanced loss's log prior, added to the cross-entropy's logits here as in
    the clean term (without it the adversarial term alone teaches the client's label prior).
    ``candidates`` (``models.robust.synonym_hull.SynonymCandidates``): what a swap can turn each
    of the batch's tokens (``ids``) into; given, the adversary searches their hull, not a ball."""
    with attack_guard():
        if candidates is not None:
            adversarial = hull_embedding(model, ids, candidates(ids), mask, labels, teacher_logits,
                                         config.adv_steps, config.temperature)
        else:
            adversarial = emb + pgd_perturbation(model, emb, mask, labels, teacher_logits, config.adv_epsilon,
                                                 config.adv_steps, config.temperature)
    logits = model.classify(adversarial, mask)
    loss = F.cross_entropy(logits if logit_adjust is None else logits + logit_adjust, labels)
    if teacher_logits is not None:
        loss = loss + kd_loss(logits, teacher_logits, config.temperature)
    return loss


def objective_loss(model, batch: Batch, config: ObjectiveConfig, use_adv: bool = True,
                   logit_adjust: torch.Tensor | None = None, attack_guard=contextlib.nullcontext, candidates=None):
    """Total loss for one batch and its parts (floats) for logging. ``logit_adjust`` (a [C] log
    prior) is added to the logits of both loss terms against the labels, clean and adversarial
    (logit-adjusted loss); the distillation terms match answers, not labels, and keep plain logits,
    and the PGD search looks for its perturbation on the plain loss."""
    mask = batch.mask
    emb = model.embed(batch.ids)
    logits = model.classify(emb, mask)
    ce = F.cross_entropy(logits if logit_adjust is None else logits + logit_adjust, batch.labels)
    total, parts = ce, {"ce": ce.item()}
    if config.kd > 0:
        if batch.teacher_logits is None:
            raise FedrexError("the KD objective needs teacher logits")
        kd = kd_loss(logits, batch.teacher_logits, config.temperature)
        total, parts["kd"] = total + config.kd * kd, kd.item()
    if config.expl > 0:
        if batch.teacher_attr is None:
            raise FedrexError("the EXPL objective needs teacher attributions")
        ex = expl_loss(model, emb, mask, content_mask(batch.ids), batch.attr_labels, batch.teacher_attr,
                       batch.has_attr)
        total, parts["expl"] = total + config.expl * ex, ex.item()
    if config.erasure > 0:
        if batch.erased_ids is None:
            raise FedrexError("the erasure term needs each row's erased variant and its reference probabilities")
        er = erasure_loss(model, batch.erased_ids, batch.erased_probs)
        total, parts["erasure"] = total + config.erasure * er, er.item()
    if config.adv > 0 and use_adv:
        adv = adv_loss(model, emb, mask, batch.labels, batch.teacher_logits, config, attack_guard, logit_adjust,
                       batch.ids, candidates)
        total, parts["adv"] = total + config.adv * adv, adv.item()
    return total, parts
