"""Randomized smoothing over word substitutions in front of a student behind its normaliser (issue
#18's second defence, after SAFER): what it buys under the substitution attacks, what it costs
clean and on a device; SST-2 dev with the shipped student, or the splits any other student was
distilled on (``--artifact``: AG News's holdout with an AG News student).

    python benchmarks/smoothing.py [--artifact sst2-student] [--epochs 2] [--seed 0] [--only "symmetric|rate 0.25"]

Every row is the student (by default the packaged `sst2-student`) behind its word normaliser (the
defended device package, the reference) with one change: the smoothed classifier of
``models.robust.smoothing`` in front of it (16 copies per sentence unless a row says, each word of
the table swapped with probability ``rate`` for one of its substitutes), its table built from the
training split's words with WordNet's synonyms, MiniLM's embedding neighbours or both (and closed
under its relation: ``PerturbationTable.symmetric``, so that an attack's candidate is a word of
the table whose substitutes hold the word it replaced; or closed over the normaliser's words only,
``PerturbationTable.compact``, which fits a 1 MB device package and holds a third fewer of PWWS's
candidates); and SAFER's own training: the student fine-tuned (``--epochs`` over the training
split, cross-entropy plus distillation of the untouched student's answers, as
``benchmarks/synonym_encoding.py`` fine-tunes) on a fresh perturbed copy of
every sentence each epoch, then smoothed the same way (and once without the smoothing, to tell what
the training buys alone). Attacks: `synonym` (PWWS), `embedding` (TextFooler-style, the attack a
WordNet table was not built from) and `char`, on the compression benchmark's 200 evaluation
sentences (seeded, 20% word budget), querying the smoothed classifier (normaliser + copies +
model; one query per sentence whatever its votes cost). "ms/sentence": one thread, batch 1 (one
batch of the copies), median of 100 evaluation sentences, float model (the device's own form:
``benchmarks/smoothing_device.py``); "package KB": the student's device package (int8 weights,
vocabulary, normaliser) plus the table the row draws from as gzip'd lines, or for a compact table
the graph over the normaliser's words the device stores (the device benchmark ships a closed table
as built, in about half the bytes of its closed lines). Writes results/smoothing.{json,md}
(smoothing_<artifact folder's name>.* for another student, ..._seed<N>.* for another seed; rows so
far in a .partial.json while it runs);
``--only`` measures the rows it names (and the reference where none is stored) and keeps the
stored numbers of the others.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.artifact import device_package, load_artifact, resolve_artifact  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.attacks import Victim  # noqa: E402
from models.encoded import EncodedData  # noqa: E402
from models.normalizer import WordNormalizer, word_counts  # noqa: E402
from models.robust.smoothing import SmoothedVictim, smoothing_table  # noqa: E402
from models.tokenizer import WordPieceTokenizer  # noqa: E402
from server.copies import answers, artifact_splits, train_on_substitution_copies  # noqa: E402
from server.distill import load_splits  # noqa: E402
from synonym_encoding import defence_arguments, measure, reference_row, results_stem, table  # noqa: E402

ATTACKS = ("synonym", "embedding", "char")
VOTES = 16
class Row(NamedTuple):
    """One change to the shipped package: the table's source, whether the table is closed under its
    relation (``PerturbationTable.symmetric``), the swap rate, whether the model is SAFER-trained on
    copies at that rate, whether the smoothed classifier answers (the row without it tells what the
    training buys alone), over how many copies, and whether the closed table is ``compact`` (only
    words the normaliser knows, substitutes in alphabetical order: the form that fits 1 MB)."""

    name: str
    source: str
    rate: float
    trained: bool
    smoothed: bool = True
    symmetric: bool = False
    votes: int = VOTES
    compact: bool = False


ROWS = [Row("smoothing, WordNet table, rate 0.25", "wordnet", 0.25, False),
        Row("smoothing, WordNet table, rate 0.5", "wordnet", 0.5, False),
        Row("smoothing, embedding table, rate 0.5", "embedding", 0.5, False),
        Row("smoothing, WordNet table, rate 0.5, trained on copies at 0.5", "wordnet", 0.5, True),
        Row("smoothing, WordNet table, rate 0.75, trained on copies at 0.75", "wordnet", 0.75, True),
        Row("no smoothing, trained on WordNet copies at 0.75 (the training alone)", "wordnet", 0.75, True, False),
        Row("smoothing, embedding table, rate 0.75, trained on copies at 0.75", "embedding", 0.75, True),
        Row("smoothing, WordNet + embedding table, rate 0.75, trained on copies at 0.75", "wordnet+embedding", 0.75, True),
        Row("smoothing, symmetric WordNet table, rate 0.75, trained on copies at 0.75", "wordnet", 0.75, True,
            symmetric=True),
        Row("no smoothing, trained on symmetric WordNet copies at 0.75 (the training alone)", "wordnet", 0.75, True,
            False, symmetric=True),
        Row("smoothing, symmetric WordNet table, rate 0.75 (the smoothing alone)", "wordnet", 0.75, False,
            symmetric=True),
        Row("smoothing, symmetric WordNet table, rate 0.75, trained on copies at 0.75, 8 votes", "wordnet", 0.75, True,
            symmetric=True, votes=8),
        Row("smoothing, symmetric WordNet + embedding table, rate 0.75, trained on copies at 0.75", "wordnet+embedding",
            0.75, True, symmetric=True),
        # the closed table over the normaliser's words only: a table that fits a 1 MB device package
        Row("smoothing, compact WordNet table, rate 0.75, trained on copies at 0.75", "wordnet", 0.75, True,
            symmetric=True, compact=True),
        Row("smoothing, compact WordNet table, rate 0.75, trained on copies at 0.75, 8 votes", "wordnet", 0.75, True,
            symmetric=True, votes=8, compact=True),
        Row("no smoothing, trained on compact WordNet copies at 0.75 (the training alone)", "wordnet", 0.75, True,
            False, symmetric=True, compact=True)]
# settings rows gained after rows were stored, with the value those rows ran with
ROW_FIELDS_ADDED = {"compact": False}
def settings_of(name: str) -> dict | None:
    """What a row of ``ROWS`` changes, as stored with its numbers (None for the reference)."""
    return next(({k: v for k, v in row._asdict().items() if k != "name"} for row in ROWS if row.name == name), None)


def ms_per_sentence(victim: Victim, texts: list[str]) -> float:
    """One thread, batch 1: the median of 100 sentences after a warm-up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        victim.answer(texts[:5])
        times = []
        for text in texts[:100]:
            start = time.perf_counter()
            victim.answer([text])
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times))
    finally:
        torch.set_num_threads(threads)


def measure_with_cost(name: str, victim: Victim, data: EncodedData, seed: int, extra: dict) -> dict:
    return measure(name, victim, data, ATTACKS, seed, {"ms/sentence": ms_per_sentence(victim, data.texts), **extra},
                   tag="smoothing")


def main() -> int:
    args = defence_arguments(__doc__, only=True, artifact=True)
    torch.set_num_threads(2)
    folder = resolve_artifact(args.artifact)
    model, config = load_artifact(folder)
    package_kb = device_package(folder)["total"] / 1024
    tokenizer = WordPieceTokenizer(config["max_length"], normalizer=WordNormalizer.load(folder))
    splits = artifact_splits(folder)
    train, dev, _ = load_splits(splits)
    texts, labels = list(train["text"]), np.asarray(train["label"])
    data = EncodedData.from_texts(list(dev["text"]), np.asarray(dev["label"]), tokenizer)
    vocabulary = sorted(word_counts(texts))
    targets = answers(model, tokenizer, texts)  # the untouched student's answers on unperturbed text: KD targets
    out = Path(args.out)
    # a file per student and seed: rows of different students never share one
    stem = results_stem("smoothing", args.artifact, args.seed)
    wanted = [w for w in args.only.split("|") if w]  # row names hold commas
    reference = reference_row(args.artifact)
    unknown = [w for w in wanted if not any(w in r.name for r in ROWS) and w not in reference]
    if unknown:
        raise SystemExit(f"--only {unknown} names no row; rows: {[r.name for r in ROWS]}")
    stored, stale, have_file = {}, set(), (out / f"{stem}.json").exists()
    if wanted and have_file:  # the rows not asked for keep their stored numbers
        kept = json.loads((out / f"{stem}.json").read_text())
        made = (kept["epochs"], kept["seed"], kept["votes"], kept.get("artifact", "sst2-student"),
                kept.get("dataset", "sst2"))
        if made != (args.epochs, args.seed, VOTES, args.artifact, splits.dataset):
            raise SystemExit(f"{out / stem}.json was measured with (epochs, seed, votes, artifact, dataset) {made}: "
                             "run every row (no --only) to change them")
        # a row is kept only as its settings stand today (rows stored before settings were recorded: as they ran)
        stored = {r["row"]: r for r in kept["rows"]
                  if r.get("settings") is None or {**ROW_FIELDS_ADDED, **r["settings"]} == settings_of(r["row"])}
        stale = {r["row"] for r in kept["rows"]} - set(stored)
    rows: list[dict] = []

    def save(final: bool = False) -> None:
        name = f"{stem}.json" if final else f"{stem}.partial.json"
        atomic_write_json(out / name, {"artifact": args.artifact, "dataset": splits.dataset, "epochs": args.epochs,
                                       "seed": args.seed, "votes": VOTES, "rows": rows})
        if final:
            (out / f"{stem}.partial.json").unlink(missing_ok=True)

    def asked(name: str) -> bool:
        return not wanted or any(w in name for w in wanted)

    if asked(reference) or reference not in stored:
        rows.append(measure_with_cost(reference, Victim(model, tokenizer), data, args.seed, {"package KB": package_kb}))
    else:
        rows.append(stored[reference])
    save()
    tables, tuned = {}, {}  # by (source, symmetric, compact); trained models by those and the rate
    known = tokenizer.normalizer.known_words()
    for name, source, rate, trained, smoothed, symmetric, votes, compact in ROWS:
        # a row not asked for is kept as stored, measured again if stored under other settings, and
        # left out if the file never held it (a file for another student may hold a few rows only)
        if not asked(name) and name not in stale:
            rows.extend([stored[name]] if name in stored else [])
            continue
        form = (source, symmetric, compact)
        if form not in tables:
            tables[form] = smoothing_table(vocabulary, source, symmetric, known if compact else None)
        perturbation = tables[form]
        if trained and (*form, rate) not in tuned:  # a fresh copy of every sentence each epoch
            tuned[(*form, rate)] = train_on_substitution_copies(model, tokenizer, texts, labels, targets, perturbation,
                                                              rate, args.epochs, args.seed)
        served = tuned[(*form, rate)] if trained else model
        if smoothed:
            victim = SmoothedVictim(served, tokenizer, perturbation, votes, rate, seed=args.seed)
            # what the device stores: the compact graph over the normaliser's words, else the table's lines
            table_kb = len(perturbation.to_graph_bytes(known) if compact else perturbation.to_bytes()) / 1024
            facts = {"votes": votes, "table words": len(perturbation.table), "table KB": table_kb,
                     "package KB": package_kb + table_kb}
        else:
            victim, facts = Victim(served, tokenizer), {"package KB": package_kb}
        rows.append(measure_with_cost(name, victim, data, args.seed, {**facts, "settings": settings_of(name)}))
        save()
    save(final=True)
    md = table(rows, COLUMNS, FORMATS)
    atomic_write_bytes(out / f"{stem}.md", (md + "\n").encode())
    print(md)
    return 0


COLUMNS = ["row", "clean_acc", *(f"acc {a}" for a in ATTACKS), "ms/sentence", "table words", "table KB", "package KB"]
FORMATS = {"ms/sentence": "{:.2f}", "table words": "{:.0f}", "table KB": "{:.0f}", "package KB": "{:.0f}"}


if __name__ == "__main__":
    sys.exit(main())
