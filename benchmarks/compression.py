"""Compression benchmark: teacher vs FedREX student (and its ablations) vs FastGRNN and PRADO,
natural and adversarial accuracy, explanation fidelity, size and latency, each model also behind
the word normaliser (a second table row from the same trained model: one change per row).

    python benchmarks/compression.py [--quick] [--datasets sst2,ag_news] [--seed 0]
    python benchmarks/compression.py --add-attacks embedding   # a recipe added later, on the kept models

Writes results/compression.json (every row, with its full config and card) after each row, so an
interrupted run keeps what it finished and a rerun skips rows already measured with the same
config; then writes results/compression.md (the table). SST-2 trains on train and evaluates on
dev; AG News (only its test split is available offline) is re-split 80/20 with the seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.attacks import RECIPES_VERSION  # noqa: E402
from models.protocol import ATTACKS  # noqa: E402
from models.objectives import ObjectiveConfig  # noqa: E402
from server.distill import DistillConfig, distill  # noqa: E402

OURS = dict(kd=1.0, expl=1.0, adv=1.0, adv_ratio=0.5)
PLAIN = dict(kd=0.0, expl=0.0, adv=0.0)
ABLATION = {"normalizer": False}  # ablation rows isolate a training change; the normaliser is its own row
# Rows every dataset gets; the ablations (and the teacher behind the normaliser) run on the datasets
# named by --full (default SST-2): two cores do not fit the whole grid twice in one working session.
MAIN_ROWS = ("FedREX student", "student + perturbed-text training", "FastGRNN", "PRADO")
VARIANTS = [  # (row name, network, objective weights, other config changes): one change per ablation
    ("FedREX student", "student", OURS, {}),
    ("student w/o EXPL", "student", {**OURS, "expl": 0.0}, ABLATION),
    ("student w/o ADV", "student", {**OURS, "adv": 0.0}, ABLATION),
    ("student w/o KD", "student", {**OURS, "kd": 0.0}, ABLATION),
    ("student + perturbed-text training", "student", OURS, {"augment": 0.5}),
    # distilled from a teacher fine-tuned with half its rows perturbed each epoch (issue #18) ...
    ("student from a perturbed-text teacher", "student", OURS, {"teacher_augment": 0.5}),
    # ... and with perturbed-text training of its own as well: the combination
    ("student + perturbed-text training + perturbed-text teacher", "student", OURS,
     {"teacher_augment": 0.5, "augment": 0.5}),
    ("student + adversarial-text training", "student", OURS, {"adv_text": 500}),
    # the ADV term's adversary in the convex hull of each word's WordNet synonyms (ASCC), not a ball
    ("student + ASCC (adversary in the synonyms' hull)", "student", OURS, {"adv_space": "synonyms"}),
    # ... and a stronger search of it: 5 hull steps (2 above) on every batch (half above)
    ("student + ASCC with 5 steps on every batch", "student", {**OURS, "adv_steps": 5, "adv_ratio": 1.0},
     {"adv_space": "synonyms"}),
    ("FastGRNN", "fastgrnn", PLAIN, {}),
    ("PRADO", "prado", PLAIN, {}),
    ("FastGRNN + our objectives", "fastgrnn", OURS, ABLATION),
    ("PRADO + our objectives", "prado", OURS, ABLATION),
]
# the attacks every trained row is measured with (part of its config, so of its key): a recipe
# added later is measured on the kept models with --add-attacks instead of retraining every row
ATTACK_ORDER = ["char", "char-beam", "synonym", "synonym-sim", "hotflip"]
# The 22.7M-parameter teacher answers every query ~30x slower than a student: the query-hungry
# searches (beam: up to 1,000 queries per sentence; similarity-checked synonyms) are left out for it.
TEACHER_ATTACKS = ("char", "synonym", "hotflip")


def base_config(dataset: str, quick: bool, seed: int) -> DistillConfig:
    split = {} if dataset == "sst2" else dict(train_split="test", eval_split="holdout", eval_fraction=0.2)
    if quick:
        return DistillConfig.quick(dataset=dataset, seed=seed, export=False, attacks=tuple(ATTACK_ORDER),
                                   normalizer=True, attack_samples=20, **split)
    return DistillConfig(dataset=dataset, seed=seed, teacher_samples=20000 if dataset == "sst2" else 0,
                         teacher_epochs=1.0, attr_samples=2000, ig_steps=8, epochs=3.0, attack_samples=200,
                         fidelity_samples=200, export=False, attacks=tuple(ATTACK_ORDER), normalizer=True,
                         **split)


def row_key(name: str, config: DistillConfig) -> str:
    """A row's identity: its name, its whole config and the attacks' semantics it was measured with."""
    payload = [name, config.as_dict(), RECIPES_VERSION]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def table(rows: list[dict]) -> str:
    """One line per model, and one more per model behind the word normaliser (same weights)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))  # rows added by a later run join their dataset
    rows = sorted(rows, key=lambda r: datasets.index(r["dataset"]))
    # black-box recipes in the trained rows' order, then recipes added later, the white-box HotFlip last
    attacks = sorted({a for r in rows for a in r["card"].get("attacks", {})},
                     key=lambda a: (a == "hotflip", ATTACK_ORDER.index(a) if a in ATTACK_ORDER else len(ATTACK_ORDER),
                                    ATTACKS.index(a)))
    head = (["dataset", "model", "params", "device KB", "ms/sent", "clean acc"] + [f"acc {a}" for a in attacks]
            + ["compr.", "suff.", "teacher agr."])
    body = []

    def fmt(value, spec=".3f"):
        return "–" if value is None or value != value else format(value, spec)

    for r in rows:
        c = r["card"]
        fid = c.get("fidelity", {})
        package = c.get("device_package", {})
        plain_kb = (package["total"] - package.get("normalizer", 0)) / 1024 if package else None
        cells = [r["dataset"], r["name"], f"{c['params']:,}", fmt(plain_kb, ".0f"), fmt(c["latency_ms"]["median"], ".2f"),
                 fmt(c["clean_acc"])]
        cells += [fmt(c["attacks"].get(a, {}).get("adv_acc")) for a in attacks]
        cells += [fmt(fid.get("comprehensiveness")), fmt(fid.get("sufficiency")), fmt(fid.get("agreement_spearman"))]
        body.append(cells)
        norm = c.get("normalized")
        if norm:
            kb = package["total"] / 1024 if package else None
            cells = [r["dataset"], f"{r['name']} + normaliser", f"{c['params']:,}", fmt(kb, ".0f"),
                     fmt(c["latency_ms"]["median"] + norm["ms_per_sentence"], ".2f"), fmt(norm["clean_acc"])]
            cells += [fmt(norm["attacks"].get(a, {}).get("adv_acc")) for a in attacks]
            body.append(cells + ["–", "–", "–"])
    return markdown_table(pd.DataFrame(body, columns=head))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="sst2,ag_news")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--full", default="sst2", help="datasets that also get the ablation rows")
    parser.add_argument("--time-only", action="store_true",
                        help="train nothing: re-time every measured row (latency, normaliser) and rewrite the table")
    parser.add_argument("--artifacts", default="/tmp/fedrex-compression", help="where each row's model is kept")
    parser.add_argument("--add-attacks", default="",
                        help="train nothing: measure these attacks on every row whose model is kept (the same "
                             "rows, budget and seed), alone and behind the normaliser, and rewrite the table")
    args = parser.parse_args()
    out = Path(args.out)
    json_path = out / ("compression-quick.json" if args.quick else "compression.json")
    done = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    stale = [r for r in done if r.get("attacks_version") != RECIPES_VERSION]
    if stale:  # measured with older attack recipes: not comparable with rows measured now
        print(f"[bench] dropping {len(stale)} rows measured with older attack recipes", file=sys.stderr)
        done = [r for r in done if r.get("attacks_version") == RECIPES_VERSION]
    # a kept row's identity is its config as this code reads it (row_config: a field added since
    # takes the value the row ran with), not the key stored when it was measured
    known = {row_key(r["name"], row_config(r)) for r in done}
    rows = list(done)

    def save() -> None:  # every row so far, after each one: an interrupted run keeps what it finished
        atomic_write_json(json_path, {"seed": args.seed, "quick": args.quick, "machine": machine(), "rows": rows})

    started = time.time()
    if args.add_attacks:
        add_attacks(rows, Path(args.artifacts), tuple(args.add_attacks.split(",")), save,
                    [n for n in args.only.split(",") if n], args.datasets.split(","))
    for dataset in ([] if args.time_only or args.add_attacks else args.datasets.split(",")):
        base = base_config(dataset, args.quick, args.seed)
        full = dataset in args.full.split(",")
        plan = [("MiniLM teacher", None, replace(base, attacks=TEACHER_ATTACKS, normalizer=full))] + [
            (name, network, replace(base, network=network, objective=ObjectiveConfig(**weights), **changes))
            for name, network, weights, changes in VARIANTS if full or name in MAIN_ROWS]
        for name, network, config in plan:
            if args.only and name not in args.only.split(","):
                continue
            key = row_key(name, config)
            if key in known:
                print(f"[bench] {dataset} / {name}: already measured", file=sys.stderr)
                continue
            print(f"[bench] {dataset} / {name} ({time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)
            row_start = time.time()
            if network is None:
                card = distill(replace(config, network="student"), None, teacher_only=True)
            else:
                card = distill(config, Path(args.artifacts) / key)
            rows.append({"dataset": dataset, "name": name, "key": key, "seconds": time.time() - row_start,
                         "card": card, "config": config.as_dict(), "attacks_version": RECIPES_VERSION})
            save()
    if not args.quick and not args.add_attacks:
        remeasure_latency(rows, Path(args.artifacts))
        save()
    md = table(rows)
    atomic_write_bytes(json_path.with_suffix(".md"), (md + "\n").encode())
    print(md)
    return 0


# Fields the configs gained after rows were measured, with the value every row measured before
# them ran with (not the field's default, which may change later): a kept row without one reads
# as that value; a row missing any other field is refused.
ADDED_FIELDS = {"adv_space": "ball", "teacher_augment": 0.0}
ADDED_OBJECTIVE_FIELDS = {"erasure": 0.0}


def row_config(row: dict) -> DistillConfig:
    config = {**ADDED_FIELDS, **row["config"]}
    objective = {**ADDED_OBJECTIVE_FIELDS, **config["objective"]}
    missing = ({f.name for f in fields(DistillConfig)} - set(config)) | ({f.name for f in fields(ObjectiveConfig)}
                                                                         - set(objective))
    if missing:
        raise SystemExit(f"row {row.get('name')!r} ({row.get('dataset')}) has no {sorted(missing)} in its config: "
                         "say in ADDED_FIELDS what rows measured before the field ran with")
    return DistillConfig(**{**config, "objective": ObjectiveConfig(**objective), "attacks": tuple(config["attacks"])})


def add_attacks(rows: list[dict], artifacts: Path, names: tuple[str, ...], save, only: list[str],
                datasets: list[str]) -> None:
    """Measure attacks a row was not trained and measured with (a recipe added later) on its kept
    model: the same evaluation rows, budget and seed as its other attacks, alone and behind the
    row's word normaliser; ``save()`` after each row, so an interrupted pass keeps what it did and
    a rerun skips it. ``only``: these row names (default: every row), of ``datasets``."""
    from models.artifact import load_artifact, load_weights
    from models.evaluation import robustness
    from models.normalizer import FILE as NORMALIZER_FILE
    from models.normalizer import WordNormalizer
    from models.protocol import check_attacks
    from models.teacher import MiniLMTeacher
    from models.tokenizer import WordPieceTokenizer
    from server.distill import evaluation_rows, load_splits

    check_attacks(names)
    for r in rows:
        if (only and r["name"] not in only) or r["dataset"] not in datasets:
            continue
        measured = [r["card"]["attacks"], *([r["card"]["normalized"]["attacks"]] if "normalized" in r["card"] else [])]
        if all(name in attacks for attacks in measured for name in names):
            print(f"[bench] {r['dataset']} / {r['name']}: {names} already measured", file=sys.stderr)
            continue
        cfg = row_config(r)
        if cfg.attack_samples <= 0:  # distilled without attacks: measuring some now would add rows it never took
            print(f"[bench] {r['dataset']} / {r['name']}: distilled with attack_samples {cfg.attack_samples} "
                  f"(no attacks), {names} not measured", file=sys.stderr)
            continue
        kept = artifacts / r["key"]
        if r["name"] == "MiniLM teacher":
            shipped = next((artifacts / o["key"] for o in rows if o["dataset"] == r["dataset"]
                            and (artifacts / o["key"] / NORMALIZER_FILE).exists()), None)
            if shipped is None:
                print(f"[bench] {r['dataset']} / teacher: no kept row holds the normaliser, {names} not measured",
                      file=sys.stderr)
                continue
            _, eval_ds, labels = load_splits(cfg)
            model = MiniLMTeacher(labels)
            model.load_state_dict(load_weights(Path(r["card"]["cache"]) / "teacher.safetensors"))
            kept = shipped  # its normaliser: every row of a dataset holds the same words
        elif (kept / "config.json").exists():
            model, _ = load_artifact(kept)
            _, eval_ds, _ = load_splits(cfg)
        else:
            print(f"[bench] {r['dataset']} / {r['name']}: model not kept, {names} not measured", file=sys.stderr)
            continue
        model.eval()
        plain = WordPieceTokenizer(cfg.max_length)
        evaluation = evaluation_rows(cfg, eval_ds, plain)
        start = time.time()
        r["card"]["attacks"].update(robustness(model, plain, evaluation, names, cfg.attack_budget,
                                               cfg.attack_samples, cfg.seed))
        if "normalized" in r["card"]:
            behind = WordPieceTokenizer(cfg.max_length, normalizer=WordNormalizer.load(kept))
            r["card"]["normalized"]["attacks"].update(robustness(model, behind, evaluation, names, cfg.attack_budget,
                                                                 cfg.attack_samples, cfg.seed))
        print(f"[bench] {r['dataset']} / {r['name']}: " + " ".join(
            f"{a} {r['card']['attacks'][a]['adv_acc']:.3f}" for a in names) + f" ({time.time() - start:.0f}s)",
            file=sys.stderr, flush=True)
        save()


def remeasure_latency(rows: list[dict], artifacts: Path) -> None:
    """Time every model again in one pass at the end, the same way (int8 weights, TorchScript,
    batch 1, one thread, the same 100 evaluation sentences), so that no row's latency depends on
    what else ran while it was trained; the same for the word normaliser (200 sentences). Rows
    whose model is gone keep an earlier pass's timing (listed at the end); each timing names its
    pass and machine."""
    from models.artifact import load_artifact, load_weights
    from models.encoded import EncodedData
    from models.evaluation import take
    from models.export import latency_ms
    from models.normalizer import FILE as NORMALIZER_FILE
    from models.normalizer import WordNormalizer
    from models.teacher import MiniLMTeacher
    from models.tokenizer import WordPieceTokenizer
    from server.distill import load_splits

    started, skipped = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), []
    normalizers: dict[str, WordNormalizer | None] = {}  # one per dataset: every row's file holds the same words
    samples: dict[str, list] = {}
    labels: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    for r in rows:
        cfg = row_config(r)
        if r["dataset"] not in samples:
            _, evaluation, labels[r["dataset"]] = load_splits(cfg)
            ids = EncodedData.from_dataset(evaluation, WordPieceTokenizer(cfg.max_length)).ids
            samples[r["dataset"]] = [ids[i] for i in take(len(ids), 100, cfg.seed)]
            texts[r["dataset"]] = [evaluation["text"][int(i)] for i in take(len(ids), 200, cfg.seed)]
        teacher = r["name"] == "MiniLM teacher"
        kept = Path(r["card"]["cache"]) / "teacher.safetensors" if teacher else artifacts / r["key"] / "config.json"
        if not kept.exists():
            skipped.append(f"{r['dataset']} / {r['name']}")
            continue
        if teacher:
            model = MiniLMTeacher(labels[r["dataset"]])
            model.load_state_dict(load_weights(kept))
        else:
            model, _ = load_artifact(kept.parent, int8=True)
        # which pass timed it, and where: rows whose model is gone keep an earlier pass's timing
        r["card"]["latency_ms"] = {**latency_ms(model, samples[r["dataset"]]), "pass": started,
                                   "machine": machine()["platform"]}
        print(f"[bench] latency {r['dataset']} / {r['name']}: {r['card']['latency_ms']['median']:.3f} ms",
              file=sys.stderr, flush=True)
        if "normalized" in r["card"]:
            if r["dataset"] not in normalizers:
                shipped = next((artifacts / o["key"] for o in rows if o["dataset"] == r["dataset"]
                                and (artifacts / o["key"] / NORMALIZER_FILE).exists()), None)
                normalizers[r["dataset"]] = WordNormalizer.load(shipped) if shipped is not None else None
            if normalizers[r["dataset"]] is not None:
                r["card"]["normalized"]["ms_per_sentence"] = normalizers[r["dataset"]].ms_per_sentence(
                    texts[r["dataset"]])
    if skipped:
        print(f"[bench] latency: {len(skipped)} rows keep an earlier pass's timing (model not kept): "
              + "; ".join(skipped), file=sys.stderr, flush=True)


def machine() -> dict:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


if __name__ == "__main__":
    sys.exit(main())
