"""Randomized smoothing over word substitutions in front of the shipped student (issue #18's second
defence, after SAFER): what it buys under the substitution attacks, what it costs clean and on a
device, on SST-2 dev.

    python benchmarks/smoothing.py [--epochs 2] [--seed 0]

Every row is the packaged `sst2-student` behind its word normaliser (the defended device package,
the reference) with one change: the smoothed classifier of ``models.robust.smoothing`` in front of
it (16 copies per sentence, each word of the table swapped with probability ``rate`` for one of
its substitutes), its table built from SST-2 train's words with WordNet's synonyms, MiniLM's
embedding neighbours or both; and SAFER's own training: the student fine-tuned (``--epochs`` over SST-2
train, cross-entropy plus distillation of the untouched student's answers, as
``benchmarks/synonym_encoding.py`` fine-tunes) on a fresh perturbed copy of every sentence each
epoch, then smoothed the same way (and once without the smoothing, to tell what the training buys
alone). Attacks: `synonym` (PWWS), `embedding` (TextFooler-style, the
attack a WordNet table was not built from) and `char`, on the compression benchmark's 200 dev
sentences (seed 0, 20% word budget), querying the smoothed classifier (normaliser + copies + model;
one query per sentence whatever its votes cost). "ms/sentence": one thread, batch 1 (one batch of
the 16 copies), median of 100 dev sentences, float model; "package KB": the shipped device package
(int8 weights, vocabulary, normaliser) plus the gzip'd table. Writes results/smoothing.{json,md}
(rows so far in smoothing.partial.json while it runs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.artifact import device_package  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.attacks import Victim  # noqa: E402
from models.datasets import cached_text_dataset  # noqa: E402
from models.encoded import EncodedData  # noqa: E402
from models.normalizer import WordNormalizer, word_counts  # noqa: E402
from models.robust.smoothing import PerturbationTable, SmoothedVictim  # noqa: E402
from models.tokenizer import WordPieceTokenizer  # noqa: E402
from server.copies import answers, train_on_substitution_copies  # noqa: E402
from synonym_encoding import defence_arguments, measure, shipped_student, table  # noqa: E402

ATTACKS = ("synonym", "embedding", "char")
VOTES = 16
# (row, table source, rate, whether the model is SAFER-trained on copies at that rate, whether the
# smoothed classifier answers: the row without it tells what the training buys alone)
ROWS = [("smoothing, WordNet table, rate 0.25", "wordnet", 0.25, False, True),
        ("smoothing, WordNet table, rate 0.5", "wordnet", 0.5, False, True),
        ("smoothing, embedding table, rate 0.5", "embedding", 0.5, False, True),
        ("smoothing, WordNet table, rate 0.5, trained on copies at 0.5", "wordnet", 0.5, True, True),
        ("smoothing, WordNet table, rate 0.75, trained on copies at 0.75", "wordnet", 0.75, True, True),
        ("no smoothing, trained on WordNet copies at 0.75 (the training alone)", "wordnet", 0.75, True, False),
        ("smoothing, embedding table, rate 0.75, trained on copies at 0.75", "embedding", 0.75, True, True),
        ("smoothing, WordNet + embedding table, rate 0.75, trained on copies at 0.75", "wordnet+embedding", 0.75,
         True, True)]


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
    args = defence_arguments(__doc__)
    folder, model = shipped_student()
    package_kb = device_package(folder)["total"] / 1024
    tokenizer = WordPieceTokenizer(64, normalizer=WordNormalizer.load(folder))
    train, _ = cached_text_dataset("sst2", "train")
    dev, _ = cached_text_dataset("sst2", "validation")
    texts, labels = list(train["text"]), np.asarray(train["label"])
    data = EncodedData.from_texts(list(dev["text"]), np.asarray(dev["label"]), tokenizer)
    vocabulary = sorted(word_counts(texts))
    targets = answers(model, tokenizer, texts)  # the untouched student's answers on unperturbed text: KD targets
    out = Path(args.out)
    rows: list[dict] = []

    def save(final: bool = False) -> None:
        name = "smoothing.json" if final else "smoothing.partial.json"
        atomic_write_json(out / name, {"epochs": args.epochs, "seed": args.seed, "votes": VOTES, "rows": rows})
        if final:
            (out / "smoothing.partial.json").unlink(missing_ok=True)

    rows.append(measure_with_cost("student + normaliser (the shipped package, reference)", Victim(model, tokenizer), data,
                        args.seed, {"package KB": package_kb}))
    save()
    tables, tuned = {}, {}  # by source; trained models by (source, rate)
    for name, source, rate, trained, smoothed in ROWS:
        if source not in tables:
            tables[source] = PerturbationTable.build(vocabulary, source)
        perturbation = tables[source]
        if trained and (source, rate) not in tuned:  # a fresh copy of every sentence each epoch, one shuffled pass
            tuned[source, rate] = train_on_substitution_copies(model, tokenizer, texts, labels, targets, perturbation,
                                                               rate, args.epochs, args.seed)
        served = tuned[source, rate] if trained else model
        if smoothed:
            victim = SmoothedVictim(served, tokenizer, perturbation, VOTES, rate, seed=args.seed)
            table_kb = len(perturbation.to_bytes()) / 1024
            facts = {"table words": len(perturbation.table), "table KB": table_kb, "package KB": package_kb + table_kb}
        else:
            victim, facts = Victim(served, tokenizer), {"package KB": package_kb}
        rows.append(measure_with_cost(name, victim, data, args.seed, facts))
        save()
    save(final=True)
    md = table(rows, COLUMNS, FORMATS)
    atomic_write_bytes(out / "smoothing.md", (md + "\n").encode())
    print(md)
    return 0


COLUMNS = ["row", "clean_acc", *(f"acc {a}" for a in ATTACKS), "ms/sentence", "table words", "table KB", "package KB"]
FORMATS = {"ms/sentence": "{:.2f}", "table words": "{:.0f}", "table KB": "{:.0f}", "package KB": "{:.0f}"}


if __name__ == "__main__":
    sys.exit(main())
