"""Defences against discrete perturbations and the parts attacks are composed of (issue #10):
query budgets, the similarity constraint, the word normaliser, perturbed-text training, the
one-change KD ablation, deployable forms and the device package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from models.attacks import (RECIPES, STOPWORDS, CharEdits, Example, SentenceSimilarity, Words, attack_dataset,
                            antonyms, embedding_neighbours, sentence_embeddings, synonyms, word_budget)
from models.artifact import device_package
from models.augment import PerturbedText
from models.datasets import cached_text_dataset
from models.errors import FedrexError
from models.networks import VocabMap, build_network
from models.normalizer import WordNormalizer
from models.objectives import ObjectiveConfig, objective_loss
from models.tokenizer import WordPieceTokenizer
from models.training import fit


@pytest.fixture(scope="module")
def model(sst2):
    torch.manual_seed(0)
    net = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity())
    fit(net, sst2[0].subset(np.arange(8000)), ObjectiveConfig(), epochs=2, batch_size=64, seed=0)
    return net


@pytest.fixture(scope="module")
def normalizer():
    train, _ = cached_text_dataset("sst2", "train")
    return WordNormalizer.from_texts(train["text"])


def test_char_beam_stays_within_its_query_and_word_budgets(model, sst2, tok):
    dev = sst2[1]
    summary, results = attack_dataset("char-beam", model, tok, dev.texts[:30], dev.labels[:30], budget=0.2, seed=0)
    limit = RECIPES["char-beam"]().query_budget
    assert all(r.queries <= limit for r in results)
    assert all(r.words_changed <= word_budget(r.n_words, 0.2) for r in results)
    assert summary["success_rate"] > 0.3 and summary["queries_per_success"] <= limit
    # a beam sees more of the space than the greedy walk: it flips at least as many rows here
    greedy, _ = attack_dataset("char", model, tok, dev.texts[:30], dev.labels[:30], budget=0.2, seed=0)
    assert summary["adv_acc"] <= greedy["adv_acc"]


def test_similarity_constraint_holds_for_every_successful_attack(model, sst2, tok):
    dev = sst2[1]
    _, results = attack_dataset("synonym-sim", model, tok, dev.texts[:25], dev.labels[:25], budget=0.2, seed=0)
    changed = [r for r in results if r.words_changed]
    assert changed, "the attack changed nothing: the constraint was not exercised"
    # the constraint compares each swap's text with the original; the final text is checked too
    for r in changed:
        a, b = sentence_embeddings([r.original, r.perturbed])
        # each single swap kept >= 0.85; several swaps compound, so the final text may drift lower
        assert float(a @ b) >= 0.85 - 0.05 * (r.words_changed - 1)
    keep = SentenceSimilarity(0.85)("a truly wonderful film", ["a truly marvellous film", "a truly awful film today"])
    assert keep.dtype == bool and keep.shape == (2,)


def test_embedding_candidates_are_minilm_neighbours_that_keep_part_of_speech_and_are_no_antonyms():
    attack, rng = RECIPES["embedding"](), np.random.default_rng(0)

    def kept(word, sentence="{} acting in a slow movie"):
        """What the recipe may put in the word's place, through Attack.candidates (the sentence
        similarity included)."""
        words = Words.of(sentence.format(word))
        example = Example(None, words, 1, 1.0, 3, rng)
        return attack.candidates(example, list(words.words), 0)

    raw = embedding_neighbours("good", 50, 0.35)
    assert "bad" in raw and "excellent" in raw  # MiniLM's raw space puts the antonym next door
    good = kept("good")
    assert "excellent" in good and "great" in good and "bad" not in good
    assert kept("Good")[:2] == [w.capitalize() for w in good[:2]]  # in the word's case
    assert "better" in embedding_neighbours("bad", 50, 0.35) and "better" not in kept("bad")  # base form "good"
    assert "faster" in embedding_neighbours("slow", 50, 0.35) and "faster" not in kept("slow")  # base form "fast"
    assert "boring" in antonyms("fascinating")  # indirect: the satellite's head "interesting" has "uninteresting"
    assert "film" in kept("movie") and "cinematic" not in kept("movie")  # nouns stay nouns
    assert kept("The") == []  # a function word, though capitalised
    assert embedding_neighbours("ꙮ", 50, 0.35) == ()  # a word MiniLM reads as [UNK] has no neighbours
    assert all(len(n) > 1 for n in embedding_neighbours("american", 50, 0.35))  # "american" never becomes "u"
    assert "cafe" not in embedding_neighbours("café", 50, 0.35)  # MiniLM reads them as one word


def test_normaliser_undoes_single_edits_and_leaves_corpus_words_alone(normalizer):
    text = "a gripping , funny and wonderful film"
    assert normalizer(text) == text  # every word is a corpus word
    assert normalizer("a grippnig , fnny and wonderfl flim") == text  # transposition, deletions
    assert normalizer("w0nderful") == "wonderful"  # digits for letters
    assert normalizer("qzxwvk") == "qzxwvk"  # nothing within one edit: passes through
    assert normalizer("Wonderful!") == "Wonderful!"  # known word: case and punctuation kept
    rng = np.random.default_rng(0)
    words = [w for w in ("wonderful", "terrible", "charming", "boring", "brilliant", "mediocre", "hilarious")]
    restored = sum(normalizer(edit) == w for w in words for edit in CharEdits()(w, rng))
    assert restored >= 0.8 * sum(len(CharEdits()(w, np.random.default_rng(0))) for w in words)


def test_normaliser_round_trips_through_its_file(normalizer, tmp_path):
    normalizer.save(tmp_path)
    again = WordNormalizer.load(tmp_path)
    assert (again.version, again.counts, again.bigrams) == (2, normalizer.counts, normalizer.bigrams)
    assert len(again.bigrams) > 40_000
    assert again("the moo of the flim") == normalizer("the moo of the flim") == "the mood of the film"
    with pytest.raises(FedrexError, match="without a word normaliser"):
        WordNormalizer.load(tmp_path / "missing")
    blob = gzip.decompress((tmp_path / "normalizer.txt.gz").read_bytes())
    for broken in (blob + b"\xff", blob.replace(b"\t", b" ", 1), b"#fedrex-normalizer 9\nfilm\t3\n", b"film\t-1\n"):
        with pytest.raises(FedrexError, match="normaliser"):  # a truncated pair list, a bad line, a newer version, a negative count
            WordNormalizer.from_bytes(gzip.compress(broken))


def test_normaliser_version_2_closes_what_deepwordbug_exploited_and_version_1_files_keep_their_behaviour(normalizer):
    """The routes DeepWordBug took through version 1 on critics' reviews (benchmarks/normalizer.py)."""
    assert normalizer("the moo of the film") == "the mood of the film"  # a neighbour seen in context wins ...
    assert normalizer("moo") == "too"  # ... over a merely frequent one, which still wins without context
    assert normalizer("a grwon-ups movie") == "a grown-ups movie"  # each letter run of a hyphenated word
    assert normalizer("nd th rest") == "and the rest"  # two-letter typos
    assert normalizer("weeipng") == "weeping"  # the tokenizer's own words are known: restored ...
    assert "weeping" not in normalizer.counts and normalizer("weeping") == "weeping"  # ... and kept
    assert normalizer("don't isn't can't it's") == "don't isn't can't it's"  # contractions untouched
    old = WordNormalizer.from_bytes(gzip.compress("".join(f"{w}\t{c}\n" for w, c in normalizer.counts.items()).encode()))
    assert old.version == 1 and not old.bigrams  # a file without the header: the artifacts built before version 2
    assert old("the moo of the film nd a grwon-ups weeipng") == "the too of the film nd a grwon-ups weeipng"
    assert WordNormalizer.from_bytes(old.to_bytes()).version == 1


def test_a_normaliser_that_remembers_its_answers_gives_the_answers_it_would_work_out(normalizer):
    """The same typo in two contexts gets each context's answer; and on typo'd dev sentences, asked
    twice (the second time from memory, through a memory small enough to start afresh), the
    remembering normaliser of each version writes exactly what a fresh one does."""
    remembering = WordNormalizer(normalizer.counts, normalizer.bigrams).remember_answers(limit=50)
    assert remembering("the moo of the film") == "the mood of the film" and remembering("moo") == "too"
    assert remembering("the moo of the film") == "the mood of the film"
    dev, _ = cached_text_dataset("sst2", "validation")
    rng = np.random.default_rng(0)  # typos as DeepWordBug makes them: two letters swapped in some words
    texts = [" ".join(w[0] + w[2] + w[1] + w[3:] if len(w) > 3 and rng.random() < 0.35 else w for w in t.split())
             for t in dev["text"][:150]]
    for version in (1, 2):
        fresh = WordNormalizer(normalizer.counts, normalizer.bigrams, version)
        memory = WordNormalizer(normalizer.counts, normalizer.bigrams, version).remember_answers(limit=50)
        expected = [fresh(t) for t in texts]
        assert sum(e != t for e, t in zip(expected, texts)) > 50  # typos were corrected: answers were worked out
        assert [memory(t) for t in texts] == expected
        assert [memory(t) for t in texts] == expected


def test_shipped_device_package_holds_the_version_2_normaliser_within_one_megabyte():
    folder = Path(__file__).resolve().parents[1] / "models" / "artifacts" / "sst2-student"
    assert WordNormalizer.load(folder).version == 2
    package = device_package(folder)
    assert package["normalizer"] == (folder / "normalizer.txt.gz").stat().st_size and package["total"] <= 1_000_000


def test_the_smoothed_packages_ship_their_tables_and_weigh_what_their_benchmark_reports():
    """The smoothed device packages (``benchmarks/smoothing_device.py``, issue #18): the student's
    package plus the WordNet table of SST-2 train's words
    - as built, which the device closes when it loads it, to exactly the closed table the attacks
      measured, in a little over half its bytes (1,139,227 bytes in all when measured: over the
      1 MB target);
    - compact, as a graph over the normaliser's words, which reads back to the compact table
      (within the 1 MB target);
    and the sizes in results/smoothing_device.json and smoothing_device_compact.json are what
    today's code writes."""
    import json

    from models.datasets import cached_text_dataset
    from models.normalizer import word_counts
    from models.robust.smoothing import PerturbationTable

    train, _ = cached_text_dataset("sst2", "train")
    built = PerturbationTable.build(sorted(word_counts(list(train["text"]))), "wordnet")
    blob = built.to_bytes()
    closed = built.symmetric()
    assert PerturbationTable.from_bytes(blob).symmetric().table == closed.table
    assert len(blob) < 0.6 * len(closed.to_bytes())
    folder = Path(__file__).resolve().parents[1] / "models" / "artifacts" / "sst2-student-copies"
    known = WordNormalizer.load(folder).known_words()
    compact = built.compact(known)
    graph = compact.to_graph_bytes(known)
    assert PerturbationTable.from_graph_bytes(graph, known).table == compact.table
    shipped = device_package(folder)
    for name, table_bytes in (("smoothing_device.json", len(blob)), ("smoothing_device_compact.json", len(graph))):
        reported = json.loads((folder.parents[2] / "results" / name).read_text())
        assert reported["table bytes"] == reported["package"]["smoothing table"] == table_bytes, name
        assert {k: v for k, v in reported["package"].items() if k not in ("smoothing table", "total", "config")} == \
            {k: v for k, v in shipped.items() if k not in ("total", "config")}
        assert reported["package"]["total"] == sum(v for k, v in reported["package"].items() if k != "total")
        if name == "smoothing_device.json":
            assert reported["closed table bytes"] == len(closed.to_bytes())
    assert reported["table words"] == len(compact.table) and reported["package"]["total"] <= 1_000_000
    assert reported["compact table as lines bytes"] == len(compact.to_bytes())


def test_normaliser_raises_accuracy_under_the_char_attack(model, sst2, normalizer):
    dev = sst2[1]
    texts, labels = dev.texts[:60], dev.labels[:60]
    plain, _ = attack_dataset("char", model, WordPieceTokenizer(64), texts, labels, seed=0)
    defended, _ = attack_dataset("char", model, WordPieceTokenizer(64, normalizer=normalizer), texts, labels, seed=0)
    assert defended["adv_acc"] > plain["adv_acc"] + 0.1


def test_perturbed_text_is_drawn_per_epoch_and_keeps_labels_and_teacher_logits(sst2, tok):
    data = sst2[0].subset(np.arange(400))
    data.teacher_logits = np.random.default_rng(0).normal(size=(400, 2)).astype(np.float32)
    data.teacher_attr = [np.ones(len(ids), np.float32) for ids in data.ids]
    augment = PerturbedText(tok, row_share=0.5, seed=0)
    first, again, second = augment(data, 0), augment(data, 0), augment(data, 1)
    changed = [i for i in range(400) if first.texts[i] != data.texts[i]]
    assert 0.35 < len(changed) / 400 < 0.6
    assert first.texts == again.texts and first.texts != second.texts  # seeded, fresh each epoch
    assert np.array_equal(first.labels, data.labels) and np.array_equal(first.teacher_logits, data.teacher_logits)
    for i in changed:
        before, after = Words.of(data.texts[i]).words, Words.of(first.texts[i]).words
        edited = [a for a, b in zip(before, after) if a != b]
        assert len(edited) <= word_budget(len(before), 0.2) and not set(edited) & STOPWORDS
        assert first.teacher_attr[i] is None  # its token positions moved
        assert np.array_equal(first.ids[i], tok.encode_ids([first.texts[i]])[0])
    assert data.texts[changed[0]] == sst2[0].texts[changed[0]]  # the original rows are untouched
    with pytest.raises(FedrexError):
        PerturbedText(tok, kinds=("leet",))


def test_a_perturbed_text_teacher_fine_tunes_on_perturbed_rows_under_a_cache_key_of_its_own(sst2, tmp_path,
                                                                                             monkeypatch):
    """``teacher_augment`` (issue #18's third defence): the teacher's fine-tuning gets perturbed-text
    training with that share of its rows, and the teacher its own cache key; at 0 it gets none and
    every teacher cached before the setting existed keeps its key; a share outside [0, 1] is refused."""
    from dataclasses import replace

    import server.distill as distill

    given = []
    monkeypatch.setattr(distill, "fit", lambda model, data, objective, **kw: given.append((data, kw["augment"])))
    monkeypatch.setattr(distill, "save_weights", lambda *args: None)
    monkeypatch.setattr(distill, "cache_dir", lambda: tmp_path)
    rows = sst2[0].subset(np.arange(200))
    cfg = distill.DistillConfig(teacher_samples=200, teacher_augment=0.5)
    distill.get_teacher(cfg, rows, 2, "perturbed")
    distill.get_teacher(replace(cfg, teacher_augment=0.0), rows, 2, "plain")
    (data, augment), (_, none) = given
    assert none is None and isinstance(augment, PerturbedText) and augment.row_share == 0.5
    changed = sum(a != b for a, b in zip(augment(data, 0).texts, data.texts))
    assert 60 < changed < 140  # about half of the 200 rows perturbed
    train, _ = cached_text_dataset("sst2", "train")
    before = distill._digest([{k: getattr(cfg, k) for k in distill.TEACHER_FIELDS if k != "teacher_augment"},
                              len(train), train._fingerprint])  # the key as computed before the field existed
    assert distill.teacher_key(replace(cfg, teacher_augment=0.0), train) == before != distill.teacher_key(cfg, train)
    perturbed_key = distill.teacher_key(cfg, train)
    monkeypatch.setattr(distill, "RECIPES_VERSION", distill.RECIPES_VERSION + 1)  # the edits it was trained on changed
    assert distill.teacher_key(cfg, train) != perturbed_key
    assert distill.teacher_key(replace(cfg, teacher_augment=0.0), train) == before
    with pytest.raises(FedrexError, match="teacher_augment"):
        replace(cfg, teacher_augment=1.5).validate()


def test_without_kd_the_adversarial_term_keeps_its_teacher_target(sst2):
    """'w/o KD' removes the KD term only: the ADV term still matches the teacher's prediction."""
    torch.manual_seed(0)
    net = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity()).eval()
    data = sst2[0].subset(np.arange(32))
    data.teacher_logits = np.tile(np.array([[4.0, -4.0]], np.float32), (32, 1))
    with_teacher = data.batch(np.arange(32))
    data.teacher_logits = None
    without = data.batch(np.arange(32))
    config = ObjectiveConfig(kd=0.0, adv=1.0)
    _, parts_t = objective_loss(net, with_teacher, config)
    _, parts_n = objective_loss(net, without, config)
    assert "kd" not in parts_t
    assert parts_t["adv"] > parts_n["adv"] + 1e-3  # CE + KL to the teacher, not CE alone


def test_synonym_candidates_are_the_attacks_swaps_read_as_one_token(tok):
    """ASCC's search space: a word's WordNet synonyms that the tokenizer reads as one token, in
    WordNet's order; stopwords, word pieces and special tokens get none; -1 pads the table."""
    from models.robust.synonym_hull import NONE, SynonymCandidates

    candidates = SynonymCandidates(tok, max_candidates=8)
    ids = torch.tensor(tok.encode(["the movie is wonderful", "unforgettably"]))
    table = candidates(ids)
    assert table.shape[:2] == ids.shape and table.shape[2] == max(len(candidates.of(int(i))) for i in ids.flatten())
    movie = tok.token_id("movie")
    expected = [tok.token_id(w) for w in dict.fromkeys(x.lower() for x in synonyms("movie"))
                if tok.token_id(w) is not None and len(tok.encode_ids([w])[0]) == 3]
    assert candidates.of(movie) == tuple(expected[:8]) and tok.token_id("film") in candidates.of(movie)
    assert movie not in candidates.of(movie)
    for row, row_ids in zip(table, ids):
        for found, token in zip(row, tok.tokens(row_ids)):
            if token in STOPWORDS or token.startswith("##") or token.startswith("["):
                assert (found == NONE).all(), token
    assert any(t.startswith("##") for t in tok.tokens(ids[1]))  # the loop above met word pieces
    # by token: the first piece of "wonderful ##ly" gets the candidates of "wonderful", which stand
    # in for the attack's swaps of "wonderfully" (the rule measured against whole words: synonym_hull)
    split = torch.tensor(tok.encode(["wonderful film", "wonderfully"]))
    assert tok.tokens(split[1])[1:3] == ["wonderful", "##ly"] and candidates.of(int(split[1, 1]))
    split_table = candidates(split)
    assert torch.equal(split_table[1, 1], split_table[0, 1]) and (split_table[1, 2] == NONE).all()


def test_distillation_searches_the_synonyms_hull_only_when_asked_and_with_an_adv_term():
    from dataclasses import replace

    from server.distill import DistillConfig

    config = DistillConfig.quick()
    replace(config, adv_space="synonyms").validate()
    with pytest.raises(FedrexError, match="adv_space must be one of"):
        replace(config, adv_space="hull").validate()
    with pytest.raises(FedrexError, match="leaves out"):
        replace(config, adv_space="synonyms", objective=replace(config.objective, adv=0.0)).validate()


def test_distillation_with_attack_samples_zero_attacks_no_row(sst2, tok, monkeypatch):
    """attack_samples=0 means no attacks, as a client's attack_examples=0 and train-on-copies'
    --attack-samples 0 (it meant every row of the split): ``models.evaluation.robustness`` attacks
    no row at limit 0, for every caller; a negative count is refused."""
    from dataclasses import replace

    import models.evaluation
    import server.distill as distill

    called = []  # (budget, rows) of each attack run: the recipe stubbed, the row selection real
    monkeypatch.setattr(models.evaluation, "attack_dataset",
                        lambda *args: called.append((args[5], len(args[3]))) or ({"adv_acc": 0.0}, None))
    torch.manual_seed(0)
    net = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity()).eval()
    dev = sst2[1].subset(np.arange(24))
    cfg = replace(distill.DistillConfig.quick(), attacks=("char",), fidelity_samples=4, attack_samples=0)
    assert distill.evaluate(net, cfg, dev, tok)["attacks"] == {}
    assert distill.evaluate_normalized(net, cfg, dev, WordNormalizer.from_texts(dev.texts))["attacks"] == {} and not called
    assert distill.evaluate(net, replace(cfg, attack_samples=8), dev, tok)["attacks"] and called == [(0.2, 8)]
    with pytest.raises(FedrexError, match="attack_samples"):
        replace(cfg, attack_samples=-1).validate()


def test_the_hull_adversary_mixes_only_a_tokens_own_options_and_raises_the_loss(sst2, tok):
    """hull_embedding: a token without candidates, or whose only candidate is itself, keeps its
    own vector; with real synonyms the mix raises the loss, and the ADV term searches it when handed them."""
    from models.objectives import hull_embedding
    from models.robust.synonym_hull import SynonymCandidates

    torch.manual_seed(0)
    net = build_network({"kind": "student", "num_labels": 2}, VocabMap.identity()).eval()
    batch = sst2[0].subset(np.arange(16)).batch(np.arange(16))
    emb = net.embed(batch.ids)
    none = torch.full((*batch.ids.shape, 3), -1)
    assert torch.equal(hull_embedding(net, batch.ids, none, batch.mask, batch.labels, None, 2), emb)
    itself = batch.ids.unsqueeze(-1).expand(-1, -1, 3)
    assert torch.allclose(hull_embedding(net, batch.ids, itself, batch.mask, batch.labels, None, 2), emb, atol=1e-6)
    synonyms_of = SynonymCandidates(tok)
    mixed = hull_embedding(net, batch.ids, synonyms_of(batch.ids), batch.mask, batch.labels, None, 2)
    without = (synonyms_of(batch.ids) < 0).all(-1)
    assert torch.equal(mixed[without], emb[without]) and not torch.equal(mixed, emb)
    clean = F.cross_entropy(net.classify(emb, batch.mask), batch.labels)
    assert F.cross_entropy(net.classify(mixed, batch.mask), batch.labels) > clean
    _, ball = objective_loss(net, batch, ObjectiveConfig(adv=1.0))
    _, hull = objective_loss(net, batch, ObjectiveConfig(adv=1.0), candidates=synonyms_of)
    assert hull["adv"] > clean.item() and hull["adv"] != ball["adv"]


@pytest.mark.parametrize("kind", ["student", "fastgrnn", "prado"])
def test_deployable_form_is_exact_for_every_length(kind, tok):
    from models.export import deployable

    torch.manual_seed(0)
    net = build_network({"kind": kind, "num_labels": 2}, VocabMap.identity()).eval()
    rows = tok.encode_ids(["a film", "a gripping , funny and wonderful film about growing up in a small town"])
    module, form = deployable(net, torch.tensor([rows[0]]))
    assert form == "torchscript"  # compiled, not traced: a trace would fix FastGRNN's loop length
    for row in rows:
        ids = torch.tensor([row])
        with torch.no_grad():
            assert torch.allclose(module(ids), net(ids), atol=1e-5)


def test_prado_attention_is_a_softmax_over_time_per_channel():
    """Changing one attention channel's filter changes that channel's pooled feature only."""
    from models.networks import Prado

    torch.manual_seed(0)
    net = Prado(2, channels=4, dim=8, features=16, ngrams=(2,)).eval()
    ids = torch.tensor([[101, 2023, 3185, 2003, 2307, 102]])
    captured = []
    net.head.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0].clone()))
    with torch.no_grad():
        net(ids)
        net.attention[0].weight[1].mul_(-3.0)
        net(ids)
    changed = (captured[0] - captured[1]).abs()[0] > 1e-6
    assert changed.tolist() == [False, True, False, False]


def test_device_tokenizer_rebuilt_from_the_shipped_vocab_matches_and_is_small(sst2, tok):
    """A device without the teacher package tokenizes from models/vocab.txt.gz: the teacher's own
    vocabulary, giving the same ids on real sentences."""
    from models.packaged import shipped_file
    from models.tokenizer import SHIPPED_VOCAB, WordPieceTokenizer, minilm_dir, vocab_gz_bytes

    assert gzip.decompress(shipped_file(SHIPPED_VOCAB).read_bytes()) == (minilm_dir() / "vocab.txt").read_bytes()
    device = WordPieceTokenizer(64, from_vocab=True)
    texts = sst2[1].texts[:300] + ["Café naïve 日本 don't g00d!!"]
    assert device.encode_ids(texts) == tok.encode_ids(texts)
    assert vocab_gz_bytes() < 150_000  # the 466 KB tokenizer.json is not what a device needs


def test_unknown_attacks_and_bad_shares_are_rejected():
    from server.distill import DistillConfig

    with pytest.raises(FedrexError, match="unknown attack"):
        DistillConfig(attacks=("char", "typo")).validate()
    with pytest.raises(FedrexError, match="augment"):
        DistillConfig(augment=1.5).validate()


def test_adversarial_text_trains_on_what_fools_the_current_model(model, sst2, tok):
    from models.augment import AdversarialText, chain

    data = sst2[0].subset(np.arange(300))
    model.train()
    make = AdversarialText(model, tok, rows=60, seed=0)
    out = make(data, 0)
    assert model.training  # the attack's eval mode does not leak into the rest of the epoch
    changed = [i for i in range(300) if out.texts[i] != data.texts[i]]
    assert len(changed) == make.last_found > 0
    with torch.no_grad():
        model.eval()
        fooled = model(torch.from_numpy(tok.encode([out.texts[i] for i in changed]))).argmax(-1).numpy()
    assert (fooled != out.labels[changed]).all() and np.array_equal(out.labels, data.labels)
    both = chain(PerturbedText(tok, seed=0), None, make)
    assert both(data, 1).texts != data.texts and chain(None) is None


def test_a_client_encodes_and_perturbs_its_rows_through_the_normaliser_it_was_sent(normalizer):
    """What the server sends (the start model's gzip'd word list) becomes the client's tokenizer:
    its rows are encoded behind the normaliser, and perturbed-text hardening re-encodes the
    perturbed rows through the same tokenizer."""
    from client.data import load_local_data
    from client.local import ClientTrainer
    from models.run_settings import RunSettings

    settings = RunSettings(dataset="rt_critics", min_samples=300, perturb_share=1.0)
    local = load_local_data({"partition-id": 0}, settings, 2, normalizer.to_bytes())
    plain = load_local_data({"partition-id": 0}, settings, 2, None)
    assert local.tokenizer.normalizer.counts == normalizer.counts and plain.tokenizer.normalizer is None
    defended = WordPieceTokenizer(settings.max_length, normalizer=normalizer)
    for rows in (local.train, local.test):
        expected = defended.encode_ids(rows.texts)
        assert all(np.array_equal(a, b) for a, b in zip(rows.ids, expected))
    rewritten = sum(not np.array_equal(a, b) for a, b in zip(local.train.ids, plain.train.ids))
    assert rewritten > 0  # critics use words SST-2 lacks: some rows really are normalised
    perturbed = ClientTrainer(settings, state=None, tokenizer=local.tokenizer).perturbed_text(seed=0)(local.train, 0)
    changed = [i for i in range(len(local.train)) if perturbed.texts[i] != local.train.texts[i]]
    assert len(changed) > 0.5 * len(local.train)
    for i in changed:
        assert np.array_equal(perturbed.ids[i], defended.encode_ids([perturbed.texts[i]])[0])
    assert ClientTrainer(settings.replace(perturb_share=0.0), state=None).perturbed_text(seed=0) is None
    # perturb-words: heavier copies than the attacks' budget, never more than asked
    heavier = ClientTrainer(settings.replace(perturb_words=0.6), state=None,
                            tokenizer=local.tokenizer).perturbed_text(seed=0)(local.train, 0)
    edits = [(sum(a != b for a, b in zip(Words.of(x).words, Words.of(y).words)), len(Words.of(x).words))
             for x, y in zip(local.train.texts, heavier.texts)]
    assert all(edited <= word_budget(n, 0.6) for edited, n in edits)
    assert sum(edited > word_budget(n, settings.attack_budget) for edited, n in edits) > 0.3 * len(edits)


def test_synonym_encoding_puts_a_word_and_its_synonyms_under_one_code_and_passes_unknown_words():
    """SEM's greedy walk (models.robust.synonym_encoding) on a hand-made synonym graph: the most
    frequent word of a group is its code, a synonym met later takes the code of the word it was
    met with, an encoded word keeps its code (groups never merge), and a word outside the table
    passes through with its punctuation."""
    from models.robust.synonym_encoding import SynonymEncoding

    graph = {"good": ["well", "full"], "well": ["good", "wellspring"], "full": ["good", "replete"],
             "bad": ["big", "tough"], "big": ["bad", "large", "full"], "film": ["movie"], "movie": ["film"]}
    counts = {"good": 50, "bad": 40, "film": 30, "movie": 35, "big": 10, "well": 5, "full": 3}
    sem = SynonymEncoding.build(counts, lambda w: graph.get(w, []))
    assert sem.code == {"well": "good", "full": "good", "wellspring": "good", "replete": "good",
                        "big": "bad", "tough": "bad", "large": "bad", "film": "movie"}
    assert sem("A good FILM, well made!") == sem("A full movie, good made!") == "A good movie, good made!"
    assert sem("an unknown xyzzy word") == "an unknown xyzzy word"
    assert sem.coverage([("good", "well"), ("big", "full"), ("film", "movie")]) == pytest.approx(2 / 3)
    assert SynonymEncoding.from_bytes(sem.to_bytes()).code == sem.code
    # star clusters: only a word that is its own code hands it on (no chains through "big" or "well")
    star = SynonymEncoding.build(counts, lambda w: graph.get(w, []), star=True)
    assert star.code == {"well": "good", "full": "good", "big": "bad", "tough": "bad", "film": "movie"}
    with pytest.raises(FedrexError, match="not a synonym encoding table"):
        SynonymEncoding.from_bytes(b"not gzip")


class CountingWords(torch.nn.Module):
    """p(positive) = sigmoid(ids summed): a deterministic stand-in whose answer any copy changes."""

    def forward(self, ids):
        score = ids.float().sum(1) / 1000.0
        return torch.stack([-score, score], 1)


def test_smoothing_averages_the_models_answers_over_seeded_copies_that_swap_only_table_words(tok):
    """models.robust.smoothing: the copies of a text are the same every call (a deterministic
    classifier), and a text with as many words draws the same swaps (common random numbers); a copy swaps only words of the table, each for one of
    its substitutes, never a stopword or a word outside the table; rate 0 answers as the model
    does; the answer is the mean of the model's probabilities over the copies; an attack counts
    one query per text; HotFlip cannot attack it; the table survives its file."""
    from models.attacks import Victim
    from models.robust.smoothing import PerturbationTable, SmoothedVictim

    table = PerturbationTable({"good": ("fine", "nice"), "film": ("movie",), "the": ("a",)})
    assert "the" in table.table  # a hand-made table may hold anything; a built one leaves stopwords out
    built = PerturbationTable.build(["the", "Good", "zzzqx"], "wordnet")
    assert "the" not in built.table and "zzzqx" not in built.table and "estimable" in built.get("GOOD")
    model = CountingWords()
    smoothed = SmoothedVictim(model, tok, PerturbationTable({"good": ("fine", "nice"), "film": ("movie",)}),
                              votes=32, rate=0.5, seed=3)
    text = "A good film, good acting and xyzzy."
    copies = smoothed.copies(text)
    assert copies == smoothed.copies(text) and len(copies) == 32 and len(set(copies)) > 4
    for copy in copies:
        words = Words.of(copy).words
        assert words[0] == "A" and words[4:] == ("acting", "and", "xyzzy")
        assert words[1] in ("good", "fine", "nice") and words[2] in ("film", "movie") and words[3] in ("good", "fine", "nice")
    # common random numbers: a text with the same number of words draws the same swaps and picks
    assert smoothed.copies("A good film, good acting and xyzzy!") == [c[:-1] + "!" for c in copies]
    assert smoothed.copies("A good film, good acting and more xyzzy.") != copies
    plain = Victim(model, tok)
    other = "The film was good"
    assert np.allclose(smoothed.answer([text, other]),  # each text's own copies, in order
                       np.stack([plain.answer(copies).mean(0), plain.answer(smoothed.copies(other)).mean(0)]))
    still = SmoothedVictim(model, tok, smoothed.table, votes=4, rate=0.0)
    assert still.copies(text) == [text] * 4 and np.allclose(still.answer([text]), plain.answer([text]))
    smoothed.proba([text, "good"])
    assert smoothed.queries == 2
    with pytest.raises(FedrexError, match="hotflip"):
        attack_dataset("hotflip", model, tok, [text], [1], victim=smoothed)
    assert PerturbationTable.from_bytes(smoothed.table.to_bytes()).table == smoothed.table.table
    with pytest.raises(FedrexError, match="not a perturbation table"):
        PerturbationTable.from_bytes(b"not gzip")
    with pytest.raises(FedrexError, match="votes >= 1"):
        SmoothedVictim(model, tok, table, votes=0)


def test_a_symmetric_table_holds_every_substitute_as_a_word_whose_substitutes_hold_the_words_listing_it():
    """``PerturbationTable.symmetric``: an attack's candidate (a substitute) becomes a word of the
    table, and its substitutes hold the word it replaced; a word keeps its own substitutes first, in
    order; a stopword substitute stays out of the words; closing a closed table changes nothing."""
    from models.robust.smoothing import PerturbationTable, smoothing_table

    table = PerturbationTable({"good": ("fine", "nice"), "great": ("fine", "big"), "film": ("movie", "the")})
    closed = table.symmetric()
    assert closed.table == {"good": ("fine", "nice"), "great": ("fine", "big"), "film": ("movie", "the"),
                            "fine": ("good", "great"), "nice": ("good",), "big": ("great",), "movie": ("film",)}
    assert closed.symmetric().table == closed.table
    # the same closure whatever order the table was built in (a built table's order is a set's)
    shuffled = PerturbationTable(dict(reversed(list(table.table.items())))).symmetric()
    assert list(shuffled.table["fine"]) == ["good", "great"] and shuffled.table == closed.table
    assert PerturbationTable.from_bytes(table.to_bytes()).symmetric().table == closed.table
    built = PerturbationTable.build(["good", "movie"], "wordnet").symmetric()
    assert smoothing_table(["good", "movie"], "wordnet", symmetric=True).table == built.table  # what train-on-copies uses
    assert all(word in built.get(s) for word, subs in built.table.items() for s in subs if s in built.table)
    assert "good" in built.get("estimable") and "movie" in built.get("film")


def test_a_compact_table_keeps_known_words_only_and_travels_as_a_graph_over_them():
    """``PerturbationTable.compact``: only the words the normaliser knows (a substitute it does not
    know is one it rewrites), no stopwords, closed, each word's substitutes in alphabetical order;
    ``to_graph_bytes`` stores it as its word pairs over the known words, and reading that back gives
    the same table; a table that is not compact, another word list and a broken file are refused."""
    from models.robust.smoothing import PerturbationTable

    table = PerturbationTable({"good": ("nice", "fine", "goodish"), "great": ("fine", "big"), "film": ("movie", "the")})
    known = sorted(["big", "film", "fine", "good", "great", "movie", "nice", "the", "zebra"])
    compact = table.compact(known)
    assert compact.table == {"good": ("fine", "nice"), "great": ("big", "fine"), "film": ("movie",),
                             "fine": ("good", "great"), "nice": ("good",), "big": ("great",), "movie": ("film",)}
    blob = compact.to_graph_bytes(known)
    back = PerturbationTable.from_graph_bytes(blob, known)
    assert back.table == compact.table and all(back.table[w] == compact.table[w] for w in compact.table)
    for wrong in (table.symmetric(), PerturbationTable({"big": ("big",)}),  # "goodish", "the", order; a self-loop
                  PerturbationTable({"big": ("fine", "fine"), "fine": ("big",)})):  # a repeated substitute
        with pytest.raises(FedrexError, match="not compact"):
            wrong.to_graph_bytes(known + ["zzz"])
    with pytest.raises(FedrexError, match="sorted list"):
        compact.to_graph_bytes(list(reversed(known)))
    with pytest.raises(FedrexError, match="another list"):
        PerturbationTable.from_graph_bytes(blob, sorted(known + ["aardvark"]))
    header, _, codes = gzip.decompress(blob).partition(b"\n")
    name, size, digest, count = header.decode().split(" ")
    for broken in (b"not gzip", blob[:-3], gzip.compress(b"#fedrex-normalizer 2\n"),
                   blob + gzip.compress(b"\x05"),  # a second gzip member: one pair more than the header counts
                   gzip.compress(f"{name} {size} {digest} {int(count) + 1}\n".encode() + codes + b"\x00"),  # a repeat
                   gzip.compress(f"{name} {size} {digest} 1\n".encode() + bytes([len(known) + 1])),  # (1, 1)
                   gzip.compress(f"{name} {size} {digest} 1\n".encode() + bytes([len(known) ** 2])),  # code N x N
                   gzip.compress(f"{name} x {digest} 0\n".encode())):
        with pytest.raises(FedrexError, match="not a perturbation graph"):
            PerturbationTable.from_graph_bytes(broken, known)


def test_a_table_swap_moves_the_smoothed_students_answer_less_than_the_students(sst2):
    """The mechanism smoothing rests on, on real SST-2 dev sentences and the shipped student
    behind its normaliser: swapping one word for a substitute the table holds moves the smoothed
    answer (16 copies at rate 0.5) less than it moves the model's, on average over the sentences
    (the attack's search climbs on exactly these moves): the copies of the two texts draw the same
    swaps, so what differs is the substitution, averaged with the copies that replace the word anyway;
    and less again with the table closed (``PerturbationTable.symmetric``), whose copies swap the
    substitute as well."""
    from models.artifact import load_artifact
    from models.attacks import Victim
    from models.robust.smoothing import PerturbationTable, SmoothedVictim

    folder = Path(__file__).resolve().parents[1] / "models" / "artifacts" / "sst2-student"
    model, _ = load_artifact(folder)
    tok = WordPieceTokenizer(64, normalizer=WordNormalizer.load(folder))
    texts = sst2[1].texts[:120]
    table = PerturbationTable.build({w for t in texts for w in Words.of(t).words}, "wordnet")
    originals, swapped = [], []
    for text in texts:
        words = Words.of(text)
        at = next((i for i, w in enumerate(words.words) if table.get(w)), None)
        if at is not None:
            originals.append(text)
            swapped.append(words.text([table.get(w)[0] if i == at else w for i, w in enumerate(words.words)]))
    assert len(originals) >= 100

    def moved(victim) -> float:
        return float(np.abs(victim.answer(originals)[:, 1] - victim.answer(swapped)[:, 1]).mean())

    plain, smoothed = moved(Victim(model, tok)), moved(SmoothedVictim(model, tok, table, votes=16, rate=0.5))
    # 0.052 against 0.069 when written; copies seeded by the text itself (fresh draws for every
    # candidate) gave 0.076, more than the model alone
    assert smoothed < 0.85 * plain, (smoothed, plain)
    # closed under its relation, the table swaps the substitute too, back to the word among others:
    # the swap moves the answer less again (0.037 when written)
    closed = moved(SmoothedVictim(model, tok, table.symmetric(), votes=16, rate=0.5))
    assert closed < 0.85 * smoothed, (closed, smoothed)


@pytest.mark.slow
def test_rounds_of_perturbed_text_hardening_raise_the_critics_accuracy_under_deepwordbug(federate_in_process):
    """Three FedAvg rounds of six real critics, in-process (each client's real local round, the
    updates averaged), from the bare shipped student: with perturbed-text hardening (every
    training row replaced by a character-edited copy, fresh each round) the global model keeps
    more of 120 held-out reviews under DeepWordBug than the same rounds without it, at the same
    clean accuracy. Prototyped with three attack seeds: 0.067 / 0.092 / 0.075 without, 0.117 /
    0.142 / 0.133 with (clean 0.775 / 0.783 / 0.750 against 0.775 / 0.783 / 0.767). The bare
    student, not the defended start: behind the normaliser the gain is a few points on 118 critics
    (README) and would be noise on six."""
    import json

    from client.data import load_local_data
    from models.artifact import load_artifact, resolve_artifact
    from models.evaluation import robustness
    from models.run_settings import RunSettings

    folder = resolve_artifact("sst2-student")
    start, _ = load_artifact(folder)
    config = json.loads((folder / "config.json").read_text())["network"]
    settings = RunSettings(dataset="rt_critics", min_samples=300, local_max_steps=10, adv_weight=0.0)
    critics = [load_local_data({"partition-id": pid}, settings, 2, None) for pid in range(6)]

    def federated(run: RunSettings):
        return federate_in_process(start, config, critics, run)

    def clean_and_attacked(model) -> tuple[float, float]:
        summaries = [robustness(model, c.tokenizer, c.test, ("char",), 0.2, 20, 0)["char"] for c in critics]
        return (float(np.mean([s["clean_acc"] for s in summaries])),
                float(np.mean([s["adv_acc"] for s in summaries])))

    plain = clean_and_attacked(federated(settings))
    hardened = clean_and_attacked(federated(settings.replace(perturb_share=1.0, perturb_kinds="char")))
    assert hardened[1] >= plain[1] + 0.02 and hardened[0] >= plain[0] - 0.03, (plain, hardened)


def test_rounds_of_ascc_hardening_raise_the_critics_accuracy_under_pwws(federate_in_process):
    """Three FedAvg rounds of six real critics, in-process, from the defended start (student +
    normaliser): with ASCC hardening (``adv-space=synonyms``, the defaults' weight and share of
    batches) the global model keeps more of 120 held-out reviews under PWWS than the same rounds
    without hardening, at about the same clean accuracy. Prototyped with three attack seeds (their
    own 120 rows each): 0.058 / 0.067 / 0.050 without, 0.167 / 0.142 / 0.158 with (clean 0.767 /
    0.767 / 0.758 against 0.783 / 0.750 / 0.708)."""
    import json

    from client.data import load_local_data
    from models.artifact import load_artifact, resolve_artifact
    from models.evaluation import robustness
    from models.run_settings import RunSettings

    folder = resolve_artifact("sst2-student")
    start, _ = load_artifact(folder)
    config = json.loads((folder / "config.json").read_text())["network"]
    normaliser = (folder / "normalizer.txt.gz").read_bytes()
    settings = RunSettings(dataset="rt_critics", min_samples=300, local_max_steps=10, adv_weight=0.0)
    critics = [load_local_data({"partition-id": pid}, settings, 2, normaliser) for pid in range(6)]

    def clean_and_attacked(model) -> tuple[float, float]:
        summaries = [robustness(model, c.tokenizer, c.test, ("synonym",), 0.2, 20, 0)["synonym"] for c in critics]
        return (float(np.mean([s["clean_acc"] for s in summaries])),
                float(np.mean([s["adv_acc"] for s in summaries])))

    plain = clean_and_attacked(federate_in_process(start, config, critics, settings))
    hardened = clean_and_attacked(federate_in_process(start, config, critics,
                                                      settings.replace(adv_weight=0.5, adv_space="synonyms")))
    assert hardened[1] >= plain[1] + 0.05 and hardened[0] >= plain[0] - 0.05, (plain, hardened)


def test_substitution_copies_are_seeded_fresh_per_epoch_and_swap_only_table_words():
    """server.copies: rate 0 leaves every text as it is; the same seed gives the same copies; the
    second epoch draws other copies than the first; a copy differs from its text only where the
    table holds the word, and only by one of that word's substitutes."""
    from models.robust.smoothing import PerturbationTable
    from server.copies import substitution_copies

    texts = ["a good film with a great cast", "the plot is dull and the acting bad", "x y z"]
    table = PerturbationTable({"good": ("fine", "nice"), "great": ("big",), "dull": ("boring",), "bad": ("poor",),
                               "film": ("movie",)})
    assert substitution_copies(texts, table, 0.0, 2, seed=0) == texts * 2
    copies = substitution_copies(texts, table, 0.75, 2, seed=0)
    assert copies == substitution_copies(texts, table, 0.75, 2, seed=0)
    assert copies[:3] != copies[3:] and copies[2] == copies[5] == "x y z"
    for text, copy in zip(texts * 2, copies):
        for word, swapped in zip(text.split(), copy.split()):
            assert swapped == word or swapped in table.get(word), (word, swapped)


def test_training_on_copies_writes_the_parents_package_with_new_weights_and_says_where_it_came_from(tmp_path):
    """`fedrex train-on-copies` on 256 SST-2 rows: the artifact loads, holds the parent's network
    and normaliser byte for byte, its device package is the parent's size, its weights moved, and
    its card names the parent's weight digests and the recipe; bad arguments are refused."""
    import json

    from models.artifact import load_artifact, read_config, resolve_artifact
    from server.copies import train_on_copies

    parent = resolve_artifact("sst2-student")
    out = tmp_path / "copies"
    card = train_on_copies("sst2-student", out, rate=0.75, epochs=1.0, rows=256, attack_samples=0, log=lambda _: None,
                           compact=True)
    model, config = load_artifact(out)
    parent_model, parent_config = load_artifact(parent)
    assert config["network"] == parent_config["network"]
    assert (out / "normalizer.txt.gz").read_bytes() == (parent / "normalizer.txt.gz").read_bytes()
    assert device_package(out)["int8_weights"] == device_package(parent)["int8_weights"]
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, parent_model.state_dict()[k])]
    assert moved, "no weight changed"
    assert json.loads((out / "card.json").read_text()) == card and not (tmp_path / "copies.partial").exists()
    assert card["parent"]["sha256"] == read_config(parent)["sha256"]
    assert card["recipe"]["rows"] == 256 and card["recipe"]["rate"] == 0.75 and card["recipe"]["train_split"] == "train"
    assert card["recipe"]["symmetric"] is True and card["recipe"]["compact"] is True
    assert 0.5 < card["evaluation"]["scores"]["trained"]["clean_acc"] <= 1 and card["evaluation"]["rows"] == 872
    with pytest.raises(FedrexError, match="already exists"):
        train_on_copies("sst2-student", out, rows=256, attack_samples=0, log=lambda _: None)
    for bad, match in (({"rate": 0.0}, "rate in"), ({"epochs": 1.5}, "whole number"), ({"rows": -5}, "rows >= 0"),
                       ({"rows": 8}, "less than one batch"), ({"source": "glove"}, "unknown perturbation source")):
        with pytest.raises(FedrexError, match=match):
            train_on_copies("sst2-student", tmp_path / "other", **{"rows": 256, **bad}, attack_samples=0,
                            log=lambda _: None)
    with pytest.raises(FedrexError, match="attack samples >= 0"):  # not "every row", as a negative limit reads
        train_on_copies("sst2-student", tmp_path / "other", rows=256, attack_samples=-1, log=lambda _: None)
    assert not (tmp_path / "other").exists()


def test_the_shipped_copies_start_is_the_shipped_students_child_and_answers_as_its_card_says(sst2):
    """models/artifacts/sst2-student-copies: made from today's shipped student (its card names the
    parent's weight digests), the same network and normaliser, a package within one megabyte, and
    the clean accuracy its card records, recomputed here on SST-2 dev through its normaliser
    (the evaluation split its parent was distilled with)."""
    import json

    from models.artifact import load_artifact, read_config, resolve_artifact

    parent, child = resolve_artifact("sst2-student"), resolve_artifact("sst2-student-copies")
    card = json.loads((child / "card.json").read_text())
    assert card["parent"]["sha256"] == read_config(parent)["sha256"]
    assert read_config(child)["network"] == read_config(parent)["network"]
    assert (child / "normalizer.txt.gz").read_bytes() == (parent / "normalizer.txt.gz").read_bytes()
    assert device_package(child)["total"] <= 1_000_000
    scores = card["evaluation"]["scores"]
    assert scores["trained"]["synonym"] > scores["parent"]["synonym"] + 0.05  # 0.265 against 0.135 when made
    model, _ = load_artifact(child)
    victim_tok = WordPieceTokenizer(64, normalizer=WordNormalizer.load(child))
    with torch.no_grad():
        predicted = model(torch.from_numpy(victim_tok.encode(sst2[1].texts))).argmax(1).numpy()
    assert float((predicted == sst2[1].labels).mean()) == pytest.approx(scores["trained"]["clean_acc"], abs=1e-12)
