"""Offline adversarial attacks with a per-example word budget.

- ``char``: DeepWordBug-style black-box attack (Gao et al., 2018): rank words by how much deleting
  them lowers the true-class probability, then edit characters of the top words (swap, substitute,
  delete, insert), keeping the edit that hurts most, until the prediction flips.
- ``synonym``: PWWS-style black-box attack (Ren et al., 2019) with WordNet synonyms: words are
  ordered by softmax(saliency) x best probability drop of a synonym swap, swapped greedily.
- ``hotflip``: white-box token-flip attack (Ebrahimi et al., 2018): the first-order change of the
  loss for swapping token i to v is (e_v - e_i) . dL/de_i; the best swap is applied, repeatedly.

Budget: at most ``max(1, floor(budget * n_words))`` words (HotFlip: WordPiece tokens) change per
example. Only examples the model gets right are attacked; the others count as failures of the
model under attack, as in TextAttack's accounting.
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from models.errors import FedrexError
from models.tokenizer import WordPieceTokenizer

ATTACKS = ("char", "synonym", "hotflip")
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


class Victim:
    """Black-box access to a model through text: probabilities, with a query counter."""

    def __init__(self, model, tokenizer: WordPieceTokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.queries = 0

    @torch.no_grad()
    def proba(self, texts: list[str]) -> np.ndarray:
        self.model.eval()
        self.queries += len(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = torch.from_numpy(self.tokenizer.encode(texts[start:start + self.batch_size]))
            out.append(torch.softmax(self.model(ids), -1).numpy())
        return np.concatenate(out)


def _delete_scores(victim: Victim, words: list[str], label: int, p_clean: float, filler: str | None) -> np.ndarray:
    """p_y(x) - p_y(x with word i removed or replaced by ``filler``), for every word."""
    variants = [" ".join(words[:i] + ([filler] if filler else []) + words[i + 1:]) for i in range(len(words))]
    return p_clean - victim.proba(variants)[:, label]


def _char_edits(word: str, rng: np.random.Generator) -> list[str]:
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


def char_attack(victim: Victim, text: str, label: int, budget: float, seed: int = 0) -> AttackResult:
    rng = np.random.default_rng(seed)
    start = victim.queries
    words = text.split()
    probs = victim.proba([text])[0]
    clean_pred = int(probs.argmax())
    result = AttackResult(text, text, label, clean_pred, clean_pred, 0, len(words), 0)
    if clean_pred != label or not words:
        result.queries = victim.queries - start
        return result
    scores = _delete_scores(victim, words, label, float(probs[label]), None)
    current, changed = list(words), 0
    for i in np.argsort(-scores, kind="stable"):
        if changed >= word_budget(len(words), budget):
            break
        if not any(c.isalnum() for c in words[i]):
            continue
        edits = _char_edits(words[i], rng)
        candidates = [" ".join(current[:i] + [e] + current[i + 1:]) for e in edits]
        cand_probs = victim.proba(candidates)
        best = int(cand_probs[:, label].argmin())
        current[i] = edits[best]
        changed += 1
        if int(cand_probs[best].argmax()) != label:
            result.adv_pred = int(cand_probs[best].argmax())
            break
    result.perturbed, result.words_changed = " ".join(current), changed
    result.queries = victim.queries - start
    return result


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


def synonym_attack(victim: Victim, text: str, label: int, budget: float, seed: int = 0) -> AttackResult:
    start = victim.queries
    words = text.split()
    probs = victim.proba([text])[0]
    clean_pred = int(probs.argmax())
    result = AttackResult(text, text, label, clean_pred, clean_pred, 0, len(words), 0)
    if clean_pred != label or not words:
        result.queries = victim.queries - start
        return result
    p_clean = float(probs[label])
    saliency = _delete_scores(victim, words, label, p_clean, "[UNK]")
    best_swap, best_drop = {}, np.zeros(len(words))
    for i, word in enumerate(words):
        options = synonyms(word)
        if not options:
            continue
        cand = victim.proba([" ".join(words[:i] + [s] + words[i + 1:]) for s in options])[:, label]
        j = int(cand.argmin())
        best_swap[i], best_drop[i] = options[j], p_clean - cand[j]
    weights = np.exp(saliency - saliency.max())
    order = np.argsort(-(weights / weights.sum()) * best_drop, kind="stable")
    current, changed = list(words), 0
    for i in order:
        if changed >= word_budget(len(words), budget):
            break
        if i not in best_swap:
            continue
        current[i] = best_swap[i]
        changed += 1
        p = victim.proba([" ".join(current)])[0]
        if int(p.argmax()) != label:
            result.adv_pred = int(p.argmax())
            break
    result.perturbed, result.words_changed = " ".join(current), changed
    result.queries = victim.queries - start
    return result


def hotflip_candidates(model, tokenizer: WordPieceTokenizer, limit: int = 8000) -> torch.Tensor:
    """Whole-word alphabetic tokens the model can tell apart (for pruned vocabularies: kept ones)."""
    vocab = tokenizer._tok.get_vocab()
    ids = sorted(i for t, i in vocab.items() if t.isalpha() and t.islower() and i > 1000)
    ids_t = torch.tensor(ids, dtype=torch.long)
    table = getattr(getattr(model, "vocab", None), "table", None)
    if table is not None and int(table.max()) < tokenizer.vocab_size - 1:  # pruned: drop [UNK]-mapped
        ids_t = ids_t[table[ids_t] > 1]
    return ids_t[:limit]


def hotflip_attack(model, tokenizer: WordPieceTokenizer, text: str, label: int, budget: float,
                   candidates: torch.Tensor) -> AttackResult:
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


def attack_dataset(name: str, model, tokenizer: WordPieceTokenizer, texts: list[str], labels,
                   budget: float = 0.2, seed: int = 0) -> tuple[dict, list[AttackResult]]:
    """Attack every example; return the summary metrics and the per-example results."""
    if name not in ATTACKS:
        raise FedrexError(f"unknown attack {name!r}: use one of {', '.join(ATTACKS)}")
    if not 0 < budget <= 1:
        raise FedrexError(f"attack budget must be in (0, 1], got {budget}")
    victim = Victim(model, tokenizer)
    candidates = hotflip_candidates(model, tokenizer) if name == "hotflip" else None
    results = []
    for k, (text, label) in enumerate(zip(texts, labels)):
        label = int(label)
        if name == "char":
            results.append(char_attack(victim, text, label, budget, seed=seed + k))
        elif name == "synonym":
            results.append(synonym_attack(victim, text, label, budget, seed=seed + k))
        else:
            results.append(hotflip_attack(model, tokenizer, text, label, budget, candidates))
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
    }
