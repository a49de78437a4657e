"""A device's encoded rows, kept between messages in its state folder.

Flower starts a new ClientApp process for every message, so a device read its file, built the
word normaliser's index and encoded its rows at every message: 0.44 s of each message on a
device in a Raspberry Pi's shape (``benchmarks/device_shape.py``), most of it the index. The rows
encoded once are kept under ``<state-dir>/encoded-rows/``, keyed by everything that decides them:
the file's path and content, the run's max length, test fraction, seed and label count, the
normaliser's bytes, the tokenizer itself (its vocabulary and settings, whichever was loaded), the
tokenizers and pyarrow versions, and the code that reads, splits and encodes. Any change is a new
key, so a stale entry is never read; an unreadable one is encoded again. The cache is a saving,
never a failure: an entry that cannot be written is said in Flower's log and the message goes on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.encoded import EncodedData
from models.errors import FedrexError
from models.files import atomic_write_bytes
from models.tokenizer import WordPieceTokenizer

FOLDER = "encoded-rows"
KEEP = 4  # entries kept per folder: a device switching between a few runs' settings re-encodes nothing
ROOT = Path(__file__).resolve().parents[1]
# the code that reads a user's file, splits it and encodes it (an App Bundle carries these sources;
# the vocabulary it leaves out is in the key through the tokenizer itself)
CODE = ("client/data.py", "client/row_cache.py", "models/datasets.py", "models/partitioning.py",
        "models/tokenizer.py", "models/normalizer.py", "models/encoded.py")
PACKAGES = ("tokenizers", "pyarrow")


@lru_cache(maxsize=1)
def code_digest() -> str:
    """The digest of CODE as installed, and of PACKAGES' versions; a file an install left out
    (bytecode only) counts as its name, so the key stays the same for the same install."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for name in CODE:
        path = ROOT / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"missing"))
    for package in PACKAGES:
        try:
            digest.update(f"{package}=={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(f"{package} missing".encode())
    return digest.hexdigest()


def rows_key(path: str, max_length: int, test_fraction: float, seed: int, num_labels: int,
             normalizer: bytes | None, tokenizer: WordPieceTokenizer) -> str:
    """The entry's name: a digest of everything that decides the rows (the module docstring). The
    file's content, not its modification time, which a copy can keep across an edit."""
    identity = {"file": str(Path(path).resolve()), "content": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                "max_length": max_length, "test_fraction": test_fraction, "seed": seed, "num_labels": num_labels,
                "normalizer": hashlib.sha256(normalizer).hexdigest() if normalizer else "",
                # its own serialisation (vocabulary, lower-casing, truncation): 6 ms
                "tokenizer": hashlib.sha256(tokenizer.serialized().encode()).hexdigest(), "code": code_digest()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def load_rows(folder: Path, key: str) -> tuple[EncodedData, EncodedData, int] | None:
    """(train, test, label count) kept under ``key``, or None: not kept, or unreadable (said in
    Flower's log; the caller encodes the rows again and replaces it)."""
    path = folder / f"{key}.npz"
    try:
        blob = path.read_bytes()
    except OSError:  # not kept (or removed by another node's clean-up a moment ago)
        return None
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
            train, test = (_split(arrays, name) for name in ("train", "test"))
            kept = train, test, int(arrays["num_labels"])
    except Exception as exc:  # noqa: BLE001  (any damage: the rows are encoded again)
        logging.getLogger("flwr").warning("[fedrex] encoded rows in %s unreadable (%s): encoding them again", path, exc)
        return None
    try:
        os.utime(path)  # used now: the clean-up keeps the entries used last
    except OSError:
        pass
    return kept


def save_rows(folder: Path, key: str, train: EncodedData, test: EncodedData, num_labels: int) -> None:
    """Keep the rows under ``key`` and drop all but the KEEP entries used last. Best effort: a
    folder that cannot be written, or an entry another node removes meanwhile, costs only the
    saving (said in Flower's log), never the message."""
    try:
        _save(folder, key, train, test, num_labels)
    except (OSError, FedrexError) as exc:
        logging.getLogger("flwr").warning("[fedrex] encoded rows not kept in %s (%s)", folder, exc)


def _save(folder: Path, key: str, train: EncodedData, test: EncodedData, num_labels: int) -> None:
    arrays = {"num_labels": np.int64(num_labels)}
    for name, data in (("train", train), ("test", test)):
        lengths = np.asarray([len(row) for row in data.ids], dtype=np.int64)
        arrays[f"{name}_ids"] = np.concatenate(data.ids).astype(np.int64) if data.ids else np.zeros(0, np.int64)
        arrays[f"{name}_lengths"] = lengths
        arrays[f"{name}_labels"] = np.asarray(data.labels, dtype=np.int64)
        # JSON, not a numpy string array, which drops a text's trailing NUL characters
        arrays[f"{name}_texts"] = np.frombuffer(json.dumps(data.texts).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"{key}.npz", buffer.getvalue())
    entries = []
    for entry in folder.glob("*.npz"):
        try:
            entries.append((entry.stat().st_mtime_ns, entry))
        except OSError:  # removed by another node sharing the folder
            continue
    for _, old in sorted(entries, reverse=True)[KEEP:]:
        old.unlink(missing_ok=True)


def _split(arrays, name: str) -> EncodedData:
    lengths, flat = arrays[f"{name}_lengths"], arrays[f"{name}_ids"]
    labels = arrays[f"{name}_labels"]
    texts = json.loads(arrays[f"{name}_texts"].tobytes().decode())
    if int(lengths.sum()) != len(flat) or not len(lengths) == len(labels) == len(texts):
        raise ValueError("its arrays disagree in length")
    ids = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return EncodedData([np.asarray(row, dtype=np.int64) for row in ids], labels.astype(np.int64), texts)
