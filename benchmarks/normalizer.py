"""The word normaliser's versions in front of the shipped student, under the black-box attacks.

    python benchmarks/normalizer.py [--datasets sst2,rt_critics,sent140_users] [--attacks char,synonym]
                                    [--user-attacks char]

The start model every client gets (models/artifacts/sst2-student) behind no normaliser, behind
version 1 (the word list alone, most frequent correction: the file shipped before) and behind
version 2 (``models.normalizer``: context, the tokenizer's words, hyphenated and two-letter
words), on the rows the other benchmarks attack: SST-2 dev (the artifact card's 200 attacked rows
of the full dev set, as ``fedrex distill`` measures them) and every held-out row of the
federation's users (rt_critics; sent140_users with >= 10 tweets), split as every client splits
them. Also what each successful DeepWordBug attack's edits became behind the normaliser: undone,
a typo that is itself a known word, a typo passed through unchanged, or corrected to another word.
Users' rows get ``--user-attacks`` (DeepWordBug: PWWS on every critic's held-out row costs about
20 minutes per normaliser here, and no spelling normaliser undoes a synonym; the personalization
benchmark attacks the same rows with both). Both versions are built from SST-2 train, as ``fedrex distill --set normalizer=true`` builds them.
Results: results/normalizer.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.load import ci95  # noqa: E402
from analysis.report import markdown_table  # noqa: E402
from models.artifact import device_package, load_artifact  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.attacks import RECIPES_VERSION, attack_dataset  # noqa: E402
from models.datasets import cached_text_dataset  # noqa: E402
from models.evaluation import take  # noqa: E402
from models.normalizer import WordNormalizer, _split  # noqa: E402
from models.tokenizer import WordPieceTokenizer, normalize_text  # noqa: E402
from personalization import DATASETS  # noqa: E402
from references import user_splits  # noqa: E402
from simulations.simulate import load_settings  # noqa: E402

ARTIFACT = ROOT / "models" / "artifacts" / "sst2-student"
MAX_LENGTH = 64
ROUTES = ("undone", "typo is a known word", "passed through", "corrected to another word")


def rows_of(dataset: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, labels, user index per row): SST-2 dev's attacked rows, or every user's held-out rows."""
    if dataset == "sst2":
        dev, _ = cached_text_dataset("sst2", "validation")
        rows = take(len(dev), 200, 0)  # the card's attacked rows (eval_samples 0: the whole dev set, seed 0)
        return [dev[int(i)]["text"] for i in rows], np.array([dev[int(i)]["label"] for i in rows]), np.arange(len(rows))
    texts, labels, users = [], [], []
    for k, (_, _, _, test_x, test_y) in enumerate(user_splits(load_settings(None, DATASETS[dataset]))):
        texts += test_x
        labels += list(test_y)
        users += [k] * len(test_x)
    return texts, np.array(labels), np.array(users)


def route(normalizer: WordNormalizer, original: str, perturbed: str) -> list[str]:
    """What became of each word an attack changed, once the normaliser read the attacked text."""
    original, perturbed = normalize_text(original), normalize_text(perturbed)  # as the tokenizer hands them over
    words, typos = original.split(), perturbed.split()
    if len(words) != len(typos):  # an edited HTML entity unescaped to a space: not a word swap to follow
        return []
    before, after = normalizer(original).split(), normalizer(perturbed).split()
    out = []
    for word, typo, was, now in zip(words, typos, before, after):
        if word == typo:
            continue
        typo_core = _split(typo.lower())[1]
        if now == was:
            out.append("undone")
        elif normalizer.known(typo_core):
            out.append("typo is a known word")
        elif _split(now.lower())[1] == typo_core:
            out.append("passed through")
        else:
            out.append("corrected to another word")
    return out


def measure(dataset: str, attacks: list[str], model, normalizers: dict) -> list[dict]:
    texts, labels, users = rows_of(dataset)
    out = []
    for name, normalizer in normalizers.items():
        tokenizer = WordPieceTokenizer(MAX_LENGTH, normalizer=normalizer)
        row = {"dataset": dataset, "normaliser": name, "rows": len(texts), "users": int(len(np.unique(users)))}
        for attack in attacks:
            start = time.time()
            summary, results = attack_dataset(attack, model, tokenizer, texts, labels, 0.2, 0)
            clean = np.array([r.attacked for r in results], dtype=float)
            held = np.array([r.attacked and not r.success for r in results], dtype=float)
            per_user = pd.DataFrame({"user": users, "clean": clean, "held": held}).groupby("user").mean()
            row.update({"clean_acc": summary["clean_acc"], "clean_user_mean": float(per_user["clean"].mean()),
                        f"{attack}_acc": summary["adv_acc"], f"{attack}_user_mean": float(per_user["held"].mean()),
                        f"{attack}_user_ci95": ci95(per_user["held"].to_numpy()),
                        f"{attack}_queries": summary["queries"], f"{attack}_seconds": time.time() - start})
            if attack == "char" and normalizer is not None:
                routes = Counter(r for res in results if res.success for r in route(normalizer, res.original, res.perturbed))
                row["char_routes"] = {k: int(routes.get(k, 0)) for k in ROUTES}
            print(f"[normalizer] {dataset} / {name} / {attack}: clean {summary['clean_acc']:.3f} "
                  f"under attack {summary['adv_acc']:.3f} ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
        if normalizer is not None:
            # on whitespace-normalised text: the normaliser joins words with one space, and many
            # tweets hold double spaces, which it would otherwise count as changed
            seen = [normalize_text(t) for t in texts]  # what the tokenizer hands the normaliser
            row["changed_clean_share"] = float(np.mean([normalizer(t) != " ".join(t.split()) for t in seen]))
            row["ms_per_sentence"] = normalizer.ms_per_sentence(texts[:500])
            row["bytes"] = len(normalizer.to_bytes())
        out.append(row)
    return out


def tables(rows: list[dict], attacks: list[str]) -> str:
    body = []
    for r in rows:
        body.append([r["dataset"], r["normaliser"], f"{r['rows']} ({r['users']} users)" if r["dataset"] != "sst2" else str(r["rows"]),
                     f"{r['clean_acc']:.3f}", *(f"{r[f'{a}_acc']:.3f}" if f"{a}_acc" in r else "–" for a in attacks),
                     *(f"{r[f'{a}_user_mean']:.3f} ± {r[f'{a}_user_ci95']:.3f}" if r["dataset"] != "sst2" else "–"
                       for a in attacks[:1]),
                     f"{r['changed_clean_share']:.2f}" if "changed_clean_share" in r else "–",
                     f"{r['ms_per_sentence']:.3f}" if "ms_per_sentence" in r else "–",
                     f"{r['bytes']:,}" if "bytes" in r else "–"])
    head = ["dataset", "normaliser", "rows", "clean acc", *(f"under {a}" for a in attacks),
            *(f"per-user mean under {a} ± 95% CI" for a in attacks[:1]), "clean rows changed", "ms per sentence",
            "file bytes"]
    md = markdown_table(pd.DataFrame(body, columns=head))
    routes = [[r["dataset"], r["normaliser"], *(str(r["char_routes"][k]) for k in ROUTES)] for r in rows if "char_routes" in r]
    if routes:
        md += ("\n\nWhat the edits of each successful DeepWordBug attack became behind the normaliser (words):\n\n"
               + markdown_table(pd.DataFrame(routes, columns=["dataset", "normaliser", *ROUTES])))
    return md


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="sst2,rt_critics,sent140_users")
    parser.add_argument("--attacks", default="char,synonym")
    parser.add_argument("--user-attacks", default="char")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    attacks, user_attacks = args.attacks.split(","), args.user_attacks.split(",")
    model, _ = load_artifact(ARTIFACT)
    model.eval()
    train, _ = cached_text_dataset("sst2", "train")
    shipped = WordNormalizer.load(ARTIFACT)
    normalizers = {"none (the bare student)": None,
                   "version 1 (word list, most frequent)": WordNormalizer.from_texts(train["text"], version=1),
                   f"version {shipped.version} (shipped)": shipped}
    datasets = args.datasets.split(",")
    out = Path(args.out)
    saved = json.loads((out / "normalizer.json").read_text()) if (out / "normalizer.json").exists() else {}
    kept = [r for r in saved.get("rows", []) if r["dataset"] not in datasets  # other datasets' rows stay
            and saved.get("attacks_version") == RECIPES_VERSION]
    rows = kept + [row for dataset in datasets
                   for row in measure(dataset, attacks if dataset == "sst2" else user_attacks, model, normalizers)]
    atomic_write_json(out / "normalizer.json", {"attacks_version": RECIPES_VERSION, "attacks": attacks,
                                                "user_attacks": user_attacks,
                                                "device_package": device_package(ARTIFACT), "rows": rows})
    md = tables(rows, attacks)
    atomic_write_bytes(out / "normalizer.md", (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
