"""Devices without torch: the student's body as ONNX int8 under onnxruntime, the head and the
per-user bias in numpy (models/linear_head.py, client/onnx_client.py), the ``head`` mode that both
kinds of device run the same way, and a federation mixing them through Flower's simulation engine."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.artifact import load_artifact, resolve_artifact
from models.linear_head import fit_logit_bias, head_logits, train_head
from models.tokenizer import WordPieceTokenizer


def test_one_numpy_head_step_is_torch_adamw_with_clipping():
    """Full batch: one step of train_head equals torch's AdamW step on nn.Linear after
    clip_grad_norm_(1.0), to float precision."""
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(12, 8)).astype(np.float32), rng.integers(0, 3, size=12)
    head = torch.nn.Linear(8, 3)
    weight, bias = head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=0.0)
    loss = torch.nn.functional.cross_entropy(head(torch.from_numpy(features)), torch.from_numpy(labels))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    optimizer.step()
    new_w, new_b, metrics = train_head(weight, bias, features, labels, lr=0.05, epochs=1, max_steps=1,
                                       batch_size=12, seed=0)
    assert np.allclose(new_w, head.weight.detach().numpy(), atol=1e-6)
    assert np.allclose(new_b, head.bias.detach().numpy(), atol=1e-6)
    assert metrics["steps"] == 1 and metrics["samples"] == 12 and metrics["loss"] == pytest.approx(loss.item(), 1e-5)
    assert new_w.dtype == weight.dtype


def test_a_head_that_cannot_learn_returns_bit_for_bit_and_one_that_can_learns():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=200)
    features = (rng.normal(size=(200, 16)) + labels[:, None] * 1.5).astype(np.float32)
    weight, bias = np.zeros((2, 16), np.float32), np.zeros(2, np.float32)
    same_w, same_b, _ = train_head(weight, bias, features, labels, lr=0.0, epochs=3, max_steps=50, batch_size=16,
                                   seed=0)
    assert np.array_equal(same_w, weight) and np.array_equal(same_b, bias)
    w, b, metrics = train_head(weight, bias, features, labels, lr=0.01, epochs=3, max_steps=50, batch_size=16, seed=0)
    assert metrics["steps"] == 39 and metrics["samples"] == 3 * 200  # 3 epochs of 13 batches (max-steps 50)
    assert (head_logits(features, w, b).argmax(1) == labels).mean() > 0.9


def test_logit_bias_by_newton_is_the_minimum():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(40, 3)), rng.integers(0, 3, size=40)
    bias = fit_logit_bias(logits, labels, l2=0.5)

    def objective(b):
        z = logits + b
        z = z - z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -log_p[np.arange(40), labels].mean() + 0.25 * (b ** 2).sum()

    for direction in np.eye(3):
        assert objective(bias) <= min(objective(bias + 1e-3 * direction), objective(bias - 1e-3 * direction))


@pytest.fixture(scope="module")
def student():
    return load_artifact(resolve_artifact("sst2-student"))[0].eval()


def test_onnx_int8_body_agrees_with_torch_on_real_sentences(student, sst2):
    """The body a torch-less device runs: its features put through the same head give PyTorch's
    prediction on real SST-2 sentences (int8 weights: a few borderline sentences may flip)."""
    from client.onnx_client import OnnxBody
    from models.export import body_onnx_int8

    tok = WordPieceTokenizer(64)
    texts, labels = sst2[1].texts[:300], sst2[1].labels[:300]
    ids = tok.encode(texts)
    body = OnnxBody(body_onnx_int8(student, torch.from_numpy(ids[:2])))
    features = body.features(tok.encode_ids(texts))
    with torch.no_grad():
        torch_features = student.features(torch.from_numpy(ids)).numpy()
        torch_pred = student(torch.from_numpy(ids)).argmax(1).numpy()
    weight, bias = student.head.weight.detach().numpy(), student.head.bias.detach().numpy()
    assert np.allclose(head_logits(torch_features, weight, bias), student(torch.from_numpy(ids)).detach().numpy(),
                       atol=1e-5)  # features -> head is the model
    onnx_pred = head_logits(features, weight, bias).argmax(1)
    assert (onnx_pred == torch_pred).mean() >= 0.98
    assert abs((onnx_pred == labels).mean() - (torch_pred == labels).mean()) <= 0.02


NO_TORCH = '''
import importlib.util, json, sys, types
real_find_spec = importlib.util.find_spec


class NoTorch:  # this interpreter behaves as if torch had no wheel for it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch'")


sys.meta_path.insert(0, NoTorch())
importlib.util.find_spec = lambda name, *rest: None if name.split(".")[0] == "torch" else real_find_spec(name, *rest)

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

import client.app  # the ClientApp every device loads
from client import onnx_client
from client.data import load_local_data
from client.device import profile_for
from models.protocol import ARRAYS, ONNX_BODY
from models.run_settings import RunSettings

body, head_file, data_file = sys.argv[1:4]
head = dict(np.load(head_file))
settings = RunSettings(mode="head", adv_weight=0.0)
local = load_local_data({"data-file": data_file, "client-id": "me"}, settings)
content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in head.items()}),
                      ONNX_BODY: ConfigRecord({"int8": open(body, "rb").read()})})
msg = types.SimpleNamespace(content=content)  # what the handlers read of a Message
sent, metrics = onnx_client.train(msg, settings, local, seed=0)
print(json.dumps({"runtime": profile_for(settings, local.partition_id).runtime, "metrics": metrics,
                  "moved": float(np.abs(sent["head.weight"].numpy() - head["head.weight"]).max()),
                  "evaluation": onnx_client.evaluate(msg, settings, local),
                  "torch_loaded": any(m.split(".")[0] == "torch" for m in sys.modules)}))
'''


def test_a_device_without_torch_loads_the_client_app_and_trains_the_head(student, tmp_path):
    """In an interpreter where torch cannot be imported: the ClientApp module loads, the device
    says its runtime is onnx, trains the received head on its own file's rows and evaluates."""
    import json
    import subprocess
    import sys

    from models.datasets import data_dir
    from models.export import body_onnx_int8

    reviews = pd.read_parquet(data_dir() / "rt_critics" / "reviews.parquet")
    critic = reviews["user_id"].value_counts().index[0]
    reviews[reviews["user_id"] == critic].head(80)[["text", "label"]].to_csv(tmp_path / "me.csv", index=False)
    (tmp_path / "body.onnx").write_bytes(body_onnx_int8(student, torch.full((2, 8), 1996)))
    np.savez(tmp_path / "head.npz", **{k: v.detach().numpy() for k, v in student.state_dict().items()
                                       if k.startswith("head.")})
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path / "body.onnx"), str(tmp_path / "head.npz"),
                           str(tmp_path / "me.csv")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["runtime"] == "onnx" and not out["torch_loaded"]
    assert out["metrics"]["steps"] >= 1 and out["metrics"]["head_samples"] == 64 and out["moved"] > 0
    # the device clock charges one forward pass of the body per training row, not the numpy head's steps
    assert out["metrics"]["samples"] == 0 and out["metrics"]["forward_samples"] == 64
    assert 0.5 <= out["evaluation"]["global.acc"] <= 1 and 0.5 <= out["evaluation"]["personal.acc"] <= 1


@pytest.mark.slow
def test_torch_and_onnx_devices_train_one_head_together_through_flower(tmp_path, student):
    """mode=head with half the critics on the ONNX path: every device trains every round, both
    kinds report global and personal accuracy (only torch devices run attacks), the body comes
    back exactly as the artifact made it and the head moved."""
    from models.artifact import load_weights
    from simulations.simulate import load_settings, simulate

    settings = load_settings(None, ["min-samples=300", "num-rounds=2", "evaluate-every=2", "fraction-train=1.0",
                                    "mode=head", "adv-weight=0", "onnx-clients=0,1,2,3", "attack-examples=3",
                                    "fidelity-examples=0", "run-id=mixed", f"runs-dir={tmp_path}"])
    run_dir = simulate(settings)
    rows = pd.read_parquet(run_dir / "clients.parquet")
    trained = rows[(rows["model"] == "train") & (rows["metric"] == "n_train")]
    assert trained.groupby("round")["partition_id"].nunique().to_dict() == {1: 8, 2: 8}
    final = rows[rows["round"] == 2]
    acc = final[final["metric"] == "acc"].groupby("model")["partition_id"].nunique().to_dict()
    assert acc == {"global": 8, "personal": 8}
    attacked = set(final[final["metric"] == "adv_acc.char"]["partition_id"])
    assert attacked == {4, 5, 6, 7}
    after = load_weights(run_dir / "checkpoints" / "round-0002.safetensors")
    start = student.state_dict()
    for key, tensor in start.items():
        same = after[key].dtype == tensor.dtype and torch.equal(after[key], tensor)
        assert same != key.startswith("head."), key  # the body untouched, the head trained


@pytest.mark.parametrize("l2", [1.0, 0.1, 0.01, 0.001])
@pytest.mark.parametrize("case", ["single-label, model disagrees", "mixed", "three classes"])
def test_the_logit_bias_reaches_the_minimum_a_reference_solver_finds(l2, case):
    """The prior/head modes' per-user bias against scipy's L-BFGS on the same convex objective,
    including the hard case: one label only, which the model calls the other with confidence (a
    full Newton step overshoots there; without a line search it stopped at 8.07 for a minimum of
    0.61 at l2 0.01)."""
    from scipy.optimize import minimize

    from models.linear_head import bias_objective

    rng = np.random.default_rng(0)
    if case == "single-label, model disagrees":
        logits, labels = np.stack([np.full(6, 4.0), np.zeros(6)], axis=1) + rng.normal(0, 0.3, (6, 2)), np.ones(6, int)
    elif case == "mixed":
        logits, labels = rng.normal(0, 2, (20, 2)), rng.integers(0, 2, 20)
    else:
        logits, labels = rng.normal(0, 3, (9, 3)), np.array([2, 2, 2, 2, 1, 2, 2, 0, 2])
    ours = bias_objective(logits, labels, l2, fit_logit_bias(logits, labels, l2))
    reference = minimize(lambda b: bias_objective(logits, labels, l2, b), np.zeros(logits.shape[1]), method="L-BFGS-B",
                         options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000}).fun
    assert ours <= reference + 1e-9, (ours, reference)
