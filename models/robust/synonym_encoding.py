"""A synonym encoding in front of the model (the idea of Wang et al., 2021, "Natural Language
Adversarial Defense through Synonym Encoding", SEM): every word of a synonym cluster is replaced by
one representative before the model sees it, so swapping a word for a synonym in its cluster
changes nothing the model reads.

Clusters come from a synonym source (WordNet's lemmas, the candidates the `synonym` attack
draws from; single alphabetic words only, so the attack's hyphenated and apostrophe candidates stay
outside the table) and are built greedily as SEM builds them: words in order of corpus frequency; a word
not yet encoded takes the code of its most frequent already-encoded synonym, or becomes a new
code; then each of its synonyms not yet encoded takes its code. SEM bounds its neighbourhoods by
an embedding distance; WordNet's synonyms of every sense are far looser, and the walk hands codes
along chains of them (on SST-2 one cluster holds 7,557 words, and "great", "worst" and "bad"
share one), so ``star`` clusters stop after one step: a frequent word and its direct synonyms.
Some synonym pairs then end in different clusters: ``coverage`` says what share of a source's
pairs share a code. Words outside the table pass through unchanged.

On a device it ships as one gzip'd table of the words it changes (word TAB representative).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from models.robust import word_table

FILE = "synonym_encoding.txt.gz"


class SynonymEncoding:
    def __init__(self, code: dict[str, str]):
        # only the words that change: a word's own representative is implied
        self.code = {word: rep for word, rep in code.items() if word != rep}

    @classmethod
    def build(cls, counts: dict[str, int], synonyms_of: Callable[[str], Iterable[str]],
              star: bool = False) -> "SynonymEncoding":
        """Cluster ``counts``' words (corpus frequencies) with the synonyms ``synonyms_of`` gives
        each, most frequent words first; a synonym the corpus lacks is encoded too (as the word it
        was met with), so an attack's rare synonym maps to a word the model has seen.

        ``star=False``: SEM's greedy walk (an encoded word hands its code on to its synonyms, so
        codes travel along chains of synonyms). ``star=True``: only a word that is its own code
        hands it on, so a cluster is one frequent word and its direct synonyms."""
        near = {w: sorted({s.lower() for s in synonyms_of(w) if s.isalpha()} - {w}) for w in counts}
        code: dict[str, str] = {}
        for word in sorted(counts, key=lambda w: (-counts[w], w)):
            if star:
                if word in code:  # a member of an earlier word's cluster: hands nothing on
                    continue
                code[word] = word
            elif word not in code:
                encoded = [s for s in near[word] if s in code]
                code[word] = code[max(encoded, key=lambda s: (counts.get(s, 0), s))] if encoded else word
            for synonym in near[word]:
                code.setdefault(synonym, code[word])
        return cls(code)

    def __call__(self, text: str) -> str:
        """``text`` with each word of the table replaced by its representative (lowercase; the
        punctuation around a word is kept)."""
        from models.normalizer import map_words

        return map_words(text, lambda core, *_neighbours: self.code.get(core, core))

    def coverage(self, pairs: Iterable[tuple[str, str]]) -> float:
        """The share of (word, synonym) pairs that read the same after encoding."""
        pairs = list(pairs)
        same = sum(self.code.get(a, a) == self.code.get(b, b) for a, b in pairs)
        return same / len(pairs) if pairs else float("nan")

    # ----------------------------------------------------------------------------- persistence
    def to_bytes(self) -> bytes:
        return word_table.to_bytes(self.code)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "SynonymEncoding":
        return cls(word_table.from_bytes(blob, "synonym encoding table"))
