"""Offline adversarial attacks, composed the way TextAttack composes them:

    attack = goal (flip the true label) + transformation (what a word may become)
             + constraints (which words and texts are allowed) + search (in what order to try)

``char`` and ``synonym`` follow TextAttack 0.3.11's recipes of the same papers
(``DeepWordBugGao2018``, ``PWWSRen2019``) with ``MaxWordsPerturbed(max_percent=budget)`` added:

- **Words** are TextAttack's (``words_from_text``): runs of letters, digits and ``_'-*@`` with those
  four symbols stripped from both ends; punctuation is not a word and a swap keeps the text around
  the word it replaces.
- **Budget**: at most ``ceil(budget x words)`` words differ from the original
  (``MaxWordsPerturbed``), each at most once (``RepeatModification``).
- **Stopwords**: NLTK's 179 English stopwords are never edited (``StopwordModification``;
  compared as written, as TextAttack does, so a capitalised "The" is not one).
- **Search** (``GreedyWordSwapWIR``): words are ranked once, then walked in order; at each word the
  candidate that lowers the true class's probability most is kept *only if it lowers it below the
  current text's*, and only a kept swap costs budget. The walk ends when the label flips.

Recipes:
- ``char``: DeepWordBug (Gao et al., 2018): words ranked by replacing each with ``[UNK]``; four
  character edits per word at random positions (neighbour swap, substitution, deletion,
  insertion, letters from ``string.ascii_letters``; words of one character are left alone).
- ``synonym``: PWWS (Ren et al., 2019): every single-word WordNet lemma of the word's synsets;
  words ranked by softmax([UNK] saliency) x the best swap's score.
- ``char-beam``: the same character edits and constraints searched by beam search (width 3) over
  every position, stopped by a query budget (FedREX's own recipe).
- ``synonym-sim``: the synonym swaps, ranked by [UNK], under a sentence-similarity constraint: the
  attacked sentence's MiniLM sentence embedding keeps cosine >= 0.85 with the original's
  (FedREX's own recipe, in the spirit of TextFooler's USE constraint).
- ``embedding``: TextFooler (Jin et al., 2020; TextAttack's ``TextFoolerJin2019``) with candidates
  from a source no WordNet-built defence saw: the 50 nearest whole words in MiniLM's own input
  (WordPiece) embedding space (``WordSwapEmbedding`` + ``WordEmbeddingDistance``), words ranked by
  deleting each (TextFooler's ranking), MiniLM sentence similarity as in ``synonym-sim`` for its
  Universal Sentence Encoder check. Three departures, each forced by what ships offline, stated so
  nobody reads this as TextFooler's numbers: cosine >= 0.35, not 0.5, because MiniLM's raw space
  is tighter than counter-fitted GloVe (a distinct SST-2 dev word has 1.7 neighbours at 0.5 and 7.3
  at 0.35, about as many as its WordNet synonyms: 6.9); counter-fitting pushed antonyms apart and
  MiniLM's raw vectors do not ("bad" is a neighbour of "good"), so WordNet's direct and indirect
  antonyms are refused; no part-of-speech tagger ships, so a swap must share a WordNet part of
  speech with the word, and function words are neither swapped nor swapped in. Also unlike
  TextFooler: the similarity is the whole sentence's against the original (as ``synonym-sim``),
  not a 15-word window against the current text, and NLTK's stopwords with the 20% word budget,
  as every recipe here.
- ``hotflip``: white-box token flips (Ebrahimi et al., 2018): the first-order change of the loss for
  swapping token i to v is (e_v - e_i) . dL/de_i; the best swap is applied, repeatedly, up to
  ``ceil(budget x WordPiece tokens)`` flips.

Only examples the model gets right are attacked; the others count as failures of the model under
attack, as in TextAttack's accounting. Every black-box attack counts its queries to the model.
"""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from models.errors import FedrexError
from models.protocol import ATTACKS, check_attacks
from models.tokenizer import WordPieceTokenizer

# NLTK's English stopword list (nltk.corpus.stopwords.words("english"), the 179 words TextAttack's
# StopwordModification uses); kept here because NLTK's stopwords corpus is not shipped offline.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom
this that that'll these those am is are was were be been being have has had having do does did doing a an the
and but if or because as until while of at by for with about against between into through during before after
above below to from up down in out on off over under again further then once here there when where why how all
any both each few more most other some such no nor not only own same so than too very s t can will just don
don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn
hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())
if len(STOPWORDS) != 179:
    raise RuntimeError("the NLTK stopword list lost or gained a word")

WORD = re.compile(r"[\w'\-*@]+")  # TextAttack's word characters (its look-alike letters aside)
WORD_EDGES = "'-_*@"  # stripped from both ends of a word


@dataclass(frozen=True)
class Words:
    """A text as TextAttack's ``AttackedText`` sees it: its words, and the text around them
    (``gaps[k]`` precedes ``words[k]``; the last gap ends the text), so that a swapped word
    keeps its punctuation and the untouched text comes back byte for byte."""

    words: tuple[str, ...]
    gaps: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> "Words":
        words, gaps, last = [], [], 0
        for match in WORD.finditer(text):
            core = match.group().strip(WORD_EDGES)
            if not core:
                continue
            start = match.start() + match.group().index(core)
            gaps.append(text[last:start])
            words.append(core)
            last = start + len(core)
        gaps.append(text[last:])
        return cls(tuple(words), tuple(gaps))

    def text(self, words: list[str] | tuple[str, ...] | None = None) -> str:
        words = self.words if words is None else words
        return "".join(g + w for g, w in zip(self.gaps, words)) + self.gaps[-1]


def word_budget(n_words: int, budget: float) -> int:
    """How many words an attack may change: TextAttack's ``MaxWordsPerturbed(max_percent=budget)``,
    ``ceil(n_words x budget)`` computed as it computes it (in floating point)."""
    return math.ceil(n_words * budget)


@dataclass
class AttackResult:
    original: str
    perturbed: str
    label: int
    clean_pred: int
    adv_pred: int
    words_changed: int
    n_words: int
    queries: int

    @property
    def attacked(self) -> bool:
        return self.clean_pred == self.label

    @property
    def success(self) -> bool:
        return self.attacked and self.adv_pred != self.label


class QueryBudgetExhausted(Exception):
    pass


class Victim:
    """Black-box access to a model through text: probabilities, with a query counter and an
    optional per-example query budget."""

    def __init__(self, model, tokenizer: WordPieceTokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.queries = 0
        self.limit: int | None = None  # absolute query count at which the current example stops

    def proba(self, texts: list[str]) -> np.ndarray:
        """One query per text, counted against the budget; the answer is ``answer``'s."""
        if self.limit is not None and self.queries + len(texts) > self.limit:
            raise QueryBudgetExhausted
        self.queries += len(texts)
        return self.answer(texts)

    @torch.no_grad()
    def answer(self, texts: list[str]) -> np.ndarray:
        """The model's class probabilities for ``texts`` (a defence in front of the model, such as
        ``models.robust.smoothing``, answers here instead)."""
        self.model.eval()
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = torch.from_numpy(self.tokenizer.encode(texts[start:start + self.batch_size]))
            out.append(torch.softmax(self.model(ids), -1).numpy())
        return np.concatenate(out)


# ------------------------------------------------------------------------------ transformations
class CharEdits:
    """DeepWordBug's four edits of one word (TextAttack's ``WordSwapNeighboringCharacterSwap``,
    ``...RandomCharacterSubstitution``, ``...Deletion``, ``...Insertion`` with ``random_one``):
    each at one random position; a word of one character gets none."""

    letters = string.ascii_letters

    def __call__(self, word: str, rng: np.random.Generator) -> list[str]:
        n = len(word)
        if n <= 1:
            return []
        i = int(rng.integers(0, n - 1))
        swap = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        i = int(rng.integers(0, n))
        substitute = word[:i] + self.letters[int(rng.integers(0, len(self.letters)))] + word[i + 1:]
        i = int(rng.integers(0, n))
        delete = word[:i] + word[i + 1:]
        i = int(rng.integers(0, n))  # before the last character at the latest, as TextAttack inserts
        insert = word[:i] + self.letters[int(rng.integers(0, len(self.letters)))] + word[i:]
        return [e for e in dict.fromkeys((swap, substitute, delete, insert)) if e != word]


class WordNetSynonyms:
    def __call__(self, word: str, rng: np.random.Generator) -> list[str]:
        return list(synonyms(word))


class EmbeddingNeighbours:
    """TextAttack's ``WordSwapEmbedding`` with its ``WordEmbeddingDistance`` constraint, over
    MiniLM's input embeddings: the ``max_candidates`` nearest whole-word WordPiece tokens (by
    cosine) with cosine >= ``min_cosine``, in the word's case (``recover_word_case``). A word
    MiniLM splits into pieces is the mean of its pieces' vectors."""

    def __init__(self, max_candidates: int = 50, min_cosine: float = 0.35):
        self.max_candidates, self.min_cosine = max_candidates, min_cosine

    def __call__(self, word: str, rng: np.random.Generator) -> list[str]:
        found = embedding_neighbours(word.lower(), self.max_candidates, self.min_cosine)
        return [_in_case_of(word, n) for n in found]


def _in_case_of(original: str, word: str) -> str:
    if original.isupper() and len(original) > 1:
        return word.upper()
    return word.capitalize() if original[:1].isupper() else word


@lru_cache(maxsize=1)
def _token_space():
    """(MiniLM's unit-norm input embeddings [V, D], those of the whole-word tokens [W, D], their
    words, the tokenizer)."""
    encoder, tokenizer = _sentence_encoder()
    table = F.normalize(encoder.embeddings.word_embeddings.weight.detach(), dim=-1)
    vocab = tokenizer._tok.get_vocab()
    # whole lowercase words of two letters or more, past BERT's reserved ids ("american" must not
    # become "u"); accents folded as MiniLM reads them, so "cafe" is not a neighbour of "café"
    whole = sorted((i, t) for t, i in vocab.items() if t.isalpha() and t.islower() and len(t) > 1 and i > 1000)
    ids = torch.tensor([i for i, _ in whole], dtype=torch.long)
    return table, table[ids], [t for _, t in whole], tokenizer


@lru_cache(maxsize=50_000)
def embedding_neighbours(word: str, max_candidates: int, min_cosine: float) -> tuple[str, ...]:
    table, whole, words, tokenizer = _token_space()
    pieces = [i for i in tokenizer.encode([word])[0].tolist() if i not in tokenizer.special_ids]
    if not pieces or tokenizer.unk_id in pieces:  # a word MiniLM cannot spell has no place in its space
        return ()
    vector = F.normalize(table[pieces].mean(0), dim=-1)
    cosine = whole @ vector
    top = torch.topk(cosine, min(max_candidates + 1, len(words)))
    spelled = tokenizer.decode(torch.tensor(pieces)).replace(" ", "")  # the word as MiniLM reads it
    return tuple(words[int(k)] for c, k in zip(top.values, top.indices)
                 if float(c) >= min_cosine and words[int(k)] not in (word, spelled))[:max_candidates]


@lru_cache(maxsize=1)
def _wordnet():
    if "NLTK_DATA" not in os.environ and os.environ.get("FEDREX_DATA_DIR"):
        os.environ["NLTK_DATA"] = os.path.join(os.environ["FEDREX_DATA_DIR"], "nltk_data")
    try:
        import nltk
        from nltk.corpus import wordnet

        if os.environ.get("NLTK_DATA") and os.environ["NLTK_DATA"] not in nltk.data.path:
            nltk.data.path.insert(0, os.environ["NLTK_DATA"])
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        raise FedrexError("WordNet not found: set NLTK_DATA to a folder holding corpora/wordnet.zip") from None


@lru_cache(maxsize=50_000)
def synonyms(word: str) -> tuple[str, ...]:
    """TextAttack's ``WordSwapWordNet``: every lemma of every WordNet synset of ``word`` that is not
    the word itself, not a phrase ("_") and one word by ``Words`` (apostrophes and hyphens kept)."""
    found: dict[str, None] = {}
    for synset in _wordnet().synsets(word):
        for lemma in synset.lemma_names():
            if lemma != word and "_" not in lemma and len(Words.of(lemma).words) == 1:
                found[lemma] = None
    return tuple(found)


# ---------------------------------------------------------------------------------- constraints
# Word constraints: callables (the word, [candidate words]) -> keep mask (the word itself, as the
# search never changes a word twice). Text constraints: (original text, [candidate texts]) -> mask.
@lru_cache(maxsize=50_000)
def _base_forms(word: str) -> frozenset:
    """The word and every WordNet base form of it in every part of speech ("faster" -> "fast",
    "better" -> "good", "well", "men" -> "man"; ``morphy`` alone keeps only the first analysis,
    and a word that is an entry itself, as "better" is, only itself)."""
    wordnet = _wordnet()
    word = word.lower()
    return frozenset({word} | {base for pos in "nvar" for base in wordnet._morphy(word, pos)})


@lru_cache(maxsize=50_000)
def parts_of_speech(word: str) -> frozenset:
    """WordNet's parts of speech of the word's base forms (adjective satellites are adjectives)."""
    return frozenset("a" if s.pos() == "s" else s.pos() for base in _base_forms(word)
                     for s in _wordnet().synsets(base))


@lru_cache(maxsize=50_000)
def antonyms(word: str) -> frozenset:
    """WordNet's direct and indirect antonyms of every sense of the word's base forms: the
    antonyms of its senses' lemmas and, for adjectives, of the head each satellite sense is
    similar to, with every lemma of the opposite sense and of the satellites similar to it ("good"
    -> "bad", "atrocious"; "fascinating" -> "boring")."""
    found = set()
    for base in _base_forms(word):
        for sense in _wordnet().synsets(base):
            for head in [sense, *sense.similar_tos()] if sense.pos() in "as" else [sense]:
                for lemma in head.lemmas():
                    for opposite in lemma.antonyms():
                        for group in [opposite.synset(), *opposite.synset().similar_tos()]:
                            found.update(name.lower() for name in group.lemma_names())
    return frozenset(found)


class SamePartOfSpeech:
    """A swap keeps a WordNet part of speech of the word (a word unknown to WordNet may only
    become another unknown word), and a function word (a stopword in any case: "The" opens
    sentences) is neither swapped nor swapped in: TextFooler's ``PartOfSpeech`` without a tagger,
    which would not let "The" become "Of" either."""

    def __call__(self, word: str, candidates: list[str]) -> np.ndarray:
        if word.lower() in STOPWORDS:
            return np.zeros(len(candidates), dtype=bool)
        tags = parts_of_speech(word.lower())
        return np.array([c.lower() not in STOPWORDS and (bool(tags & parts_of_speech(c.lower())) if tags
                                                         else not parts_of_speech(c.lower()))
                         for c in candidates], dtype=bool)


class NotAntonym:
    """Refuses a WordNet antonym of the word (compared by base forms, so "slow" cannot become
    "faster"): what counter-fitting did for TextFooler's embedding."""

    def __call__(self, word: str, candidates: list[str]) -> np.ndarray:
        refused = antonyms(word.lower())
        return np.array([not (_base_forms(c) & refused) for c in candidates], dtype=bool)


class SentenceSimilarity:
    """Keeps a candidate only if its sentence embedding (mean-pooled all-MiniLM-L6-v2, the
    teacher's pre-trained encoder) has cosine >= ``min_cosine`` with the original sentence's."""

    def __init__(self, min_cosine: float = 0.85):
        self.min_cosine = min_cosine

    def __call__(self, original: str, candidates: list[str]) -> np.ndarray:
        if not candidates:
            return np.zeros(0, dtype=bool)
        emb = sentence_embeddings([original, *candidates])
        return emb[1:] @ emb[0] >= self.min_cosine


@lru_cache(maxsize=1)
def _sentence_encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from models.tokenizer import minilm_dir

    return AutoModel.from_pretrained(str(minilm_dir())).eval(), WordPieceTokenizer(128)


@torch.no_grad()
def sentence_embeddings(texts: list[str]) -> np.ndarray:
    """Unit-norm mean-pooled MiniLM sentence embeddings (the sentence-transformers recipe)."""
    encoder, tokenizer = _sentence_encoder()
    ids = torch.from_numpy(tokenizer.encode(texts))
    mask = (ids != 0).unsqueeze(-1).float()
    hidden = encoder(input_ids=ids, attention_mask=mask.squeeze(-1).long()).last_hidden_state
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1).numpy()


# ------------------------------------------------------------------------------------ searches
def _replace(words: list[str], i: int, new: str) -> list[str]:
    return words[:i] + [new] + words[i + 1:]


@dataclass
class Example:
    """One attack in progress: the original words, the label, the victim and the word budget."""

    victim: Victim
    original: Words
    label: int
    p_clean: float
    budget: int
    rng: np.random.Generator

    def proba(self, candidates: list[list[str]]) -> np.ndarray:
        """The victim's class probabilities for the texts these word lists make (one row each)."""
        return self.victim.proba([self.original.text(w) for w in candidates])


@dataclass
class GreedyWordImportance:
    """TextAttack's ``GreedyWordSwapWIR``. Rank the modifiable words once by ``ranking``:
    "unk" (the true-class score with the word replaced by [UNK]), "weighted-saliency" (PWWS:
    softmax of those scores x the best swap's score at that word) or "delete" (the word dropped:
    TextFooler's, the ``embedding`` recipe's). Then walk the ranking: at each word keep the candidate
    that lowers the true-class probability most, if it lowers it below the current text's (a swap
    that does not is not kept and costs no budget), until the label flips or the budget is spent.
    Scores are TextAttack's ``1 - p(true label)``."""

    ranking: str = "unk"

    def rank(self, attack: "Attack", ex: Example, indices: list[int]) -> list[int]:
        words = list(ex.original.words)
        filler = "" if self.ranking == "delete" else "[UNK]"
        scores = 1 - ex.proba([_replace(words, i, filler) for i in indices])[:, ex.label]
        if self.ranking == "weighted-saliency":
            best_swap = np.zeros(len(indices))
            for k, i in enumerate(indices):
                candidates = attack.candidates(ex, words, i)
                if candidates:
                    best_swap[k] = 1 - ex.proba([_replace(words, i, c) for c in candidates])[:, ex.label].min()
            weights = np.exp(scores - scores.max())
            scores = weights / weights.sum() * best_swap
        return [indices[k] for k in np.argsort(-scores, kind="stable")]

    def __call__(self, attack: "Attack", ex: Example) -> tuple[list[str], int, int]:
        current, changed, p_current = list(ex.original.words), 0, ex.p_clean
        indices = attack.modifiable(ex.original)
        for i in self.rank(attack, ex, indices) if indices and ex.budget else []:
            if changed >= ex.budget:  # MaxWordsPerturbed refuses every further candidate
                break
            candidates = attack.candidates(ex, current, i)
            if not candidates:
                continue
            probs = ex.proba([_replace(current, i, c) for c in candidates])
            best = int(probs[:, ex.label].argmin())
            if probs[best, ex.label] >= p_current:
                continue
            current[i], changed, p_current = candidates[best], changed + 1, float(probs[best, ex.label])
            if int(probs[best].argmax()) != ex.label:
                return current, changed, int(probs[best].argmax())
        return current, changed, ex.label


@dataclass
class BeamSearch:
    """Beam search over (position, candidate) swaps: each step expands every beam at every
    modifiable position it has not changed yet and keeps the ``width`` texts with the lowest
    true-class probability; the word budget bounds its depth, the victim's query budget ends it."""

    width: int = 3

    def __call__(self, attack: "Attack", ex: Example) -> tuple[list[str], int, int]:
        modifiable = attack.modifiable(ex.original)
        beams: list[tuple[list[str], frozenset]] = [(list(ex.original.words), frozenset())]
        best_words, best_changed = list(ex.original.words), 0
        try:
            for _ in range(ex.budget):
                expansions = [(_replace(w, i, c), changed | {i}) for w, changed in beams for i in modifiable
                              if i not in changed for c in attack.candidates(ex, w, i)]
                if not expansions:
                    break
                probs = ex.proba([w for w, _ in expansions])
                order = np.argsort(probs[:, ex.label], kind="stable")
                top = int(order[0])
                best_words, best_changed = expansions[top][0], len(expansions[top][1])
                if int(probs[top].argmax()) != ex.label:
                    return best_words, best_changed, int(probs[top].argmax())
                beams = [expansions[int(k)] for k in order[: self.width]]
        except QueryBudgetExhausted:
            pass
        return best_words, best_changed, ex.label


# ------------------------------------------------------------------------------------- attacks
@dataclass
class Attack:
    """A black-box attack: a transformation proposing new words, constraints on which words may
    change (``stopwords``), on what a word may become (``word_constraints``) and on the texts they
    make (``text_constraints``), a search ordering them, and an optional per-example query budget."""

    transformation: object
    search: object
    stopwords: frozenset = STOPWORDS
    word_constraints: list = field(default_factory=list)  # callables (word, [candidate words]) -> keep mask
    text_constraints: list = field(default_factory=list)  # callables (original, [candidate texts]) -> keep mask
    query_budget: int | None = None

    def modifiable(self, words: Words) -> list[int]:
        return [i for i, w in enumerate(words.words) if w not in self.stopwords]

    def candidates(self, ex: Example, words: list[str], i: int) -> list[str]:
        options = [o for o in self.transformation(words[i], ex.rng) if o != words[i]]
        for constraint in self.word_constraints:  # cheap ones first: they thin what the text checks see
            if not options:
                break
            options = [o for o, k in zip(options, constraint(words[i], options)) if k]
        for constraint in self.text_constraints:
            if not options:
                break
            keep = constraint(ex.original.text(), [ex.original.text(_replace(words, i, o)) for o in options])
            options = [o for o, k in zip(options, keep) if k]
        return options

    def run(self, victim: Victim, text: str, label: int, budget: float, seed: int = 0) -> AttackResult:
        start = victim.queries
        words = Words.of(text)
        probs = victim.proba([text])[0]
        clean_pred = int(probs.argmax())
        result = AttackResult(text, text, label, clean_pred, clean_pred, 0, len(words.words), 0)
        if clean_pred == label and words.words:
            ex = Example(victim, words, label, float(probs[label]), word_budget(len(words.words), budget),
                         np.random.default_rng(seed))
            victim.limit = None if self.query_budget is None else start + self.query_budget
            try:
                current, changed, result.adv_pred = self.search(self, ex)
                result.perturbed, result.words_changed = words.text(current), changed
            except QueryBudgetExhausted:  # the search ran out before its first full step
                pass
            finally:
                victim.limit = None
        result.queries = victim.queries - start
        return result


class HotFlip:
    """White-box: gradient-guided token flips inside the model's id space (no text round trip)."""

    def __init__(self, candidates: torch.Tensor):
        self.candidate_ids = candidates

    def run(self, model, tokenizer: WordPieceTokenizer, text: str, label: int, budget: float) -> AttackResult:
        model.eval()
        ids = torch.from_numpy(tokenizer.encode([text]))
        positions = [i for i, t in enumerate(ids[0].tolist()) if t not in tokenizer.special_ids]
        n_tokens, queries = len(positions), 1
        with torch.no_grad():
            clean_pred = int(model(ids).argmax(-1))
        result = AttackResult(text, text, label, clean_pred, clean_pred, 0, n_tokens, 0)
        if clean_pred != label or not positions:
            result.queries = queries
            return result
        candidates = self.candidate_ids
        with torch.no_grad():
            cand_emb = model.candidate_embeddings(candidates)  # [V, D]
        flipped: set[int] = set()
        target = torch.tensor([label])
        for _ in range(word_budget(n_tokens, budget)):
            emb = model.embed(ids).detach().requires_grad_(True)
            loss = F.cross_entropy(model.classify(emb, ids != 0), target)
            (grad,) = torch.autograd.grad(loss, emb)
            queries += 1
            open_positions = [p for p in positions if p not in flipped]
            if not open_positions:
                break
            g = grad[0, open_positions]  # [P, D]
            gain = g @ cand_emb.T - (g * emb[0, open_positions].detach()).sum(-1, keepdim=True)  # [P, V]
            same = candidates.unsqueeze(0) == ids[0, open_positions].unsqueeze(1)
            gain = gain.masked_fill(same, -float("inf"))
            flat = int(gain.argmax())
            pos, cand = open_positions[flat // gain.shape[1]], int(candidates[flat % gain.shape[1]])
            ids = ids.clone()
            ids[0, pos] = cand
            flipped.add(pos)
            with torch.no_grad():
                pred = int(model(ids).argmax(-1))
            queries += 1
            if pred != label:
                result.adv_pred = pred
                break
        result.perturbed = tokenizer.decode(ids[0])
        result.words_changed, result.queries = len(flipped), queries
        return result


def whole_word_candidates(tokenizer: WordPieceTokenizer, token_ids: np.ndarray | None = None,
                          limit: int = 8000) -> torch.Tensor:
    """HotFlip's candidate set: whole-word alphabetic WordPiece ids, restricted to ``token_ids``
    (e.g. the training data's most frequent tokens) when given. Benchmarks pass the same set for
    every model so that no model is attacked with a smaller or larger dictionary than another."""
    vocab = tokenizer._tok.get_vocab()
    words = {i for t, i in vocab.items() if t.isalpha() and t.islower() and i > 1000}
    ids = [int(i) for i in token_ids if int(i) in words] if token_ids is not None else sorted(words)
    return torch.tensor(ids[:limit], dtype=torch.long)


def model_candidates(model, tokenizer: WordPieceTokenizer) -> torch.Tensor:
    """Without a shared set: the whole words a pruned-vocabulary model can tell apart."""
    ids = whole_word_candidates(tokenizer)
    table = getattr(getattr(model, "vocab", None), "table", None)
    if table is not None and int(table.max()) < tokenizer.vocab_size - 1:  # pruned: drop [UNK]-mapped
        ids = ids[table[ids] > 1]
    return ids


# Bumped whenever a recipe's semantics change, so that stored measurements made with an older
# recipe are recognised as stale (benchmarks key their rows on it). 2: TextAttack's recipes (#20).
RECIPES_VERSION = 2
RECIPES = {
    "char": lambda: Attack(CharEdits(), GreedyWordImportance("unk")),
    "synonym": lambda: Attack(WordNetSynonyms(), GreedyWordImportance("weighted-saliency")),
    "char-beam": lambda: Attack(CharEdits(), BeamSearch(width=3), query_budget=1000),
    "synonym-sim": lambda: Attack(WordNetSynonyms(), GreedyWordImportance("unk"),
                                  text_constraints=[SentenceSimilarity(0.85)]),
    "embedding": lambda: Attack(EmbeddingNeighbours(50, 0.35), GreedyWordImportance("delete"),
                                word_constraints=[SamePartOfSpeech(), NotAntonym()],
                                text_constraints=[SentenceSimilarity(0.85)]),
}
if ATTACKS != (*RECIPES, "hotflip"):  # models/protocol.py names them for devices without torch
    raise RuntimeError("models.protocol.ATTACKS and models.attacks.RECIPES disagree")


def attack_dataset(name: str, model, tokenizer: WordPieceTokenizer, texts: list[str], labels,
                   budget: float = 0.2, seed: int = 0, candidates: torch.Tensor | None = None,
                   victim: Victim | None = None) -> tuple[dict, list[AttackResult]]:
    """Attack every example; return the summary metrics and the per-example results.
    ``candidates``: HotFlip's token set (default: the words the model can tell apart). ``victim``:
    what the black-box recipes query instead of ``model`` behind ``tokenizer`` (a defence that
    answers for the model, e.g. ``models.robust.smoothing.SmoothedVictim``)."""
    check_attacks([name])
    if not 0 < budget <= 1:
        raise FedrexError(f"attack budget must be in (0, 1], got {budget}")
    if name == "hotflip" and victim is not None:
        raise FedrexError("hotflip edits token ids through the model's gradient: it cannot attack a text-level victim")
    if name == "hotflip":
        hotflip = HotFlip(candidates if candidates is not None else model_candidates(model, tokenizer))
        results = [hotflip.run(model, tokenizer, t, int(y), budget) for t, y in zip(texts, labels)]
    else:
        attack, victim = RECIPES[name](), victim or Victim(model, tokenizer)
        results = [attack.run(victim, t, int(y), budget, seed=seed + k) for k, (t, y) in enumerate(zip(texts, labels))]
    return summarize_attack(results), results


def summarize_attack(results: list[AttackResult]) -> dict:
    n = len(results)
    attacked = [r for r in results if r.attacked]
    succeeded = [r for r in attacked if r.success]
    return {
        "n": n,
        "clean_acc": len(attacked) / n if n else float("nan"),
        "adv_acc": (len(attacked) - len(succeeded)) / n if n else float("nan"),
        "success_rate": len(succeeded) / len(attacked) if attacked else float("nan"),
        # undefined (NaN), not 0, when nothing succeeded: a 0 would drag every mean toward "no change"
        "words_changed_pct": float(np.mean([100 * r.words_changed / max(r.n_words, 1) for r in succeeded]))
        if succeeded else float("nan"),
        "queries": float(np.mean([r.queries for r in attacked])) if attacked else float("nan"),
        "queries_per_success": float(np.mean([r.queries for r in succeeded])) if succeeded else float("nan"),
    }
