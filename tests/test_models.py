"""Networks, objectives, attacks, attributions, artifacts and exports, on real SST-2 text."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from models.artifact import load_artifact, read_config, resolve_artifact
from models.attacks import ATTACKS, attack_dataset, word_budget
from models.attribution import eraser_scores, integrated_gradients, random_attributions
from models.encoded import EncodedData
from models.errors import FedrexError
from models.networks import FastGRNNCell, Prado, VocabMap, build_network
from models.objectives import ObjectiveConfig, kd_loss
from models.training import accuracy, fit, predict_logits


@pytest.fixture(scope="module")
def undefended(sst2):
    """A CE-only student: the attacks' target."""
    train, _ = sst2
    torch.manual_seed(0)
    model = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity())
    fit(model, train, ObjectiveConfig(), epochs=2, batch_size=64, seed=0)
    return model


@pytest.fixture(scope="module")
def quick_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "sst2"
    result = subprocess.run([sys.executable, "-m", "simulations.cli", "distill", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_undefended_student_learns(undefended, sst2):
    assert accuracy(undefended, sst2[1]) > 0.70  # chance is 0.51


def test_kd_lowers_student_teacher_kl_versus_ce_alone(quick_artifact, sst2):
    """Same student, data and steps: adding KD pulls its predictions toward the (real, fine-tuned
    MiniLM) teacher's, on the rows it trained on and on unseen dev rows. Measured: train KL
    0.235 -> 0.184, dev KL 0.286 -> 0.255."""
    from pathlib import Path

    from models.artifact import load_weights
    from models.teacher import MiniLMTeacher

    card = json.loads((quick_artifact / "card.json").read_text())
    teacher = MiniLMTeacher(2)
    teacher.load_state_dict(load_weights(Path(card["teacher"]["cache"]) / "teacher.safetensors"))
    train = sst2[0].subset(np.arange(3000))
    train.teacher_logits = predict_logits(teacher, train)
    dev = sst2[1].subset(np.arange(300))
    dev_teacher = torch.from_numpy(predict_logits(teacher, dev))

    def kl_after(objective):
        torch.manual_seed(0)
        model = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity())
        fit(model, train, objective, epochs=3, batch_size=64, seed=0)
        on_train = kd_loss(torch.from_numpy(predict_logits(model, train)), torch.from_numpy(train.teacher_logits), 1.0)
        on_dev = kd_loss(torch.from_numpy(predict_logits(model, dev)), dev_teacher, 1.0)
        return float(on_train), float(on_dev)

    ce_train, ce_dev = kl_after(ObjectiveConfig())
    kd_train, kd_dev = kl_after(ObjectiveConfig(kd=2.0))
    assert kd_train < 0.85 * ce_train
    assert kd_dev < 0.95 * ce_dev


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_flip_an_undefended_model_within_budget(attack, undefended, sst2, tok):
    dev = sst2[1]
    texts, labels = dev.texts[:40], dev.labels[:40]
    summary, results = attack_dataset(attack, undefended, tok, texts, labels, budget=0.2, seed=0)
    succeeded = [r for r in results if r.success]
    assert summary["success_rate"] > 0.3
    assert summary["adv_acc"] < summary["clean_acc"]
    for r in results:
        assert r.words_changed <= word_budget(r.n_words, 0.2)
    for r in succeeded:
        if attack != "hotflip":  # word-level attacks: the text itself differs in <= budget words
            before, after = r.original.split(), r.perturbed.split()
            assert len(before) == len(after)
            assert 1 <= sum(a != b for a, b in zip(before, after)) <= word_budget(r.n_words, 0.2)
            with torch.no_grad():  # and the perturbed text really fools the model
                assert int(undefended(torch.from_numpy(tok.encode([r.perturbed]))).argmax()) != r.label


def test_ig_comprehensiveness_beats_random_attributions(undefended, sst2):
    dev = sst2[1].subset(np.arange(150))
    ig = eraser_scores(undefended, dev, integrated_gradients(undefended, dev, n_steps=16))
    rnd = eraser_scores(undefended, dev, random_attributions(dev, seed=0))
    assert ig["comprehensiveness"] > rnd["comprehensiveness"] + 0.02
    assert ig["sufficiency"] < rnd["sufficiency"]


def test_eraser_matches_a_hand_computed_example(undefended, tok):
    data = EncodedData.from_texts(["a truly wonderful film"], [1], tok)
    attr = [np.array([0, 0.1, 0.2, 5.0, 0.3, 0], dtype=np.float32)]  # 'wonderful' ranks first
    scores = eraser_scores(undefended, data, attr, fractions=(0.25,))
    with torch.no_grad():
        full = torch.softmax(undefended(torch.tensor([data.ids[0].tolist()])), -1)[0]
        y = int(full.argmax())
        without = torch.softmax(undefended(torch.tensor([[101] + data.ids[0][1:3].tolist() + data.ids[0][4:].tolist()])), -1)[0]
        only = torch.softmax(undefended(torch.tensor([[101, int(data.ids[0][3]), 102]])), -1)[0]
    assert scores["comprehensiveness"] == pytest.approx(float(full[y] - without[y]), abs=1e-5)
    assert scores["sufficiency"] == pytest.approx(float(full[y] - only[y]), abs=1e-5)
    # Evidence *against* the prediction is not a rationale: a large negative attribution on
    # 'truly' does not move it to the top (ERASER ranks by signed support; |attr| would).
    against = [np.array([0, 0.1, -9.0, 5.0, 0.3, 0], dtype=np.float32)]
    assert eraser_scores(undefended, data, against, fractions=(0.25,)) == pytest.approx(scores)


def test_fastgrnn_cell_matches_its_equations():
    torch.manual_seed(0)
    cell = FastGRNNCell(4, 3, w_rank=2, u_rank=2)
    x, h = torch.randn(1, 4), torch.randn(1, 3)
    wx = cell.w2(cell.w1(x))
    pre = wx + cell.u2(cell.u1(h))
    z = torch.sigmoid(pre + cell.bias_z)
    h_tilde = torch.tanh(pre + cell.bias_h)
    zeta, nu = torch.sigmoid(cell.zeta_raw), torch.sigmoid(cell.nu_raw)
    expected = (zeta * (1 - z) + nu) * h_tilde + z * h
    assert torch.allclose(cell(wx, h), expected)


def test_prado_has_no_embedding_table_and_ternary_projection():
    model = Prado(2)
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    features = model.projection(torch.tensor([[101, 7592, 2088]]))
    assert set(features.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert sum(p.numel() for p in model.parameters()) < 100_000


@pytest.mark.parametrize("kind", ["student", "fastgrnn", "prado"])
def test_every_network_handles_empty_unknown_and_overlong_text(kind, tok):
    model = build_network({"kind": kind, "num_labels": 2}, VocabMap.identity()).eval()
    texts = ["", "   ", "\u2603\u2603 zzqxj", "word " * 500]
    ids = torch.from_numpy(tok.encode(texts))
    assert ids.shape[1] == 64  # the long text was truncated
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all()
    all_padding = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        assert torch.isfinite(model(all_padding)).all()


def test_quick_artifact_card_and_size(quick_artifact):
    card = json.loads((quick_artifact / "card.json").read_text())
    assert card["int8_bytes"] <= 1_000_000  # whole model, embeddings included
    for key in ("clean_acc", "int8_acc", "int8_agreement", "onnx_agreement", "params", "latency_ms", "attacks",
                "fidelity", "teacher"):
        assert key in card
    assert set(card["attacks"]) == {"char", "hotflip"}
    assert card["clean_acc"] > 0.6
    assert (quick_artifact / "model.torchscript.pt").exists() and (quick_artifact / "model.int8.onnx").exists()


def test_int8_matches_float_on_the_whole_dev_set(quick_artifact, sst2):
    dev = sst2[1]
    float_model, _ = load_artifact(quick_artifact)
    int8_model, _ = load_artifact(quick_artifact, int8=True)
    agree = (predict_logits(float_model, dev).argmax(1) == predict_logits(int8_model, dev).argmax(1)).mean()
    assert agree >= 0.95


def test_onnx_runtime_matches_pytorch_on_real_sentences(quick_artifact, sst2):
    from models.export import onnx_logits

    model, _ = load_artifact(quick_artifact, int8=True)
    batch = sst2[1].batch(np.arange(100))
    with torch.no_grad():
        torch_pred = model(batch.ids).argmax(-1).numpy()
    ort_pred = onnx_logits(quick_artifact / "model.int8.onnx", batch.ids.numpy()).argmax(-1)
    assert (torch_pred == ort_pred).mean() >= 0.95
    scripted = torch.jit.load(str(quick_artifact / "model.torchscript.pt"))
    with torch.no_grad():
        assert torch.equal(scripted(batch.ids).argmax(-1), model(batch.ids).argmax(-1))


def test_corrupted_and_foreign_artifacts_are_refused(quick_artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quick_artifact, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FedrexError, match="SHA-256 differs"):
        load_artifact(bad)
    import hashlib

    config = json.loads((bad / "config.json").read_text())
    config["sha256"]["model.safetensors"] = hashlib.sha256(b"\x00garbage" * 10).hexdigest()  # recorded as it is:
    (bad / "config.json").write_text(json.dumps(config))  # the checksum passes, the parser refuses it
    with pytest.raises(FedrexError, match="not a valid safetensors"):
        load_artifact(bad)
    (bad / "config.json").write_text('{"format": "someone-else/3"}')
    with pytest.raises(FedrexError, match="not a FedREX model config"):
        read_config(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(FedrexError, match="corrupted"):
        read_config(bad)
    with pytest.raises(FedrexError, match="no config.json"):
        read_config(tmp_path)


def _flip_last_byte(path):
    """Change one byte of a tensor's data: the file still parses as safetensors."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_weight_file_changed_after_it_was_written_is_refused(quick_artifact, tmp_path):
    """config.json records each weight file's SHA-256 at write time (the shipped artifact's too);
    one flipped bit in the weights, which safetensors alone would load, is refused; so is a
    truncated file, with the same message; and `fedrex simulate`'s torch-free check before the
    start (``check_artifact``) refuses each the same way."""
    import hashlib
    import shutil

    from models.artifact import INT8_FILE, check_artifact, load_weights

    shipped = resolve_artifact("sst2-student")
    for folder in (quick_artifact, shipped):
        recorded = read_config(folder)["sha256"]
        assert recorded == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in recorded}
        assert set(recorded) == {"model.safetensors", INT8_FILE}
    changed = tmp_path / "changed"
    shutil.copytree(quick_artifact, changed)
    assert check_artifact(changed) == read_config(quick_artifact)
    _flip_last_byte(changed / INT8_FILE)
    assert load_weights(changed / INT8_FILE)  # still a valid safetensors file...
    with pytest.raises(FedrexError, match="SHA-256 differs from the one recorded in .*config.json"):
        load_artifact(changed, int8=True)  # ...but not the one that was written
    load_artifact(changed)  # the float file is untouched and loads
    (changed / "model.safetensors").write_bytes((changed / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(FedrexError, match="changed or truncated"):
        load_artifact(changed)
    # deleting the digest from the card does not let the changed file in
    card = json.loads((changed / "config.json").read_text())
    del card["sha256"][INT8_FILE]
    (changed / "config.json").write_text(json.dumps(card))
    with pytest.raises(FedrexError, match="config.json records no SHA-256 for model.int8.safetensors"):
        load_artifact(changed, int8=True)
    # the check reads what a run starts from (the float weights) and the config's own agreement
    (changed / "model.safetensors").write_bytes((quick_artifact / "model.safetensors").read_bytes())
    assert check_artifact(changed)["num_labels"] == 2
    card["network"]["num_labels"] = 3
    (changed / "config.json").write_text(json.dumps(card))
    with pytest.raises(FedrexError, match="does not match its num_labels"):
        check_artifact(changed)
    del card["sha256"]["model.safetensors"]
    (changed / "config.json").write_text(json.dumps(card))
    with pytest.raises(FedrexError, match="config.json records no SHA-256 for model.safetensors"):
        check_artifact(changed)


class _Exploit:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['FEDREX_PWNED'], 'w').write('x')",))


def test_a_pickle_disguised_as_weights_never_runs(quick_artifact, tmp_path, monkeypatch):
    import shutil

    marker = tmp_path / "pwned"
    monkeypatch.setenv("FEDREX_PWNED", str(marker))
    evil = tmp_path / "evil"
    shutil.copytree(quick_artifact, evil)
    (evil / "model.safetensors").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(FedrexError):
        load_artifact(evil)
    assert not marker.exists()


def test_mismatched_weights_are_a_clear_error(quick_artifact, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(quick_artifact, other)
    config = json.loads((other / "config.json").read_text())
    config["network"]["hidden"] = 32
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(FedrexError, match="do not match"):
        load_artifact(other)


def test_expl_objective_pulls_student_saliency_toward_the_teacher_map(sst2):
    """With a fixed target map per example, training with EXPL raises the cosine similarity
    between the student's saliency and that map compared with CE alone."""
    from models.objectives import expl_loss
    from models.tokenizer import content_mask

    train = sst2[0].subset(np.arange(2000))
    rng = np.random.default_rng(0)
    train.teacher_attr = [rng.random(len(ids)).astype(np.float32) ** 4 for ids in train.ids]
    train.attr_labels = train.labels.copy()  # the label each target map explains

    def distance_after(objective):
        torch.manual_seed(0)
        model = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity())
        fit(model, train, objective, epochs=3, batch_size=64, seed=0)
        batch = train.batch(np.arange(256))
        return float(expl_loss(model, model.embed(batch.ids), batch.mask, content_mask(batch.ids),
                               batch.attr_labels, batch.teacher_attr, batch.has_attr).detach())

    assert distance_after(ObjectiveConfig(expl=5.0)) < distance_after(ObjectiveConfig()) - 0.05


def test_bad_objective_weights_are_rejected():
    with pytest.raises(FedrexError):
        ObjectiveConfig(kd=-1).validate()
    with pytest.raises(FedrexError):
        ObjectiveConfig(adv_ratio=2).validate()


def test_attack_summaries_leave_undefined_values_undefined():
    from models.attacks import AttackResult, summarize_attack

    held = [AttackResult("a b", "a b", 1, 1, 1, 0, 2, 5), AttackResult("c d", "c d", 0, 1, 1, 0, 2, 0)]
    summary = summarize_attack(held)  # one attacked and held, one already wrong
    assert summary["clean_acc"] == 0.5 and summary["adv_acc"] == 0.5 and summary["success_rate"] == 0.0
    assert math.isnan(summary["words_changed_pct"])  # nothing succeeded: no words were changed by a success
    flipped = summarize_attack([AttackResult("a b c d", "x b c d", 1, 1, 0, 1, 4, 9), *held])
    assert flipped["words_changed_pct"] == pytest.approx(25.0) and flipped["adv_acc"] == pytest.approx(1 / 3)


def test_expl_explains_the_reference_label_over_real_tokens(sst2):
    """The student's saliency is taken for the label the reference map explains (not the true
    label), and [CLS]/[SEP] carry no attribution mass on either side."""
    from models.objectives import expl_loss, saliency
    from models.tokenizer import content_mask

    torch.manual_seed(0)
    model = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity()).eval()  # no dropout
    data = sst2[0].subset(np.arange(8))
    data.teacher_attr = [np.random.default_rng(i).random(len(ids)).astype(np.float32) for i, ids in enumerate(data.ids)]
    data.attr_labels = 1 - data.labels  # the reference explains the other label
    batch = data.batch(np.arange(8))
    real = content_mask(batch.ids)
    assert not real[:, 0].any() and real.sum() == batch.mask.sum() - 2 * 8  # [CLS], [SEP] are not real tokens
    emb = model.embed(batch.ids)
    sal = saliency(model, emb, batch.mask, batch.attr_labels, create_graph=False, real=real)
    assert torch.all(sal[~real] == 0) and torch.allclose(sal.sum(1), torch.ones(8))
    loss = expl_loss(model, emb, batch.mask, real, batch.attr_labels, batch.teacher_attr, batch.has_attr)
    target = batch.teacher_attr * real
    target = target / target.sum(1, keepdim=True)
    expected = (1 - F.cosine_similarity(sal, target, dim=-1)).mean()
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    wrong = saliency(model, emb, batch.mask, batch.labels, create_graph=False, real=real)
    assert float((1 - F.cosine_similarity(wrong, target, dim=-1)).mean()) != pytest.approx(float(loss), abs=1e-5)
