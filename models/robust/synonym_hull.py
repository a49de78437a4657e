"""The substitutions a word-swap attack may make, as token ids: the search space of hardening in
the convex hull of each word's synonyms (ASCC: Dong et al., ICLR 2021, "Towards Robustness against
Natural Language Word Substitutions"; ``models.objectives.hull_embedding``).

The candidates of a token are the WordNet lemmas the `synonym` attack draws from
(``models.attacks.synonyms``), each passed through the client's own tokenizer (its word
normaliser included), kept where it becomes a single token: the token the model reads after the
attack swaps that word. A lemma the tokenizer splits into pieces has no single vector to mix and
is left out; one outside the vocabulary is [UNK], as the model reads it. Word pieces ("##ing"),
special tokens, stopwords and non-alphabetic tokens have none. At most 8 per token (WordNet's
first), which bounds the search's cost; the attack may try more. Looked up lazily, for the tokens
a batch holds, and remembered: a client's rows hold a few hundred distinct words.

Candidates belong to whole words: a token followed by a word piece (the first piece of a word
the tokenizer splits, "wonderful" in "wonderful ##ly") gets none in a batch, as the attack swaps
"wonderfully" whole and never writes "fantastic ##ly". A split word's own synonyms are not
searched either: they would replace several positions with one (or another number), which a hull
over one position cannot hold. The hull is then a little narrower than the attack's reach, never
wider. Measured with this rule: results/ascc_whole_words.json.
"""

from __future__ import annotations

import numpy as np
import torch

from models.attacks import STOPWORDS, synonyms
from models.tokenizer import WordPieceTokenizer

NONE = -1  # padding of the candidate table: no candidate in this slot


class SynonymCandidates:
    def __init__(self, tokenizer: WordPieceTokenizer, max_candidates: int = 8):
        self.tokenizer, self.max_candidates = tokenizer, max_candidates
        self._known: dict[int, tuple[int, ...]] = {}
        self._pieces: set[int] = set()  # ids of word pieces ("##ly"): what continues a word

    def of(self, token_id: int) -> tuple[int, ...]:
        """The single-token ids the synonym attack can turn ``token_id``'s word into (at most
        ``max_candidates``, in WordNet's order, the token itself left out)."""
        if token_id not in self._known:
            self._learn([token_id])
        return self._known[token_id]

    def _learn(self, token_ids) -> None:
        for token_id, word in zip(token_ids, self.tokenizer.tokens(token_ids)):
            if word.startswith("##"):
                self._pieces.add(token_id)
            swappable = token_id not in self.tokenizer.special_ids and word.isalpha() and len(word) > 1 \
                and word not in STOPWORDS  # as the attack: it never swaps a stopword
            lemmas = list(dict.fromkeys(lemma.lower() for lemma in synonyms(word))) if swappable else []
            found: list[int] = []
            for ids in self.tokenizer.encode_ids(lemmas) if lemmas else []:
                content = ids[1:-1]  # without [CLS] and [SEP]
                if len(content) == 1 and content[0] != token_id and content[0] not in found:
                    found.append(content[0])
            self._known[token_id] = tuple(found[: self.max_candidates])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, length] token ids -> [batch, length, K] candidate ids, ``NONE`` where a token
        has fewer than K (K: the most any token of the batch has, at least 1). A token a word piece
        follows in its row is part of a split word and gets none."""
        rows = ids.reshape(-1, ids.shape[-1]).tolist()
        self._learn([i for i in dict.fromkeys(i for row in rows for i in row) if i not in self._known])
        found_at = [[() if nxt in self._pieces else self._known[i] for i, nxt in zip(row, [*row[1:], None])]
                    for row in rows]
        width = max(1, max(len(found) for row in found_at for found in row))
        table = np.full((len(rows), len(rows[0]), width), NONE, dtype=np.int64)
        for r, row in enumerate(found_at):
            for position, found in enumerate(row):
                table[r, position, : len(found)] = found
        return torch.from_numpy(table).reshape(*ids.shape, width)
