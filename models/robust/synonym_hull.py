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

Looked up by token, not by word: the first piece of a word the tokenizer splits ("wonderful" in
"wonderful ##ly") gets that piece's candidates read as a word ("fantastic ##ly"), which stand in
for the attack's whole-word swap ("fantastically"); a hull over one position cannot hold a swap
to another number of pieces. 10.8% of the positions with candidates on 2,000 critics' rows are
such pieces (counted ad hoc). Narrowing the candidates to whole words (none for a token a word
piece follows) was measured, seeds 0-2 of both datasets (results/ascc_whole_words.json, written
by benchmarks/personalization.py at the commit that tried it): the global model kept less under
`char` and `synonym` on both datasets and every seed (three-seed means 0.8 / 0.9 points less on
critics, 0.9 / 1.1 on tweets), for 2.0 and 0.7 points more comprehensiveness and the same clean
accuracy (within 0.3). The wider rule is kept, for robustness, the purpose of ASCC.
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

    def of(self, token_id: int) -> tuple[int, ...]:
        """The single-token ids the synonym attack can turn ``token_id``'s word into (at most
        ``max_candidates``, in WordNet's order, the token itself left out)."""
        if token_id not in self._known:
            self._learn([token_id])
        return self._known[token_id]

    def _learn(self, token_ids) -> None:
        for token_id, word in zip(token_ids, self.tokenizer.tokens(token_ids)):
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
        has fewer than K (K: the most any token of the batch has, at least 1)."""
        flat = ids.reshape(-1).tolist()
        self._learn([i for i in dict.fromkeys(flat) if i not in self._known])
        width = max(1, max(len(self._known[i]) for i in flat))
        table = np.full((len(flat), width), NONE, dtype=np.int64)
        for row, token_id in enumerate(flat):
            found = self._known[token_id]
            table[row, : len(found)] = found
        return torch.from_numpy(table).reshape(*ids.shape, width)
