"""The smoothed classifier as a device would hold and run it (issue #18's third item): what its
package weighs, what a sentence costs on one thread, and whether its exports answer as the model
the attacks measured.

    python benchmarks/smoothing_device.py [--artifact sst2-student-copies] [--source wordnet] [--rate 0.75]
                                          [--symmetric | --compact] [--votes 16] [--seed 0]

Make the student first: ``fedrex train-on-copies --out FOLDER --compact --attack-samples 0`` (or
``--symmetric``, the closed table), then ``--artifact FOLDER`` (the recipe on its card says which
table it was trained on; another setting is refused).

The package: the artifact's device package (config, int8 weights, the gzip'd WordPiece vocabulary,
the normaliser) plus the perturbation table (``models.robust.smoothing``, built from the words of
the artifact's training split as ``fedrex train-on-copies`` builds it) in the form a device stores:
a compact table (``PerturbationTable.compact``) as the graph of its word pairs over the
normaliser's words (``to_graph_bytes``); a closed one as built (``models.robust.word_table``),
which the device closes when it loads it (``PerturbationTable.symmetric``), half the bytes of the
closed table. Reading it back is timed and must give the table the student was trained on.
Latency: one thread, one sentence at a time, median and p90 of 100 evaluation sentences (SST-2 dev
for an SST-2 student) after a warm-up: the ``votes`` copies drawn, normalised and tokenised
(Python), then the model on the batch of copies in deployable form (``models.export.deployable``:
TorchScript of the int8 weights, frozen), and ONNX Runtime on the int8 ONNX export (one intra-op
thread) on the same copies; the unsmoothed model at batch 1 for scale; three passes, the median
of each and of the three. Agreement: the smoothed answers on every evaluation sentence of the
float weights (what ``benchmarks/smoothing.py`` attacks), the TorchScript int8 module and the ONNX
int8 export, with each one's accuracy.
Writes results/smoothing_device.{json,md} (smoothing_device_compact.* for a compact table,
..._votes<N>.* for another number of votes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# one thread means the tokenizer's too: its batch encoding otherwise starts a thread pool
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.artifact import device_package, load_artifact, resolve_artifact  # noqa: E402
from models.export import deployable, export_onnx_int8  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.normalizer import WordNormalizer, word_counts  # noqa: E402
from models.robust.smoothing import PerturbationTable, SmoothedVictim  # noqa: E402
from models.tokenizer import WordPieceTokenizer  # noqa: E402
from server.copies import artifact_splits  # noqa: E402
from server.distill import load_splits  # noqa: E402
from synonym_encoding import table as markdown_rows  # noqa: E402


class OnnxModel:
    """An int8 ONNX export behind the call a ``Victim`` makes of a torch model (ids -> logits)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def eval(self):
        return self

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"ids": ids.numpy().astype(np.int64)})[0])


def timed(victim: SmoothedVictim, texts: list[str], passes: int = 3, warmup: int = 5) -> dict:
    """Per sentence on one thread: the copies to padded ids (Python), the model on them, the whole;
    the median of each pass over ``texts``, and the median of the passes (this machine's timings
    move by half from one run to the next)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    by_pass = []
    try:
        with torch.no_grad():
            for _ in range(passes):
                prepare, run, whole = [], [], []
                for i, text in enumerate(texts[:warmup] + texts):
                    start = time.perf_counter()
                    ids = torch.from_numpy(victim.tokenizer.encode(victim.copies(text)))
                    middle = time.perf_counter()
                    torch.softmax(victim.model(ids), -1).mean(0)
                    end = time.perf_counter()
                    if i >= warmup:
                        prepare.append(1000 * (middle - start))
                        run.append(1000 * (end - middle))
                        whole.append(1000 * (end - start))
                by_pass.append({"copies ms": statistics.median(prepare), "model ms": statistics.median(run),
                                "ms/sentence": statistics.median(whole), "p90 ms": float(np.percentile(whole, 90))})
    finally:
        torch.set_num_threads(threads)
    return {**{k: statistics.median(p[k] for p in by_pass) for k in by_pass[0]},
            "ms/sentence by pass": [p["ms/sentence"] for p in by_pass]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default="sst2-student-copies")
    parser.add_argument("--source", help="the table's source (default: the artifact's recipe, else wordnet)")
    parser.add_argument("--rate", type=float, help="swap rate (default: the artifact's recipe, else 0.75)")
    parser.add_argument("--symmetric", action="store_true", default=None,
                        help="close the table (default: as the artifact's recipe says)")
    parser.add_argument("--compact", action="store_true", default=None,
                        help="the compact table, shipped as a graph over the normaliser's words (default: as "
                             "the artifact's recipe says)")
    parser.add_argument("--votes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = resolve_artifact(args.artifact)
    card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").exists() else {}
    recipe = card.get("recipe") or {}
    # the smoothing the student was trained for: a setting that differs from its recipe is refused
    for name, default in (("source", "wordnet"), ("rate", 0.75), ("symmetric", False), ("compact", False)):
        trained = recipe.get(name, False if name in ("symmetric", "compact") and recipe else None)
        if getattr(args, name) is not None and trained is not None and getattr(args, name) != trained:
            raise SystemExit(f"--{name} {getattr(args, name)} but {args.artifact} was trained on copies with {name} "
                             f"{trained}: measure the smoothing it was trained for")
        setattr(args, name, getattr(args, name) if getattr(args, name) is not None else
                trained if trained is not None else default)
    args.symmetric = args.symmetric or args.compact  # a compact table is closed
    float_model, config = load_artifact(folder)
    normalizer = WordNormalizer.load(folder)
    tokenizer = WordPieceTokenizer(config["max_length"], normalizer=normalizer)
    train, dev, _ = load_splits(artifact_splits(folder))
    # the words the student's copies were drawn from: the rows train-on-copies trained on
    words = sorted(word_counts(list(train["text"])[:recipe.get("rows") or len(train)]))
    built = PerturbationTable.build(words, args.source)
    known = normalizer.known_words() if args.compact else None
    trained_on = built.shaped(args.symmetric, known)
    # the device holds a compact table as a graph over its normaliser's words; a closed one as built,
    # closing it when it loads it (half the bytes of the closed table)
    blob = trained_on.to_graph_bytes(known) if args.compact else built.to_bytes()
    loads = []
    for _ in range(5):
        start = time.perf_counter()
        if args.compact:  # the device lists its normaliser's words when it loads the graph: timed too
            table = PerturbationTable.from_graph_bytes(blob, normalizer.known_words())
        else:
            table = PerturbationTable.from_bytes(blob)
            table = table.symmetric() if args.symmetric else table
        loads.append(1000 * (time.perf_counter() - start))
    if table.table != trained_on.table:
        raise SystemExit("the table read from its file is not the table the student was trained on: a bug")
    table_bytes = len(blob)
    package = device_package(folder)
    texts, labels = list(dev["text"]), np.asarray(dev["label"])
    int8_model, _ = load_artifact(folder, int8=True)
    example = torch.from_numpy(tokenizer.encode(texts[:4]))
    scripted, form = deployable(int8_model, example)
    models = {"float weights": float_model.eval(), f"int8 weights, {form}": scripted}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx_int8(int8_model, Path(tmp) / "model.int8.onnx", example)
        onnx_bytes = onnx_path.stat().st_size
        models["int8 ONNX, ONNX Runtime"] = OnnxModel(onnx_path)
        victims = {name: SmoothedVictim(m, tokenizer, table, args.votes, args.rate, seed=args.seed)
                   for name, m in models.items()}
        answers = {name: v.answer(texts).argmax(1) for name, v in victims.items()}
        reference = answers["float weights"]
        rows = []
        for name, victim in victims.items():
            row = {"model": name, "clean_acc": float((answers[name] == labels).mean()),
                   "agreement with the float weights": float((answers[name] == reference).mean())}
            if name != "float weights":
                row.update(timed(victim, texts[:100]))
            rows.append(row)
        plain = SmoothedVictim(scripted, tokenizer, table, 1, 0.0, seed=args.seed)  # one unperturbed copy
        rows.append({"model": f"unsmoothed, int8 weights, {form} (batch 1, for scale)",
                     "clean_acc": float((plain.answer(texts).argmax(1) == labels).mean()), **timed(plain, texts[:100])})
    result = {"artifact": args.artifact, "artifact recipe": card.get("recipe"), "source": args.source,
              "symmetric": args.symmetric, "compact": args.compact, "rate": args.rate,
              "votes": args.votes, "seed": args.seed, "table words": len(table.table), "table bytes": table_bytes,
              ("compact table as lines bytes" if args.compact else "closed table bytes"): len(table.to_bytes()),
              "table load ms": statistics.median(loads),
              "package": {**package, "smoothing table": table_bytes, "total": package["total"] + table_bytes},
              "onnx int8 bytes": onnx_bytes, "rows": rows, "threads": 1}
    out = Path(args.out)
    stem = ("smoothing_device" + ("_compact" if args.compact else "")
            + (f"_votes{args.votes}" if args.votes != 16 else ""))
    atomic_write_json(out / f"{stem}.json", result)
    columns = ["model", "clean_acc", "agreement with the float weights", "copies ms", "model ms", "ms/sentence",
               "ms/sentence by pass", "p90 ms"]
    passes = [{**r, "ms/sentence by pass": " / ".join(f"{v:.2f}" for v in r["ms/sentence by pass"])}
              if "ms/sentence by pass" in r else r for r in rows]
    md = markdown_rows(passes, columns, {**{c: "{:.2f}" for c in columns[3:]}, "ms/sentence by pass": "{}"})
    sizes = ", ".join(f"{k} {v / 1024:.0f} KB" for k, v in result["package"].items())
    md += (f"\n\nPackage ({args.artifact}, {args.source} table of {len(built.table)} words"
           + (f", compact: {len(table.table)} words as a graph over the normaliser's {len(known)}, "
              f"read in {result['table load ms']:.0f} ms" if args.compact else
              f", closed on loading to {len(table.table)} words in {result['table load ms']:.0f} ms (closed on "
              f"disk it would take {result['closed table bytes'] / 1024:.0f} KB)" if args.symmetric else "")
           + f"): {sizes}; {args.votes} votes at rate {args.rate}.\n")
    atomic_write_bytes(out / f"{stem}.md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
