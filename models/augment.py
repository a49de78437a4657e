"""Training on perturbed text: a defence against discrete attacks that embedding-space PGD does
not cover. Each epoch, a seeded share of the training rows is replaced by a copy whose words were
edited the way the attacks edit them (``models.attacks`` transformations: character edits and
WordNet synonyms, up to the attacks' word budget), drawn fresh every epoch. A perturbed row keeps
its label and its teacher logits (KD then asks the student to answer the perturbed text as the
teacher answered the clean one); its teacher attribution map is dropped, since the token positions
it refers to moved."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.attacks import STOPWORDS, CharEdits, WordNetSynonyms, Words, word_budget
from models.encoded import EncodedData
from models.errors import FedrexError
from models.protocol import PERTURBATIONS
from models.tokenizer import WordPieceTokenizer

TRANSFORMATIONS = {"char": CharEdits(), "synonym": WordNetSynonyms()}
if tuple(TRANSFORMATIONS) != PERTURBATIONS:  # models/protocol.py names them for devices without torch
    raise RuntimeError("models.protocol.PERTURBATIONS and models.augment.TRANSFORMATIONS disagree")


def with_texts(data: EncodedData, rows, texts: list[str], tokenizer: WordPieceTokenizer) -> EncodedData:
    """A copy of ``data`` whose ``rows`` carry ``texts`` instead (re-encoded); labels and teacher
    logits stay, the attribution maps of those rows go (their token positions moved)."""
    out = data.subset(np.arange(len(data)))
    for i, text, ids in zip(rows, texts, tokenizer.encode_ids(list(texts)) if len(texts) else []):
        out.texts[i], out.ids[i] = text, np.asarray(ids, dtype=np.int64)
        if out.teacher_attr is not None:
            out.teacher_attr[i] = None
    return out


def perturb(text: str, rng: np.random.Generator, word_share: float, kinds: tuple[str, ...]) -> str:
    """Edit up to the attacks' word budget of the words an attack may edit (``models.attacks.Words``,
    stopwords left alone), each with one option of a randomly ordered transformation."""
    parsed = Words.of(text)
    words = list(parsed.words)
    positions = [i for i, w in enumerate(words) if w not in STOPWORDS]
    if not positions:
        return text
    chosen = rng.choice(positions, size=min(len(positions), word_budget(len(words), word_share)), replace=False)
    for i in chosen:
        for kind in rng.permutation(list(kinds)):  # the first transformation with an option wins
            options = TRANSFORMATIONS[kind](words[i], rng)
            if options:
                words[i] = options[int(rng.integers(0, len(options)))]
                break
    return parsed.text(words)


@dataclass
class PerturbedText:
    tokenizer: WordPieceTokenizer
    row_share: float = 0.5
    word_share: float = 0.2
    kinds: tuple[str, ...] = ("char", "synonym")
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.row_share <= 1 or not 0 < self.word_share <= 1:
            raise FedrexError("perturbed-text shares must be in (0, 1]")
        unknown = set(self.kinds) - set(TRANSFORMATIONS)
        if unknown or not self.kinds:
            raise FedrexError(f"perturbations must be among {', '.join(TRANSFORMATIONS)}, got {self.kinds}")

    def semantics(self) -> list:
        """What decides the perturbed rows besides the data and the attacks' transformations (for a
        cache key): the shares, the kinds and the seed."""
        return [self.row_share, self.word_share, list(self.kinds), self.seed]

    def __call__(self, data: EncodedData, epoch: int) -> EncodedData:
        rng = np.random.default_rng([self.seed, epoch])
        rows = np.flatnonzero(rng.random(len(data)) < self.row_share)
        texts = [perturb(data.texts[i], rng, self.word_share, self.kinds) for i in rows]
        return with_texts(data, rows, texts, self.tokenizer)


@dataclass
class AdversarialText:
    """ADV on the token side: at the start of every epoch, a black-box attack recipe
    (``models.attacks.RECIPES``) is run against the model *as it is now* on a seeded sample of
    ``rows`` training rows, and each successful adversarial text replaces its row for that epoch
    (label and teacher logits kept, attribution map dropped, as for ``PerturbedText``)."""

    model: object
    tokenizer: WordPieceTokenizer
    rows: int = 1000
    attack: str = "char"
    budget: float = 0.2
    seed: int = 0

    def __call__(self, data: EncodedData, epoch: int) -> EncodedData:
        from models.attacks import attack_dataset

        rng = np.random.default_rng([self.seed, epoch, 1])
        picked = np.sort(rng.choice(len(data), size=min(self.rows, len(data)), replace=False))
        was_training = self.model.training  # the attack puts the model in eval mode; training resumes after
        _, results = attack_dataset(self.attack, self.model, self.tokenizer, [data.texts[i] for i in picked],
                                    data.labels[picked], self.budget, seed=self.seed + 7919 * epoch)
        self.model.train(was_training)
        found = [(i, r.perturbed) for i, r in zip(picked, results) if r.success]
        self.last_found = len(found)
        return with_texts(data, [i for i, _ in found], [text for _, text in found], self.tokenizer)


def chain(*steps):
    """Apply several per-epoch augmentations in turn (``None`` entries are skipped); None if none."""
    steps = [s for s in steps if s is not None]
    if not steps:
        return None

    def apply(data: EncodedData, epoch: int) -> EncodedData:
        for step in steps:
            data = step(data, epoch)
        return data

    return apply
