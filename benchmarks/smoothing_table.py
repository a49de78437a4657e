"""What a smoothing table covers of the attack it should absorb: of PWWS's WordNet candidates for
the words of SST-2 dev (stopwords left out, as no recipe edits them), the share that are words of
the table (a candidate that is not passes every copy unchanged) and the share whose substitutes
list the word they replace; for the WordNet table built from SST-2 train's words, and for that
table closed under its relation (``PerturbationTable.symmetric``), and compact (closed over the
words the shipped normaliser knows: ``PerturbationTable.compact``; a candidate outside them is one
the normaliser rewrites); with each table's size as gzip'd lines (``models.robust.word_table``),
with xz for comparison, and for the compact table as the graph a device stores
(``to_graph_bytes``); for scale, the closed table in that form too (less the stopword substitutes
a graph cannot hold: every pair in it is a word of the table both ways): its pairs as a graph over the
normaliser's words and its own, plus the list of its words the normaliser does not hold, which a
device would need as well ("extra words KB", gzip'd). And what the normaliser does with the
candidates: the share it knows, and the share it does not know and passes unchanged (the model
reads them; a table without them never swaps them back). About a minute.

    python benchmarks/smoothing_table.py

Writes results/smoothing_table.{json,md}.
"""

from __future__ import annotations

import gzip
import lzma
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from models.attacks import STOPWORDS, Words, synonyms  # noqa: E402
from models.datasets import cached_text_dataset  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.artifact import resolve_artifact  # noqa: E402
from models.normalizer import WordNormalizer, word_counts  # noqa: E402
from models.robust.smoothing import PerturbationTable  # noqa: E402


def coverage(table: PerturbationTable, pairs: list[tuple[str, str]]) -> dict:
    """Of PWWS's (word, candidate) ``pairs``, the shares ``table`` covers."""
    return {"candidates": len(pairs),
            "candidate is a table word": sum(c in table.table for _, c in pairs) / len(pairs),
            "candidate lists the word it replaces": sum(w in table.get(c) for w, c in pairs) / len(pairs)}


def main() -> int:
    train, _ = cached_text_dataset("sst2", "train")
    dev, _ = cached_text_dataset("sst2", "validation")
    dev_words = {w.lower() for t in dev["text"] for w in Words.of(t).words} - STOPWORDS
    pairs = [(w, c.lower()) for w in sorted(dev_words) for c in synonyms(w)]  # PWWS's candidates
    built = PerturbationTable.build(sorted(word_counts(list(train["text"]))), "wordnet")
    normalizer = WordNormalizer.load(resolve_artifact("sst2-student"))
    known = normalizer.known_words()
    rows = []
    closed = built.symmetric()
    # the closed table as a graph: over the normaliser's words and every word of the table
    extra = sorted(set(closed.table) - set(known))
    wider = sorted(set(known) | set(extra))
    for name, table, graph, extra_kb in (
            ("WordNet table as built", built, None, None), ("closed (symmetric)", closed, None, None),
            ("compact (closed over the normaliser's words)", built.compact(known), known, None),
            ("closed less its stopword substitutes, as a graph over the normaliser's words and its own (for size)",
             built.compact(wider), wider,
             len(gzip.compress("\n".join(extra).encode(), 9, mtime=0)) / 1024)):
        blob = table.to_bytes()
        rows.append({"table": name, "words": len(table.table), **coverage(table, pairs), "gzip KB": len(blob) / 1024,
                     "xz KB": len(lzma.compress(gzip.decompress(blob), preset=9 | lzma.PRESET_EXTREME)) / 1024,
                     "graph KB": len(table.to_graph_bytes(graph)) / 1024 if graph is not None else None,
                     "extra words KB": extra_kb})
    candidates = [c for _, c in pairs]
    fate = {"candidates": len(candidates),
            "known to the normaliser": sum(normalizer.known(c) for c in candidates) / len(candidates),
            "unknown and passed unchanged": sum(not normalizer.known(c) and normalizer(c).lower() == c
                                                for c in candidates) / len(candidates)}
    atomic_write_json(ROOT / "results" / "smoothing_table.json", {"dataset": "sst2", "rows": rows, "normaliser": fate})
    frame = pd.DataFrame(rows)
    for column in ("candidate is a table word", "candidate lists the word it replaces"):
        frame[column] = frame[column].map("{:.3f}".format)
    for column in ("gzip KB", "xz KB", "graph KB", "extra words KB"):
        frame[column] = frame[column].map(lambda v: "–" if v != v or v is None else f"{v:.0f}")
    md = markdown_table(frame) + (
        f"\n\nOf the {fate['candidates']} candidates, {fate['known to the normaliser']:.3f} are words the shipped "
        f"normaliser knows, and {fate['unknown and passed unchanged']:.3f} are words it does not know and passes "
        "unchanged.")
    atomic_write_bytes(ROOT / "results" / "smoothing_table.md", (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
