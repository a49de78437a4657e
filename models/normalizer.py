"""A word recognizer in front of the model (the idea of Pruthi et al., 2019, "Combating
Adversarial Misspellings with Robust Word Recognition", with a lookup instead of their RNN).

Every word the training corpus contains is kept as it is. Any other word is mapped to the most
frequent corpus word within one edit (insertion, deletion, substitution or transposition of
neighbours), after undoing digit/symbol-for-letter spelling ("g00d" -> "good"). A word with no
such neighbour passes through unchanged (Pruthi et al.'s "pass-through" backoff). Lookups use
the symmetric-delete index (SymSpell's idea): a word and every string one deletion away from it
are keys, so an edit-distance-1 neighbour shares a key with the query.

On a device it ships as one gzip'd word list with counts; the index is rebuilt at load time.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path

from models.errors import FedrexError

FILE = "normalizer.txt.gz"
LEET = str.maketrans({"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
WORD = re.compile(r"^([^a-z0-9@$!]*)(.*?)([^a-z0-9]*)$")  # leading punctuation, core, trailing punctuation


def _deletes(word: str) -> set[str]:
    return {word[:i] + word[i + 1:] for i in range(len(word))}


def _within_one_edit(a: str, b: str) -> bool:
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


class WordNormalizer:
    def __init__(self, counts: dict[str, int], min_length: int = 3):
        if not counts:
            raise FedrexError("the word normaliser needs a non-empty word list")
        self.counts = dict(counts)
        self.min_length = min_length  # shorter unknown words are too ambiguous to correct
        # one edit changes a length by at most one: a longer word has no correction, and looking
        # for one would cost its length squared (a 100,000-letter "word" took 2 s)
        self.longest = max(len(word) for word in self.counts)
        self._index: dict[str, list[str]] = {}
        for word in self.counts:
            for key in {word} | _deletes(word):
                self._index.setdefault(key, []).append(word)

    @classmethod
    def from_texts(cls, texts, min_count: int = 1) -> "WordNormalizer":
        return cls({w: c for w, c in word_counts(texts).items() if c >= min_count})

    def correct(self, word: str) -> str:
        """The vocabulary word a (lowercase) word was most likely meant to be."""
        if (word in self.counts or not self.min_length <= len(word) <= self.longest + 1
                or not any(c.isalpha() for c in word)):
            return word
        for query in dict.fromkeys([word.translate(LEET), word]):
            if not query.isalpha():  # "don't", "2nd", numbers: not misspellings of corpus words
                continue
            if query in self.counts:
                return query
            found = {w for key in {query} | _deletes(query) for w in self._index.get(key, ())
                     if _within_one_edit(query, w)}
            if found:
                return max(sorted(found), key=self.counts.__getitem__)
        return word

    def __call__(self, text: str) -> str:
        return map_words(text, lambda core: self.correct(core) if core else core)

    def ms_per_sentence(self, texts: list[str]) -> float:
        return ms_per_sentence(self, texts)

    # ----------------------------------------------------------------------------- persistence
    def to_bytes(self) -> bytes:
        """The gzip'd word list with counts: what a device stores and what travels to it."""
        lines = "".join(f"{w}\t{c}\n" for w, c in sorted(self.counts.items()))
        return gzip.compress(lines.encode(), mtime=0)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "WordNormalizer":
        try:
            text = gzip.decompress(blob).decode()
            counts = {word: int(count) for word, count in (line.split("\t") for line in text.splitlines())}
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
            raise FedrexError(f"not a word normaliser's word list ({type(err).__name__})") from None
        return cls(counts)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILE
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, folder: Path) -> "WordNormalizer":
        path = Path(folder) / FILE
        if not path.exists():
            raise FedrexError(f"{path} not found: this artifact was built without a word normaliser")
        return cls.from_bytes(path.read_bytes())


def word_counts(texts) -> Counter:
    """How often each alphabetic word occurs in ``texts`` (lowercase, punctuation around it cut):
    the corpus a text defence is built from."""
    return Counter(core for text in texts for core in (_split(w)[1] for w in text.lower().split()) if core.isalpha())


def map_words(text: str, change) -> str:
    """``text`` with each word (lowercase, the punctuation around it kept) replaced by
    ``change(word)``; a word it leaves as it is keeps its original spelling and case."""
    out = []
    for token in text.split():
        lead, core, tail = _split(token.lower())
        new = change(core)
        out.append(token if new == core else lead + new + tail)
    return " ".join(out)


def ms_per_sentence(transform, texts: list[str]) -> float:
    """What a text -> text defence costs per sentence, after a warm-up pass, with the garbage
    collector's view of the calling process frozen: on a device the defence lives in a small
    process, and a full collection over a benchmark's millions of objects would otherwise be
    charged to it."""
    import gc
    import time

    for text in texts:
        transform(text)
    gc.collect()
    gc.freeze()
    try:
        start = time.perf_counter()
        for text in texts:
            transform(text)
        return (time.perf_counter() - start) * 1000 / max(len(texts), 1)
    finally:
        gc.unfreeze()


def _split(token: str) -> tuple[str, str, str]:
    match = WORD.match(token)
    return (match.group(1), match.group(2), match.group(3)) if match else ("", token, "")
