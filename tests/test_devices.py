"""Device profiles, FedScale traces, the virtual clock and the round rules (client/device.py,
server/fleet.py); a simulated fleet through Flower's simulation engine on real critics.

The FedScale files here are written by the tests in FedScale's published formats (the real traces
are not on this machine): synthetic traces, named as such."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.device import TIERS, fedscale_profiles, parse_mix, profile_for
from models.errors import FedrexError
from models.protocol import CONFIG, DEVICE_STATUSES, DEVICE_TIERS, MEASURES
from models.run_settings import RunSettings
from server.fleet import Fleet, is_active, parse_profile, transfer_seconds


def profile(**changes) -> dict:
    base = {"tier": "flagship", "slowdown": 1.0, "down_kbps": 8_000.0, "up_kbps": 4_000.0, "latency_s": 0.5,
            "memory_mb": 4096.0, "dropout": 0.0, "period_s": 86_400.0, "active": [[0.0, 86_400.0]]}
    return {**base, **changes}


def fleet(profiles: dict, **settings) -> Fleet:
    values = {"device_mix": "flagship=1", "seed": 0, **settings}
    return Fleet(profiles, RunSettings().replace(**values), ms_per_sample=2.0)


# ------------------------------------------------------------------------------- the clock
def test_round_time_is_download_plus_compute_plus_upload_by_hand():
    # 1 MB down at 8,000 kbit/s = 1 s (+0.5 s latency); 100 samples x 2 ms x slowdown 3 = 0.6 s;
    # 0.5 MB up at 4,000 kbit/s = 1 s.
    times = fleet({0: profile(slowdown=3.0)}).round_time(0, samples=100, down_bytes=1_000_000, up_bytes=500_000)
    assert times == pytest.approx({"download_s": 1.5, "compute_s": 0.6, "upload_s": 1.0})


def test_deadline_stragglers_over_selection_and_the_clock():
    slow, fast = profile(slowdown=50.0), profile()
    f = fleet({0: fast, 1: fast, 2: slow, 3: fast}, round_deadline=5.0, over_selection=1.3)
    candidates, target, count = f.selection([0, 1, 2, 3], fraction=0.5, minimum=1)
    assert (target, count) == (2, 3)  # ceil(2 x 1.3)
    reports = [(0, 10, 1000, 1000), (1, 20, 1000, 1000), (2, 100, 1000, 1000)]  # slow: 100 x 2 ms x 50 = 10 s
    outcome, accepted, facts = f.settle(1, reports, failed=[3], target=target)
    assert {p: o["status"] for p, o in outcome.items()} == {0: "ok", 1: "ok", 2: "straggler", 3: "failed"}
    assert accepted == [0, 1]
    assert f.clock == pytest.approx(outcome[1]["round_s"])  # the round closes at the target-th report
    assert facts["device_ok"] == 2 and facts["device_straggler"] == 1 and facts["abandoned"] == 0


def test_surplus_reports_beyond_the_goal_are_stragglers_even_on_time():
    f = fleet({i: profile() for i in range(3)})
    outcome, accepted, _ = f.settle(1, [(0, 30, 0, 0), (1, 10, 0, 0), (2, 20, 0, 0)], [], target=2)
    assert accepted == [1, 2] and outcome[0]["status"] == "straggler"  # the two fastest count


def test_too_few_reports_abandon_the_round_and_the_clock_waits_for_the_deadline():
    f = fleet({0: profile(), 1: profile(slowdown=100.0)}, round_deadline=3.0, min_report_share=1.0)
    outcome, accepted, facts = f.settle(1, [(0, 10, 0, 0), (1, 100, 0, 0)], [], target=2)
    assert accepted == [] and facts["abandoned"] == 1.0
    assert outcome[0]["status"] == "abandoned" and outcome[1]["status"] == "straggler"
    assert f.clock == 3.0


def test_dropout_and_a_window_closing_mid_round_drop_the_device():
    leaving = profile(active=[[0.0, 0.2]])  # gone before its 0.5 s latency has passed
    f = fleet({0: profile(dropout=1.0), 1: leaving, 2: profile()}, min_report_share=0.3)
    outcome, accepted, _ = f.settle(1, [(0, 1, 0, 0), (1, 1, 0, 0), (2, 1, 0, 0)], [], target=3)
    assert [outcome[p]["status"] for p in (0, 1, 2)] == ["dropped", "dropped", "ok"]
    assert accepted == [2]


def test_availability_windows_wrap_the_period_and_gate_selection():
    night = profile(active=[[0.0, 3600.0], [82_800.0, 86_400.0]])  # 23:00 to 01:00
    assert is_active(night, 86_400 + 1800) and is_active(night, 83_000) and not is_active(night, 43_200)
    f = fleet({0: night, 1: profile(), 2: profile(memory_mb=1024.0)}, device_min_memory_mb=2048.0)
    f.clock = 43_200.0  # noon: the night device is away, the 1 GB one is ineligible
    candidates, _, _ = f.selection([0, 1, 2], fraction=1.0, minimum=1)
    assert candidates == [1] and f.unavailable([0, 1, 2]) == [0, 2]


def test_without_device_simulation_nothing_changes():
    f = Fleet({}, RunSettings(), ms_per_sample=0.0)
    assert not f.enabled
    assert f.selection(list(range(10)), 0.2, 2) == (list(range(10)), 2, 2)
    assert f.unavailable(list(range(10))) == []


def test_device_assign_label_gives_the_slowest_devices_to_the_harshest_users():
    from server.fleet import assign_by_label

    profiles = {0: profile(slowdown=4.0, tier="low-end", runtime="torch"), 1: profile(slowdown=1.0, runtime="onnx"),
                2: profile(slowdown=6.0, tier="rpi4", runtime="torch", crashes=True)}
    dealt = assign_by_label(profiles, {0: 0.9, 1: 0.2, 2: 0.5})
    assert [dealt[p]["slowdown"] for p in (0, 2, 1)] == [1.0, 4.0, 6.0]  # most positive -> fastest
    assert dealt[1]["tier"] == "rpi4" and dealt[1]["runtime"] == "onnx"  # the device moves, the client's runtime stays
    assert dealt[2]["crashes"] and sorted(p["slowdown"] for p in dealt.values()) == [1.0, 4.0, 6.0]
    with pytest.raises(FedrexError, match="device-assign must be one of"):
        RunSettings.from_flower({"device-assign": "by-age"})


# ---------------------------------------------------------------------------- the profiles
def test_tiers_are_drawn_per_client_reproducibly_and_travel_as_json():
    settings = RunSettings(device_mix="flagship=1,low-end=1,rpi4=1")
    first = [profile_for(settings, pid) for pid in range(60)]
    assert [p.as_record() for p in first] == [profile_for(settings, pid).as_record() for pid in range(60)]
    assert {p.tier for p in first} == set(TIERS)
    assert [p.tier for p in first] != [profile_for(settings.replace(seed=1), pid).tier for pid in range(60)]
    back = parse_profile(first[0].as_record())
    assert back["slowdown"] == first[0].slowdown and back["active"] == first[0].active
    assert set(TIERS) | {"ideal", "fedscale"} == set(DEVICE_TIERS)  # the codes analysis/ decodes


def test_plain_simulation_gets_the_ideal_device_and_crash_clients_is_a_device_property():
    settings = RunSettings(crash_clients="3, 5")
    ideal = parse_profile(profile_for(settings, 0).as_record())
    assert ideal["slowdown"] == 0 and math.isinf(ideal["up_kbps"]) and ideal["dropout"] == 0
    assert profile_for(settings, 5).crashes and not profile_for(settings, 4).crashes


def test_bad_mixes_get_one_clear_error():
    with pytest.raises(FedrexError, match="unknown tier 'iphone'"):
        parse_mix("iphone=1")
    with pytest.raises(FedrexError, match="not tier=share"):
        parse_mix("flagship=lots")
    with pytest.raises(FedrexError, match="no tier with a positive share"):
        parse_mix("flagship=0")
    with pytest.raises(FedrexError, match="not both"):
        RunSettings.from_flower({"device-mix": "rpi4=1", "device-trace": "x"})
    assert parse_mix("flagship=1,rpi4=3") == {"flagship": 0.25, "rpi4": 0.75}


def write_fedscale(folder: Path, as_json: bool = False) -> None:
    capacity = {1: {"computation": 40.0, "communication": 2000.0}, 2: {"computation": 10.0, "communication": 8000.0},
                3: {"computation": 20.0, "communication": 500.0}}
    behave = {1: {"duration": 600, "inactive": [300, 900], "finish_time": 1000, "active": [100, 600], "model": "x"},
              2: {"duration": 1000, "inactive": [1000], "finish_time": 1000, "active": [0], "model": "y"}}
    for name, data in (("client_device_capacity", capacity), ("client_behave_trace", behave)):
        if as_json:
            (folder / f"{name}.json").write_text(json.dumps({str(k): v for k, v in data.items()}))
        else:
            (folder / name).write_bytes(pickle.dumps(data))


@pytest.mark.parametrize("as_json", [False, True])
def test_fedscale_trace_imports_from_pickle_or_json(tmp_path, as_json):
    write_fedscale(tmp_path, as_json)
    profiles = fedscale_profiles(str(tmp_path))
    assert [p.slowdown for p in profiles] == [2.0, 0.5, 1.0]  # computation / median (20 ms)
    # FedScale's kbit is 1,024 bits: 2000 of them per second is 2048 FedREX kbit/s
    assert [p.up_kbps for p in profiles] == pytest.approx([2048.0, 8192.0, 512.0])
    assert transfer_seconds(256_000, profiles[0].up_kbps) == pytest.approx(256_000 / 1024 * 8 / 2000)  # as FedScale
    assert profiles[0].period_s == 1000 and profiles[0].active == [[100.0, 300.0], [600.0, 900.0]]
    assert profiles[2].active == [[0.0, 86_400.0]]  # no behaviour trace: always available
    first = parse_profile(profiles[0].as_record())
    assert is_active(first, 1150) and not is_active(first, 1400)  # FedScale: time modulo finish_time
    settings = RunSettings(device_trace=str(tmp_path))
    assert profile_for(settings, 4).slowdown == 0.5  # client 4 takes entry 4 mod 3


def test_a_trace_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    (tmp_path / "client_device_capacity").write_bytes(pickle.dumps({1: Exploit()}))
    with pytest.raises(FedrexError, match="only plain dicts, lists, strings and numbers"):
        fedscale_profiles(str(tmp_path))
    assert not marker.exists()
    (tmp_path / "client_device_capacity").write_bytes(b"garbage")
    with pytest.raises(FedrexError, match="neither JSON nor a readable pickle"):
        fedscale_profiles.__wrapped__(str(tmp_path))


# ----------------------------------------------------------------- a fleet through Flower
def test_a_device_without_an_optional_package_gets_one_clear_error(monkeypatch):
    import importlib.util

    import client.app as client_app

    real = importlib.util.find_spec
    missing = {"captum", "onnxruntime"}
    monkeypatch.setattr(client_app.importlib.util, "find_spec", lambda name: None if name in missing else real(name))
    client_app.check_packages.cache_clear()
    with pytest.raises(FedrexError, match=r"needs the package 'captum' for fidelity-examples > 0.*\[fidelity\]"):
        client_app.check_packages(RunSettings(fidelity_examples=5), "torch")
    client_app.check_packages(RunSettings(fidelity_examples=0), "torch")  # a run without fidelity does not need it
    with pytest.raises(FedrexError, match=r"needs the package 'onnxruntime'.*\[onnx\]"):
        client_app.check_packages(RunSettings(mode="head", adv_weight=0.0), "onnx")
    missing.discard("onnxruntime")  # the ONNX path measures no fidelity: captum is not asked for
    client_app.check_packages(RunSettings(mode="head", adv_weight=0.0, fidelity_examples=5), "onnx")
    client_app.check_packages.cache_clear()


def test_a_users_file_reads_without_the_datasets_library_and_bad_files_say_why(tmp_path):
    from models.datasets import read_user_file

    rows = pd.DataFrame({"text": ["great film", "dull and long", "a joy"], "label": [1, 0, 1]})
    rows.to_csv(tmp_path / "me.csv", index=False)
    rows.to_json(tmp_path / "me.jsonl", orient="records", lines=True)
    rows.to_parquet(tmp_path / "me.parquet")
    for name in ("me.csv", "me.jsonl", "me.parquet"):
        texts, labels, num_labels = read_user_file(tmp_path / name)
        assert texts == list(rows["text"]) and labels.tolist() == [1, 0, 1] and num_labels == 2
    rows.rename(columns={"label": "stars"}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(FedrexError, match="no column 'label'"):
        read_user_file(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(FedrexError, match="is empty"):
        read_user_file(tmp_path / "empty.csv")
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(FedrexError, match="not valid UTF-8"):
        read_user_file(tmp_path / "latin.csv")


def test_a_devices_rows_are_encoded_once_and_kept_exactly_until_what_decides_them_changes(tmp_path):
    """A device is a new process at every message: its rows, encoded once, are read back from its
    state folder with every id, label and text exact, without building the normaliser's index;
    a changed file, another normaliser or a damaged entry encodes them again."""
    from client.data import _device_file
    from client.row_cache import FOLDER, KEEP
    from models.tokenizer import client_tokenizer

    texts = ["a grate film, realy", 'the "acting" was dul\nand long', "unforgettable \u00e9l\u00e1n", "bad", "ok", "fine"]
    path = tmp_path / "me.parquet"
    pd.DataFrame({"text": texts, "label": [1, 0, 1, 0, 1, 1]}).to_parquet(path)
    blob = (Path(__file__).resolve().parents[1] / "models/artifacts/sst2-student-copies/normalizer.txt.gz").read_bytes()
    state, settings = str(tmp_path / "state"), RunSettings()

    def load(normalizer=blob):
        client_tokenizer.cache_clear()  # a new process: a new normaliser
        return _device_file.__wrapped__(str(path), "me", 7, settings, 2, normalizer, state)

    def same(a, b):
        return (a.partition_id, a.client_id, a.num_labels) == (b.partition_id, b.client_id, b.num_labels) and all(
            x.texts == y.texts and x.labels.dtype == y.labels.dtype and np.array_equal(x.labels, y.labels)
            and len(x.ids) == len(y.ids) and all(u.dtype == v.dtype and np.array_equal(u, v) for u, v in zip(x.ids, y.ids))
            for x, y in ((a.train, b.train), (a.test, b.test)))

    fresh = load()
    assert "_index" in fresh.tokenizer.normalizer.__dict__  # the typos were corrected: the index was built
    kept = list((tmp_path / "state" / FOLDER).glob("*.npz"))
    assert len(kept) == 1
    again = load()
    assert same(fresh, again)
    assert "_index" not in again.tokenizer.normalizer.__dict__  # read back: nothing to correct
    assert not same(fresh, load(normalizer=None))  # another normaliser: encoded again, differently
    kept[0].write_bytes(kept[0].read_bytes()[:100])  # damaged: encoded again, the same rows
    assert same(fresh, load()) and "_index" in client_tokenizer(settings.max_length, blob).normalizer.__dict__
    pd.DataFrame({"text": ["a grate film"] + texts[1:], "label": [1, 0, 1, 0, 1, 1]}).to_parquet(path)
    changed = load()
    assert sorted(changed.train.texts + changed.test.texts) == sorted(["a grate film"] + texts[1:])
    stamp = path.stat()  # labels flipped in place: the same size, and a copy may keep the old time
    pd.DataFrame({"text": ["a grate film"] + texts[1:], "label": [0, 1, 0, 1, 0, 0]}).to_parquet(path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size
    flipped = load()
    assert np.array_equal(flipped.train.labels, 1 - changed.train.labels)
    for length in (16, 24, 32, 48):
        client_tokenizer.cache_clear()
        _device_file.__wrapped__(str(path), "me", 7, settings.replace(max_length=length), 2, blob, state)
    assert len(list((tmp_path / "state" / FOLDER).glob("*.npz"))) == KEEP
    with pytest.raises(FedrexError, match="does not exist"):  # a missing file: the same clear error as without a cache
        _device_file.__wrapped__(str(tmp_path / "gone.csv"), "me", 7, settings, 2, blob, state)
    (tmp_path / "a-file").write_text("")  # a state folder that cannot hold the rows costs the saving, not the message
    client_tokenizer.cache_clear()
    assert same(flipped, _device_file.__wrapped__(str(path), "me", 7, settings, 2, blob, str(tmp_path / "a-file")))


@pytest.mark.slow
def test_a_round_the_rules_abandon_returns_the_model_bit_for_bit(tmp_path, capfd):
    """Nobody meets a 1 ms deadline: every round is abandoned and the global model after it is
    the shipped artifact, every tensor and dtype. Also: the supported simulation path prints no
    deprecation warning."""
    from models.artifact import load_artifact, load_weights, resolve_artifact
    from simulations.simulate import load_settings, simulate

    settings = load_settings("fleet", ["min-samples=300", "num-rounds=1", "fraction-evaluate=0",
                                       "device-ms-per-sample=2.0", "round-deadline=0.001", "run-id=abandoned",
                                       f"runs-dir={tmp_path}"])
    run_dir = simulate(settings)
    start = load_artifact(resolve_artifact("sst2-student"))[0].state_dict()
    after = load_weights(run_dir / "checkpoints" / "round-0001.safetensors")
    assert set(after) == set(start)
    for key, tensor in start.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert rounds[rounds["metric"] == "abandoned"]["value"].tolist() == [1.0]
    printed = capfd.readouterr().err
    assert "DEPRECATED FEATURE" not in printed and "run_simulation" not in printed  # Flower's warning


@pytest.mark.slow
def test_a_simulated_fleet_records_statuses_virtual_time_and_reports_by_tier(tmp_path):
    from analysis.load import device_rounds, fairness_by_tier, load_run, participation_by_tier, time_to_accuracy
    from analysis.report import write_report
    from simulations.simulate import load_settings, simulate

    # the critics with >= 120 reviews; the reference fixed so the statuses are reproducible; a
    # deadline that low-end phones (2 Mbit/s up for a 2.3 MB update) cannot meet.
    settings = load_settings("fleet", ["min-samples=120", "num-rounds=2", "evaluate-every=2", "attack-examples=0",
                                       "fidelity-examples=0", "local-max-steps=5", "fraction-train=0.5",
                                       "device-ms-per-sample=2.0", "round-deadline=6", "run-id=fleet",
                                       f"runs-dir={tmp_path}"])
    run_dir = simulate(settings)
    df = load_run(run_dir)
    rounds = device_rounds(df)
    assert set(rounds["round"]) == {1, 2} and rounds["status"].isin(DEVICE_STATUSES).all()
    reported = rounds.dropna(subset=["round_s"])
    slow = reported[reported["tier"] == "low-end"]
    assert len(slow) and (slow["round_s"] > 6).all() and (slow["status"] != "ok").all()
    ok = rounds[rounds["status"] == "ok"]
    assert (ok["round_s"] <= 6).all() and len(ok) > 0
    # only ok updates count: per round, at most the goal (half of the clients)
    assert ok.groupby("round").size().max() <= df["client_id"].nunique() // 2
    trained = df[(df["model"] == "train") & (df["metric"] == "n_train")]
    assert len(trained) > len(ok)  # over-selected devices trained; not all of them counted
    tiers = participation_by_tier(df)
    assert set(tiers["tier"]) <= set(TIERS) and tiers["clients"].sum() == df["client_id"].nunique()
    assert tiers.set_index("tier").loc["low-end", "ok"] == 0
    fair = fairness_by_tier(df)
    assert fair.set_index("tier").loc["low-end", "updates_per_client"] == 0
    clock = time_to_accuracy(run_dir, df)
    assert clock["virtual_hours"].iloc[0] == 0 and clock["virtual_hours"].iloc[-1] > 0
    assert json.loads((run_dir / "run.json").read_text())["device_ms_per_sample"] == 2.0
    text = write_report(run_dir).read_text()
    assert "Participation by device tier" in text and "device_timeline.png" in text
    rounds_table = pd.read_parquet(run_dir / "rounds.parquet")
    assert (rounds_table["metric"] == "virtual_clock_s").sum() == 2


@pytest.mark.slow
def test_a_resumed_fleet_run_continues_its_clock_and_keeps_its_reference(tmp_path):
    """Stop a fleet run after round 1, resume it: round 2 starts where round 1's clock ended (not at
    0), with the reference ms per sample the run measured and kept in run.json."""
    from simulations.simulate import load_settings, simulate

    settings = load_settings("fleet", ["min-samples=300", "num-rounds=2", "fraction-evaluate=0", "run-id=resumed",
                                       f"runs-dir={tmp_path}"])
    run_dir = simulate(settings, {"stop-after": 1})
    measured = json.loads((run_dir / "run.json").read_text())["device_ms_per_sample"]
    assert measured > 0
    simulate(settings, {"resume": str(run_dir)})
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    clock = rounds[rounds["metric"] == "virtual_clock_s"].set_index("round")["value"]
    length = rounds[rounds["metric"] == "virtual_round_s"].set_index("round")["value"]
    assert clock[1] == pytest.approx(length[1]) and clock[2] == pytest.approx(clock[1] + length[2])
    assert json.loads((run_dir / "run.json").read_text())["device_ms_per_sample"] == measured


def test_a_resumed_fleet_takes_the_clock_of_the_committed_round(tmp_path):
    """A crash after rounds.parquet got round 2 but before run.json said so: the resumed run
    redoes round 2 from round 1's clock (10 s), not from the uncommitted round's (25 s)."""
    from server.app import start_fleet
    from server.store import ROUND_COLUMNS, RunStore, write_parquet

    settings = RunSettings(device_mix="flagship=1", device_ms_per_sample=1.0)
    store = RunStore.create(tmp_path, settings.to_flower(), "crashed")
    store.note(device_ms_per_sample=1.0, device_forward_share=0.3)
    store.commit_round(1, {}, pd.DataFrame(columns=["client_id", "partition_id", "model", "metric", "value"]),
                       extra_summary=[{"model": "round", "metric": "virtual_clock_s", "stat": "value", "value": 10.0}])
    rounds = store.read_rounds()
    later = rounds.assign(round=2, value=25.0)
    write_parquet(store.folder / "rounds.parquet", pd.concat([rounds, later], ignore_index=True)[ROUND_COLUMNS])
    assert store.completed_rounds == 1
    fleet = start_fleet(settings, RunStore.open(store.folder), None, {0: parse_profile(profile_for(settings, 0).as_record())})
    assert fleet.clock == 10.0


def test_a_device_that_walked_away_keeps_the_personal_state_from_before_that_round(tmp_path):
    """The fleet marks a device dropped in round 2 (it walked away mid-round); every later message
    to it says so, and the device drops the head it computed in round 2 for round 1's, in memory
    and when it restores from disk after a resume, keeping the privacy spent (conservatively)."""
    from flwr.app import Context, RecordDict

    from client.state import ClientState, restore
    from server.app import dropped_devices
    from server.store import RunStore

    settings = RunSettings(device_mix="flagship=1")
    always = {"period_s": 86_400.0, "active": [[0.0, 86_400.0]]}
    fleet = Fleet({7: {**parse_profile(profile_for(settings, 7).as_record()), **always, "dropout": 1.0},
                   8: {**parse_profile(profile_for(settings, 8).as_record()), **always, "dropout": 0.0}}, settings, 1.0)
    outcome, accepted, _ = fleet.settle(2, [(7, 10, 1000, 1000), (8, 10, 1000, 1000)], [], 1)
    assert outcome[7]["status"] == "dropped" and fleet.dropped_in == {7: 2} and accepted == [8]
    fleet.settle(3, [(8, 10, 1000, 1000)], [7], 1)  # it fails next round (raised, or never replied): it
    assert fleet.dropped_in == {7: 2}  # saved nothing there, so round 2's state must still be dropped

    run_dir = tmp_path / "run"
    ClientState({"head": torch.ones(1)}, [(1.0, 0.1, 5)], 1).save(run_dir, 7, 1)
    computed = ClientState({"head": torch.full((1,), 2.0)}, [(1.0, 0.1, 5)] * 2, 2)
    computed.save(run_dir, 7, 2)
    context = Context(1, 7, {}, RecordDict(), {})
    computed.to_context(context)
    state = restore(context, run_dir, 7, 3, dropped_round=2)
    assert torch.equal(state.personal["head"], torch.ones(1)) and state.last_round == 1 and len(state.dp_history) == 2
    again = restore(context, run_dir, 7, 3, dropped_round=2)  # the context now holds the reverted state
    assert torch.equal(again.personal["head"], torch.ones(1))
    fresh = restore(Context(1, 7, {}, RecordDict(), {}), run_dir, 7, 3, dropped_round=2)  # after a resume
    assert torch.equal(fresh.personal["head"], torch.ones(1))
    kept = restore(Context(1, 7, {}, RecordDict(), {}), run_dir, 7, 3)
    assert torch.equal(kept.personal["head"], torch.full((1,), 2.0))  # a device that finished keeps it

    store = RunStore.create(tmp_path, settings.to_flower(), "fleet")  # a resumed run knows who walked away
    rows = pd.DataFrame([("c7", 7, "device", "status", float(DEVICE_STATUSES.index("dropped"))),
                         ("c8", 8, "device", "status", float(DEVICE_STATUSES.index("ok")))],
                        columns=["client_id", "partition_id", "model", "metric", "value"])
    store.commit_round(1, {}, rows)
    later = pd.DataFrame([("c7", 7, "device", "status", float(DEVICE_STATUSES.index("unavailable"))),
                          ("c8", 8, "device", "status", float(DEVICE_STATUSES.index("dropped")))], columns=rows.columns)
    store.commit_round(2, {}, later)
    assert dropped_devices(RunStore.open(store.folder)) == {7: 1, 8: 2}


def test_only_the_device_that_walked_away_is_told_so(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from models.protocol import FLEET
    from server.recorder import Recorder
    from server.store import RunStore
    from server.strategy import make_strategy

    class Grid:
        def get_node_ids(self):
            return [100, 101]

    settings = RunSettings(device_mix="flagship=1", evaluate_every=1, fraction_evaluate=1.0)
    fleet = Fleet({}, settings, 1.0)
    fleet.dropped_in = {0: 2}
    recorder = Recorder(RunStore.create(tmp_path, settings.to_flower(), "r"), settings, 2, {100: 0, 101: 1},
                        {0: "a", 1: "b"}, {}, show_progress=False)
    strategy = make_strategy(settings, recorder, {}, fleet)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    messages = strategy.configure_evaluate(1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord({}), Grid())
    told = {m.metadata.dst_node_id: dict(m.content.config_records[FLEET]) if FLEET in m.content.config_records
            else None for m in messages}
    assert told == {100: {"dropped-round": 2}, 101: None}


def test_a_sample_of_users_is_evaluated_as_a_panel_the_same_users_every_round(tmp_path):
    """fraction-evaluate draws once: round 0, 5 and 10 evaluate the same users (a fresh draw per
    round compared different users and showed their label mix as the model changing), while the
    training draw still changes from round to round."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from server.recorder import Recorder
    from server.store import RunStore
    from server.strategy import make_strategy

    class Grid:
        def get_node_ids(self):
            return list(range(1000, 1100))

    settings = RunSettings(fraction_evaluate=0.1, fraction_train=0.1, evaluate_every=5, num_rounds=10)
    recorder = Recorder(RunStore.create(tmp_path, settings.to_flower(), "r"), settings, 0,
                        {node: node - 1000 for node in range(1000, 1100)}, {i: str(i) for i in range(100)}, {},
                        show_progress=False)
    strategy = make_strategy(settings, recorder, {})
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    weights = ArrayRecord({"w": torch.zeros(1)})

    def evaluated(server_round):
        return sorted(m.metadata.dst_node_id for m in strategy.configure_evaluate(server_round, weights,
                                                                                ConfigRecord({}), Grid()))

    def trained(server_round):
        return sorted(m.metadata.dst_node_id for m in strategy.configure_train(server_round, weights,
                                                                             ConfigRecord({}), Grid()))

    def measures(server_round):
        return {m.content.config_records[CONFIG][MEASURES] for m in strategy.configure_evaluate(
            server_round, weights, ConfigRecord({}), Grid())}

    panel = evaluated(0)
    assert len(panel) == 10 and evaluated(5) == panel and evaluated(10) == panel
    assert evaluated(3) == []  # evaluate-every=5
    # round 0 and the last measure everything; the round between them clean accuracy alone (the default)
    assert measures(0) == measures(10) == {"full"} and measures(5) == {"clean"}
    assert trained(1) != trained(2) and len(trained(1)) == 10

    class Fewer(Grid):  # a panel member went away: the others stay, the next in rank fills in
        def get_node_ids(self):
            return [n for n in super().get_node_ids() if n != panel[0]]

    smaller = sorted(m.metadata.dst_node_id for m in strategy.configure_evaluate(10, weights, ConfigRecord({}), Fewer()))
    assert len(set(smaller) & set(panel)) == 9 and panel[0] not in smaller


def test_a_reply_for_several_users_counts_each_user_once_and_fails_the_ones_it_left_out(tmp_path):
    """evaluate-batch=3 over 8 simulated users: 3 messages. One reply answers all its users, one
    leaves a user out and names another twice, one never comes: 5 users answered, the 3 others
    failed (each with a row and an event), nothing counted twice."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import _reply
    from server.recorder import Recorder
    from server.store import RunStore
    from server.strategy import make_strategy

    class Grid:
        def get_node_ids(self):
            return list(range(1000, 1008))

    settings = RunSettings(evaluate_batch=3, evaluate_every=1)
    nodes = {node: node - 1000 for node in range(1000, 1008)}
    store = RunStore.create(tmp_path, settings.to_flower(), "r")
    recorder = Recorder(store, settings, 0, nodes, {i: f"user-{i}" for i in range(8)}, {}, show_progress=False)
    strategy = make_strategy(settings, recorder, {}, batchable=frozenset(range(8)))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    sent = strategy.configure_evaluate(1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord({}), Grid())
    by_users = {tuple(json.loads(str(m.content.config_records["users"]["partitions"]))): m for m in sent}
    assert sorted(by_users) == [(0, 1, 2), (3, 4, 5), (6, 7)]  # in whatever order Flower lists them
    answers = {(0, 1, 2): [0, 1, 2], (3, 4, 5): [3, 4, 4]}  # the second leaves user 5 out, names 4 twice
    replies = []
    for carried, users in answers.items():
        TaskIdentity.node_id = by_users[carried].metadata.dst_node_id
        replies.append(_reply(by_users[carried], [{"partition_id": u, "global.acc": 0.5} for u in users], 3))
    TaskIdentity.node_id = 0
    recorder.on_replies(1, "evaluate", replies)
    rows = pd.DataFrame(recorder.rows)
    assert sorted(rows[rows["metric"] == "acc"]["partition_id"]) == [0, 1, 2, 3, 4]
    assert sorted(rows[rows["metric"] == "failed"]["partition_id"]) == [5, 6, 7]
    assert (recorder.counts["evaluate_messages"], recorder.counts["evaluate_sampled"],
            recorder.counts["evaluate_replied"], recorder.counts["evaluate_failed"]) == (3, 8, 5, 3)
    events = [json.loads(line) for line in (store.folder / "events.jsonl").read_text().splitlines()]
    assert sorted(e["partition_id"] for e in events if "error" in e) == [4, 5, 6, 7]  # 4: named twice


def test_the_reference_cost_mixes_clean_and_adversarial_steps_in_the_training_share(monkeypatch):
    """Clean steps cost 0.66 ms per sample and adversarial ones 1.46 (the issue's figures, on a
    scripted clock): at adv-ratio 0.5 a sample costs 1.06 whatever a few steps' draws would pick;
    without hardening 0.66; ASCC's steps (adv-space=synonyms: timed with the synonym candidates
    handed to the loop, 2.26 here) 1.46. Mode head's forward-only rows are charged at the forward
    pass's share."""
    import models.training
    import server.fleet as fleet_module
    from models.networks import VocabMap, build_network
    from server.fleet import measure_ms_per_sample

    clock = [0.0]

    def scripted_fit(model, data, config, max_steps, batch_size, lr, candidates=None):
        adversarial = config.adv > 0 and config.adv_ratio == 1.0
        cost = (2.26 if candidates is not None else 1.46) if adversarial else 0.66
        clock[0] += max_steps * batch_size * cost / 1000
        return {"samples": max_steps * batch_size}

    monkeypatch.setattr(models.training, "fit", scripted_fit)
    monkeypatch.setattr(fleet_module.time, "perf_counter", lambda: clock[0])
    model = build_network({"kind": "student", "num_labels": 2, "dim": 8, "hidden": 8}, VocabMap.identity())
    assert measure_ms_per_sample(model, RunSettings(adv_weight=0.5, adv_ratio=0.5))["train"] == pytest.approx(1.06)
    assert measure_ms_per_sample(model, RunSettings(adv_weight=0.0))["train"] == pytest.approx(0.66)
    ascc = RunSettings(adv_weight=0.5, adv_ratio=0.5, adv_space="synonyms")
    assert measure_ms_per_sample(model, ascc)["train"] == pytest.approx(1.46)
    fleet = Fleet({}, RunSettings(), ms_per_sample=2.0, ms_per_forward=0.5)
    assert fleet.work(0, 200) == pytest.approx(50.0) and fleet.work(30, 0) == 30.0


def test_a_fleet_with_no_device_available_moves_its_clock_to_the_next_window_instead_of_hanging(tmp_path):
    """Every device's window is closed now: the round trains nobody, the strategy hands Flower no
    message (an empty node list made Flower wait forever) and the clock jumps to the first opening;
    a memory floor no device meets is one clear error."""
    from flwr.app import ArrayRecord, ConfigRecord

    from server.recorder import Recorder
    from server.store import RunStore
    from server.strategy import make_strategy

    class Grid:
        def get_node_ids(self):
            return [100, 101]

    settings = RunSettings(device_mix="flagship=1", min_train_clients=1, fraction_train=1.0)
    windows = [{"period_s": 1000.0, "active": [[100.0, 200.0]]}, {"period_s": 1000.0, "active": [[700.0, 900.0]]}]
    profiles = {pid: {**parse_profile(profile_for(settings, pid).as_record()), **w} for pid, w in enumerate(windows)}
    fleet = Fleet(profiles, settings, 1.0, clock=500.0)
    assert fleet.next_opening([0, 1]) == pytest.approx(200.0) and fleet.next_opening([0]) == pytest.approx(600.0)
    recorder = Recorder(RunStore.create(tmp_path, settings.to_flower(), "r"), settings, 0, {100: 0, 101: 1},
                        {0: "a", 1: "b"}, {}, show_progress=False)
    strategy = make_strategy(settings, recorder, {}, fleet)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    weights = ArrayRecord({"w": torch.zeros(1)})
    assert strategy.configure_train(1, weights, ConfigRecord({}), Grid()) == []
    assert fleet.clock == pytest.approx(700.0) and recorder.counts["virtual_clock_s"] == fleet.clock
    assert strategy.aggregate_train(1, []) == (None, None)
    assert len(strategy.configure_train(2, weights, ConfigRecord({}), Grid())) == 1  # device 1 is up now
    floor = make_strategy(settings.replace(device_min_memory_mb=1e9), recorder, {}, Fleet(profiles, settings.replace(
        device_min_memory_mb=1e9), 1.0, clock=500.0))
    with pytest.raises(FedrexError, match="no device of the fleet meets device-min-memory-mb"):
        floor.configure_train(1, weights, ConfigRecord({}), Grid())
    # the jump lands inside the window whatever the clock's magnitude (floating point could leave it a
    # hair short, and every later round would wait ~1e-10 s and train nobody)
    rng = np.random.default_rng(0)
    week = {"period_s": 86_400.0, "active": [[3_600.123456789, 7_200.0]]}
    for clock in rng.uniform(0, 7 * 86_400, 2_000):
        jumped = Fleet({0: {**profiles[0], **week}}, settings, 1.0, clock=float(clock))
        jumped.clock += jumped.next_opening([0])
        assert is_active(jumped.profiles[0], jumped.clock)


def test_a_device_that_never_replies_gets_a_failed_status_row(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import _reply
    from server.recorder import Recorder
    from server.store import RunStore
    from server.strategy import make_strategy

    class Grid:
        def get_node_ids(self):
            return [100, 101]

    settings = RunSettings(device_mix="flagship=1", min_train_clients=2, fraction_train=1.0, over_selection=1.0,
                           min_report_share=0.5)
    always = {"period_s": 1000.0, "active": [[0.0, 1000.0]], "dropout": 0.0}
    profiles = {pid: {**parse_profile(profile_for(settings, pid).as_record()), **always} for pid in (0, 1)}
    recorder = Recorder(RunStore.create(tmp_path, settings.to_flower(), "r"), settings, 0, {100: 0, 101: 1},
                        {0: "a", 1: "b"}, {}, show_progress=False)
    strategy = make_strategy(settings, recorder, {}, Fleet(profiles, settings, 1.0))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    messages = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord({}), Grid())
    first = next(m for m in messages if m.metadata.dst_node_id == 100)
    TaskIdentity.node_id = 100
    reply = _reply(first, {"partition_id": 0, "samples": 8}, 8, ArrayRecord({"w": torch.ones(1)}))
    TaskIdentity.node_id = 0
    strategy.aggregate_train(1, [reply])  # node 101 never answers
    status = {r["partition_id"]: DEVICE_STATUSES[int(r["value"])] for r in recorder.rows
              if r["model"] == "device" and r["metric"] == "status"}
    assert status == {0: "ok", 1: "failed"}


def test_a_user_is_bound_to_its_node_and_a_second_claimant_is_refused_or_recorded():
    from server.identity import Claim, settle_claims

    ann, impostor, bob = Claim(11, 5, "ann", False), Claim(12, 5, "ann", False), Claim(13, 6, "bob", False)
    # first discovery: two nodes claim ann and neither is bound: nobody can tell, neither takes part
    accepted, notes, binding = settle_claims([impostor, ann, bob], {})
    assert accepted == [bob] and binding == {"bob": 13}
    assert sorted(c.node for c, _ in notes) == [11, 12] and all("none of them takes part" in n for _, n in notes)
    # ann's device was bound earlier in the run (a resume): it keeps ann, the impostor is refused
    accepted, notes, binding = settle_claims([impostor, ann, bob], {"ann": 11, "bob": 13})
    assert accepted == [ann, bob] and binding == {"ann": 11, "bob": 13}
    assert [c.node for c, _ in notes] == [12] and "refused" in notes[0][1]
    # ann's node is gone (a device restarted without SuperNode auth gets a new id): rebound, recorded
    accepted, notes, binding = settle_claims([impostor], {"ann": 11})
    assert accepted == [impostor] and binding == {"ann": 12} and "rebound" in notes[0][1]
    # a node speaks for one user: ann's node renamed itself carl, which releases ann (recorded)
    carl = Claim(11, 7, "carl", False)
    accepted, notes, binding = settle_claims([impostor, carl], {"ann": 11})
    assert accepted == [impostor, carl] and binding == {"ann": 12, "carl": 11} and "now names 'carl'" in notes[0][1]
    # one user under two partitions (a device may set its own partition-id) is still one user claimed twice
    accepted, notes, _ = settle_claims([ann, Claim(12, 9, "ann", False)], {})
    assert accepted == [] and len(notes) == 2
    accepted, notes, _ = settle_claims([ann, Claim(12, 9, "ann", False)], {"ann": 11})
    assert accepted == [ann] and "refused" in notes[0][1]
    # a bound user whose node is away keeps its binding
    assert settle_claims([bob], {"ann": 11, "bob": 13})[2] == {"ann": 11, "bob": 13}
    # simulated nodes bind nothing; two on one partition are a misconfigured run
    assert settle_claims([Claim(1, 0, "a", True), Claim(2, 1, "b", True)], {})[2] == {}
    with pytest.raises(FedrexError, match="partition id 5"):
        settle_claims([Claim(1, 5, "x", True), Claim(2, 5, "y", True)], {})
    # a chain of claims linked user to partition to user is one group, however it was met
    chain = [Claim(21, 1, "u", False), Claim(22, 2, "v", False), Claim(23, 2, "u", False)]
    assert settle_claims(chain, {})[0] == [] and len(settle_claims(chain, {})[1]) == 3


def test_the_claims_of_a_100000_user_pool_settle_in_linear_time():
    """A pool's discovery brings a claim per user: settling them must not compare every pair (it
    did, and 100,000 users never reached round 1)."""
    import time

    from server.identity import Claim, settle_claims

    claims = [Claim((1 << 62) + pid, pid, f"client-{pid:05d}", True) for pid in range(100_000)]
    start = time.time()
    accepted, notes, binding = settle_claims(claims, {})
    assert len(accepted) == 100_000 and not notes and binding == {}
    assert time.time() - start < 10  # pairwise: hours


def test_an_evaluation_between_the_first_and_last_round_measures_the_same_accuracies_without_attacks(tmp_path):
    """``evaluate-between=clean`` (the default): a user told to measure clean accuracy alone gives
    the global and personal accuracies a full evaluation gives, to the last digit, and no attack or
    fidelity figure (they are four fifths of an evaluation's cost)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import _evaluate_user
    from models.personalization import get_mode
    from models.protocol import ARRAYS, FROZEN, split_state
    from server.app import global_model, start_config
    from simulations.simulate import load_settings

    settings = load_settings(None, ["dataset=rt_critics", "attack-examples=2", "fidelity-examples=2", "ig-steps=2",
                                    f"runs-dir={tmp_path}"])
    model, config = global_model(settings)
    shared, frozen = split_state(model.state_dict(), get_mode(settings.mode).shared_keys(model))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def evaluated(measures: str) -> dict:
        round_config = {**start_config(settings, config["network"]), "run-id": "t", "global-round": 5,
                        "run-dir": str(tmp_path / "run"), MEASURES: measures}
        msg = Message(RecordDict({ARRAYS: ArrayRecord(shared), FROZEN: ArrayRecord(frozen),
                                  CONFIG: ConfigRecord(round_config)}), dst_node_id=1,
                      message_type=MessageType.EVALUATE)
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 3, "num-partitions": 118},
                          state=RecordDict(), run_config=settings.to_flower())
        return _evaluate_user(msg, context)[0]

    full, clean = evaluated("full"), evaluated("clean")
    for key in ("global.acc", "personal.acc"):
        assert clean[key] == full[key]
    measured_only_in_full = {k for k in full if "adv_acc" in k or "comprehensiveness" in k}
    assert {"global.adv_acc.char", "global.comprehensiveness"} <= measured_only_in_full
    assert not measured_only_in_full & set(clean)


def test_a_pool_node_names_its_users_without_reading_their_rows_unless_devices_go_by_label(monkeypatch):
    """Discovery through a pool (client.app._pool_user): the user's id and device from the dataset's
    partitioner and the seed; its label share only when the server deals devices by label, equal
    to what the user's own loaded rows say."""
    from client.app import _pool_user
    from client.data import load_local_data
    from client.device import profile_for
    from models.protocol import DEVICE

    settings = RunSettings(dataset="rt_critics", device_mix="flagship=0.5,rpi4=0.5", device_assign="label")
    local = load_local_data({"partition-id": 7}, settings, 2, None)
    info = _pool_user(settings, 7, {})
    assert info["client-id"] == local.client_id and info["partition-id"] == 7
    assert info["train-positive"] == pytest.approx(float((local.train.labels == 1).mean()))
    assert info[DEVICE] == profile_for(settings, 7).as_record()
    from models.partitioning import FederatedData

    def unread(*_):
        raise AssertionError("a user's rows were read to discover it")

    monkeypatch.setattr(FederatedData, "client", unread)
    monkeypatch.setattr(FederatedData, "partition", unread)
    assert "train-positive" not in _pool_user(settings.replace(device_assign="random"), 7, {})
    with pytest.raises(FedrexError, match="partition id 118 out of range"):
        _pool_user(settings, 118, {})
