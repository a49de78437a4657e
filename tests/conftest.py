"""Shared fixtures. Tests run on the real data in shared/data (FEDREX_DATA_DIR); never on made-up data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray started without an address joins the cluster a `ray start` or a test's ray.cluster_utils.Cluster
# last wrote to /tmp/ray/ray_current_cluster: with tests on two workers, Flower's own `flwr run .` could
# join the two-node cluster another test runs. "local": always a Ray of its own (a test that wants a
# cluster names its address)
os.environ.setdefault("RAY_ADDRESS", "local")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's two workers share the machine's cores: torch's OpenMP threads (and those of every
    # process a test starts) one per worker, as two-thread pools spin against each other (a training
    # test took 5x as long beside a simulation)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _find_data_dir() -> Path:
    raw = os.environ.get("FEDREX_DATA_DIR") or str(REPO.parent / "shared" / "data")
    path = Path(raw).resolve()
    if not (path / "rt_critics" / "reviews.parquet").exists():
        raise RuntimeError(f"tests need the real data: set FEDREX_DATA_DIR (looked in {path})")
    os.environ["FEDREX_DATA_DIR"] = str(path)
    os.environ.setdefault("NLTK_DATA", str(path / "nltk_data"))
    return path


DATA_DIR = _find_data_dir()


# The README runs the tests on two pytest-xdist workers, each module whole on one worker (its module
# fixtures built once), modules in collection order (--dist loadfile --no-loadscope-reorder). These
# run Flower or train for minutes: collected first, longest first, they start at once and the other
# modules fill in around them, so both workers end together.
LONGEST_FIRST = ("test_federated.py", "test_flower_app.py", "test_deployment.py", "test_devices.py", "test_models.py",
                 "test_analysis.py", "test_robustness.py", "test_learning.py", "test_onnx_client.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Each test session gets its own FedREX cache, so no test trusts a stale entry."""
    if "FEDREX_TEST_CACHE" in os.environ:  # opt-in reuse across local runs
        os.environ["FEDREX_CACHE_DIR"] = os.environ["FEDREX_TEST_CACHE"]
    else:
        os.environ["FEDREX_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedrex-cache"))
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def tok():
    from models.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer(64)


@pytest.fixture(scope="session")
def sst2(tok):
    """(the first 20,000 SST-2 training rows, the whole dev set), encoded."""
    from models.datasets import cached_text_dataset
    from models.encoded import EncodedData

    train, _ = cached_text_dataset("sst2", "train")
    dev, _ = cached_text_dataset("sst2", "validation")
    return EncodedData.from_dataset(train.select(range(20_000)), tok), EncodedData.from_dataset(dev, tok)


@pytest.fixture(scope="session")
def federate_in_process():
    """``federate(start, network, clients, settings, anchor=None)``: three FedAvg rounds without
    Flower, each client's real local round (``client.local.train_round``) from the same received
    weights, the updates averaged with equal weights; ``anchor``: the start model the explanation
    terms and start-kd read. Returns the final global model."""
    import torch

    from client.local import train_round
    from client.state import ClientState
    from models.networks import build_network

    def federate(start, network: dict, clients: list, settings, anchor=None):
        weights = {k: v.clone() for k, v in start.state_dict().items()}
        for rnd in (1, 2, 3):
            sent = [train_round(lambda: build_network(network), weights, c.train, settings, ClientState(), rnd,
                                c.partition_id, 0.0, c.tokenizer, anchor)[0] for c in clients]
            weights = {**weights, **{k: torch.stack([s[k] for s in sent]).mean(0) for k in sent[0]}}
        model = build_network(network)
        model.load_state_dict(weights)
        return model

    return federate


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(at)``: from now on, the ``at``-th file opened for an atomic write
    (``models.files``) fails every write as a full disk does; returns the count of files opened
    so far (a one-item list). ``monkeypatch.undo()`` ends it."""
    import errno

    real_fdopen = os.fdopen

    def fill_at(at: int) -> list[int]:
        opened = [0]

        def fdopen(fd, mode):
            opened[0] += 1
            handle = real_fdopen(fd, mode)
            if opened[0] == at:
                def write(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                handle.write = write
            return handle

        monkeypatch.setattr("models.files.os.fdopen", fdopen)
        return opened

    return fill_at
