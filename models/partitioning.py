"""Cut a canonical dataset into federated clients with flwr-datasets partitioners.

This lives beside the data layer (not in ``simulations/``) because a client must be able to load
its own partition by id with nothing but ``models/`` installed: simulation and deployment share
this one code path.

Partitions are index lists over one memory-mapped dataset; a client's rows are materialised only
when that client asks for them, so 3,000 registered clients cost 3,000 index lists, not copies.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from models.datasets import LABEL, TIME, USER
from models.errors import FedrexError

PARTITIONERS = ("natural", "dirichlet", "iid", "bootstrap")
SYNTHETIC = ("bootstrap",)  # partitioners whose clients are not real users: load tests, said so on start


PLOTTING = "flwr_datasets.visualization"


def _load_plotting(attribute: str):
    """The real ``flwr_datasets.visualization``, imported the first time anything asks for one of
    its names, or for ``__all__`` (``from ... import *``). A probe of another dunder is not such a
    read: ``inspect.getmodule`` asks every module in ``sys.modules`` for ``__file__``, and torch's
    optimizers import torch._dynamo, which calls it, so without this every process that trains
    would import the plots (1 s, ~60 MB)."""
    if attribute.startswith("__") and attribute.endswith("__") and attribute != "__all__":
        raise AttributeError(f"module {PLOTTING!r} (not yet imported) has no attribute {attribute!r}")
    if sys.modules.get(PLOTTING) is _plotting_stub:
        sys.modules.pop(PLOTTING, None)  # another thread may have got here first
    module = importlib.import_module(PLOTTING)
    sys.modules["flwr_datasets"].visualization = module
    return getattr(module, attribute)


_plotting_stub = types.ModuleType(PLOTTING, "flwr_datasets' plots, imported when first used")
_plotting_stub.__getattr__ = _load_plotting  # PEP 562: the module's missing attributes


def flwr_partitioners():
    """``flwr_datasets.partitioner``, without the plotting its package imports on the way.

    ``flwr_datasets/__init__.py`` imports its ``visualization`` package, which imports seaborn,
    scipy.stats and matplotlib: 1.5 s and tens of MB in every process that cuts a dataset (the
    ``fedrex`` command, the ServerApp, every Ray actor, a device at every message), for plots FedREX
    never draws. A stand-in takes the plotting package's place while the package loads and imports
    the real one the first time anything reads from it."""
    if "flwr_datasets" not in sys.modules:
        # the real package's folder, found without importing anything: a submodule imported while
        # the stand-in is in place loads alone, and once (reading __path__ would load the package,
        # which imports its submodules, and then the import system would load that one again)
        package = importlib.util.find_spec("flwr_datasets")
        if package is not None:  # not installed: the import below says so
            _plotting_stub.__path__ = [str(Path(folder) / "visualization") for folder in package.submodule_search_locations]
            sys.modules.setdefault(PLOTTING, _plotting_stub)
    from flwr_datasets import partitioner

    return partitioner


@dataclass(frozen=True)
class PartitionConfig:
    """How to split a dataset into clients and each client's data into train/test."""

    kind: str = "natural"
    num_partitions: int = 0  # natural: 0 = one client per user; others: required
    alpha: float = 0.5  # Dirichlet concentration: small = strong label skew
    min_samples: int = 0  # natural: drop users with fewer rows; dirichlet: minimum partition size
    test_fraction: float = 0.2
    seed: int = 0
    bootstrap_rows: int = 10  # bootstrap: rows each synthetic user draws

    def validate(self) -> None:
        if self.kind not in PARTITIONERS:
            raise FedrexError(f"unknown partitioner {self.kind!r}: use one of {', '.join(PARTITIONERS)}")
        if self.kind == "dirichlet" and not self.alpha > 0:
            raise FedrexError(f"alpha must be > 0 for the Dirichlet partitioner, got {self.alpha}")
        if self.kind != "natural" and self.num_partitions < 1:
            raise FedrexError(f"the {self.kind} partitioner needs num-partitions >= 1, got {self.num_partitions}")
        if not 0 <= self.test_fraction < 1:
            raise FedrexError(f"test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.kind == "bootstrap" and self.bootstrap_rows < 1:
            raise FedrexError(f"bootstrap-rows must be >= 1, got {self.bootstrap_rows}")
        if self.min_samples < 0:
            raise FedrexError(f"min-samples must be >= 0, got {self.min_samples}")


@dataclass
class ClientData:
    """One client's data: its stable id and seeded, disjoint train/test splits (Datasets)."""

    partition_id: int
    client_id: str
    train: object
    test: object


class FederatedData:
    """A dataset plus a partitioner; ``client(pid)`` materialises a single client lazily."""

    def __init__(self, dataset, num_labels: int, config: PartitionConfig):
        config.validate()
        self.config = config
        self.num_labels = num_labels
        self.dataset = self._prepare(dataset)
        self.partitioner = self._build_partitioner()

    # -- construction -----------------------------------------------------------------------
    def _prepare(self, dataset):
        cfg = self.config
        if cfg.kind == "natural":
            if USER not in dataset.column_names:
                raise FedrexError("the natural partitioner needs a user column (pass --user-column)")
            if cfg.min_samples > 1:
                users = np.asarray(dataset.with_format("arrow")[USER].to_numpy(zero_copy_only=False))
                unique, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
                keep = np.flatnonzero(counts[inverse] >= cfg.min_samples)
                if keep.size == 0:
                    raise FedrexError(f"no user has >= {cfg.min_samples} samples (largest has {counts.max()})")
                dataset = dataset.select(keep)
        elif cfg.kind == "bootstrap":
            if cfg.bootstrap_rows > len(dataset):
                raise FedrexError(f"bootstrap-rows {cfg.bootstrap_rows} > the dataset's {len(dataset)} rows")
        else:
            minimum = max(cfg.min_samples, 1)
            if cfg.num_partitions * minimum > len(dataset):
                raise FedrexError(
                    f"{cfg.num_partitions} clients need at least {cfg.num_partitions * minimum} samples "
                    f"but the dataset has {len(dataset)}; use fewer clients"
                )
        if cfg.kind == "iid":  # IidPartitioner shards contiguously: shuffle first, seeded
            dataset = dataset.shuffle(seed=cfg.seed)
        return dataset

    def _build_partitioner(self):
        flwr = flwr_partitioners()
        cfg = self.config
        if cfg.kind == "natural":
            partitioner = flwr.NaturalIdPartitioner(partition_by=USER)
        elif cfg.kind == "dirichlet":
            partitioner = flwr.DirichletPartitioner(
                num_partitions=cfg.num_partitions, partition_by=LABEL, alpha=cfg.alpha,
                min_partition_size=max(cfg.min_samples, 2 if len(self.dataset) >= 2 * cfg.num_partitions else 1),
                self_balancing=False, shuffle=True, seed=cfg.seed,
            )
        elif cfg.kind == "bootstrap":
            partitioner = BootstrapPartitioner(cfg.num_partitions, cfg.bootstrap_rows, cfg.seed)
        else:
            partitioner = flwr.IidPartitioner(num_partitions=cfg.num_partitions)
        partitioner.dataset = self.dataset
        return partitioner

    # -- access --------------------------------------------------------------------------------
    @cached_property
    def num_partitions(self) -> int:
        if self.config.kind == "dirichlet":
            self._load(0)  # Dirichlet sizes are only known once sampled; fail here, not later
        return int(self.partitioner.num_partitions)

    def check_partition_id(self, partition_id: int) -> None:
        if not 0 <= partition_id < self.num_partitions:
            raise FedrexError(f"partition id {partition_id} out of range 0..{self.num_partitions - 1}")

    def partition(self, partition_id: int):
        self.check_partition_id(partition_id)
        return self._load(partition_id)

    def _load(self, partition_id: int):
        cfg = self.config
        with warnings.catch_warnings():  # flwr-datasets warns on every resampling attempt
            warnings.simplefilter("ignore", UserWarning)
            try:
                return self.partitioner.load_partition(partition_id)
            except ValueError as err:
                if cfg.kind == "dirichlet":
                    raise FedrexError(
                        f"Dirichlet sampling (alpha={cfg.alpha}) could not give each of {cfg.num_partitions} "
                        f"clients its minimum size after repeated tries: raise alpha or use fewer clients"
                    ) from None
                raise FedrexError(f"cannot partition: {err}".splitlines()[0]) from None

    def client_id(self, partition_id: int) -> str:
        if self.config.kind == "natural":
            return str(self.partitioner.partition_id_to_natural_id[partition_id])
        return f"client-{partition_id:05d}"

    def client(self, partition_id: int) -> ClientData:
        part = self.partition(partition_id)
        train_idx, test_idx = split_indices(part, self.config, partition_id)
        return ClientData(partition_id, self.client_id(partition_id), part.select(train_idx), part.select(test_idx))


class BootstrapPartitioner:
    """Synthetic users for load tests: user ``pid`` holds ``rows`` distinct rows of the whole
    dataset drawn from (seed, pid), so users overlap, any number of them can exist, and nothing is
    precomputed: memory and start-up stay flat in the number of users. It offers what FederatedData
    uses of a flwr-datasets partitioner (``dataset``, ``num_partitions``, ``load_partition``)."""

    def __init__(self, num_partitions: int, rows: int, seed: int):
        self.num_partitions, self.rows, self.seed = num_partitions, rows, seed
        self.dataset = None

    def load_partition(self, partition_id: int):
        rng = np.random.default_rng([self.seed, 0xB007, partition_id])
        return self.dataset.select(np.sort(rng.choice(len(self.dataset), self.rows, replace=False)))


def test_size(n: int, fraction: float) -> int:
    """Rows held out for testing: ``round(n*fraction)`` kept within [1, n-1] so both sides exist
    whenever the client has two rows; a one-row client trains and has no test set."""
    if n < 2 or fraction <= 0:
        return 0
    return int(min(max(round(n * fraction), 1), n - 1))


def split_indices(part, config: PartitionConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/test indices covering ``part``.

    Natural users with timestamps are split chronologically (train on the past, test on the
    future, as a deployed model would meet its user); everyone else gets a seeded shuffle whose
    seed mixes the run seed and the partition id, so it does not depend on which process asks.
    """
    n = len(part)
    n_test = test_size(n, config.test_fraction)
    if config.kind == "natural" and TIME in part.column_names:
        times = part.with_format("arrow")[TIME]
        order = np.argsort(times.cast("int64").fill_null(np.iinfo(np.int64).min).to_numpy(), kind="stable")
    else:
        rng = np.random.default_rng([config.seed, partition_id])
        order = rng.permutation(n)
    return np.sort(order[: n - n_test]), np.sort(order[n - n_test:])
