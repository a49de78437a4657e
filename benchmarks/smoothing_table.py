"""What a smoothing table covers of the attack it should absorb: of PWWS's WordNet candidates for
the words of SST-2 dev (stopwords left out, as no recipe edits them), the share that are words of
the table (a candidate that is not passes every copy unchanged) and the share whose substitutes
list the word they replace; for the WordNet table built from SST-2 train's words, and for that
table closed under its relation (``PerturbationTable.symmetric``); with each table's size, gzip'd
(the device file, ``models.robust.word_table``) and with xz for comparison. About a minute.

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
from models.normalizer import word_counts  # noqa: E402
from models.robust.smoothing import PerturbationTable  # noqa: E402


def coverage(table: PerturbationTable, dev_words: set[str]) -> dict:
    pairs = [(w, c.lower()) for w in sorted(dev_words) for c in synonyms(w)]
    return {"candidates": len(pairs),
            "candidate is a table word": sum(c in table.table for _, c in pairs) / len(pairs),
            "candidate lists the word it replaces": sum(w in table.get(c) for w, c in pairs) / len(pairs)}


def main() -> int:
    train, _ = cached_text_dataset("sst2", "train")
    dev, _ = cached_text_dataset("sst2", "validation")
    dev_words = {w.lower() for t in dev["text"] for w in Words.of(t).words} - STOPWORDS
    built = PerturbationTable.build(sorted(word_counts(list(train["text"]))), "wordnet")
    rows = []
    for name, table in (("WordNet table as built", built), ("closed (symmetric)", built.symmetric())):
        blob = table.to_bytes()
        rows.append({"table": name, "words": len(table.table), **coverage(table, dev_words), "gzip KB": len(blob) / 1024,
                     "xz KB": len(lzma.compress(gzip.decompress(blob), preset=9 | lzma.PRESET_EXTREME)) / 1024})
    atomic_write_json(ROOT / "results" / "smoothing_table.json", {"dataset": "sst2", "rows": rows})
    frame = pd.DataFrame(rows)
    for column in ("candidate is a table word", "candidate lists the word it replaces"):
        frame[column] = frame[column].map("{:.3f}".format)
    for column in ("gzip KB", "xz KB"):
        frame[column] = frame[column].map("{:.0f}".format)
    md = markdown_table(frame)
    atomic_write_bytes(ROOT / "results" / "smoothing_table.md", (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
