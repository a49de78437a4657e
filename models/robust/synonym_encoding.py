"""A synonym encoding in front of the model (the idea of Wang et al., 2021, "Natural Language
Adversarial Defense through Synonym Encoding", SEM): every word of a synonym cluster is replaced by
one representative before the model sees it, so swapping a word for a synonym in its cluster
changes nothing the model reads.

Clusters come from a synonym source (WordNet's lemmas, the candidates the `synonym` attack
draws from) and are built greedily as SEM builds them: words in order of corpus frequency; a word
not yet encoded takes the code of its most frequent already-encoded synonym, or becomes a new
code; then each of its synonyms not yet encoded takes its code. The greedy walk keeps clusters
from chaining across the whole vocabulary (full transitive closure over WordNet would put "good"
and "bad" in one cluster), at the price that some synonym pairs end up in different clusters:
``coverage`` says what share of a synonym source's pairs share a code. Words outside the table
pass through unchanged.

On a device it ships as one gzip'd table of the words it changes (word TAB representative).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable

from models.errors import FedrexError

FILE = "synonym_encoding.txt.gz"


class SynonymEncoding:
    def __init__(self, code: dict[str, str]):
        # only the words that change: a word's own representative is implied
        self.code = {word: rep for word, rep in code.items() if word != rep}

    @classmethod
    def build(cls, counts: dict[str, int], synonyms_of: Callable[[str], Iterable[str]]) -> "SynonymEncoding":
        """SEM's greedy clustering of ``counts``' words (corpus frequencies) and of the synonyms
        ``synonyms_of`` gives each: a synonym the corpus lacks is encoded too (as the word it was met
        with), so an attack's rare synonym maps to a word the model has seen."""
        near = {w: sorted({s.lower() for s in synonyms_of(w) if s.isalpha()} - {w}) for w in counts}
        code: dict[str, str] = {}
        for word in sorted(counts, key=lambda w: (-counts[w], w)):
            if word not in code:
                encoded = [s for s in near[word] if s in code]
                code[word] = code[max(encoded, key=lambda s: (counts.get(s, 0), s))] if encoded else word
            for synonym in near[word]:
                code.setdefault(synonym, code[word])
        return cls(code)

    def __call__(self, text: str) -> str:
        """``text`` with each word of the table replaced by its representative (lowercase; the
        punctuation around a word is kept)."""
        from models.normalizer import _split

        out = []
        for token in text.split():
            lead, core, tail = _split(token.lower())
            rep = self.code.get(core)
            out.append(token if rep is None else lead + rep + tail)
        return " ".join(out)

    def coverage(self, pairs: Iterable[tuple[str, str]]) -> float:
        """The share of (word, synonym) pairs that read the same after encoding."""
        pairs = list(pairs)
        same = sum(self.code.get(a, a) == self.code.get(b, b) for a, b in pairs)
        return same / len(pairs) if pairs else float("nan")

    # ----------------------------------------------------------------------------- persistence
    def to_bytes(self) -> bytes:
        return gzip.compress("".join(f"{w}\t{r}\n" for w, r in sorted(self.code.items())).encode(), mtime=0)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "SynonymEncoding":
        try:
            lines = gzip.decompress(blob).decode().splitlines()
            code = dict(line.split("\t") for line in lines)
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
            raise FedrexError(f"not a synonym encoding table ({type(err).__name__})") from None
        return cls(code)
