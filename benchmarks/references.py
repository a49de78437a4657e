"""Reference rows every personalization table needs, per user, on exactly FedREX's split (the
same partitions and per-user train/test rows the clients use):

- ``majority``: each user's own train-majority label (ties -> the pooled majority);
- ``tfidf (global data)``: TF-IDF (1-2 grams) + logistic regression trained on the data the
  global model was distilled from (SST-2 train), i.e. the classical model a device could ship;
- ``tfidf + user prior``: the same, with a per-user logit bias fitted on the user's training rows
  (the classical twin of FedREX's ``prior`` mode, same L2);
- ``central tfidf (users)``: TF-IDF + LR on the pooled training rows of all users (no federation,
  no privacy: the non-federated reference);
- ``central tfidf (global data + users)``: the same on SST-2 train plus the pooled user rows;
- ``start model`` and ``start model + user label prior``: the run's starting model as every client
  serves it (behind its word normaliser when the run uses one), alone and with the log of each
  user's add-one smoothed training label frequencies added to its log-probabilities: a closed-form
  correction of the start model with no training at all;
- the central FedREX student: the start model fine-tuned centrally on the pooled user rows, alone
  and with twice as many SST-2 train rows mixed in (the student's twin of central TF-IDF on both);
- the start's MiniLM teacher (22.7M parameters, 39 times the student's 586K; the one the start was
  distilled from, rebuilt from the start's card and cached), alone, fine-tuned centrally on the
  pooled user rows, and each with the user label prior: what a model of the teacher's size reaches,
  a capacity reference for the student's targets.

Returns per-user accuracy so every row is summarised like FedREX's own (mean, median, p10).
"""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from client.data import client_tokenizer, federation
from models.datasets import cached_text_dataset
from models.linear_head import fit_logit_bias, log_label_prior
from models.protocol import NORMALIZER


def user_splits(settings) -> list[tuple[str, list, np.ndarray, list, np.ndarray]]:
    """(client id, train texts, train labels, test texts, test labels) for every client with test rows."""
    fed = federation(settings)
    out = []
    for pid in range(fed.num_partitions):
        client = fed.client(pid)
        if len(client.test) == 0:
            continue
        out.append((client.client_id, list(client.train["text"]), np.asarray(client.train["label"]),
                    list(client.test["text"]), np.asarray(client.test["label"])))
    return out


def _tfidf_lr(texts, labels, seed: int):
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(texts)
    model = LogisticRegression(C=4.0, max_iter=2000, random_state=seed).fit(features, labels)
    return lambda batch: model.decision_function(vectorizer.transform(batch)) if len(batch) else np.zeros(0)


def _logits(decision: np.ndarray) -> np.ndarray:
    """Binary decision values as two-column logits (multi-class already are)."""
    return decision if decision.ndim == 2 else np.stack([np.zeros_like(decision), decision], axis=1)


def reference_accuracy(settings, global_dataset: str = "sst2", prior_l2: float = 1.0) -> dict[str, dict[str, float]]:
    """{reference name: {client id: accuracy on the client's test rows}}."""
    users = user_splits(settings)
    pooled_texts = [t for _, train, _, _, _ in users for t in train]
    pooled_labels = np.concatenate([y for _, _, y, _, _ in users])
    global_table, _ = cached_text_dataset(global_dataset, "train", settings.data_dir or None)
    global_texts, global_labels = list(global_table["text"]), np.asarray(global_table["label"])
    pooled_majority = int(np.bincount(pooled_labels).argmax())
    classical = _tfidf_lr(global_texts, global_labels, settings.seed)
    central = _tfidf_lr(pooled_texts, pooled_labels, settings.seed)
    central_all = _tfidf_lr(global_texts + pooled_texts, np.concatenate([global_labels, pooled_labels]), settings.seed)
    rows: dict[str, dict[str, float]] = {name: {} for name in (
        "majority", f"tfidf ({global_dataset})", f"tfidf ({global_dataset}) + user prior", "central tfidf (users)",
        f"central tfidf ({global_dataset} + users)")}
    for client_id, train_x, train_y, test_x, test_y in users:
        counts = np.bincount(train_y, minlength=2)
        majority = int(counts.argmax()) if counts.max() > counts.min() else pooled_majority
        rows["majority"][client_id] = float((test_y == majority).mean())
        test_logits = _logits(classical(test_x))
        rows[f"tfidf ({global_dataset})"][client_id] = float((test_logits.argmax(1) == test_y).mean())
        bias = fit_logit_bias(_logits(classical(train_x)), train_y, prior_l2)
        rows[f"tfidf ({global_dataset}) + user prior"][client_id] = float(((test_logits + bias).argmax(1) == test_y).mean())
        rows["central tfidf (users)"][client_id] = float((_logits(central(test_x)).argmax(1) == test_y).mean())
        rows[f"central tfidf ({global_dataset} + users)"][client_id] = float(
            (_logits(central_all(test_x)).argmax(1) == test_y).mean())
    return rows


def start_tokenizer(settings):
    """The tokenizer every client of a run with these settings encodes with (``client_tokenizer``
    behind what the server sends)."""
    from server.app import start_config

    return client_tokenizer(settings.max_length, start_config(settings, {}).get(NORMALIZER))


def with_label_prior(log_probs: np.ndarray, train_labels: np.ndarray) -> np.ndarray:
    """Start model + user label prior: log p(y | x) + log of the user's add-one smoothed training
    label frequencies (the closed form of a label-shift correction toward the user's prior)."""
    return log_probs + log_label_prior(train_labels, log_probs.shape[1])


def start_model_accuracy(settings) -> dict[str, dict[str, float]]:
    """{"start model" | "start model + user label prior": {client id: accuracy}}."""
    import torch

    from models.encoded import EncodedData
    from models.training import predict_logits
    from server.app import global_model

    model, _ = global_model(settings)
    tokenizer = start_tokenizer(settings)
    rows: dict[str, dict[str, float]] = {"start model": {}, "start model + user label prior": {}}
    for client_id, _, train_y, test_x, test_y in user_splits(settings):
        logits = predict_logits(model, EncodedData.from_texts(test_x, test_y, tokenizer))
        log_probs = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
        rows["start model"][client_id] = float((log_probs.argmax(1) == test_y).mean())
        rows["start model + user label prior"][client_id] = float(
            (with_label_prior(log_probs, train_y).argmax(1) == test_y).mean())
    return rows


def central_student_accuracy(settings, epochs: float = 2.0, public_share: float = 0.0) -> dict[str, float]:
    """{client id: accuracy}: the run's starting model fine-tuned centrally on the pooled training
    rows of all users (same objective, learning rate and batch size as the clients, same
    tokenizer), i.e. what the federation would reach with no federation constraints: the
    non-federated upper reference. ``public_share`` > 0 mixes in that many times as many rows of the
    data the start was distilled from (its train split, a seeded draw)."""
    from models.encoded import EncodedData
    from models.training import fit, predict_logits, seed_everything
    from server.app import global_model

    users = user_splits(settings)
    tokenizer = start_tokenizer(settings)
    texts = [t for _, train, _, _, _ in users for t in train]
    labels = np.concatenate([y for _, _, y, _, _ in users])
    if public_share > 0:
        public = cached_text_dataset(settings.distill_dataset, "train", settings.data_dir or None)[0]
        count = min(len(public), int(public_share * len(texts)))
        drawn = public.select(np.random.default_rng(settings.seed).choice(len(public), count, replace=False).tolist())
        texts, labels = texts + list(drawn["text"]), np.concatenate([labels, np.asarray(drawn["label"])])
    pooled = EncodedData.from_texts(texts, labels, tokenizer)
    seed_everything(settings.seed)
    model, _ = global_model(settings)
    fit(model, pooled, settings.objective(), epochs=epochs, batch_size=settings.batch_size, lr=settings.lr,
        seed=settings.seed, progress="central student", log_every=200)
    out = {}
    for client_id, _, _, test_x, test_y in users:
        test = EncodedData.from_texts(test_x, test_y, tokenizer)
        out[client_id] = float((predict_logits(model, test).argmax(1) == test.labels).mean())
    return out


TEACHER_ROWS = ("MiniLM teacher (22.7M params, SST-2: the start's teacher)",
                "MiniLM teacher + user label prior",
                "central MiniLM teacher (fine-tuned on pooled user rows, 1 epoch)",
                "central MiniLM teacher + user label prior")


def teacher_accuracy(settings, epochs: float = 1.0) -> dict[str, dict[str, float]]:
    """{``TEACHER_ROWS`` name: {client id: accuracy}}: the teacher the start was distilled from (its
    distillation settings read from the start's card; trained once and cached like the distiller's
    own), on the plain WordPiece tokenizer it was trained with, then fine-tuned centrally on the
    pooled user rows with its own learning rate and batch size; each with the user label prior."""
    import copy
    import json

    import torch

    from models.encoded import EncodedData
    from models.objectives import ObjectiveConfig
    from models.tokenizer import WordPieceTokenizer
    from models.training import fit, predict_logits, seed_everything
    from server.app import start_folder
    from server.distill import TEACHER_FIELDS, TEACHER_FIELDS_ADDED, DistillConfig, get_teacher, load_splits, teacher_key

    card = json.loads((start_folder(settings) / "card.json").read_text())
    # a field the card predates takes the value its teacher had (TEACHER_FIELDS_ADDED)
    cfg = DistillConfig(**{k: card["config"][k] if k not in TEACHER_FIELDS_ADDED else
                           card["config"].get(k, TEACHER_FIELDS_ADDED[k]) for k in TEACHER_FIELDS},
                        data_dir=settings.data_dir or None)
    tokenizer = WordPieceTokenizer(cfg.max_length)
    train_ds, eval_ds, num_labels = load_splits(cfg)
    teacher, _ = get_teacher(cfg, EncodedData.from_dataset(train_ds, tokenizer), num_labels,
                             teacher_key(cfg, train_ds))
    dev = EncodedData.from_dataset(eval_ds, tokenizer)
    dev_acc = float((predict_logits(teacher, dev).argmax(1) == dev.labels).mean())
    if abs(dev_acc - card["teacher"]["clean_acc"]) > 1e-9:  # another teacher than the start's: not this row
        raise SystemExit(f"the rebuilt teacher scores {dev_acc:.4f} on {cfg.dataset} {cfg.eval_split}, the start's "
                         f"card {card['teacher']['clean_acc']:.4f}: it is not the teacher the start was distilled from")
    users = user_splits(settings)
    pooled = EncodedData.from_texts([t for _, train, _, _, _ in users for t in train],
                                    np.concatenate([y for _, _, y, _, _ in users]), tokenizer)
    seed_everything(settings.seed)
    central = copy.deepcopy(teacher)
    fit(central, pooled, ObjectiveConfig(), epochs=epochs, batch_size=cfg.teacher_batch, lr=cfg.teacher_lr,
        weight_decay=0.01, seed=settings.seed, progress="central teacher", log_every=50)
    rows: dict[str, dict[str, float]] = {name: {} for name in TEACHER_ROWS}
    for client_id, _, train_y, test_x, test_y in users:
        test = EncodedData.from_texts(test_x, test_y, tokenizer)
        for model, (alone, with_prior) in ((teacher, TEACHER_ROWS[:2]), (central, TEACHER_ROWS[2:])):
            model.eval()
            log_probs = torch.log_softmax(torch.from_numpy(predict_logits(model, test)).double(), -1).numpy()
            rows[alone][client_id] = float((log_probs.argmax(1) == test_y).mean())
            rows[with_prior][client_id] = float((with_label_prior(log_probs, train_y).argmax(1) == test_y).mean())
    return rows
