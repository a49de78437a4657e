"""Load text-classification data from a named registry entry, a Hugging Face id or a local file.

Every dataset comes out with the same canonical columns so the rest of FedREX never deals with
per-dataset names: ``text`` (str), ``label`` (int64 in ``[0, num_labels)``), and optionally
``user_id`` (str) and ``timestamp``. The result is an Arrow-backed ``datasets.Dataset``, saved once
to FedREX's cache and memory-mapped from there, so every process (a Ray actor, a SuperNode) shares
the same pages and thousands of partitions are cut from it as index lists, not copies.

Named datasets load from ``FEDREX_DATA_DIR`` (layout of ``shared/data``) when that folder holds
them, otherwise from the Hugging Face hub. Nothing is ever made up: a dataset that cannot be found
is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.errors import FedrexError

DATA_DIR_ENV = "FEDREX_DATA_DIR"
TEXT, LABEL, USER, TIME = "text", "label", "user_id", "timestamp"
LOCAL_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how its columns map onto the canonical ones."""

    name: str
    num_labels: int
    label_names: tuple[str, ...]
    local_files: dict[str, str]  # split -> path relative to the data dir
    hub_id: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split -> hub split
    text_column: str = TEXT
    label_column: str = LABEL
    user_column: str | None = None
    time_column: str | None = None
    # The hub copy's columns/labels when they differ from the local copy's.
    hub_text_column: str | None = None
    hub_user_column: str | None = None
    hub_time_column: str | None = None
    hub_label_map: dict[int, int] | None = None
    # (dataset, split) whose texts this one must not hold: the shipped start model and the
    # references learn from it, so a row it also holds would be tested on what was trained on
    disjoint_from: tuple[str, str] | None = None


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="sst2", num_labels=2, label_names=("negative", "positive"),
            local_files={"train": "sst2/train.parquet", "validation": "sst2/validation.parquet"},
            hub_id="stanfordnlp/sst2", hub_splits={"train": "train", "validation": "validation"},
            hub_text_column="sentence",
        ),
        DatasetSpec(
            name="ag_news", num_labels=4, label_names=("world", "sports", "business", "sci/tech"),
            local_files={"test": "ag_news/test.parquet"},
            hub_id="fancyzhx/ag_news", hub_splits={"train": "train", "test": "test"},
        ),
        DatasetSpec(
            name="sent140_users", num_labels=2, label_names=("negative", "positive"),
            local_files={"train": "sent140_users/tweets.parquet"},
            hub_id="stanfordnlp/sentiment140", hub_splits={"train": "train"},
            user_column="user_id", time_column="timestamp",
            hub_user_column="user", hub_time_column="date", hub_label_map={0: 0, 4: 1},
        ),
        DatasetSpec(
            name="rt_critics", num_labels=2, label_names=("rotten", "fresh"),
            local_files={"train": "rt_critics/reviews.parquet"},
            user_column="user_id", time_column="timestamp",
            # SST-2 was cut from Rotten Tomatoes snippets: 99 of the 12,820 reviews (98 with the same
            # label) are SST-2 training sentences or phrases, which the student learnt
            disjoint_from=("sst2", "train"),
        ),
    )
}


@dataclass(frozen=True)
class ColumnOverrides:
    """User-given column names for an arbitrary dataset (a hub id or a local file)."""

    text: str | None = None
    label: str | None = None
    user: str | None = None
    time: str | None = None
    num_labels: int | None = None


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: the explicit argument, else ``$FEDREX_DATA_DIR``, else None."""
    raw = explicit if explicit is not None else os.environ.get(DATA_DIR_ENV)
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise FedrexError(f"data dir {path} does not exist (set by --data-dir or ${DATA_DIR_ENV})")
    return path


def load_text_dataset(
    name: str,
    split: str = "train",
    data_dir_path: str | os.PathLike | None = None,
    columns: ColumnOverrides = ColumnOverrides(),
):
    """Load ``name`` (registry name, local file or hub id) as a canonical, validated Dataset.

    Returns ``(dataset, num_labels)``.
    """
    local_root = data_dir(data_dir_path)
    if name in REGISTRY:
        spec = REGISTRY[name]
        raw, mapping, label_map = _load_registered(spec, split, local_root)
        num_labels = spec.num_labels
    elif Path(name).suffix.lower() in LOCAL_FORMATS:
        raw = _load_local_file(Path(name), (columns.text or TEXT, columns.user or USER))
        mapping, label_map, num_labels = _override_mapping(columns, raw.column_names), None, columns.num_labels
    elif "/" in name and not Path(name).exists():
        raw = _load_hub(name, split)
        mapping, label_map, num_labels = _override_mapping(columns, raw.column_names), None, columns.num_labels
    else:
        known = ", ".join(sorted(REGISTRY))
        raise FedrexError(
            f"unknown dataset {name!r}: use one of {known}, a .parquet/.csv/.json file, or a hub id"
        )
    dataset, num_labels = canonicalize(raw, mapping, num_labels, label_map, source=name)
    if name in REGISTRY and REGISTRY[name].disjoint_from:
        dataset = without_texts_of(dataset, *REGISTRY[name].disjoint_from, data_dir_path)
    return dataset, num_labels


def overlap_key(text: str) -> str:
    """A text as the overlap check compares it: lowercase letters and digits only, so SST-2's
    tokenized form ("it 's a ...") matches the raw review it came from ("It's a ...")."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def without_texts_of(dataset, other: str, split: str, data_dir_path):
    """``dataset`` without the rows whose text (``overlap_key``) ``other``'s ``split`` also holds."""
    try:
        seen = {overlap_key(t) for t in cached_text_dataset(other, split, data_dir_path)[0][TEXT]}
    except FedrexError as err:
        raise FedrexError(f"cannot check this dataset against {other} {split}, whose texts it must not "
                          f"hold: {err}") from None
    seen.discard("")  # a text without letters or digits says nothing about overlap
    keep = [i for i, text in enumerate(dataset[TEXT]) if overlap_key(text) not in seen]
    return dataset.select(keep) if len(keep) < len(dataset) else dataset


def _override_mapping(columns: ColumnOverrides, present: list[str]) -> dict[str, str | None]:
    """Given names win; otherwise canonical names are used, and the optional user and time
    columns are picked up when a file already has them under their canonical names."""
    return {TEXT: columns.text or TEXT, LABEL: columns.label or LABEL,
            USER: columns.user or (USER if USER in present else None),
            TIME: columns.time or (TIME if TIME in present else None)}


def _load_registered(spec: DatasetSpec, split: str, local_root: Path | None):
    if local_root is not None and split in spec.local_files and (local_root / spec.local_files[split]).exists():
        mapping = {TEXT: spec.text_column, LABEL: spec.label_column, USER: spec.user_column,
                   TIME: spec.time_column}
        return (_load_local_file(local_root / spec.local_files[split], (spec.text_column, spec.user_column or USER)),
                mapping, None)
    if local_root is not None and split not in spec.local_files:
        have = ", ".join(sorted(spec.local_files))
        raise FedrexError(f"{spec.name} has no {split!r} split in {local_root} (it has: {have})")
    if spec.hub_id is None:
        raise FedrexError(
            f"{spec.name} is only available locally: set --data-dir or ${DATA_DIR_ENV} to a folder "
            f"holding {spec.local_files.get(split, spec.local_files)}"
        )
    if split not in spec.hub_splits:
        raise FedrexError(f"{spec.name} has no {split!r} split (it has: {', '.join(spec.hub_splits)})")
    mapping = {TEXT: spec.hub_text_column or spec.text_column, LABEL: spec.label_column,
               USER: spec.hub_user_column or spec.user_column,
               TIME: spec.hub_time_column or spec.time_column}
    if spec.hub_label_map:
        mapping[LABEL] = "sentiment"
    return _load_hub(spec.hub_id, spec.hub_splits[split]), mapping, spec.hub_label_map


def _load_local_file(path: Path, string_columns: tuple[str, ...] = (TEXT, USER)):
    """A local file: a CSV with pyarrow (``_read_csv``: ``string_columns``, the text and the user
    id, stay text whatever they look like), anything else through HF datasets."""
    import datasets

    if not path.exists():
        raise FedrexError(f"data file {path} does not exist")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FedrexError(f"cannot read {path}: use one of {', '.join(LOCAL_FORMATS)}")
    if fmt == "csv":
        return datasets.Dataset(_read_csv(path, *string_columns))
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in several types
        cause = exc.__cause__ or exc
        if isinstance(cause, UnicodeDecodeError):
            raise FedrexError(f"{path} is not valid UTF-8 ({cause.reason} at byte {cause.start})") from None
        if "corresponds to no data" in str(cause):  # datasets' words for a header-only file
            raise FedrexError(f"{path} is empty: no rows to train or evaluate on") from None
        raise FedrexError(f"cannot read {path}: {type(cause).__name__}: {cause}".splitlines()[0]) from None


def _read_csv(path: Path, *string_columns: str) -> pa.Table:
    """A .csv/.tsv with pyarrow. ``string_columns`` (the text, a user id) are text even when every
    cell looks like a number: pandas, under HF datasets' CSV loader, made "007" the integer 7 and two
    19-digit user ids one float. An empty cell is missing (a row with no text is refused later, as
    before), any other cell is what it says ("NA" is a text); quoted cells may hold line breaks."""
    import pyarrow.csv as pa_csv

    _check_utf8(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        table = pa_csv.read_csv(
            path, parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                                  null_values=[""], strings_can_be_null=True))
    except pa.ArrowInvalid as err:
        if "Empty CSV file" in str(err):
            raise FedrexError(f"{path} is empty: no rows to train or evaluate on") from None
        raise FedrexError(f"cannot read {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    repeated = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if repeated:
        raise FedrexError(f"{path} names column(s) {', '.join(map(repr, repeated))} more than once: give each "
                          "column its own name")
    return table


def read_user_file(path: str | os.PathLike) -> tuple[list[str], np.ndarray, int]:
    """A device user's own file (.csv/.tsv/.json/.jsonl/.parquet with ``text`` and ``label``
    columns) read with pyarrow alone, so a device needs no ``datasets`` library; the same
    validation (and messages) as every other source. Returns (texts, labels, num_labels)."""
    import json

    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FedrexError(f"data file {path} does not exist")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FedrexError(f"cannot read {path}: use one of {', '.join(LOCAL_FORMATS)}")
    try:
        if fmt == "csv":
            table = _read_csv(path, TEXT)
        elif fmt == "json":
            text = path.read_text(encoding="utf-8").strip()
            rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                 if line.strip()]
            table = pa.Table.from_pylist(rows)
        else:
            table = pq.read_table(path)
    except FedrexError:
        raise
    except UnicodeDecodeError as err:
        raise FedrexError(f"{path} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except Exception as err:  # pyarrow's and json's parser errors
        if "Empty CSV file" in str(err):
            raise FedrexError(f"{path} is empty: no rows to train or evaluate on") from None
        raise FedrexError(f"cannot read {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    missing = [c for c in (TEXT, LABEL) if c not in table.column_names]
    if missing:
        raise FedrexError(f"{path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                          f"a device's file needs {TEXT!r} and {LABEL!r} columns")
    if table.num_rows == 0:
        raise FedrexError(f"{path} is empty: no rows to train or evaluate on")
    texts = _validate_text(table.column(TEXT), str(path))
    labels, num_labels = _validate_labels(table.column(LABEL), None, None, str(path))
    return texts.to_pylist(), labels, num_labels


def _check_utf8(path: Path) -> None:
    """Fail early, with the byte offset, on text files that are not UTF-8."""
    offset = 0
    with open(path, "rb") as handle:
        decoder = __import__("codecs").getincrementaldecoder("utf-8")()
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise FedrexError(
                    f"{path} is not valid UTF-8 (byte {offset + err.start}: {chunk[err.start:err.start + 4]!r});"
                    " re-encode it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset += len(chunk)


def _load_hub(hub_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as exc:
        raise FedrexError(
            f"cannot load {hub_id!r} split {split!r} from the Hugging Face hub ({type(exc).__name__}); "
            f"offline? point --data-dir/${DATA_DIR_ENV} at a local copy"
        ) from None


def canonicalize(raw, mapping: dict[str, str | None], num_labels: int | None,
                 label_map: dict[int, int] | None = None, source: str = "dataset"):
    """Rename/select columns to the canonical schema and validate them. Returns (dataset, num_labels)."""
    for canonical, column in mapping.items():
        if column is not None and column not in raw.column_names:
            hint = {TEXT: "--text-column", LABEL: "--label-column", USER: "--user-column",
                    TIME: "--time-column"}[canonical]
            raise FedrexError(
                f"{source} has no column {column!r} for {canonical} (columns: {', '.join(raw.column_names)}); "
                f"pass {hint}"
            )
    if len(raw) == 0:
        raise FedrexError(f"{source} is empty: no rows to train or evaluate on")
    present = {canonical: column for canonical, column in mapping.items() if column is not None}
    arrow = raw.select_columns(list(dict.fromkeys(present.values()))).with_format("arrow")[:]
    arrays = {canonical: arrow.column(column) for canonical, column in present.items()}
    arrays[TEXT] = _validate_text(arrays[TEXT], source)
    labels, num_labels = _validate_labels(arrays[LABEL], num_labels, label_map, source)
    arrays[LABEL] = pa.chunked_array([pa.array(labels, pa.int64())])
    if USER in arrays:
        arrays[USER] = pc.cast(arrays[USER], pa.string())
    import datasets

    return datasets.Dataset(pa.table(arrays)), num_labels


def _validate_text(column: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        decoded = []
        for index, value in enumerate(column.to_pylist()):
            try:
                decoded.append(None if value is None else value.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise FedrexError(f"{source}: text in row {index} is not valid UTF-8 (byte {err.start})") from None
        column = pa.chunked_array([pa.array(decoded, pa.string())])
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise FedrexError(f"{source}: text column holds {column.type}, not strings")
    nulls = column.null_count
    if nulls:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise FedrexError(f"{source}: {nulls} rows have no text (first at row {first}); drop or fill them")
    return column


def _validate_labels(column: pa.ChunkedArray, num_labels: int | None,
                     label_map: dict[int, int] | None, source: str):
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise FedrexError(f"{source}: {column.null_count} rows have no label (first at row {first})")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        raise FedrexError(f"{source}: labels are strings; map them to integers 0..K-1 first")
    values = column.to_numpy()
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            raise FedrexError(
                f"{source}: {int(bad.sum())} labels are NaN or not whole numbers (first at row {int(np.flatnonzero(bad)[0])})"
            )
    values = values.astype(np.int64)
    if label_map is not None:
        mapped = np.array([label_map.get(int(v), -1) for v in values], dtype=np.int64)
        values = mapped
    if num_labels is None:
        num_labels = int(values.max()) + 1 if values.size else 0
    bad = (values < 0) | (values >= num_labels)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise FedrexError(
            f"{source}: {int(bad.sum())} labels outside 0..{num_labels - 1} "
            f"(first at row {first}: {int(column[first].as_py())})"
        )
    if num_labels < 2:
        raise FedrexError(f"{source}: needs at least 2 classes, found {num_labels}")
    return values, num_labels


def cached_text_dataset(
    name: str,
    split: str = "train",
    data_dir_path: str | os.PathLike | None = None,
    columns: ColumnOverrides = ColumnOverrides(),
):
    """``load_text_dataset`` with its canonical result saved to disk once and memory-mapped after.

    The key covers the source (and, for files, their size, modification and change times) and the
    column mapping, so an edited file or other columns give a fresh entry. Writes go to a temporary folder renamed into
    place, so a crash never leaves a half-written entry that a later run would trust.
    """
    import hashlib
    import json
    import shutil
    import tempfile

    import datasets

    local_root = data_dir(data_dir_path)
    source = _source_fingerprint(name, split, local_root)
    key = hashlib.sha256(json.dumps([source, columns.__dict__, CACHE_VERSION], sort_keys=True,
                                    default=str).encode()).hexdigest()[:20]
    entry = cache_dir() / "datasets" / f"{Path(name).stem if name not in REGISTRY else name}-{split}-{key}"
    if (entry / "fedrex.json").exists():
        meta = json.loads((entry / "fedrex.json").read_text())
        return datasets.load_from_disk(str(entry / "data")), int(meta["num_labels"])
    dataset, num_labels = load_text_dataset(name, split, data_dir_path, columns)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".staging-"))
    try:
        dataset.save_to_disk(str(staging / "data"))
        (staging / "fedrex.json").write_text(json.dumps({"num_labels": num_labels, "source": source}))
        try:
            staging.rename(entry)
        except OSError:  # another process won the race: its entry is as good as ours
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(entry / "data")), num_labels


CACHE_VERSION = 2  # 2: CSVs read with pyarrow (texts and user ids as text, empty cells missing)


def cache_dir() -> Path:
    """FedREX's cache root: ``$FEDREX_CACHE_DIR`` or ``~/.cache/fedrex``."""
    return Path(os.environ.get("FEDREX_CACHE_DIR", Path.home() / ".cache" / "fedrex")).expanduser()


def _source_fingerprint(name: str, split: str, local_root: Path | None) -> list:
    paths = []
    if name in REGISTRY and local_root is not None and split in REGISTRY[name].local_files:
        paths.append(local_root / REGISTRY[name].local_files[split])
    elif Path(name).suffix.lower() in LOCAL_FORMATS:
        paths.append(Path(name))
    # the change time too: a copy or a tool can put back a file's size and modification time after an
    # edit, never its change time (the kernel sets it at every write); hashing the content instead
    # would cost every process that loads a dataset a read of the whole file
    stats = [[str(p.resolve()), s.st_size, s.st_mtime_ns, s.st_ctime_ns] for p in paths if p.exists()
             for s in [p.stat()]]
    disjoint = REGISTRY[name].disjoint_from if name in REGISTRY else None
    return [name, split, stats, _source_fingerprint(*disjoint, local_root) if disjoint else None]
