"""A synonym encoding in front of the shipped student (issue #18's first defence, after Wang et
al.'s SEM): what it buys under the WordNet attacks and what it costs clean, on SST-2 dev (or on the
splits another student was distilled on: ``--artifact``, AG News's holdout for an AG News student).

    python benchmarks/synonym_encoding.py [--artifact sst2-student] [--epochs 2] [--seed 0]

Every row is the student (by default the packaged `sst2-student`) behind its word normaliser (the
defended device package, the reference), with one change: a synonym encoding
(models.robust.synonym_encoding) built from its training split's words and WordNet, SEM's greedy
walk or star clusters, in front of the model as it is, or with the model fine-tuned on encoded text
(`--epochs` over the training split, cross-entropy plus distillation of the untouched student's
answers on the same sentences, unencoded). The control row fine-tunes the same way on unencoded text, so that a gain can be told from the extra training.
Attacks: `synonym` (PWWS), `synonym-sim`, `embedding` (TextFooler-style, candidates from MiniLM's
embedding space: an attack the WordNet-built encoding was not built from) and `char` on the
compression benchmark's 200 dev sentences (seed 0, 20% word budget), querying normaliser +
encoding + model. Writes results/synonym_encoding.{json,md} (synonym_encoding_<artifact folder's
name>.* for another student, ..._seed<N>.* for another seed; rows so far in a .partial.json while
it runs); about 15 minutes on two cores for SST-2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from server.copies import answers, fine_tune  # noqa: E402
from models.artifact import load_artifact, resolve_artifact  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.attacks import Victim, synonyms  # noqa: E402
from models.encoded import EncodedData  # noqa: E402
from models.evaluation import robustness  # noqa: E402
from models.normalizer import WordNormalizer, ms_per_sentence, word_counts  # noqa: E402
from models.robust.synonym_encoding import SynonymEncoding  # noqa: E402
from models.tokenizer import WordPieceTokenizer  # noqa: E402

ATTACKS = ("synonym", "synonym-sim", "embedding", "char")


def measure(name: str, victim: Victim, data: EncodedData, attacks: tuple[str, ...], seed: int, extra: dict,
            tag: str = "sem") -> dict:
    """Clean accuracy on every row of ``data`` and accuracy under each attack on its seeded 200,
    all through ``victim`` (the model behind its tokenizer, or a defence answering for it)."""
    start = time.time()
    clean = float((victim.answer(data.texts).argmax(1) == data.labels).mean())
    found = robustness(victim.model, victim.tokenizer, data, attacks, 0.2, 200, seed, victim=victim)
    row = {"row": name, "clean_acc": clean, **{f"acc {a}": found[a]["adv_acc"] for a in attacks}, **extra}
    print(f"[{tag}] {name}: clean {clean:.3f} " + " ".join(f"{a} {found[a]['adv_acc']:.3f}" for a in attacks)
          + f" ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
    return row


def defence_arguments(doc: str, only: bool = False, artifact: bool = False) -> argparse.Namespace:
    """What a benchmark of a defence in front of the shipped student takes: --epochs of its
    fine-tuning, --seed, --out (with ``only``, --only: the rows to measure again; with
    ``artifact``, --artifact: the student to defend instead of the shipped one)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results"))
    if artifact:
        parser.add_argument("--artifact", default="sst2-student", help="the student behind its normaliser: a "
                            "packaged name or an artifact folder (rows on the splits it was distilled on)")
    if only:
        parser.add_argument("--only", default="", help="measure only the rows whose names contain one of these "
                            "|-separated texts (row names hold commas) and keep the others' stored numbers (their epochs and seed must "
                            "be the ones asked for)")
    return parser.parse_args()


REFERENCE = "student + normaliser (the shipped package, reference)"


def reference_row(artifact: str) -> str:
    """The reference row's name: the shipped package, or the student ``--artifact`` names."""
    return REFERENCE if artifact == "sst2-student" else f"{Path(artifact).name} + normaliser (reference)"


def results_stem(benchmark: str, artifact: str, seed: int) -> str:
    """A defence benchmark's results file name: one per student (the shipped one unnamed) and seed."""
    return (benchmark + ("" if artifact == "sst2-student" else f"_{Path(artifact).name}")
            + (f"_seed{seed}" if seed else ""))


def main() -> int:
    from server.copies import artifact_splits
    from server.distill import load_splits

    args = defence_arguments(__doc__, artifact=True)
    torch.set_num_threads(2)
    folder = resolve_artifact(args.artifact)
    model, config = load_artifact(folder)
    model.eval()
    normalizer = WordNormalizer.load(folder)
    train, dev, _ = load_splits(artifact_splits(folder))
    texts, labels = list(train["text"]), np.asarray(train["label"])
    dev_texts, dev_labels = list(dev["text"]), np.asarray(dev["label"])
    counts = word_counts(texts)
    dev_words = sorted(word_counts(dev_texts))
    pairs = [(w, s.lower()) for w in dev_words for s in synonyms(w) if s.isalpha()]

    plain = WordPieceTokenizer(config["max_length"], normalizer=normalizer)
    targets = answers(model, plain, texts)  # the untouched student's answers on unencoded text: KD targets
    out = Path(args.out)
    stem = results_stem("synonym_encoding", args.artifact, args.seed)

    def save(final: bool = False) -> None:
        """After every row into a partial file (an interrupted run keeps what it measured without
        replacing the last complete results), into the results at the end."""
        name = f"{stem}.json" if final else f"{stem}.partial.json"
        atomic_write_json(out / name, {"artifact": args.artifact, "dataset": config.get("dataset"),
                                       "epochs": args.epochs, "seed": args.seed, "pairs": len(pairs), "rows": rows})
        if final:
            (out / f"{stem}.partial.json").unlink(missing_ok=True)

    def measured(name: str, model, tokenizer, facts: dict) -> dict:
        data = EncodedData.from_texts(dev_texts, dev_labels, tokenizer)
        return measure(name, Victim(model, tokenizer), data, ATTACKS, args.seed, facts)

    rows = [measured(reference_row(args.artifact), model, plain, {})]
    save()
    tuned = fine_tune(model, plain, texts, labels, targets, args.epochs, args.seed)
    rows.append(measured(f"control: fine-tuned {args.epochs:g} epochs on unencoded text", tuned, plain, {}))
    save()
    for kind, star in (("SEM greedy walk", False), ("star clusters", True)):
        encoding = SynonymEncoding.build(counts, synonyms, star=star)
        sizes = pd.Series(list(encoding.code.values())).value_counts()
        facts = {"table KB": len(encoding.to_bytes()) / 1024, "coverage of dev words' WordNet pairs":
                 encoding.coverage(pairs), "largest cluster": int(sizes.max()) + 1,
                 "ms/sentence": ms_per_sentence(encoding, dev_texts)}
        tokenizer = WordPieceTokenizer(config["max_length"], normalizer=lambda t, e=encoding: e(normalizer(t)))
        rows.append(measured(f"+ {kind}, model as shipped", model, tokenizer, facts))
        save()
        tuned = fine_tune(model, tokenizer, texts, labels, targets, args.epochs, args.seed)
        rows.append(measured(f"+ {kind}, fine-tuned {args.epochs:g} epochs on encoded text", tuned, tokenizer, facts))
        save()
    save(final=True)
    md = table(rows)
    atomic_write_bytes(out / f"{stem}.md", (md + "\n").encode())
    print(md)
    return 0


FORMATS = {"table KB": "{:.0f}", "largest cluster": "{:.0f}"}  # every other number: 3 decimals


COLUMNS = ["row", "clean_acc", *(f"acc {a}" for a in ATTACKS), "table KB", "coverage of dev words' WordNet pairs",
           "largest cluster", "ms/sentence"]


def table(rows: list[dict], columns: list[str] = COLUMNS, formats: dict = FORMATS) -> str:
    """``rows`` as a markdown table of ``columns``, numbers as ``formats`` says (else 3 decimals)."""
    frame = pd.DataFrame(rows).reindex(columns=columns)
    for column in columns[1:]:
        form = formats.get(column, "{:.3f}")
        frame[column] = ["–" if v != v else form.format(v) for v in frame[column]]
    return markdown_table(frame)


if __name__ == "__main__":
    sys.exit(main())
