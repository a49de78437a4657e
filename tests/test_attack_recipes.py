"""The attack recipes' semantics, pinned against TextAttack 0.3.11's DeepWordBug and PWWS (issue #20):
the greedy search keeps a swap only if it lowers the true class's probability, and only a kept swap
costs budget; the budget is ceil(budget x words) with punctuation not a word; stopwords are never
edited; the candidate sets. A scripted victim makes every probability known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.attacks import (RECIPES, STOPWORDS, Attack, CharEdits, GreedyWordImportance, Victim, Words, synonyms,
                            word_budget)


class ScriptedVictim(Victim):
    """p(true label 0) = 0.6 minus the drop of every word present: label 1 once p < 0.5."""

    def __init__(self, drops: dict[str, float]):
        super().__init__(model=None, tokenizer=None)
        self.drops = drops
        self.seen: list[str] = []

    def proba(self, texts):
        self.queries += len(texts)
        self.seen += texts
        p = np.array([0.6 - sum(self.drops.get(w, 0.0) for w in Words.of(t).words) for t in texts])
        return np.stack([p, 1 - p], 1)


class Table:
    """A transformation with fixed candidates per word."""

    def __init__(self, options: dict[str, list[str]]):
        self.options = options

    def __call__(self, word, rng):
        return list(self.options.get(word, []))


def test_a_swap_that_does_not_lower_the_true_score_is_not_kept_and_costs_no_budget():
    # "beta" ranks first (with [UNK] in its place p falls from 0.9 to 0.6), but its only swap
    # raises p to 0.95: the recipe leaves it and spends its one word (5 words x 0.2) on "gamma".
    victim = ScriptedVictim({"beta": -0.3, "beta2": -0.35, "gamma2": 0.45})
    attack = Attack(Table({"beta": ["beta2"], "gamma": ["gamma2"]}), GreedyWordImportance("unk"), stopwords=frozenset())
    words = "alpha beta gamma delta epsilon".split()
    result = attack.run(victim, " ".join(words), 0, budget=0.2)
    assert victim.seen[1:6] == [" ".join("[UNK]" if j == i else w for j, w in enumerate(words))
                                for i in range(5)]  # after the clean query: every word ranked by [UNK]
    assert "alpha beta2 gamma delta epsilon" in victim.seen  # the useless swap was tried...
    assert result.success and result.words_changed == 1  # ...and cost nothing
    assert result.perturbed == "alpha beta gamma2 delta epsilon"


def test_the_walk_keeps_each_improving_swap_until_the_label_flips():
    victim = ScriptedVictim({f"w{i}x": 0.06 for i in range(10)})  # two swaps take p to 0.48
    attack = Attack(Table({f"w{i}": [f"w{i}x"] for i in range(10)}), GreedyWordImportance("unk"), stopwords=frozenset())
    result = attack.run(victim, " ".join(f"w{i}" for i in range(10)), 0, budget=0.2)
    assert result.success and result.words_changed == 2 and result.perturbed.count("x") == 2


def test_budget_is_ceil_of_the_share_of_words_and_punctuation_is_not_a_word():
    assert [word_budget(n, 0.2) for n in (1, 4, 5, 6, 10, 11)] == [1, 1, 1, 2, 2, 3]
    assert word_budget(0, 0.2) == 0
    assert word_budget(15, 0.2) == math.ceil(15 * 0.2)  # TextAttack's float arithmetic, kept as it is
    text = "a wonderful , moving -- and funny ... film !"
    assert Words.of(text).words == ("a", "wonderful", "moving", "and", "funny", "film")
    # 6 words -> 2 changes allowed, although three swaps would be needed to flip the label
    victim = ScriptedVictim({w + "x": 0.04 for w in ("wonderful", "moving", "funny", "film")})
    attack = Attack(Table({w: [w + "x"] for w in ("wonderful", "moving", "funny", "film")}),
                    GreedyWordImportance("unk"))
    result = attack.run(victim, text, 0, budget=0.2)
    assert not result.success and result.words_changed == 2 and result.n_words == 6
    assert result.perturbed.count("x") == 2
    assert result.perturbed.replace("x", "") == text  # punctuation and spacing kept byte for byte


def test_stopwords_are_never_edited_even_when_they_matter_most():
    assert len(STOPWORDS) == 179 and {"not", "the", "no", "nor", "don't", "isn't"} <= STOPWORDS
    victim = ScriptedVictim({"notx": 0.5, "dullx": 0.05})
    attack = RECIPES["char"]()
    attack.transformation = Table({"not": ["notx"], "dull": ["dullx"]})
    result = attack.run(victim, "not dull at all", 0, budget=0.5)
    assert "notx" not in " ".join(victim.seen) and not result.success
    assert result.perturbed == "not dullx at all"
    # compared as written, as TextAttack does: "Not" is a word it may edit
    victim = ScriptedVictim({"Notx": 0.5})
    attack.transformation = Table({"Not": ["Notx"]})
    assert attack.run(victim, "Not dull at all", 0, budget=0.5).success


def test_words_round_trip_every_sst2_dev_sentence(sst2):
    for text in sst2[1].texts:
        words = Words.of(text)
        assert words.text() == text
        assert all(w and w[0] not in "'-_*@" and w[-1] not in "'-_*@" for w in words.words)
    assert Words.of("it 's a 'great' , isn't it").words == ("it", "s", "a", "great", "isn't", "it")


def test_char_edits_are_deepwordbugs_four_and_leave_one_letter_words_alone():
    rng = np.random.default_rng(0)
    assert CharEdits()("a", rng) == []
    for _ in range(50):
        for edit in CharEdits()("movie", rng):
            assert edit != "movie" and abs(len(edit) - 5) <= 1
    lengths = {len(e) for _ in range(50) for e in CharEdits()("movie", rng)}
    assert lengths == {4, 5, 6}  # deletion, swap/substitution, insertion


def test_pwws_candidates_are_every_single_word_wordnet_lemma():
    good = synonyms("good")
    assert {"well", "beneficial", "estimable", "dependable"} <= set(good)
    assert "good" not in good and not any("_" in s for s in good)
    assert len(good) > 20  # no cap: TextAttack tries them all
    assert "up-and-coming" in synonyms("industrious")  # hyphenated single words are kept


@pytest.mark.parametrize("name", ["char", "synonym"])
def test_recipes_compose_the_published_parts(name):
    attack = RECIPES[name]()
    assert attack.stopwords == STOPWORDS and attack.query_budget is None and not attack.text_constraints
    assert attack.search.ranking == {"char": "unk", "synonym": "weighted-saliency"}[name]
