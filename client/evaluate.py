"""What every client measures on its own held-out rows, for the global and the personal model:
accuracy, accuracy under each attack the run names (``client-attacks``) and its success rate, explanation fidelity
(ERASER comprehensiveness/sufficiency of its IG maps, and the comprehensiveness of random maps on the
same rows, so the number can be read), agreement of its attributions with the start model's
(round 0's) when the message carries the start and, for the personal model, with the global model's. Plus who the client is: sizes, label balance, privacy spent.
"""

from __future__ import annotations

from client.data import LocalData, data_profile
from models.evaluation import fidelity, robustness
from models.protocol import ACC_ATTACKED_ROWS, ATTACK_METRICS, attack_metric
from models.tokenizer import WordPieceTokenizer
from models.training import predict_logits


def model_metrics(model, local: LocalData, settings, tokenizer: WordPieceTokenizer, seed: int,
                  reference_attr=None, start_attr=None) -> tuple[dict, list]:
    """``reference_attr``: the global model's maps by row (the personal model's agreement);
    ``start_attr``: the start model's (``start_attributions``: agreement with round 0)."""
    test = local.test
    predicted = predict_logits(model, test).argmax(1)
    metrics = {"acc": float((predicted == test.labels).mean())}
    if local.num_labels == 2:  # share of the held-out rows called positive (label 1): drift shows here
        metrics["pred_positive"] = float((predicted == 1).mean())
    if settings.attack_examples > 0:
        summaries = robustness(model, tokenizer, test, settings.attacks(), settings.attack_budget,
                               settings.attack_examples, seed)
        for attack, summary in summaries.items():
            # clean and attacked accuracy of one robustness figure come from the same (attacked) rows:
            # every attack runs on the same seeded subset, so one clean figure serves them all
            metrics[ACC_ATTACKED_ROWS] = summary["clean_acc"]
            values = dict(adv_acc=summary["adv_acc"], attack_success=summary["success_rate"],
                          words_changed_pct=summary["words_changed_pct"], queries=summary["queries"])
            metrics.update({attack_metric(name, attack): values[name] for name in ATTACK_METRICS})
    attr = None
    if settings.fidelity_examples > 0:
        fid, attr = fidelity(model, test, {"": reference_attr, "start_": start_attr}, settings.ig_steps,
                             settings.fidelity_examples, seed)
        metrics.update({k: fid[k] for k in ("comprehensiveness", "sufficiency", "comprehensiveness_random")})
        for prefix in ("", "start_"):
            if f"{prefix}agreement_spearman" in fid:
                metrics[f"{prefix}agreement_spearman"] = fid[f"{prefix}agreement_spearman"]
                metrics[f"{prefix}agreement_topk"] = fid[f"{prefix}agreement_topk_overlap"]
    return metrics, attr


def start_attributions(start, local: LocalData, settings, seed: int):
    """The start model's IG maps on the rows ``model_metrics`` explains (by row; None elsewhere)."""
    if settings.fidelity_examples <= 0 or len(local.test) == 0:
        return None
    _, attr = fidelity(start, local.test, None, settings.ig_steps, settings.fidelity_examples, seed, eraser=False)
    return full_attr_list(attr, len(local.test), settings.fidelity_examples, seed)


def client_profile(local: LocalData, state, settings) -> dict:
    """``data_profile`` plus what the client's state says: privacy spent (NaN in a run without DP:
    not applicable, rather than a budget of 0), last training time, whether it holds personal weights."""
    from client.privacy import epsilon_of

    epsilon = epsilon_of(state.dp_history, settings.delta) if settings.dp else float("nan")
    return {**data_profile(local), "epsilon": epsilon,
            "train_seconds": state.train_seconds, "has_personal": float(state.personal is not None)}


def full_attr_list(attr, n_rows: int, limit: int, seed: int):
    """Spread the attributions of the evaluated subset back to row positions (None elsewhere)."""
    from models.evaluation import take

    out: list = [None] * n_rows
    for position, row in enumerate(take(n_rows, limit, seed)):
        out[row] = attr[position]
    return out
