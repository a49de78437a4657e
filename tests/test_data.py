"""Data layer: real datasets load, partition and split as documented; bad input fails clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.datasets import ColumnOverrides, cached_text_dataset, load_text_dataset
from models.errors import FedrexError
from models.partitioning import FederatedData, PartitionConfig, split_indices
from models.tokenizer import WordPieceTokenizer

ROOT = Path(__file__).resolve().parents[1]


def federated(name, **config):
    dataset, num_labels = cached_text_dataset(name, "validation" if name == "sst2" else "train")
    return FederatedData(dataset, num_labels, PartitionConfig(**config))


def test_rt_critics_natural_partition_has_118_clients_covering_all_rows():
    fed = federated("rt_critics", kind="natural")
    sizes = [len(fed.partition(pid)) for pid in range(fed.num_partitions)]
    assert fed.num_partitions == 118
    assert sum(sizes) == 12_820 - 99  # without the reviews SST-2 train holds (next test)
    assert min(sizes) == 20 and max(sizes) == 1_125
    # every partition is one critic, and the client id names that critic
    part = fed.partition(3)
    assert set(part["user_id"]) == {fed.client_id(3)}


def test_rt_critics_holds_no_text_the_start_model_learnt_from_sst2(tmp_path):
    """SST-2 was cut from Rotten Tomatoes snippets: 99 critic reviews (98 with the same label) are
    SST-2 training sentences or phrases, which the shipped student and the SST-2 references
    learnt. FedREX's rt_critics leaves them out, so no user is tested on a text the start model
    was trained on; without SST-2 beside it, the loader says why it cannot check."""
    from models.datasets import data_dir, overlap_key

    raw = pd.read_parquet(data_dir() / "rt_critics" / "reviews.parquet")
    seen = {overlap_key(t) for t in pd.read_parquet(data_dir() / "sst2" / "train.parquet")["text"]}
    assert overlap_key("It's a masterpiece!") == overlap_key("it 's a masterpiece !")
    contaminated = raw["text"].map(overlap_key).isin(seen)
    assert contaminated.sum() == 99
    loaded = cached_text_dataset("rt_critics", "train")[0].to_pandas()
    assert not loaded["text"].map(overlap_key).isin(seen).any()
    assert sorted(loaded["text"]) == sorted(raw.loc[~contaminated, "text"])
    alone = tmp_path / "rt_critics"
    alone.mkdir()
    (alone / "reviews.parquet").symlink_to(data_dir() / "rt_critics" / "reviews.parquet")
    with pytest.raises(FedrexError, match="cannot check this dataset against sst2 train"):
        load_text_dataset("rt_critics", "train", tmp_path)


def test_sent140_keeps_single_label_users():
    fed = federated("sent140_users", kind="natural")
    single = sum(len(set(fed.partition(pid)["label"])) == 1 for pid in range(fed.num_partitions))
    assert fed.num_partitions == 2_875
    assert single == 900  # as documented in shared/data/README.md


def test_cutting_a_dataset_leaves_flwr_datasets_plotting_libraries_out():
    """flwr_datasets' package imports seaborn, scipy and matplotlib for its plots (1.5 s and about
    90 MB in every process that cuts a dataset: the command, the ServerApp, every actor): cutting
    rt_critics into its users imports none of them, nor does a torch optimizer's step afterwards
    (it imports torch._dynamo, which asks every loaded module for its ``__file__``), and
    flwr_datasets' plots still load when asked, a submodule of theirs too."""
    cached_text_dataset("rt_critics", "train")  # built here: a first build imports scipy on its own
    code = ("import sys\n"
            "from client.data import federation\n"
            "from models.run_settings import RunSettings\n"
            "fed = federation(RunSettings())\n"
            "print(fed.num_partitions, len(fed.client(0).train))\n"
            "import torch\n"
            "torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).step()\n"
            "print(sorted(m for m in ('seaborn', 'scipy', 'matplotlib') if m in sys.modules))\n"
            "import flwr_datasets\n"
            "from flwr_datasets.visualization import plot_label_distributions\n"
            "print(callable(plot_label_distributions), callable(flwr_datasets.visualization.plot_comparison_label_distribution),"
            " 'seaborn' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    clients, heavy, plots = result.stdout.splitlines()
    assert clients.split()[0] == "118" and int(clients.split()[1]) > 0
    assert heavy == "[]"
    assert plots == "True True True"
    # a submodule of the plots imported first, while the stand-in is in place: it loads, once
    code = ("import sys\n"
            "from client.data import federation\n"
            "from models.run_settings import RunSettings\n"
            "federation(RunSettings())\n"
            "import flwr_datasets.visualization.bar_plot as bar_plot\n"
            "from flwr_datasets.visualization import label_distribution\n"
            "print(callable(bar_plot._plot_bar), label_distribution._plot_bar is bar_plot._plot_bar)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True"]


def test_min_samples_filter_drops_small_users():
    fed = federated("sent140_users", kind="natural", min_samples=20)
    assert fed.num_partitions == 23
    assert all(len(fed.partition(pid)) >= 20 for pid in range(fed.num_partitions))


def _dirichlet_sizes(seed):
    fed = federated("sst2", kind="dirichlet", num_partitions=20, alpha=0.5, seed=seed)
    return [tuple(fed.partition(pid)["text"][:3]) + (len(fed.partition(pid)),) for pid in range(20)]


def test_dirichlet_is_reproducible_per_seed_and_differs_across_seeds():
    assert _dirichlet_sizes(1) == _dirichlet_sizes(1)
    assert _dirichlet_sizes(1) != _dirichlet_sizes(2)


def test_dirichlet_with_small_alpha_skews_labels_more_than_iid():
    def mean_majority(fed):
        shares = []
        for pid in range(fed.num_partitions):
            labels = np.asarray(fed.partition(pid)["label"])
            shares.append(np.bincount(labels, minlength=2).max() / len(labels))
        return float(np.mean(shares))

    skewed = mean_majority(federated("sst2", kind="dirichlet", num_partitions=10, alpha=0.1, seed=0))
    iid = mean_majority(federated("sst2", kind="iid", num_partitions=10, seed=0))
    assert skewed > iid + 0.1


@pytest.mark.parametrize("config", [dict(kind="natural"), dict(kind="dirichlet", num_partitions=30, alpha=1.0),
                                    dict(kind="iid", num_partitions=30), dict(kind="bootstrap", num_partitions=30)])
def test_client_splits_are_disjoint_and_cover_the_partition(config):
    name = "rt_critics" if config["kind"] == "natural" else "sst2"
    fed = federated(name, test_fraction=0.25, **config)
    for pid in range(0, fed.num_partitions, 7):
        part = fed.partition(pid)
        train, test = split_indices(part, fed.config, pid)
        assert len(np.intersect1d(train, test)) == 0
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(part)))
        assert len(test) == max(1, round(0.25 * len(part)))
        client = fed.client(pid)
        assert len(client.train) == len(train) and len(client.test) == len(test)


def test_natural_users_are_split_chronologically():
    fed = federated("rt_critics", kind="natural")
    for pid in (0, 50, 117):
        client = fed.client(pid)
        train_times = pd.Series(client.train["timestamp"]).dropna()
        test_times = pd.Series(client.test["timestamp"]).dropna()
        assert train_times.max() <= test_times.min()


def test_iid_split_depends_on_seed():
    a = federated("sst2", kind="iid", num_partitions=5, seed=0).client(0)
    b = federated("sst2", kind="iid", num_partitions=5, seed=0).client(0)
    c = federated("sst2", kind="iid", num_partitions=5, seed=1).client(0)
    assert a.test["text"] == b.test["text"]
    assert a.test["text"] != c.test["text"]


def test_bootstrap_users_are_drawn_per_seed_and_user_any_number_of_them_at_once():
    """Synthetic users for load tests: 10 distinct rows each, the same for the same (seed, user)
    in any process, other users and seeds other rows, and a million of them cost nothing to set up
    (nothing is precomputed: a user's rows are drawn when it is asked for)."""
    import time

    start = time.time()
    fed = federated("sst2", kind="bootstrap", num_partitions=1_000_000, bootstrap_rows=10, seed=0)
    assert fed.num_partitions == 1_000_000 and time.time() - start < 5
    texts = lambda f, pid: list(f.partition(pid)["text"])  # noqa: E731
    last = texts(fed, 999_999)
    assert len(set(last)) == 10
    again = federated("sst2", kind="bootstrap", num_partitions=1_000_000, seed=0)
    assert texts(again, 999_999) == last and texts(again, 3) != last
    assert texts(federated("sst2", kind="bootstrap", num_partitions=1_000_000, seed=1), 999_999) != last
    with pytest.raises(FedrexError, match="bootstrap-rows 900 > the dataset's 872 rows"):
        federated("sst2", kind="bootstrap", num_partitions=3, bootstrap_rows=900)


def test_tiny_clients_keep_a_test_row_and_a_train_row():
    fed = federated("sent140_users", kind="natural")
    sizes = {pid: len(fed.partition(pid)) for pid in range(200)}
    pid = min(sizes, key=sizes.get)
    client = fed.client(pid)
    assert sizes[pid] == 3 and len(client.train) == 2 and len(client.test) == 1


def test_tokenizer_round_trips_known_wordpiece_ids():
    tok = WordPieceTokenizer(max_length=16)
    ids = tok.encode(["Hello world", "unaffable"])
    assert ids[0].tolist()[:4] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP], BERT uncased vocab
    assert tok.tokens(ids[1][ids[1] != 0]) == ["[CLS]", "una", "##ffa", "##ble", "[SEP]"]
    assert tok.decode(ids[1]) == "unaffable"
    assert ids[0, 4:].tolist() == [0] * (ids.shape[1] - 4)  # padded with [PAD]


def test_tokenizer_unescapes_html_and_truncates():
    tok = WordPieceTokenizer(max_length=8)
    assert tok.encode(["&quot;hi&quot; &amp;"])[0].tolist() == tok.encode(['"hi" &'])[0].tolist()
    long = tok.encode(["word " * 100])
    assert long.shape == (1, 8) and long[0, -1] == tok.sep_id


def test_sent140_text_keeps_html_entities_raw_in_the_dataset():
    dataset, _ = cached_text_dataset("sent140_users")
    assert any("&quot;" in text for text in dataset["text"][:5000])


# ---------------------------------------------------------------- bad input
def write_csv(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_a_local_csv_of_numeric_looking_texts_reads_them_as_text(tmp_path):
    """pandas would read this text column as integers ("007" -> 7): it stays text, as written."""
    path = write_csv(tmp_path, "codes.csv", b"text,label\n007,1\n42,0\n3.50,1\n")
    dataset, _ = load_text_dataset(path)
    assert dataset["text"] == ["007", "42", "3.50"]
    renamed = write_csv(tmp_path, "renamed.csv", b"body,label\n007,1\n42,0\n")
    assert load_text_dataset(renamed, columns=ColumnOverrides(text="body"))[0]["text"] == ["007", "42"]
    with pytest.raises(FedrexError, match="no column 'text'"):
        load_text_dataset(renamed)
    # user ids stay text (two 19-digit ids were one float), quoted texts may hold line breaks, an
    # empty text is refused as before, a column named twice is one clear error
    users = write_csv(tmp_path, "users.csv", b'text,label,user_id\n"two\nlines",1,9300000000000000001\n'
                                             b'"NA",0,9300000000000000002\n')
    dataset, _ = load_text_dataset(users, columns=ColumnOverrides(user="user_id"))
    assert dataset["text"] == ["two\nlines", "NA"]
    assert dataset["user_id"] == ["9300000000000000001", "9300000000000000002"]
    with pytest.raises(FedrexError, match="1 rows have no text"):
        load_text_dataset(write_csv(tmp_path, "blank.csv", b"text,label\nfine,1\n,0\n"))
    with pytest.raises(FedrexError, match="names column.*'' more than once"):
        load_text_dataset(write_csv(tmp_path, "sheet.csv", b"text,label,,\nfine,1,,\n"))


def test_local_csv_with_column_mapping(tmp_path):
    path = write_csv(tmp_path, "mine.csv", b"review,stars,who\nnice film,1,ann\nawful,0,bob\nfine,1,ann\n")
    dataset, k = load_text_dataset(path, columns=ColumnOverrides(text="review", label="stars", user="who"))
    assert k == 2 and dataset["text"] == ["nice film", "awful", "fine"] and dataset["user_id"][0] == "ann"


@pytest.mark.parametrize(
    "content, columns, message",
    [
        (b"text,label\n", ColumnOverrides(), "empty"),
        (b"sentence,label\nhi,1\nho,0\n", ColumnOverrides(), "no column 'text'"),
        (b"text,label\ncaf\xe9,1\nok,0\n", ColumnOverrides(), "not valid UTF-8"),
        (b"text,label\na,1\nb,\nc,0\n", ColumnOverrides(), "no label"),
        (b"text,label\na,1.5\nb,0\n", ColumnOverrides(), "not whole numbers"),
        (b"text,label\na,1\nb,7\n", ColumnOverrides(num_labels=2), "outside 0..1"),
        (b"text,label\na,-1\nb,0\n", ColumnOverrides(), "outside"),
        (b"text,label\na,0\nb,0\n", ColumnOverrides(), "at least 2 classes"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, columns, message):
    path = write_csv(tmp_path, "bad.csv", content)
    with pytest.raises(FedrexError, match=message):
        load_text_dataset(path, columns=columns)


def test_nan_labels_in_parquet_are_rejected(tmp_path):
    path = tmp_path / "nan.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1.0, float("nan"), 0.0]}).to_parquet(path)
    with pytest.raises(FedrexError, match="no label|NaN"):
        load_text_dataset(str(path))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(kind="dirichlet", num_partitions=5, alpha=0), "alpha must be > 0"),
        (dict(kind="iid", num_partitions=10_000), "need at least 10000 samples"),
        (dict(kind="nope"), "unknown partitioner"),
        (dict(kind="iid", num_partitions=0), "num-partitions >= 1"),
        (dict(kind="natural"), "needs a user column"),
        (dict(kind="bootstrap", num_partitions=5, bootstrap_rows=0), "bootstrap-rows must be >= 1"),
    ],
)
def test_bad_partition_configs_give_clear_errors(config, message):
    dataset, k = cached_text_dataset("sst2", "validation")
    with pytest.raises(FedrexError, match=message):
        FederatedData(dataset, k, PartitionConfig(**config))


def test_unknown_dataset_and_missing_split():
    with pytest.raises(FedrexError, match="unknown dataset 'nope'"):
        load_text_dataset("nope")
    with pytest.raises(FedrexError, match="no 'train' split"):
        load_text_dataset("ag_news", "train")


def test_cache_entry_is_refreshed_when_the_file_changes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,1\nb,0\n")
    first, _ = cached_text_dataset(str(path))
    path.write_text("text,label\na,1\nb,0\nc,1\n")
    second, _ = cached_text_dataset(str(path))
    assert len(first) == 2 and len(second) == 3
    # an edit that keeps the size, with the modification time put back (as `cp -p` or a restore does)
    import os

    before = path.stat()
    path.write_text("text,label\na,0\nb,1\nc,0\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    third, _ = cached_text_dataset(str(path))
    assert list(third["label"]) == [0, 1, 0]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_describe_prints_the_table():
    result = run_cli("data", "describe", "--dataset", "rt_critics")
    assert result.returncode == 0, result.stderr
    assert "clients                      118" in result.stdout
    assert "single-label clients         0 (0.0%)" in result.stdout


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    bad = write_csv(tmp_path, "bad.csv", b"text,label\ncaf\xe9,1\n")
    for args in (("--dataset", "nope"), ("--dataset", bad, "--partitioner", "iid", "--num-partitions", "1"),
                 ("--dataset", "sst2", "--split", "validation", "--partitioner", "dirichlet",
                  "--num-partitions", "3", "--alpha", "-1")):
        result = run_cli("data", "describe", *args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("fedrex: error:")


def test_a_run_folder_that_cannot_be_written_is_one_clear_error_and_a_full_disk_leaves_the_old_file(tmp_path,
                                                                                                  monkeypatch,
                                                                                                  full_disk):
    from models.files import atomic_write_bytes

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("simulate", "--runs-dir", str(blocker / "runs"), "--run-config", "num-rounds=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]  # beside the progress lines
    assert len(errors) == 1 and errors[0].startswith("fedrex: error: cannot write")

    target = tmp_path / "run.json"
    atomic_write_bytes(target, b"round 3")
    full_disk(1)  # the next file written fails every write, as on a full disk
    with pytest.raises(FedrexError, match="cannot write .*run.json: No space left on device"):
        atomic_write_bytes(target, b"round 4")
    monkeypatch.undo()
    assert target.read_bytes() == b"round 3"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "run.json"]  # no partial temporary file


# A child that commits round 1 of a run, then round 2, and SIGKILLs itself just before the
# ``kill_at``-th file rename of round 2's commit (checkpoint, clients part, clients.parquet,
# rounds.parquet, run.json: 5 renames; 6 = after run.json, before old checkpoints are pruned).
_COMMIT_THEN_DIE = r"""
import os, signal, sys
import pandas as pd, torch
from server.store import RunStore

folder, kill_at = sys.argv[1], int(sys.argv[2])
def rows(r):
    return pd.DataFrame({"client_id": ["a", "b"], "partition_id": [0, 1], "model": ["global"] * 2,
                         "metric": ["acc"] * 2, "value": [0.5 + r / 10, 0.25 + r / 10]})
store = RunStore.create(folder, {"num-rounds": 3}, "run")
store.commit_round(1, {"w": torch.ones(3)}, rows(1))
renames, real = [0], os.replace
def dying_replace(src, dst):
    renames[0] += 1
    if renames[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = dying_replace
store.commit_round(2, {"w": torch.full((3,), 2.0)}, rows(2))
os.kill(os.getpid(), signal.SIGKILL)  # kill_at = 6: after the commit point, before anything else
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5, 6])
def test_a_kill_mid_commit_leaves_the_last_committed_round_and_a_resume_writes_the_same_files(tmp_path, kill_at):
    """kill -9 at every rename of a round's commit: the run reads as the last committed round (a
    reader never sees rows of a round run.json does not count), its checkpoint loads and verifies,
    and committing the round again (what a resume does) gives the uninterrupted run's files."""
    from analysis.load import load_rounds, load_run
    from server.store import RunStore

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    child = subprocess.run([sys.executable, "-c", _COMMIT_THEN_DIE, str(killed), str(kill_at)], cwd=ROOT)
    assert child.returncode == -9
    subprocess.run([sys.executable, "-c", _COMMIT_THEN_DIE, str(whole), "0"], cwd=ROOT)  # 0: never killed mid-commit
    store = RunStore.open(killed / "run")
    committed = 2 if kill_at == 6 else 1
    assert store.completed_rounds == committed
    assert store.load_checkpoint(committed)["w"][0].item() == committed
    assert load_run(killed / "run")["round"].max() == committed
    assert load_rounds(killed / "run")["round"].max() == committed
    if committed == 1:  # the resume commits round 2 again, as the recorder would
        import torch

        rows = pd.read_parquet(whole / "run" / "clients" / "round-0002.parquet")
        store.commit_round(2, {"w": torch.full((3,), 2.0)}, rows[["client_id", "partition_id", "model", "metric",
                                                                    "value"]])
    for name in ("clients.parquet", "rounds.parquet", "checkpoints/round-0002.safetensors"):
        assert (killed / "run" / name).read_bytes() == (whole / "run" / name).read_bytes(), name
    assert load_run(killed / "run").equals(load_run(whole / "run"))


@pytest.mark.parametrize("full_at", [1, 2, 3, 4, 5])
def test_a_full_disk_mid_commit_is_one_clear_error_and_leaves_the_last_committed_round(tmp_path, monkeypatch,
                                                                                      full_disk, full_at):
    """The disk fills at each of a round's five writes (checkpoint, clients part, clients.parquet,
    rounds.parquet, run.json): one FedrexError naming the file, no temporary file left, the run
    reads as round 1 everywhere, and committing round 2 once there is room gives the files of a run
    whose disk never filled."""
    import torch

    from analysis.load import load_rounds, load_run
    from server.store import RunStore

    def rows(r):
        return pd.DataFrame({"client_id": ["a", "b"], "partition_id": [0, 1], "model": ["global"] * 2,
                             "metric": ["acc"] * 2, "value": [0.5 + r / 10, 0.25 + r / 10]})

    runs = {}
    for name in ("full", "whole"):
        runs[name] = RunStore.create(tmp_path / name, {"num-rounds": 3}, "run")
        runs[name].commit_round(1, {"w": torch.ones(3)}, rows(1))
    runs["whole"].commit_round(2, {"w": torch.full((3,), 2.0)}, rows(2))

    full_disk(full_at)
    with pytest.raises(FedrexError, match="cannot write .*: No space left on device"):
        runs["full"].commit_round(2, {"w": torch.full((3,), 2.0)}, rows(2))
    monkeypatch.undo()
    assert runs["full"].completed_rounds == 1  # in memory too: whatever records the failure next says round 1
    folder = tmp_path / "full" / "run"
    assert not [p for p in folder.rglob(".*")], "a temporary file was left behind"
    store = RunStore.open(folder)
    assert store.completed_rounds == 1 and store.load_checkpoint(1)["w"][0].item() == 1
    assert load_run(folder)["round"].max() == 1 and load_rounds(folder)["round"].max() == 1
    store.commit_round(2, {"w": torch.full((3,), 2.0)}, rows(2))  # room again: what a resume does
    for name in ("clients.parquet", "rounds.parquet", "checkpoints/round-0002.safetensors"):
        assert (folder / name).read_bytes() == (tmp_path / "whole" / "run" / name).read_bytes(), name
    assert load_run(folder).equals(load_run(tmp_path / "whole" / "run"))
