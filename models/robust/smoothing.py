"""Randomized smoothing over word substitutions (issue #18's second defence, after Ye, Gong and
Liu, 2020, "SAFER: A Structure-free Approach for Certified Robustness to Adversarial Word
Substitutions").

The smoothed classifier answers for a text with the mean of the model's class probabilities over
``votes`` copies of it; in each copy every word of the perturbation table (never a stopword: no
recipe edits those) is replaced, with probability ``rate``, by one of its substitutes drawn
uniformly. The table holds a corpus's words and their substitutes from one source: WordNet's
synonyms (the `synonym` attack's own source) or MiniLM's embedding neighbours (the `embedding`
attack's); it ships to a device as one gzip'd file, and a word outside it passes unchanged. A
swapped word is lowercase (the tokenizer is uncased); only ``build`` leaves stopwords out, a
table read from a file holds what was written. A
substitution the attack makes is then one the copies were already drawing, so it moves the mean
less than it moves the model.

Two choices differ from SAFER's certification, on purpose:
- the mean of probabilities, not a hard vote: 16 hard votes would hand a score-based attack a
  staircase of 17 levels, a masking of the score that makes a search fail without the model being
  robust; the mean keeps the attack's scores as informative as the model's;
- the copies come from a generator seeded by (seed, the number of words): common random numbers.
  The smoothed classifier is a deterministic function of its input, and a text and an attack's
  candidate (the same words but one) draw the same swaps at every position, so the answer moves
  by what the substitution changes and not by fresh draws. Seeded by the text itself, every
  candidate would re-draw all its copies: on SST-2 dev a one-word swap then moved the smoothed
  answer more than the model's (0.076 against 0.069 mean change in p(positive), 16 copies at rate
  0.5), noise that makes a score-based search stumble without the model being robust.

The cost on a device is ``votes`` forward passes per sentence (one batch).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Iterable

import numpy as np
import torch

from models.attacks import STOPWORDS, Victim, Words, embedding_neighbours, synonyms
from models.errors import FedrexError
from models.normalizer import from_varint_gaps, varint_gaps
from models.robust import word_table
from models.tokenizer import WordPieceTokenizer

SOURCES = ("wordnet", "embedding", "wordnet+embedding")


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise FedrexError(f"unknown perturbation source {source!r}: one of {list(SOURCES)}")


class PerturbationTable:
    """word (lowercase) -> the substitutes smoothing draws from."""

    def __init__(self, table: dict[str, tuple[str, ...]]):
        self.table = {w: tuple(s) for w, s in table.items() if s}

    @classmethod
    def build(cls, words: Iterable[str], source: str) -> "PerturbationTable":
        """The substitutes ``source`` gives each of ``words`` (stopwords left out): WordNet's
        synonyms as the `synonym` attack draws them, the `embedding` attack's neighbours (its
        defaults: 50 nearest, cosine >= 0.35), or both."""
        check_source(source)
        parts = [synonyms if part == "wordnet" else (lambda w: embedding_neighbours(w, 50, 0.35))
                 for part in source.split("+")]
        return cls({w: tuple(dict.fromkeys(s.lower() for near in parts for s in near(w) if s.lower() != w))
                    for w in {w.lower() for w in words} if w not in STOPWORDS})

    def symmetric(self) -> "PerturbationTable":
        """The table closed under its own relation: every substitute becomes a word of the table
        too, and each word's substitutes gain every word that lists it (stopwords stay out). Built
        from a corpus's words, a table covers the attack's original words but not its candidates:
        on SST-2 dev half of PWWS's WordNet candidates were no word of the WordNet table (their
        copies never moved: a swap traded a word the copies drew over for one they kept), and
        only 28% listed the word they replace. Closed, a candidate's copies draw from a set that
        holds the word it replaced. A word's own substitutes come first, in their order; the words
        listing it follow in alphabetical order, so a table and the same table read from its file
        close to the same table."""
        neighbours = {w: dict.fromkeys(s) for w, s in self.table.items()}
        # in the words' order, not the table's: a built table's order is a set's, which differs between
        # processes, and a substitute's position is what a copy's draw picks
        for word, substitutes in sorted(self.table.items()):
            for substitute in substitutes:
                if substitute not in STOPWORDS:
                    neighbours.setdefault(substitute, {})[word] = None
        return PerturbationTable({w: tuple(n) for w, n in neighbours.items()})

    def compact(self, known: Iterable[str]) -> "PerturbationTable":
        """The table in the form a device stores in few bytes (``to_graph_bytes``): only words of
        ``known`` (the normaliser's, ``WordNormalizer.known_words``, which the device holds
        already, so the file names words by index and ships no spelling), no stopwords, closed
        under the relation (``symmetric``), and each word's substitutes in alphabetical order, the
        order the graph gives them back in. What it leaves out is what it costs: on SST-2 the
        compact WordNet table holds 11,887 words (24,085 closed), and 65% of PWWS's candidates for
        dev words are words of it (97% of the closed table's): a third of the candidates are words
        the normaliser does not know, and most of those pass it unchanged, so the copies never
        swap them back (``benchmarks/smoothing_table.py``; under PWWS the compact smoothing keeps
        0.230 of SST-2 dev where the closed one keeps 0.450, ``benchmarks/smoothing.py``)."""
        allowed = set(known) - STOPWORDS
        kept = PerturbationTable({w: tuple(s for s in subs if s in allowed) for w, subs in self.table.items()
                                  if w in allowed}).symmetric()
        return PerturbationTable({w: tuple(sorted(subs)) for w, subs in kept.table.items()})

    def shaped(self, symmetric: bool = False, known: list[str] | None = None) -> "PerturbationTable":
        """This table as built, closed (``symmetric``) or, given ``known``, ``compact`` over it: the
        three forms a recipe trains on (``smoothing_table``)."""
        return self.compact(known) if known is not None else self.symmetric() if symmetric else self

    def get(self, word: str) -> tuple[str, ...]:
        return self.table.get(word.lower(), ())

    def to_bytes(self) -> bytes:
        return word_table.to_bytes({w: " ".join(s) for w, s in self.table.items()})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "PerturbationTable":
        return cls({w: tuple(s.split(" ")) for w, s in word_table.from_bytes(blob, "perturbation table").items()})

    def to_graph_bytes(self, words: list[str]) -> bytes:
        """A ``compact`` table as the pairs of words it links, each pair once, the words named by
        their index in ``words`` (sorted; the normaliser's ``known_words``, which the device holds
        already): a header (the list's length, a digest of it, the number of pairs), then the pair
        codes (index of the first x len(words) + index of the second, first < second) ascending, as
        varint gaps, all gzip'd; the normaliser stores its bigrams so. 55 KB for SST-2's compact
        WordNet table, where the table as built takes 206 KB in ``to_bytes``. A table the graph
        could not give back (not compact over ``words``: a word outside them, a substitute that
        does not list it back, substitutes out of order or repeated, a word its own substitute)
        is refused."""
        index = {w: i for i, w in enumerate(words)}
        if list(words) != sorted(index) or len(index) != len(words):
            raise FedrexError("a graph table names words by their index in a sorted list of distinct words")
        codes = set()
        for word, substitutes in self.table.items():
            if word not in index or word in substitutes or list(substitutes) != sorted(set(substitutes)) \
                    or any(s not in index or word not in self.table.get(s, ()) for s in substitutes):
                raise FedrexError(f"the table is not compact over these words at {word!r}: "
                                  "use PerturbationTable.compact")
            codes.update(min(index[word], index[s]) * len(words) + max(index[word], index[s]) for s in substitutes)
        header = f"{GRAPH_HEADER} {len(words)} {_digest(words)} {len(codes)}\n".encode()
        return gzip.compress(header + varint_gaps(sorted(codes)), mtime=0)

    @classmethod
    def from_graph_bytes(cls, blob: bytes, words: list[str]) -> "PerturbationTable":
        """The table ``to_graph_bytes`` wrote over the same ``words``; another list, or anything
        but such a file (a pair count that differs, codes not strictly ascending, a pair not
        first < second < len(words)), is refused."""
        try:
            header, _, packed = gzip.decompress(blob).partition(b"\n")
            name, size, digest, count = header.decode().split(" ")
            size, count = int(size), int(count)
            if name != GRAPH_HEADER:
                raise ValueError("header")
            codes = from_varint_gaps(packed)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as err:
            raise FedrexError(f"not a perturbation graph ({type(err).__name__})") from None
        if size != len(words) or digest != _digest(words):
            raise FedrexError(f"this perturbation graph names the words of another list ({size} words, digest "
                              f"{digest}) than the normaliser's ({len(words)}, {_digest(words)})")
        pairs = [divmod(code, size) for code in codes]
        if len(codes) != count or any(b <= a for a, b in zip(codes, codes[1:])) \
                or any(not first < second < size for first, second in pairs):
            raise FedrexError(f"not a perturbation graph (its {len(codes)} pair codes are not {count} ascending "
                              f"pairs of distinct words of the list)")
        neighbours: dict[int, list[int]] = {}
        for first, second in pairs:  # ascending, so each word's neighbours come in index (alphabetical) order
            neighbours.setdefault(first, []).append(second)
            neighbours.setdefault(second, []).append(first)
        return cls({words[i]: tuple(words[j] for j in sorted(n)) for i, n in sorted(neighbours.items())})


GRAPH_HEADER = "#fedrex-perturbation-graph"


def _digest(words: list[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()[:16]


def smoothing_table(words: Iterable[str], source: str, symmetric: bool = False,
                    known: list[str] | None = None) -> PerturbationTable:
    """The table a student is trained on with copies (``server.copies``) and smoothed over:
    ``build`` from its training ``words``, closed under its relation (``symmetric``), or, given
    ``known`` (its normaliser's words), ``compact`` over them, the form that fits a 1 MB device package."""
    return PerturbationTable.build(words, source).shaped(symmetric, known)


def perturbed(table: PerturbationTable, words: Words, rate: float, rng: np.random.Generator) -> str:
    """One copy: each word of ``table`` swapped with probability ``rate`` for one of its
    substitutes (what training on copies, ``server.copies``, draws too, from a generator of its own)."""
    options = [table.get(w) for w in words.words]
    swap = rng.random(len(options)) < rate
    picks = rng.integers(0, 1 << 30, len(options))
    return words.text([o[p % len(o)] if s and o else w for w, o, s, p in zip(words.words, options, swap, picks)])


class SmoothedVictim(Victim):
    """The model behind ``tokenizer``, smoothed over ``table``'s substitutions. Attacks count one
    query per text, whatever its votes cost."""

    def __init__(self, model, tokenizer: WordPieceTokenizer, table: PerturbationTable, votes: int = 16,
                 rate: float = 0.5, seed: int = 0, batch_size: int = 256):
        if votes < 1 or not 0 <= rate <= 1:
            raise FedrexError(f"smoothing needs votes >= 1 and rate in [0, 1], got {votes} and {rate}")
        super().__init__(model, tokenizer, batch_size)
        self.table, self.votes, self.rate, self.seed = table, votes, rate, seed

    def copies(self, text: str) -> list[str]:
        """The ``votes`` perturbed copies the answer for ``text`` averages (the same every call)."""
        words = Words.of(text)
        rng = np.random.default_rng([self.seed, len(words.words)])
        return [self.perturbed(words, rng) for _ in range(self.votes)]

    def perturbed(self, words: Words, rng: np.random.Generator) -> str:
        return perturbed(self.table, words, self.rate, rng)

    @torch.no_grad()
    def answer(self, texts: list[str]) -> np.ndarray:
        probs = super().answer([c for t in texts for c in self.copies(t)])
        return probs.reshape(len(texts), self.votes, -1).mean(1)
