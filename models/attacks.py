"""Offline adversarial attacks, composed the way TextAttack composes them:

    attack = goal (flip the true label) + transformation (what a word may become)
             + constraints (which words and texts are allowed) + search (in what order to try)

A recipe is a few lines in ``RECIPES``; every recipe keeps a per-example word budget of at most
``max(1, floor(budget * n_words))`` changed words (HotFlip: WordPiece tokens) and counts its
queries to the model. Only examples the model gets right are attacked; the others count as
failures of the model under attack, as in TextAttack's accounting.

Recipes:
- ``char``: DeepWordBug (Gao et al., 2018): words ranked by how much deleting them lowers the
  true-class probability; character edits (swap, substitute, delete, insert) applied greedily.
- ``synonym``: PWWS (Ren et al., 2019): WordNet synonyms, words ranked by softmax(saliency) x the
  best swap's probability drop, applied greedily.
- ``char-beam``: the same character edits searched by beam search (width 3) over every position,
  stopped by a query budget.
- ``synonym-sim``: WordNet synonyms, greedy, under a sentence-similarity constraint: the attacked
  sentence's MiniLM sentence embedding keeps cosine >= 0.85 with the original's.
- ``hotflip``: white-box token flips (Ebrahimi et al., 2018): the first-order change of the loss for
  swapping token i to v is (e_v - e_i) . dL/de_i; the best swap is applied, repeatedly.
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from models.errors import FedrexError
from models.protocol import ATTACKS, check_attacks
from models.tokenizer import WordPieceTokenizer

STOPWORDS = frozenset(
    "a an the and or but if of at by for with about against between into through during before after above "
    "below to from up down in out on off over under again further then once here there when where why how "
    "all any both each few more most other some such no nor not only own same so than too very s t can will "
    "just don should now i me my we our you your he him his she her it its they them their what which who "
    "whom this that these those am is are was were be been being have has had do does did 's".split()
)


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


def word_budget(n_words: int, budget: float) -> int:
    return max(1, math.floor(budget * n_words))


class QueryBudgetExhausted(Exception):
    pass


class Victim:
    """Black-box access to a model through text: probabilities, with a query counter and an
    optional per-example query budget."""

    def __init__(self, model, tokenizer: WordPieceTokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.queries = 0
        self.limit: int | None = None  # absolute query count at which the current example stops

    @torch.no_grad()
    def proba(self, texts: list[str]) -> np.ndarray:
        if self.limit is not None and self.queries + len(texts) > self.limit:
            raise QueryBudgetExhausted
        self.model.eval()
        self.queries += len(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = torch.from_numpy(self.tokenizer.encode(texts[start:start + self.batch_size]))
            out.append(torch.softmax(self.model(ids), -1).numpy())
        return np.concatenate(out)


# ------------------------------------------------------------------------------ transformations
class CharEdits:
    """DeepWordBug's four edits of one word, each at a random position."""

    def __call__(self, word: str, rng: np.random.Generator) -> list[str]:
        letters = string.ascii_lowercase
        edits = []
        if len(word) >= 2:
            i = int(rng.integers(0, len(word) - 1))
            edits.append(word[:i] + word[i + 1] + word[i] + word[i + 2:])  # swap neighbours
            edits.append(word[:i] + word[i + 1:])  # delete
        i = int(rng.integers(0, len(word)))
        edits.append(word[:i] + letters[int(rng.integers(0, 26))] + word[i + 1:])  # substitute
        edits.append(word[:i] + letters[int(rng.integers(0, 26))] + word[i:])  # insert
        return [e for e in dict.fromkeys(edits) if e and e != word]


class WordNetSynonyms:
    def __call__(self, word: str, rng: np.random.Generator) -> list[str]:
        return list(synonyms(word))


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
def synonyms(word: str, limit: int = 20) -> tuple[str, ...]:
    """Single-word WordNet synonyms of ``word`` (lowercase, alphabetic, not the word itself)."""
    lower = word.lower()
    if lower in STOPWORDS or not lower.isalpha():
        return ()
    found = []
    for synset in _wordnet().synsets(lower):
        for lemma in synset.lemma_names():
            candidate = lemma.lower()
            if candidate != lower and candidate.isalpha() and candidate not in found:
                found.append(candidate)
    return tuple(found[:limit])


# ---------------------------------------------------------------------------------- constraints
def has_letters_or_digits(word: str) -> bool:
    """Which words may be modified: punctuation-only tokens are left alone."""
    return any(c.isalnum() for c in word)


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
class GreedyWordImportance:
    """Rank words once ("delete": drop the word; "unk": replace it by [UNK]; "weighted-saliency":
    PWWS's softmax(unk saliency) x the best swap's drop), then walk the ranking and apply the
    candidate that lowers the true-class probability most, until the label flips or the budget
    is spent."""

    ranking: str = "delete"

    def __call__(self, attack: "Attack", victim: Victim, words: list[str], label: int, p_clean: float,
                 rng: np.random.Generator, budget: int, text: str) -> tuple[list[str], int, int]:
        modifiable = [i for i, w in enumerate(words) if has_letters_or_digits(w)]
        filler = None if self.ranking == "delete" else "[UNK]"
        variants = [" ".join(words[:i] + ([filler] if filler else []) + words[i + 1:]) for i in range(len(words))]
        scores = p_clean - victim.proba(variants)[:, label]
        if self.ranking == "weighted-saliency":
            best_drop = np.zeros(len(words))
            for i in modifiable:
                candidates = attack.candidates(words, i, rng, text)
                if candidates:
                    best_drop[i] = p_clean - victim.proba([" ".join(_replace(words, i, c)) for c in candidates])[:, label].min()
            weights = np.exp(scores - scores.max())
            scores = weights / weights.sum() * best_drop
        current, changed = list(words), 0
        for i in np.argsort(-scores, kind="stable"):
            if changed >= budget:
                break
            if i not in modifiable:
                continue
            candidates = attack.candidates(current, i, rng, text)
            if not candidates:
                continue
            probs = victim.proba([" ".join(_replace(current, i, c)) for c in candidates])
            best = int(probs[:, label].argmin())
            current[i], changed = candidates[best], changed + 1
            if int(probs[best].argmax()) != label:
                return current, changed, int(probs[best].argmax())
        return current, changed, label


@dataclass
class BeamSearch:
    """Beam search over (position, candidate) swaps: each step expands every beam at every
    position it has not changed yet and keeps the ``width`` texts with the lowest true-class
    probability; the victim's query budget ends it."""

    width: int = 3

    def __call__(self, attack: "Attack", victim: Victim, words: list[str], label: int, p_clean: float,
                 rng: np.random.Generator, budget: int, text: str) -> tuple[list[str], int, int]:
        modifiable = [i for i, w in enumerate(words) if has_letters_or_digits(w)]
        beams: list[tuple[list[str], frozenset]] = [(list(words), frozenset())]
        best_words, best_changed = list(words), 0
        try:
            for _ in range(budget):
                expansions = [(_replace(w, i, c), changed | {i}) for w, changed in beams for i in modifiable
                              if i not in changed for c in attack.candidates(w, i, rng, text)]
                if not expansions:
                    break
                probs = victim.proba([" ".join(w) for w, _ in expansions])
                order = np.argsort(probs[:, label], kind="stable")
                top = int(order[0])
                best_words, best_changed = expansions[top][0], len(expansions[top][1])
                if int(probs[top].argmax()) != label:
                    return best_words, best_changed, int(probs[top].argmax())
                beams = [expansions[int(k)] for k in order[: self.width]]
        except QueryBudgetExhausted:
            pass
        return best_words, best_changed, label


# ------------------------------------------------------------------------------------- attacks
@dataclass
class Attack:
    """A black-box attack: a transformation proposing new words, constraints filtering them (and
    the texts they make), a search ordering them, and an optional per-example query budget."""

    transformation: object
    search: object
    text_constraints: list = field(default_factory=list)  # callables (original, [candidate texts]) -> keep mask
    query_budget: int | None = None

    def candidates(self, words: list[str], i: int, rng: np.random.Generator, original: str) -> list[str]:
        options = self.transformation(words[i], rng)
        for constraint in self.text_constraints:
            if not options:
                break
            keep = constraint(original, [" ".join(_replace(words, i, o)) for o in options])
            options = [o for o, k in zip(options, keep) if k]
        return options

    def run(self, victim: Victim, text: str, label: int, budget: float, seed: int = 0) -> AttackResult:
        rng = np.random.default_rng(seed)
        start = victim.queries
        words = text.split()
        probs = victim.proba([text])[0]
        clean_pred = int(probs.argmax())
        result = AttackResult(text, text, label, clean_pred, clean_pred, 0, len(words), 0)
        if clean_pred == label and words:
            victim.limit = None if self.query_budget is None else start + self.query_budget
            try:
                current, changed, result.adv_pred = self.search(self, victim, words, label, float(probs[label]), rng,
                                                                word_budget(len(words), budget), text)
                result.perturbed, result.words_changed = " ".join(current), changed
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


RECIPES = {
    "char": lambda: Attack(CharEdits(), GreedyWordImportance("delete")),
    "synonym": lambda: Attack(WordNetSynonyms(), GreedyWordImportance("weighted-saliency")),
    "char-beam": lambda: Attack(CharEdits(), BeamSearch(width=3), query_budget=1000),
    "synonym-sim": lambda: Attack(WordNetSynonyms(), GreedyWordImportance("unk"), [SentenceSimilarity(0.85)]),
}
if ATTACKS != (*RECIPES, "hotflip"):  # models/protocol.py names them for devices without torch
    raise RuntimeError("models.protocol.ATTACKS and models.attacks.RECIPES disagree")


def attack_dataset(name: str, model, tokenizer: WordPieceTokenizer, texts: list[str], labels,
                   budget: float = 0.2, seed: int = 0, candidates: torch.Tensor | None = None
                   ) -> tuple[dict, list[AttackResult]]:
    """Attack every example; return the summary metrics and the per-example results.
    ``candidates``: HotFlip's token set (default: the words the model can tell apart)."""
    check_attacks([name])
    if not 0 < budget <= 1:
        raise FedrexError(f"attack budget must be in (0, 1], got {budget}")
    if name == "hotflip":
        hotflip = HotFlip(candidates if candidates is not None else model_candidates(model, tokenizer))
        results = [hotflip.run(model, tokenizer, t, int(y), budget) for t, y in zip(texts, labels)]
    else:
        attack, victim = RECIPES[name](), Victim(model, tokenizer)
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
