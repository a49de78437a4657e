"""Compression benchmark: teacher vs FedREX student (and its ablations) vs FastGRNN and PRADO,
natural and adversarial accuracy, explanation fidelity, size and latency.

    python benchmarks/compression.py [--quick] [--datasets sst2,ag_news] [--seed 0]

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
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from models.artifact import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.objectives import ObjectiveConfig  # noqa: E402
from server.distill import DistillConfig, distill  # noqa: E402

OURS = dict(kd=1.0, expl=1.0, adv=1.0, adv_ratio=0.5)
VARIANTS = [  # (row name, network, objective weights)
    ("FedREX student", "student", OURS),
    ("student w/o EXPL", "student", {**OURS, "expl": 0.0}),
    ("student w/o ADV", "student", {**OURS, "adv": 0.0}),
    ("student w/o KD", "student", {**OURS, "kd": 0.0}),
    ("FastGRNN", "fastgrnn", dict(kd=0.0, expl=0.0, adv=0.0)),
    ("PRADO", "prado", dict(kd=0.0, expl=0.0, adv=0.0)),
    ("FastGRNN + our objectives", "fastgrnn", OURS),
    ("PRADO + our objectives", "prado", OURS),
]


def base_config(dataset: str, quick: bool, seed: int) -> DistillConfig:
    split = {} if dataset == "sst2" else dict(train_split="test", eval_split="holdout", eval_fraction=0.2)
    if quick:
        return DistillConfig.quick(dataset=dataset, seed=seed, export=False, **split)
    return DistillConfig(dataset=dataset, seed=seed, teacher_samples=20000 if dataset == "sst2" else 0,
                         teacher_epochs=1.0, attr_samples=2000, ig_steps=8, epochs=3.0, attack_samples=200,
                         fidelity_samples=200, export=False, **split)


def row_key(name: str, config: DistillConfig) -> str:
    return hashlib.sha256(json.dumps([name, config.as_dict()], sort_keys=True).encode()).hexdigest()[:16]


def table(rows: list[dict]) -> str:
    attacks = sorted({a for r in rows for a in r["card"].get("attacks", {})}, key=["char", "synonym", "hotflip"].index)
    head = (["dataset", "model", "params", "int8 KB", "ms/sent", "clean acc"] + [f"acc {a}" for a in attacks]
            + ["compr.", "suff.", "teacher agr."])
    body = []
    for r in rows:
        c = r["card"]
        fid = c.get("fidelity", {})
        cells = [r["dataset"], r["name"], f"{c['params']:,}",
                 f"{c['int8_bytes'] / 1024:.0f}" if "int8_bytes" in c else "–",
                 f"{c['latency_ms']['median']:.2f}", f"{c['clean_acc']:.3f}"]
        cells += [f"{c['attacks'][a]['adv_acc']:.3f}" if a in c.get("attacks", {}) else "–" for a in attacks]
        cells += [f"{fid.get('comprehensiveness', float('nan')):.3f}", f"{fid.get('sufficiency', float('nan')):.3f}",
                  f"{fid['agreement_spearman']:.3f}" if "agreement_spearman" in fid else "–"]
        body.append(cells)
    return markdown_table(pd.DataFrame(body, columns=head))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="sst2,ag_news")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    out = Path(args.out)
    json_path = out / ("compression-quick.json" if args.quick else "compression.json")
    done = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    known = {r["key"] for r in done}
    rows = list(done)
    started = time.time()
    for dataset in args.datasets.split(","):
        base = base_config(dataset, args.quick, args.seed)
        plan = [("MiniLM teacher", None, base)] + [
            (name, network, replace(base, network=network, objective=ObjectiveConfig(**weights)))
            for name, network, weights in VARIANTS]
        for name, network, config in plan:
            key = row_key(name, config)
            if key in known:
                print(f"[bench] {dataset} / {name}: already measured", file=sys.stderr)
                continue
            print(f"[bench] {dataset} / {name} ({time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)
            row_start = time.time()
            if network is None:
                card = distill(replace(config, network="student"), None, teacher_card=True)["teacher"]
            else:
                card = distill(config, None)
            rows.append({"dataset": dataset, "name": name, "key": key, "seconds": time.time() - row_start,
                         "card": card, "config": config.as_dict()})
            atomic_write_json(json_path, {"seed": args.seed, "quick": args.quick, "machine": machine(), "rows": rows})
    md = table(rows)
    atomic_write_bytes(json_path.with_suffix(".md"), (md + "\n").encode())
    print(md)
    return 0


def machine() -> dict:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


if __name__ == "__main__":
    sys.exit(main())
