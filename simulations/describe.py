"""`fedrex data describe`: what a partitioning gives each client, before anything is trained."""

from __future__ import annotations

import json

import numpy as np

from models.datasets import ColumnOverrides, cached_text_dataset
from models.partitioning import FederatedData, PartitionConfig, test_size


def partition_stats(fed: FederatedData) -> dict:
    """Per-client counts summarised: sizes, split sizes, label balance, single-label clients."""
    sizes, majority_share, single_label, label_totals = [], [], 0, np.zeros(fed.num_labels, np.int64)
    for pid in range(fed.num_partitions):
        labels = fed.partition(pid).with_format("numpy")["label"]
        counts = np.bincount(labels, minlength=fed.num_labels)
        label_totals += counts
        sizes.append(len(labels))
        majority_share.append(counts.max() / max(len(labels), 1))
        single_label += int(np.count_nonzero(counts) == 1)
    sizes = np.asarray(sizes)
    tests = np.asarray([test_size(int(n), fed.config.test_fraction) for n in sizes])
    return {
        "clients": int(fed.num_partitions),
        "samples": int(sizes.sum()),
        "samples_per_client": _summary(sizes),
        "train_per_client": _summary(sizes - tests),
        "test_per_client": _summary(tests),
        "clients_without_test": int(np.count_nonzero(tests == 0)),
        "label_share": [round(float(c) / max(sizes.sum(), 1), 4) for c in label_totals],
        "majority_label_share_per_client": _summary(np.asarray(majority_share)),
        "single_label_clients": single_label,
    }


def _summary(values: np.ndarray) -> dict:
    return {"min": _num(values.min()), "p10": _num(np.percentile(values, 10)),
            "median": _num(np.median(values)), "mean": _num(values.mean()), "max": _num(values.max())}


def _num(value) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else round(value, 3)


def format_table(title: str, stats: dict) -> str:
    rows = [("clients", f"{stats['clients']:,}"), ("samples", f"{stats['samples']:,}")]
    for key, label in (("samples_per_client", "samples/client"), ("train_per_client", "train/client"),
                       ("test_per_client", "test/client"),
                       ("majority_label_share_per_client", "majority-label share/client")):
        s = stats[key]
        rows.append((label, f"min {s['min']}  p10 {s['p10']}  median {s['median']}  mean {s['mean']}  max {s['max']}"))
    rows.append(("clients without test rows", f"{stats['clients_without_test']:,}"))
    rows.append(("label share (overall)", "  ".join(f"{i}: {v:.1%}" for i, v in enumerate(stats["label_share"]))))
    share = stats["single_label_clients"] / max(stats["clients"], 1)
    rows.append(("single-label clients", f"{stats['single_label_clients']:,} ({share:.1%})"))
    width = max(len(r[0]) for r in rows)
    return "\n".join([title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows])


def describe(args) -> int:
    dataset, num_labels = cached_text_dataset(
        args.dataset, args.split, args.data_dir,
        ColumnOverrides(args.text_column, args.label_column, args.user_column, args.time_column, args.num_labels),
    )
    config = PartitionConfig(args.partitioner, args.num_partitions, args.alpha, args.min_samples,
                             args.test_fraction, args.seed, args.bootstrap_rows)
    fed = FederatedData(dataset, num_labels, config)
    stats = partition_stats(fed)
    if args.format == "json":
        print(json.dumps({"dataset": args.dataset, "partition": config.__dict__, **stats}, indent=2))
    else:
        extra = f" alpha={config.alpha}" if config.kind == "dirichlet" else ""
        print(format_table(f"{args.dataset} [{args.split}] | {config.kind}{extra} | seed {config.seed}", stats))
    return 0
