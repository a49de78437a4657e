"""Distillation of the global model (the method of Qiang et al., as interpreted in
``models/objectives.py``): a fine-tuned MiniLM teacher, its cached logits and Integrated Gradients
maps, and a compact network trained with CE + KD + EXPL + ADV, then evaluated and exported.

Every expensive teacher product is cached under ``$FEDREX_CACHE_DIR/teacher/<key>``, the key
hashing the data and every setting that shapes it, so later runs and other variants pay once.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models.artifact import device_package, load_weights, save_artifact, save_weights
from models.files import atomic_write_json
from models.attacks import RECIPES_VERSION, whole_word_candidates
from models.datasets import cache_dir, cached_text_dataset
from models.encoded import EncodedData
from models.errors import FedrexError
from models.evaluation import fidelity, robustness, take
from models.export import export_onnx_int8, export_torchscript, latency_ms, onnx_logits
from models.networks import VocabMap, build_network, count_parameters, pca_init_embedding
from models.normalizer import WordNormalizer
from models.augment import AdversarialText, PerturbedText, chain
from models.objectives import ObjectiveConfig
from models.robust.synonym_hull import SynonymCandidates
from models.protocol import check_attacks
from models.tokenizer import WordPieceTokenizer
from models.training import accuracy, fit, predict_logits, seed_everything
from models.training_config import ADV_SPACES


@dataclass
class DistillConfig:
    dataset: str = "sst2"
    train_split: str = "train"
    eval_split: str = "validation"  # "holdout": carve eval_fraction out of train_split, seeded
    eval_fraction: float = 0.2
    data_dir: str | None = None
    max_length: int = 64
    seed: int = 0
    # teacher: fine-tuned on a subset (CPU cost ~40-100 examples/s), signals cached
    teacher_samples: int = 20000
    teacher_epochs: float = 1.0
    teacher_lr: float = 5e-5
    teacher_batch: int = 32
    teacher_freeze: int = 0
    # share of the teacher's training rows replaced by perturbed text each epoch (the attacks' own
    # edits, as ``augment`` does for the student; 0 = off): a teacher to distil from that has seen
    # swapped words (issue #18)
    teacher_augment: float = 0.0
    attr_samples: int = 2000  # student training rows that get a teacher IG map (EXPL)
    ig_steps: int = 8
    # compact network
    network: str = "student"
    student_samples: int = 0  # 0 = the whole training split
    epochs: float = 3.0
    batch_size: int = 64
    lr: float = 2e-3
    vocab_size: int = 8000
    dim: int = 64
    hidden: int = 128
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(kd=1.0, expl=1.0, adv=1.0,
                                                                              adv_ratio=0.5))
    # evaluation
    eval_samples: int = 0
    attack_samples: int = 200  # rows each attack runs on (0 = no attacks, as a client's attack_examples)
    attack_budget: float = 0.2
    attacks: tuple[str, ...] = ("char", "synonym", "hotflip")
    fidelity_samples: int = 200
    export: bool = True
    # defences against discrete perturbations (issue #10)
    augment: float = 0.0  # share of training rows replaced by perturbed text each epoch (0 = off)
    adv_text: int = 0  # rows attacked (char recipe) against the current model each epoch, trained on (0 = off)
    normalizer: bool = False  # also evaluate behind the word normaliser (models.normalizer), shipped with the model
    # where the ADV term's adversary searches (models.training_config.ADV_SPACES): "ball" (embedding
    # PGD) or "synonyms" (ASCC: each token's vector mixed with its WordNet synonyms', the `synonym`
    # attack's swaps; models.robust.synonym_hull)
    adv_space: str = "ball"

    @classmethod
    def quick(cls, **overrides) -> "DistillConfig":
        """Minutes on 2 cores: small teacher subset with frozen lower layers, few steps."""
        base = cls(teacher_samples=1500, teacher_freeze=2, teacher_lr=1e-4, attr_samples=256, ig_steps=4,
                   student_samples=4000, epochs=2.0, eval_samples=300, attack_samples=40,
                   fidelity_samples=40, attacks=("char", "hotflip"))
        return replace(base, **overrides)

    def validate(self) -> None:
        self.objective.validate()
        check_attacks(self.attacks)
        for name in ("augment", "teacher_augment"):
            if not 0 <= getattr(self, name) <= 1:
                raise FedrexError(f"{name} (share of perturbed rows) must be in [0, 1], got {getattr(self, name)}")
        for name in ("adv_text", "attack_samples"):
            if getattr(self, name) < 0:
                raise FedrexError(f"{name} (rows attacked) must be >= 0, got {getattr(self, name)}")
        if self.adv_space not in ADV_SPACES:
            raise FedrexError(f"adv_space must be one of {ADV_SPACES}, got {self.adv_space!r}")
        if self.adv_space != "ball" and self.objective.adv <= 0:
            raise FedrexError(f"adv_space {self.adv_space!r} shapes the ADV term, which this objective leaves out (adv 0)")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["objective"] = self.objective.as_dict()
        out["attacks"] = list(self.attacks)
        return out


def log(message: str) -> None:
    print(f"[distill] {message}", file=sys.stderr, flush=True)


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- data
def load_splits(cfg: DistillConfig):
    train, num_labels = cached_text_dataset(cfg.dataset, cfg.train_split, cfg.data_dir)
    if cfg.eval_split == "holdout":
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        n_eval = int(round(cfg.eval_fraction * len(train)))
        evaluation, train = train.select(np.sort(order[:n_eval])), train.select(np.sort(order[n_eval:]))
    else:
        evaluation, _ = cached_text_dataset(cfg.dataset, cfg.eval_split, cfg.data_dir)
    return train, evaluation, num_labels


# ---------------------------------------------------------------------------------- teacher
# the settings that shape the teacher: its cache key, and what rebuilds it from a student's card
TEACHER_FIELDS = ("dataset", "train_split", "eval_split", "eval_fraction", "max_length", "seed", "teacher_samples",
                  "teacher_epochs", "teacher_lr", "teacher_batch", "teacher_freeze", "teacher_augment")
# fields added to TEACHER_FIELDS after teachers were cached, with the value those teachers had: left
# out of the key at that value, so every cached teacher keeps its key
TEACHER_FIELDS_ADDED = {"teacher_augment": 0.0}


def teacher_key(cfg: DistillConfig, train) -> str:
    settings = {k: getattr(cfg, k) for k in TEACHER_FIELDS
                if k not in TEACHER_FIELDS_ADDED or getattr(cfg, k) != TEACHER_FIELDS_ADDED[k]}
    if cfg.teacher_augment:  # a perturbed-text teacher is also what its perturbations were
        settings["perturbations"] = [RECIPES_VERSION, *teacher_perturbation(cfg, None).semantics()]
    return _digest([settings, len(train), train._fingerprint])


def teacher_perturbation(cfg: DistillConfig, tokenizer) -> PerturbedText:
    """The perturbed-text training of a teacher with ``teacher_augment`` > 0."""
    return PerturbedText(tokenizer, row_share=cfg.teacher_augment, seed=cfg.seed)


def get_teacher(cfg: DistillConfig, train: EncodedData, num_labels: int, key: str):
    """Fine-tune MiniLM on a seeded subset of ``train``, or load it from the cache."""
    from models.teacher import MiniLMTeacher

    folder = cache_dir() / "teacher" / key
    seed_everything(cfg.seed)
    teacher = MiniLMTeacher(num_labels, freeze_layers=cfg.teacher_freeze)
    if (folder / "teacher.safetensors").exists():
        teacher.load_state_dict(load_weights(folder / "teacher.safetensors"))
        teacher.eval()
        log(f"teacher: cached ({folder})")
        return teacher, folder
    rows = take(len(train), cfg.teacher_samples, cfg.seed)
    log(f"teacher: fine-tuning MiniLM on {len(rows)} rows for {cfg.teacher_epochs} epoch(s)"
        + (f", {cfg.teacher_augment:.0%} of them perturbed each epoch" if cfg.teacher_augment > 0 else ""))
    augment = teacher_perturbation(cfg, WordPieceTokenizer(cfg.max_length)) if cfg.teacher_augment > 0 else None
    fit(teacher, train.subset(rows), ObjectiveConfig(), epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch,
        lr=cfg.teacher_lr, weight_decay=0.01, seed=cfg.seed, progress="teacher", log_every=25, augment=augment)
    save_weights(folder / "teacher.safetensors", teacher.state_dict())
    return teacher, folder


def teacher_signals(teacher, data: EncodedData, folder: Path, name: str, attr_rows: np.ndarray, ig_steps: int):
    """Teacher logits for every row and IG maps (on the teacher's prediction) for ``attr_rows``,
    cached in ``folder/name.npz``."""
    from models.attribution import integrated_gradients

    path = folder / f"{name}-{_digest([len(data), attr_rows.tolist(), ig_steps])}.npz"
    if path.exists():
        with np.load(path) as saved:
            logits, flat, offsets = saved["logits"], saved["attr"], saved["offsets"]
    else:
        start = time.time()
        logits = predict_logits(teacher, data, batch_size=64)
        log(f"teacher: logits for {len(data)} {name} rows ({time.time() - start:.0f}s); IG maps for {len(attr_rows)} rows")
        maps = integrated_gradients(teacher, data.subset(attr_rows), n_steps=ig_steps, batch_size=8)
        flat = np.concatenate(maps) if maps else np.zeros(0, np.float32)
        offsets = np.cumsum([0] + [len(m) for m in maps])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, logits=logits, attr=flat, offsets=offsets)
        tmp.replace(path)
    attr: list[np.ndarray | None] = [None] * len(data)
    for j, row in enumerate(attr_rows):
        attr[row] = flat[offsets[j]:offsets[j + 1]]
    return logits, attr


# ---------------------------------------------------------------------------------- student
def frequent_tokens(train: EncodedData, limit: int) -> np.ndarray:
    """The ``limit`` most frequent real token ids of the training rows, most frequent first."""
    counts = np.bincount(np.concatenate(train.ids), minlength=30522)
    counts[[0, 101, 102]] = 0
    kept = np.argsort(-counts, kind="stable")[:limit]
    return kept[counts[kept] > 0]


def build_compact(cfg: DistillConfig, train: EncodedData, num_labels: int, teacher=None):
    """The compact network: vocabulary pruned to the ``vocab_size`` most frequent training tokens,
    embedding initialised from the teacher's by PCA when a teacher is given."""
    network = {"kind": cfg.network, "num_labels": num_labels}
    if cfg.network == "prado":
        return build_network(network), network
    kept = frequent_tokens(train, cfg.vocab_size - 2)
    vocab = VocabMap.pruned(30522, torch.from_numpy(kept))
    network.update(vocab_size=vocab.size, dim=cfg.dim, hidden=cfg.hidden)
    model = build_network(network, vocab)
    if teacher is not None:
        with torch.no_grad():
            pca_init_embedding(model.embedding, teacher.word_embeddings.weight[vocab.kept_ids])
    return model, network


# ------------------------------------------------------------------------------- evaluation
def evaluate(model, cfg: DistillConfig, evaluation: EncodedData, tokenizer, teacher_eval_attr=None,
             candidates=None) -> dict:
    """Clean accuracy, accuracy under each attack, fidelity and latency. ``candidates``: HotFlip's
    token set, the same for every model of a benchmark."""
    start = time.time()
    card = {"clean_acc": accuracy(model, evaluation), "params": count_parameters(model)}
    card["attacks"] = robustness(model, tokenizer, evaluation, cfg.attacks, cfg.attack_budget, cfg.attack_samples,
                                 cfg.seed, candidates)
    card["fidelity"], _ = fidelity(model, evaluation, {"": teacher_eval_attr}, cfg.ig_steps, cfg.fidelity_samples, cfg.seed)
    card["latency_ms"] = latency_ms(model, [evaluation.ids[i] for i in take(len(evaluation), 100, cfg.seed)])
    log(f"evaluated {type(model).__name__}: clean acc {card['clean_acc']:.4f} "
        + " ".join(f"{k} {v['adv_acc']:.3f}" for k, v in card["attacks"].items()) + f" ({time.time() - start:.0f}s)")
    return card


def evaluate_normalized(model, cfg: DistillConfig, evaluation: EncodedData, normalizer: WordNormalizer) -> dict:
    """The same model behind the word normaliser: clean accuracy on the normalised evaluation text
    and the black-box attacks, which now query normaliser + model (HotFlip edits token ids behind
    any text-level defence, so it is not repeated here)."""
    start = time.time()
    tokenizer = WordPieceTokenizer(cfg.max_length, normalizer=normalizer)
    normalized = EncodedData.from_texts(evaluation.texts, evaluation.labels, tokenizer)
    rows = [evaluation.texts[i] for i in take(len(evaluation), 200, cfg.seed)]
    card = {"clean_acc": accuracy(model, normalized), "words": len(normalizer.counts),
            "ms_per_sentence": normalizer.ms_per_sentence(rows),
            # whitespace-normalised: the normaliser joins words with one space, which is no rewrite
            "changed_clean_share": float(np.mean([normalizer(t) != " ".join(t.split()) for t in evaluation.texts]))}
    black_box = tuple(a for a in cfg.attacks if a != "hotflip")
    card["attacks"] = robustness(model, tokenizer, evaluation, black_box, cfg.attack_budget, cfg.attack_samples,
                                 cfg.seed)
    log(f"behind the normaliser: clean acc {card['clean_acc']:.4f} "
        + " ".join(f"{k} {v['adv_acc']:.3f}" for k, v in card["attacks"].items()) + f" ({time.time() - start:.0f}s)")
    return card


def evaluation_rows(cfg: DistillConfig, eval_ds, tokenizer) -> EncodedData:
    """The seeded evaluation rows every model of a config is measured on (attacks take theirs
    from these)."""
    return EncodedData.from_dataset(eval_ds, tokenizer).subset(take(len(eval_ds), cfg.eval_samples, cfg.seed))


def distill(cfg: DistillConfig, out: Path | None = None, teacher_only: bool = False) -> dict:
    """Run the whole pipeline; write the artifact to ``out`` (when given) and return its card.
    ``teacher_only``: stop after the teacher and return the teacher's own evaluation card."""
    cfg.validate()
    seed_everything(cfg.seed)
    tokenizer = WordPieceTokenizer(cfg.max_length)
    train_ds, eval_ds, num_labels = load_splits(cfg)
    train = EncodedData.from_dataset(train_ds, tokenizer)
    evaluation = evaluation_rows(cfg, eval_ds, tokenizer)
    log(f"{cfg.dataset}: {len(train)} training rows, {len(evaluation)} evaluation rows, {num_labels} labels")

    # The teacher is needed for KD/EXPL, for the PCA embedding init, and to score every model's
    # attributions against it; it is cached, so asking for it costs once per data+config.
    card: dict = {"config": cfg.as_dict()}
    student_rows = take(len(train), cfg.student_samples, cfg.seed + 1)
    student_train = train.subset(student_rows)
    key = teacher_key(cfg, train_ds)
    teacher, folder = get_teacher(cfg, train, num_labels, key)
    attr_rows = take(len(student_train), cfg.attr_samples, cfg.seed + 2)
    logits, attr = teacher_signals(teacher, student_train, folder, f"train{len(student_rows)}", attr_rows,
                                   cfg.ig_steps)
    student_train.teacher_logits, student_train.teacher_attr = logits, attr
    fid_rows = take(len(evaluation), cfg.fidelity_samples, cfg.seed)
    _, teacher_eval_attr = teacher_signals(teacher, evaluation, folder, f"eval{len(evaluation)}", fid_rows,
                                           cfg.ig_steps)
    card["teacher"] = {"clean_acc": accuracy(teacher, evaluation), "cache": str(folder)}
    log(f"teacher: accuracy {card['teacher']['clean_acc']:.4f} on {len(evaluation)} evaluation rows")
    # one HotFlip dictionary for every model: the whole words among the frequent training tokens
    candidates = whole_word_candidates(tokenizer, frequent_tokens(train, cfg.vocab_size - 2))
    normalizer = WordNormalizer.from_texts(train.texts) if cfg.normalizer else None
    if teacher_only:  # the teacher's own card: no agreement with itself
        card["teacher"].update(evaluate(teacher, cfg, evaluation, tokenizer, None, candidates))
        if normalizer is not None:
            card["teacher"]["normalized"] = evaluate_normalized(teacher, cfg, evaluation, normalizer)
        return card["teacher"]

    seed_everything(cfg.seed)
    model, network = build_compact(cfg, student_train, num_labels, teacher)
    log(f"{cfg.network}: {count_parameters(model):,} parameters, objective {cfg.objective.as_dict()}")
    augment = chain(PerturbedText(tokenizer, row_share=cfg.augment, seed=cfg.seed) if cfg.augment > 0 else None,
                    AdversarialText(model, tokenizer, rows=cfg.adv_text, budget=cfg.attack_budget, seed=cfg.seed)
                    if cfg.adv_text > 0 else None)
    card["train"] = fit(model, student_train, cfg.objective, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        seed=cfg.seed, progress=cfg.network, log_every=200, augment=augment,
                        candidates=SynonymCandidates(tokenizer) if cfg.adv_space == "synonyms" else None)
    card.update(evaluate(model, cfg, evaluation, tokenizer, teacher_eval_attr, candidates))
    if normalizer is not None:
        card["normalized"] = evaluate_normalized(model, cfg, evaluation, normalizer)
    config = {"network": network, "max_length": cfg.max_length, "dataset": cfg.dataset, "num_labels": num_labels,
              "objective": cfg.objective.as_dict()}
    with tempfile_dir(out) as folder:
        card.update(save_artifact(folder, model, config))
        if normalizer is not None:
            normalizer.save(folder)
        card["device_package"] = device_package(folder)
        card.update(check_int8(folder, evaluation, cfg))
        if cfg.export and cfg.network == "student":
            card.update(export_all(folder, evaluation, cfg))
        atomic_write_json(folder / "card.json", card)
    return card


class tempfile_dir:
    """The artifact folder, or a throwaway one when no ``out`` is given (benchmarks)."""

    def __init__(self, out: Path | None):
        self.out, self._tmp = out, None

    def __enter__(self) -> Path:
        import tempfile

        if self.out is None:
            self._tmp = tempfile.TemporaryDirectory()
            return Path(self._tmp.name)
        Path(self.out).mkdir(parents=True, exist_ok=True)
        return Path(self.out)

    def __exit__(self, *exc):
        if self._tmp is not None:
            self._tmp.cleanup()


def check_int8(folder: Path, evaluation: EncodedData, cfg: DistillConfig) -> dict:
    """Accuracy of the int8 weights and how often they agree with the float model."""
    from models.artifact import load_artifact

    float_model, _ = load_artifact(folder)
    int8_model, _ = load_artifact(folder, int8=True)
    float_pred = predict_logits(float_model, evaluation).argmax(1)
    int8_pred = predict_logits(int8_model, evaluation).argmax(1)
    return {"int8_acc": float((int8_pred == evaluation.labels).mean()),
            "int8_agreement": float((int8_pred == float_pred).mean())}


def export_all(folder: Path, evaluation: EncodedData, cfg: DistillConfig) -> dict:
    """TorchScript + int8 ONNX of the int8-weight model; ONNX Runtime vs PyTorch on real rows."""
    from models.artifact import load_artifact

    model, _ = load_artifact(folder, int8=True)
    example = evaluation.batch(np.arange(min(4, len(evaluation)))).ids
    export_torchscript(model, folder / "model.torchscript.pt", example)
    export_onnx_int8(model, folder / "model.int8.onnx", example)
    rows = take(len(evaluation), 300, cfg.seed)
    torch_pred, onnx_pred = [], []
    for batch in evaluation.subset(rows).batches(64):
        with torch.no_grad():
            torch_pred.append(model(batch.ids).argmax(-1).numpy())
        onnx_pred.append(onnx_logits(folder / "model.int8.onnx", batch.ids.numpy()).argmax(-1))
    torch_pred, onnx_pred = np.concatenate(torch_pred), np.concatenate(onnx_pred)
    return {"onnx_int8_bytes": (folder / "model.int8.onnx").stat().st_size,
            "onnx_agreement": float((torch_pred == onnx_pred).mean())}
