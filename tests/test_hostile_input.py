"""Hostile input, generated (hypothesis): whatever a user types or a device's file holds, FedREX
either takes it or refuses it with one FedrexError (the CLI's one `fedrex: error:` line), never
another exception from deep inside a library. Derandomized, with no example database, so every
run tries the same inputs (a failure is reproducible). The dataset files it generates are read
through HF datasets with a cache of the module's own (``_own_hf_cache``): hundreds of one-off cache
entries must not pile up in the user's; Hypothesis keeps only its caches in .hypothesis/, which git
ignores.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from analysis.load import RunFolderError, load_run, run_info
from models.datasets import load_text_dataset, read_user_file
from models.errors import FedrexError
from models.run_settings import RunSettings, split_pairs
from models.tokenizer import WordPieceTokenizer, client_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150)
KEYS = [f.name.replace("_", "-") for f in dataclasses.fields(RunSettings)]
# what a TOML file, `--run-config k=v` or Flower can hand over as a value
VALUES = st.one_of(st.text(max_size=20), st.integers(-10**9, 10**9), st.floats(), st.booleans(),
                   st.sampled_from(["", "nan", "inf", "-1", "0", "1e400", "true", "none", "char,synonym", "x=1"]))


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), VALUES, max_size=5))
def test_any_run_config_is_settings_or_one_clear_error(config):
    try:
        parsed = RunSettings.from_flower(config)
    except FedrexError as err:
        assert str(err)
    else:
        parsed.validate()  # what was taken is valid, and round-trips
        assert RunSettings.from_flower(parsed.to_flower()) == parsed


@FUZZ
@given(st.lists(st.text(max_size=25), max_size=5))
def test_any_override_pairs_parse_or_give_one_clear_error(pairs):
    try:
        values = split_pairs(pairs)
    except FedrexError as err:
        assert "is not key=value" in str(err)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())


@pytest.fixture(scope="module")
def tokenizers():
    normalizer = (ROOT / "models" / "artifacts" / "sst2-student" / "normalizer.txt.gz").read_bytes()
    return WordPieceTokenizer(16), client_tokenizer(16, normalizer)  # bare, and behind the word normaliser


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=200), st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=50),
                          st.just(""), st.just("a" * 100_000)), min_size=1, max_size=4))
def test_any_text_encodes_to_framed_ids_within_the_vocabulary(tokenizers, texts):
    """Empty, huge, control characters, any script: [CLS] ... [SEP], at most max-length ids, every
    id a real token; the normaliser in front changes none of that."""
    for tokenizer in tokenizers:
        for ids in tokenizer.encode_ids(texts):
            assert 2 <= len(ids) <= tokenizer.max_length
            assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
            assert all(0 <= i < tokenizer.vocab_size for i in ids)


DEVICE_FILES = st.sampled_from(["user.csv", "user.tsv", "user.json", "user.jsonl", "user.parquet"])


def dataset_file(path: Path) -> tuple[list[str], np.ndarray, int]:
    """A dataset file as the server and simulations read it (`--dataset FILE`, HF datasets but
    pyarrow for CSV), in read_user_file's shape."""
    dataset, num_labels = load_text_dataset(str(path))
    return list(dataset["text"]), np.asarray(dataset["label"]), num_labels


READERS = pytest.mark.parametrize("read", [read_user_file, dataset_file], ids=["device file", "dataset file"])


@pytest.fixture(scope="module", autouse=True)
def _own_hf_cache(tmp_path_factory):
    """HF datasets caches every file it reads, by path: the generated files go to a temporary cache."""
    import datasets

    before = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf-datasets-cache")
    yield
    datasets.config.HF_DATASETS_CACHE = before


def test_generated_dataset_files_leave_the_users_hf_cache_alone(tmp_path):
    """What ``_own_hf_cache`` is for: a dataset file read here is cached under the temporary cache."""
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert dataset_file(path)[0] == ["good", "bad"]
    assert cache.is_relative_to(tmp_path.parents[1]) and any(cache.rglob("*.arrow"))  # pytest's temporary root


@READERS
@FUZZ
@given(DEVICE_FILES, st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    # almost right: a header, then rows with random cells
    st.lists(st.tuples(st.text(max_size=15), st.one_of(st.integers(-3, 3), st.floats(), st.text(max_size=3))),
             max_size=6).map(lambda rows: ("text,label\n" + "".join(f'"{t}",{v}\n' for t, v in rows)).encode())))
def test_any_device_file_is_rows_or_one_clear_error(read, name, content):
    """A device's own data file (read with pyarrow alone) and a dataset file (read as `--dataset`
    reads it): random bytes, random text, a CSV with random cells, under every suffix."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            texts, labels, num_labels = read(path)
        except FedrexError as err:
            assert str(path) in str(err)
        else:
            assert len(texts) == len(labels) > 0 and all(isinstance(t, str) for t in texts)
            assert labels.dtype.kind == "i" and 0 <= labels.min() and labels.max() < num_labels


WORDS = st.text(alphabet=st.characters(categories=("L", "N", "Zs", "P"), exclude_characters='"\\'), min_size=1,
                max_size=40).filter(lambda t: t.strip() == t and t)


@READERS
@FUZZ
@given(DEVICE_FILES, st.lists(st.tuples(WORDS, st.sampled_from([0, 1])), min_size=2, max_size=8)
       .filter(lambda rows: {label for _, label in rows} == {0, 1}))
def test_a_well_formed_device_file_reads_back_its_rows(read, name, rows):
    """The other side of the fuzz above: any well-formed file, in every format, gives back exactly
    its texts and labels (so the refusals above are of bad files, not of files in general), texts
    that look like numbers ("42", "007") included."""
    frame = pd.DataFrame(rows, columns=["text", "label"])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        if name.endswith(".parquet"):
            frame.to_parquet(path)
        elif name.endswith(".jsonl"):
            frame.to_json(path, orient="records", lines=True, force_ascii=False)
        elif name.endswith(".json"):
            frame.to_json(path, orient="records", force_ascii=False)
        else:
            frame.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
        texts, labels, num_labels = read(path)
    assert texts == frame["text"].tolist() and labels.tolist() == frame["label"].tolist() and num_labels == 2


@FUZZ
@given(st.lists(st.fixed_dictionaries({
    "text": st.one_of(st.none(), st.text(max_size=20), st.integers()),
    "label": st.one_of(st.none(), st.integers(-2, 5), st.floats(), st.booleans(), st.text(max_size=2))}),
    min_size=1, max_size=6))
def test_any_parquet_cells_are_rows_or_one_clear_error(rows):
    """Typed cells a text file cannot carry: NaN and None labels, floats, booleans, numbers as text."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "user.parquet"
        try:
            pd.DataFrame(rows).to_parquet(path)
        except Exception:  # pyarrow cannot write this mix of types: not an input a device could hold
            return
        try:
            texts, labels, _ = read_user_file(path)
        except FedrexError as err:
            assert str(path) in str(err)
        else:
            assert all(isinstance(t, str) for t in texts) and np.issubdtype(labels.dtype, np.integer)


def _clients_parquet() -> bytes:
    """A real clients.parquet of rounds 0-3."""
    import io

    frame = pd.DataFrame({"run_id": "r", "round": [0, 1, 2, 3], "client_id": "a", "partition_id": 0,
                          "model": "global", "metric": "acc", "value": [0.5, 0.6, 0.7, 0.8]})
    sink = io.BytesIO()
    frame.to_parquet(sink)
    return sink.getvalue()


RUN_JSON = st.one_of(
    st.binary(max_size=200), st.text(max_size=100).map(str.encode),
    st.fixed_dictionaries({"run_id": st.text(max_size=5), "settings": st.dictionaries(st.text(max_size=5), VALUES, max_size=3),
                           "completed_rounds": st.one_of(st.integers(-2, 6), st.text(max_size=3), st.none(), st.floats())})
    .map(lambda meta: json.dumps(meta).encode()))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.just(_clients_parquet())), RUN_JSON)
def test_any_run_folder_is_read_or_one_clear_error(clients, meta):
    """What `fedrex report` reads first: a clients.parquet of random bytes or a real one, beside a
    run.json of random bytes or of random fields. A table read holds only committed rounds."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "clients.parquet").write_bytes(clients)
        (Path(folder) / "run.json").write_bytes(meta)
        try:
            frame = load_run(folder)
        except RunFolderError as err:
            assert folder in str(err)
        else:
            try:
                completed = json.loads(meta).get("completed_rounds")
            except (ValueError, AttributeError):  # not a JSON object: nothing says which rounds are committed
                completed = None
            if isinstance(completed, int) and not isinstance(completed, bool):
                assert frame["round"].max() <= completed
        try:
            run_info(folder)
        except RunFolderError as err:
            assert folder in str(err)
