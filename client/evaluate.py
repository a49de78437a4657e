"""What every client measures on its own held-out rows, for the global and the personal model:
accuracy, accuracy under each attack the run names (``client-attacks``) and its success rate, explanation fidelity
(ERASER comprehensiveness/sufficiency of its IG maps) and, for the personal model, agreement of its
attributions with the global model's. Plus who the client is: sizes, label balance, privacy spent.
"""

from __future__ import annotations

from client.data import LocalData, data_profile
from models.evaluation import fidelity, robustness
from models.protocol import ACC_ATTACKED_ROWS, ATTACK_METRICS, attack_metric
from models.tokenizer import WordPieceTokenizer
from models.training import predict_logits


def model_metrics(model, local: LocalData, settings, tokenizer: WordPieceTokenizer, seed: int,
                  reference_attr=None) -> tuple[dict, list]:
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
        fid, attr = fidelity(model, test, reference_attr, settings.ig_steps, settings.fidelity_examples, seed)
        metrics.update(comprehensiveness=fid["comprehensiveness"], sufficiency=fid["sufficiency"])
        if reference_attr is not None:
            metrics.update(agreement_spearman=fid["agreement_spearman"], agreement_topk=fid["agreement_topk_overlap"])
    return metrics, attr


def client_profile(local: LocalData, state, delta: float) -> dict:
    """``data_profile`` plus what the client's state says: privacy spent, last training time,
    whether it holds personal weights."""
    from client.privacy import epsilon_of

    return {**data_profile(local), "epsilon": epsilon_of(state.dp_history, delta),
            "train_seconds": state.train_seconds, "has_personal": float(state.personal is not None)}


def full_attr_list(attr, n_rows: int, limit: int, seed: int):
    """Spread the attributions of the evaluated subset back to row positions (None elsewhere)."""
    from models.evaluation import take

    out: list = [None] * n_rows
    for position, row in enumerate(take(n_rows, limit, seed)):
        out[row] = attr[position]
    return out
