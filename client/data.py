"""A client's own data, by the same code path in simulation and on a device.

- Simulation: ``node_config["partition-id"]`` picks a partition of the run's dataset (cut by
  flwr-datasets from one memory-mapped table, cached once per process).
- Device: ``node_config["data-file"]`` names a local .csv/.parquet/.json of the user's own texts
  (``client-id`` optional); it is split train/test like any partition.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from client import row_cache
from models.datasets import cached_text_dataset, read_user_file
from models.encoded import EncodedData
from models.errors import FedrexError
from models.partitioning import ClientData, FederatedData, PartitionConfig, split_indices
from models.run_settings import RunSettings
from models.tokenizer import WordPieceTokenizer, client_tokenizer


@dataclass
class LocalData:
    partition_id: int
    client_id: str
    train: EncodedData
    test: EncodedData
    num_labels: int
    tokenizer: WordPieceTokenizer  # what encoded the rows: every later text (attacks, perturbations) goes through it

    @property
    def label_counts(self) -> np.ndarray:
        return np.bincount(np.concatenate([self.train.labels, self.test.labels]), minlength=self.num_labels)


def partition_config(settings: RunSettings) -> PartitionConfig:
    return PartitionConfig(settings.partitioner, settings.num_partitions, settings.alpha, settings.min_samples,
                           settings.test_fraction, settings.seed, settings.bootstrap_rows)


@lru_cache(maxsize=2)
def federated_data(settings_key: tuple, dataset: str, data_dir: str, config: PartitionConfig) -> FederatedData:
    table, num_labels = cached_text_dataset(dataset, "train", data_dir or None)
    return FederatedData(table, num_labels, config)


def federation(settings: RunSettings) -> FederatedData:
    config = partition_config(settings)
    return federated_data((settings.dataset, settings.data_dir, config), settings.dataset, settings.data_dir, config)


@lru_cache(maxsize=16384)  # a simulation's users, encoded once per worker process (a few KB each)
def _encoded(settings: RunSettings, partition_id: int, normalizer: bytes | None) -> LocalData:
    fed = federation(settings)
    client = fed.client(partition_id)
    return _encode(client, fed.num_labels, client_tokenizer(settings.max_length, normalizer))


def _encode(client: ClientData, num_labels: int, tokenizer: WordPieceTokenizer) -> LocalData:
    return LocalData(client.partition_id, client.client_id, EncodedData.from_dataset(client.train, tokenizer),
                     EncodedData.from_dataset(client.test, tokenizer), num_labels, tokenizer)


@lru_cache(maxsize=4)
def _device_file(path: str, client_id: str, partition_id: int, settings: RunSettings, num_labels: int,
                 normalizer: bytes | None, state_dir: str | None = None) -> LocalData:
    """The user's own file, read with pyarrow alone (no datasets library on a device), split
    train/test by the run's seed; with a state folder, encoded once and kept there
    (``client.row_cache``: every message is a new process on a device)."""
    tokenizer = client_tokenizer(settings.max_length, normalizer)
    # a missing file is read_user_file's one clear error, not a failed stat while making the key
    folder = Path(state_dir) / row_cache.FOLDER if state_dir and Path(path).is_file() else None
    if folder is not None:
        key = row_cache.rows_key(path, settings.max_length, settings.test_fraction, settings.seed, num_labels,
                                 normalizer, tokenizer)
        kept = row_cache.load_rows(folder, key)
        if kept is not None:
            train, test, labels_count = kept
            return LocalData(partition_id, client_id, train, test, labels_count, tokenizer)
    texts, labels, found_labels = read_user_file(path)
    config = PartitionConfig(kind="iid", num_partitions=1, test_fraction=settings.test_fraction, seed=settings.seed)
    train_idx, test_idx = split_indices(texts, config, 0)
    rows = lambda idx: {"text": [texts[i] for i in idx], "label": labels[idx]}  # noqa: E731  (what _encode reads)
    local = _encode(ClientData(partition_id, client_id, rows(train_idx), rows(test_idx)),
                    max(num_labels, found_labels), tokenizer)
    if folder is not None:
        row_cache.save_rows(folder, key, local.train, local.test, local.num_labels)
    return local


def load_local_data(node_config: dict, settings: RunSettings, num_labels: int = 2,
                    normalizer: bytes | None = None) -> LocalData:
    """The client's rows, encoded by ``client_tokenizer`` (behind ``normalizer``, the start model's
    gzip'd word list, when given)."""
    if "data-file" in node_config:
        client_id = str(node_config.get("client-id", "device"))
        # The server keys clients by partition id; a device without one gets a stable id from its name.
        partition_id = int(node_config.get("partition-id", zlib.crc32(client_id.encode()) % 2**31))
        state_dir = str(node_config["state-dir"]) if "state-dir" in node_config else None
        return _device_file(str(node_config["data-file"]), client_id, partition_id, settings,
                            num_labels, normalizer, state_dir)
    if "partition-id" not in node_config:
        raise FedrexError("this node has neither a partition-id (simulation) nor a data-file (device) in its node config")
    return _encoded(settings, int(node_config["partition-id"]), normalizer)


def round_seed(settings: RunSettings, round_number: int, partition_id: int, salt: int = 0) -> int:
    """Every random choice of a client in a round derives from (run seed, round, partition), so
    results do not depend on which Ray actor or device runs it."""
    return int(np.random.SeedSequence([settings.seed, round_number, partition_id, salt]).generate_state(1)[0])


def measurement_seed(settings: RunSettings, partition_id: int) -> int:
    """The seed of what a client measures (which held-out rows are attacked and explained, and the
    attacks' own random draws): the same in every round, so that round 0 and round 10 measure the
    same rows the same way and a change between them is the model's."""
    return round_seed(settings, 0, partition_id, salt=7)


def data_profile(local: LocalData) -> dict:
    """Who the client is: sizes and label balance (the share of positive test rows for binary tasks)."""
    counts = local.label_counts
    total = max(int(counts.sum()), 1)
    binary = {"test_positive": float((local.test.labels == 1).mean())} if local.num_labels == 2 and len(local.test) else {}
    return {**binary, "n_train": len(local.train), "n_test": len(local.test),
            "majority_share": float(counts.max() / total), "single_label": float(np.count_nonzero(counts) == 1)}
