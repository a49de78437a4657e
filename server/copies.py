"""Training on substitution copies: a start artifact fine-tuned on copies of its training text in
which words are swapped for their substitutes (SAFER's training, Ye et al. 2020, without its
smoothing at answer time), so that a device pays nothing more than for the parent.

Each epoch every training sentence is replaced by a fresh copy: each word of a perturbation table
(``models.robust.smoothing.PerturbationTable``: WordNet synonyms, MiniLM embedding neighbours or
both; stopwords never) swapped with probability ``rate`` for one of its substitutes. The loss is
cross-entropy on the labels plus distillation of the parent's own answers on the unperturbed
sentence, so the copies teach invariance and the parent's answers keep what it knew. Network,
tokenizer, normaliser and package size stay the parent's.

    fedrex train-on-copies --artifact sst2-student --out FOLDER [--source wordnet --rate 0.75 --epochs 2] [--symmetric | --compact]

Measured on SST-2 dev (``benchmarks/smoothing.py``, row "the training alone"): 0.852 clean, 0.265
under PWWS (the parent 0.842 / 0.135), 0.315 under the embedding-neighbour attack (unchanged: a
WordNet table teaches WordNet's swaps), 0.590 under DeepWordBug (0.570).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.artifact import device_package, load_artifact, read_config, resolve_artifact, save_artifact
from models.files import atomic_write_json
from models.errors import FedrexError
from models.normalizer import FILE as NORMALIZER_FILE
from models.normalizer import WordNormalizer, word_counts
from models.tokenizer import WordPieceTokenizer

ATTACKS = ("char", "synonym", "embedding")  # what the card measures, on the parent's 200 dev sentences
LR, BATCH_SIZE = 1e-3, 64  # AdamW's learning rate and the batch of fine_tune


def fine_tune(model, tokenizer, texts: list[str], labels: np.ndarray, targets: torch.Tensor, epochs: float,
              seed: int, lr: float = LR, batch_size: int = BATCH_SIZE) -> torch.nn.Module:
    """A copy of ``model`` trained with cross-entropy on ``labels`` plus distillation of
    ``targets`` (probabilities, one row per text), on ``texts`` as ``tokenizer`` encodes them;
    AdamW, seeded; each pass a fresh permutation; a fractional ``epochs`` stops the last pass
    early, on a random part of the rows."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model).train()
    rows = tokenizer.encode_ids(texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng, y = np.random.default_rng(seed), torch.from_numpy(np.asarray(labels))
    order = np.concatenate([rng.permutation(len(texts)) for _ in range(int(np.ceil(epochs)))])
    for step in range(int(epochs * len(texts) / batch_size)):
        batch = order[step * batch_size:(step + 1) * batch_size]
        logp = torch.log_softmax(model(torch.from_numpy(tokenizer.pad([rows[i] for i in batch]))), -1)
        loss = torch.nn.functional.nll_loss(logp, y[batch]) - (targets[batch] * logp).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def answers(model, tokenizer, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    ids = tokenizer.encode(texts)
    return torch.cat([torch.softmax(model(torch.from_numpy(ids[i:i + batch_size])), -1)
                      for i in range(0, len(texts), batch_size)])


def substitution_copies(texts: list[str], table, rate: float, epochs: int, seed: int) -> list[str]:
    """``epochs`` fresh copies of every text, epoch after epoch (epoch e's draws seeded by (seed, e))."""
    from models.attacks import Words
    from models.robust.smoothing import perturbed

    return [perturbed(table, Words.of(t), rate, rng) for e in range(epochs)
            for rng in [np.random.default_rng([seed, 1000 + e])] for t in texts]


def train_on_substitution_copies(model, tokenizer, texts: list[str], labels: np.ndarray, targets: torch.Tensor, table,
                                 rate: float, epochs: float, seed: int) -> torch.nn.Module:
    """``fine_tune`` over ``ceil(epochs)`` passes of fresh copies of ``texts`` (one shuffled run over
    all of them; a fractional ``epochs`` stops it early), each copy keeping its text's label and
    distillation target."""
    passes = int(np.ceil(epochs))
    return fine_tune(model, tokenizer, substitution_copies(texts, table, rate, passes, seed), np.tile(labels, passes),
                     targets.repeat(passes, 1), epochs / passes, seed)


def artifact_splits(folder: Path):
    """The splits an artifact was distilled on and evaluated with (a holdout carved out of train,
    too), as the ``DistillConfig`` that ``server.distill.load_splits`` reads: its card's settings, or
    the dataset its config names."""
    from server.distill import DistillConfig

    card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").exists() else {}
    config = read_config(folder)
    split_settings = card.get("config") or ({"dataset": config["dataset"]} if config.get("dataset") else {})
    if not split_settings:
        raise FedrexError(f"{folder} names no dataset it was trained on (no card, no dataset in its config)")
    return DistillConfig(**{k: split_settings[k] for k in ("dataset", "train_split", "eval_split", "eval_fraction",
                                                           "seed", "data_dir") if k in split_settings})


def train_on_copies(artifact: str, out: Path, source: str = "wordnet", rate: float = 0.75, epochs: int = 2,
                    seed: int = 0, rows: int = 0, attack_samples: int = 200, log=None, symmetric: bool = False,
                    compact: bool = False) -> dict:
    """Write ``out``: ``artifact`` fine-tuned for ``epochs`` passes over fresh substitution copies of
    the training split it was distilled on (the first ``rows`` only when > 0: a quick check), with
    its normaliser, and a card saying what it came from and what both models score on the parent's
    evaluation split, through the normaliser. Everything is written to ``out`` + ".partial" and
    renamed into place last: a folder named ``out`` is always a finished artifact. ``symmetric``: the
    table closed under its relation; ``compact``: closed over the words its normaliser knows, the
    form that fits a 1 MB device package (``PerturbationTable.compact``). Returns the card."""
    from models.attacks import Victim
    from models.encoded import EncodedData
    from models.evaluation import robustness
    from models.robust.smoothing import check_source, smoothing_table
    from server.distill import load_splits

    log = log or say
    check_source(source)
    if not 0 < rate <= 1 or int(epochs) != epochs or epochs < 1 or rows < 0 or attack_samples < 0:
        raise FedrexError(f"train-on-copies needs rate in (0, 1], a whole number of epochs >= 1, rows >= 0 and "
                          f"attack samples >= 0, got {rate}, {epochs}, {rows} and {attack_samples}")
    epochs = int(epochs)
    parent, out = resolve_artifact(artifact), Path(out)
    if out.resolve() == parent.resolve():
        raise FedrexError("--out must not be the parent artifact's own folder")
    if out.exists():
        raise FedrexError(f"{out} already exists; an artifact is never overwritten: remove it or choose another --out")
    model, config = load_artifact(parent)
    parent_card = json.loads((parent / "card.json").read_text()) if (parent / "card.json").exists() else {}
    made = parent_card.get("config", {})
    splits = artifact_splits(parent)
    normalizer = WordNormalizer.load(parent) if (parent / NORMALIZER_FILE).exists() else None
    if compact and normalizer is None:
        raise FedrexError(f"--compact names the table's words by the normaliser's, and {artifact} has no normaliser")
    tokenizer = WordPieceTokenizer(config["max_length"], normalizer=normalizer)
    train, evaluation, _ = load_splits(splits)
    texts, labels = list(train["text"]), np.asarray(train["label"])
    if rows:
        texts, labels = texts[:rows], labels[:rows]
    if len(texts) * epochs < BATCH_SIZE:
        raise FedrexError(f"{len(texts)} rows x {epochs} epochs is less than one batch of {BATCH_SIZE}: nothing to train")
    start = time.time()
    targets = answers(model, tokenizer, texts)
    table = smoothing_table(sorted(word_counts(texts)), source, symmetric,
                            normalizer.known_words() if compact else None)
    form = ", compact" if compact else ", symmetric" if symmetric else ""
    log(f"[copies] {len(texts)} {splits.dataset} {splits.train_split} sentences, {len(table.table)} table words "
        f"({source}{form}), rate {rate}, {epochs} epochs, {torch.get_num_threads()} threads")
    tuned = train_on_substitution_copies(model, tokenizer, texts, labels, targets, table, rate, epochs, seed)
    log(f"[copies] trained in {time.time() - start:.0f}s")
    data = EncodedData.from_texts(list(evaluation["text"]), np.asarray(evaluation["label"]), tokenizer)
    scores = {}
    for name, net in (("parent", model), ("trained", tuned)):
        victim = Victim(net, tokenizer)
        clean = float((victim.answer(data.texts).argmax(1) == data.labels).mean())
        attacked = robustness(net, tokenizer, data, ATTACKS, 0.2, attack_samples, 0)
        scores[name] = {"clean_acc": clean, **{a: s["adv_acc"] for a, s in attacked.items()}}
        log(f"[copies] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores[name].items()))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted earlier call left
    save_artifact(partial, tuned, {k: v for k, v in config.items() if k not in ("format", "sha256")})
    if normalizer is not None:
        shutil.copyfile(parent / NORMALIZER_FILE, partial / NORMALIZER_FILE)
    card = {"parent": {"artifact": artifact, "sha256": read_config(parent).get("sha256", {})},
            "recipe": {"kind": "substitution copies", "source": source, "symmetric": symmetric or compact,
                       "compact": compact, "rate": rate, "epochs": epochs,
                       "seed": seed, "train_split": splits.train_split, "rows": len(texts), "lr": LR,
                       "batch_size": BATCH_SIZE,
                       "loss": "cross-entropy + distillation of the parent's answers on unperturbed text"},
            "evaluation": {"dataset": splits.dataset, "split": splits.eval_split, "rows": len(data),
                           "attack_samples": attack_samples, "budget": 0.2,
                           "through": "the word normaliser" if normalizer is not None else "the model alone",
                           "scores": scores},
            "device_package": device_package(partial),
            "reproduce": {"command": "fedrex " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train-on-copies"]
                          else "fedrex train-on-copies", "torch": torch.__version__,
                          # the same weights need the same thread count: float sums differ with it
                          "threads": torch.get_num_threads()}}
    if made:  # the lineage: what the parent was distilled with, and its teacher (the teacher references read them)
        card["config"] = made
        card["config_is"] = "the parent's distillation settings; this artifact's own training is 'recipe'"
    if "teacher" in parent_card:
        card["teacher"] = parent_card["teacher"]
    atomic_write_json(partial / "card.json", card)
    partial.rename(out)
    return card


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args) -> int:
    card = train_on_copies(args.artifact, Path(args.out), args.source, args.rate, args.epochs, args.seed,
                           args.rows, args.attack_samples, symmetric=args.symmetric, compact=args.compact)
    print(f"wrote {args.out} (package {card['device_package']['total'] / 1024:.0f} KB)")
    return 0
