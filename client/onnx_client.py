"""A device without a torch wheel: the global model's body as ONNX int8 under onnxruntime, and
the shared head and the user's logit bias trained in numpy by ``models/linear_head.py``, the code
every device of a ``head``-mode run uses (``models/personalization.py``). The server exports the
body once per run and sends it with each message to such devices (``server/app.py``), so the body
a device runs is always the run's.

What such a device reports: its training metrics, and for the global and the personal model the
accuracy (and share called positive) on its held-out rows. Attacks and explanation fidelity need
gradients or many model queries through torch and are not measured here (they read as missing).
Imports: numpy and onnxruntime (plus the light FedREX modules).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from models.errors import FedrexError
from models.linear_head import fit_logit_bias, head_logits, head_work, train_linear_head
from models.protocol import ARRAYS, HEAD_KEYS, ONNX_BODY

_SESSIONS: dict[str, "OnnxBody"] = {}  # one inference session per body, per process


class OnnxBody:
    """Features of token-id rows from an ONNX model ``ids [B, L] int64 -> features [B, D]``."""

    def __init__(self, model: bytes, threads: int = 1):
        import onnxruntime as ort  # client/app.py's check_packages names the extra when it is missing

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def features(self, rows, batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = np.zeros((len(chunk), max(2, max(len(r) for r in chunk))), dtype=np.int64)  # 0 = [PAD]
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = row
            out.append(self.session.run(None, {"ids": ids})[0])
        return np.concatenate(out).astype(np.float32)


def body_of(msg, threads: int) -> OnnxBody:
    if ONNX_BODY not in msg.content.config_records:
        raise FedrexError("this device runs the ONNX path but the server sent no ONNX body: the server must know "
                          "the device's runtime (its profile says onnx) in a mode=head run")
    model = bytes(msg.content.config_records[ONNX_BODY]["int8"])
    key = hashlib.sha256(model).hexdigest()
    if key not in _SESSIONS:
        _SESSIONS.clear()
        _SESSIONS[key] = OnnxBody(model, threads)
    return _SESSIONS[key]


def received_head(msg) -> dict[str, np.ndarray]:
    head = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
    if set(head) != set(HEAD_KEYS):
        raise FedrexError(f"the server sent {sorted(head)[:3]}...: a device without torch trains the head only "
                          "(run with mode=head)")
    return head


def check_mode(settings) -> None:
    if settings.mode != "head":
        raise FedrexError(f"a device without torch (ONNX body, numpy head) takes part in mode=head runs only; "
                          f"this run's mode is {settings.mode}")


def train(msg, settings, local, seed: int) -> tuple[dict, dict]:
    """One round: the received head trained on this device's rows; returns (head as Flower
    Arrays, metrics)."""
    from flwr.app import Array

    check_mode(settings)
    start = time.time()
    head = received_head(msg)
    features = body_of(msg, settings.client_threads).features(local.train.ids)
    weight, bias, metrics = train_linear_head(settings, head["head.weight"], head["head.bias"], features,
                                              local.train.labels, seed)
    metrics = head_work(metrics, len(local.train))  # the clock charges the body's forward pass, as on torch devices
    metrics["train_seconds"] = time.time() - start
    return {"head.weight": Array(weight), "head.bias": Array(bias)}, metrics


def evaluate(msg, settings, local) -> dict:
    """Global (the received head) and personal (plus this user's logit bias) metrics."""
    check_mode(settings)
    head = received_head(msg)
    body = body_of(msg, settings.client_threads)
    test_logits = head_logits(body.features(local.test.ids), head["head.weight"], head["head.bias"])
    personal = test_logits
    if len(local.train):
        train_logits = head_logits(body.features(local.train.ids), head["head.weight"], head["head.bias"])
        personal = test_logits + fit_logit_bias(train_logits, local.train.labels, settings.prior_l2)
    metrics = {}
    for model, logits in (("global", test_logits), ("personal", personal)):
        predicted = logits.argmax(1)
        metrics[f"{model}.acc"] = float((predicted == local.test.labels).mean())
        if local.num_labels == 2:
            metrics[f"{model}.pred_positive"] = float((predicted == 1).mean())
    return metrics
