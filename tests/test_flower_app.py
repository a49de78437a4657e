"""The FedREX Flower App through Flower's real simulation engine (Ray), on real critics and tweets:
the start model reaches every client (a round that cannot learn returns it bit for bit, its
normaliser in front), rounds learn, a server optimizer's state survives a resume, the watchdog,
tiny and single-label users, bad configs, and `flwr run .` itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from models.artifact import load_weights
from models.errors import FedrexError
from simulated import SMALL, run, tidy
from simulations.simulate import load_settings, simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """One round that cannot learn (lr 0), evaluated before and after; the defaults put the start
    model's word normaliser in front of every client's model."""
    return run(tmp_path_factory.mktemp("frozen"), "run-id=frozen", "lr=0", "num-rounds=1")


def test_a_federated_round_with_learning_rate_zero_returns_the_model_bit_for_bit(frozen):
    """Through Flower's simulation engine: nobody learns, so the global model after the round is
    the shipped artifact, every tensor and dtype (the int16 vocabulary map included)."""
    from models.artifact import load_artifact, resolve_artifact

    start = load_artifact(resolve_artifact("sst2-student"))[0].state_dict()
    after = load_weights(frozen / "checkpoints" / "round-0001.safetensors")
    assert set(after) == set(start)
    for key, tensor in start.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    # the same model measured again: every client attacks and explains the same held-out rows with
    # the same draws in every round, so round 1 repeats round 0 to the last digit
    frame = tidy(frozen)
    measured = frame[frame["model"] == "global"]
    by_round = {r: g.drop(columns="round").reset_index(drop=True) for r, g in measured.groupby("round")}
    assert set(by_round) == {0, 1} and any(m.startswith("adv_acc") for m in by_round[0]["metric"])
    pd.testing.assert_frame_equal(by_round[0], by_round[1])


def test_the_start_models_normaliser_reaches_every_client_and_the_attacks_query_through_it(frozen, tmp_path):
    """The same start model without its normaliser (normalizer=false) on the same rows: the
    character attack, which queries what the client serves, loses most of its power against the
    defended package, while clean accuracy stays about the same."""
    plain = run(tmp_path, "run-id=plain", "lr=0", "num-rounds=1", "normalizer=false")

    def round0(folder, metric):
        frame = tidy(folder)
        rows = frame[(frame["round"] == 0) & (frame["model"] == "global") & (frame["metric"] == metric)]
        return rows.set_index("partition_id")["value"]

    shipped = (Path(__file__).resolve().parents[1] / "models/artifacts/sst2-student/normalizer.txt.gz").stat().st_size
    assert json.loads((frozen / "run.json").read_text())["normalizer_bytes"] == shipped
    assert json.loads((plain / "run.json").read_text())["normalizer_bytes"] == 0
    defended, undefended = round0(frozen, "adv_acc.char"), round0(plain, "adv_acc.char")
    assert len(defended) == len(undefended) >= 6
    assert defended.mean() > undefended.mean() + 0.15, (defended.mean(), undefended.mean())
    assert abs(round0(frozen, "acc").mean() - round0(plain, "acc").mean()) < 0.05


def test_the_start_model_reference_row_is_what_every_client_reports_at_round_0(frozen):
    """benchmarks/references.py computes the start model's per-user accuracy offline, on the same
    split and through the same tokenizer (normaliser included) as the clients: it must equal the
    round-0 accuracy each client reported through Flower, user by user."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from references import start_model_accuracy

    reported = tidy(frozen)
    reported = reported[(reported["round"] == 0) & (reported["model"] == "global") & (reported["metric"] == "acc")]
    offline = start_model_accuracy(load_settings(None, SMALL))
    assert offline["start model"] == pytest.approx(reported.set_index("client_id")["value"].to_dict(), abs=1e-12)
    assert set(offline["start model + user label prior"]) == set(offline["start model"])


def test_federated_rounds_raise_pooled_accuracy_over_round_0(tmp_path):
    """The 23 Sentiment140 users with >= 20 tweets: the SST-2 global model learns the tweet domain
    from them, so pooled held-out accuracy after 3 rounds beats the starting model's."""
    folder = run(tmp_path, "run-id=learns", "dataset=sent140_users", "min-samples=20", "fraction-train=1.0",
                 "local-max-steps=20", "evaluate-every=3", "attack-examples=0", "fidelity-examples=0")
    frame = pd.read_parquet(folder / "rounds.parquet")
    pooled = frame[(frame["model"] == "global") & (frame["metric"] == "acc") & (frame["stat"] == "weighted_mean")]
    by_round = dict(zip(pooled["round"], pooled["value"]))
    assert sorted(by_round) == [0, 3]
    assert by_round[3] > by_round[0] + 0.03, by_round
    clients = pd.read_parquet(folder / "clients.parquet")
    assert not (clients["metric"] == "failed").any()  # rounds 1-2 evaluate nobody, so nobody failed


def test_a_resumed_run_with_a_server_optimizer_gives_the_uninterrupted_rows(tmp_path):
    """A server optimizer's state is checkpointed with the weights and restored by a resumed
    ServerApp: stopped after round 1 and resumed, the run gives the uninterrupted run's rows and
    final weights, bit for bit (before, a resumed FedAvgM crashed and FedAdam drifted). FedAdam
    here, through Flower; every strategy's own state (FedAvgM's momentum included) is checked
    through the run store by test_learning's test_a_resumed_strategy_continues_exactly_as_an_uninterrupted_one."""
    pairs = ["strategy=fedadam", "num-rounds=2", "evaluate-every=2", "server-lr=0.01"]
    whole = run(tmp_path, *pairs, "run-id=whole")
    folder = run(tmp_path, *pairs, "run-id=stopped", control={"stop-after": 1})
    assert json.loads((folder / "run.json").read_text())["status"] == "stopped"
    simulate(load_settings(None, []), {"resume": str(folder)})
    assert json.loads((folder / "run.json").read_text())["status"] == "completed"
    pd.testing.assert_frame_equal(tidy(folder), tidy(whole))
    final = load_weights(folder / "checkpoints" / "round-0002.safetensors")
    for key, tensor in load_weights(whole / "checkpoints" / "round-0002.safetensors").items():
        assert torch.equal(final[key], tensor), key


def test_the_watchdog_stops_what_a_killed_run_left_and_spares_the_next_runs_superlink(tmp_path):
    """Stand-in processes, no Flower: after its parent dies the watchdog stops the SuperLink of the
    run's FLWR_HOME and port, and a process left in the group of the simulation process (as Ray's are)
    even when the named simulation process was killed first (nothing named is left in that group);
    a SuperLink in the same FLWR_HOME on another port (the resumed run's) and a user's own process
    that mentions the address keep running."""
    import subprocess
    import time

    from simulations.localhost import free_ports
    from simulations.watchdog import alive

    def stand_in(*words, code="import time; time.sleep(120)"):
        return subprocess.Popen([sys.executable, "-c", code, *words], start_new_session=True,
                                stdout=subprocess.PIPE, text=True)

    home, (port, next_port) = str(tmp_path / "home"), map(str, free_ports(2))  # nothing binds them: names only
    superlink = stand_in("flower-superlink", "--port", port, "--database", home)
    resumed = stand_in("flower-superlink", "--port", next_port, "--database", home)
    bystander = stand_in("curl", f"127.0.0.1:{port}")
    simulation = stand_in("flwr-simulation", f"127.0.0.1:{port}", code=(
        "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
        "time.sleep(120)']); print(child.pid, flush=True); time.sleep(120)"))
    ray_like = int(simulation.stdout.readline())  # same process group, names nothing
    parent = stand_in()
    watchdog = subprocess.Popen([sys.executable, "-m", "simulations.watchdog", str(parent.pid), home, port],
                                cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        time.sleep(2.5)  # the watchdog has looked at the running simulation at least once
        simulation.kill()  # the named process dies first, as a kill -9 of the whole run takes it
        simulation.wait()
        parent.kill()
        parent.wait()
        assert watchdog.wait(timeout=60) == 0
        assert superlink.wait(timeout=5) is not None
        assert not alive(ray_like), "a process in the killed simulation's group outlived the watchdog"
        assert resumed.poll() is None, "the watchdog stopped the next run's SuperLink"
        assert bystander.poll() is None, "the watchdog stopped a process that only mentions the address"
    finally:
        for process in (superlink, resumed, bystander, simulation, parent, watchdog):
            process.kill()
        subprocess.run(["kill", "-9", str(ray_like)], stderr=subprocess.DEVNULL)


def test_fedper_on_tiny_and_single_label_users(tmp_path):
    tweets = pd.read_parquet(Path(__import__("os").environ["FEDREX_DATA_DIR"]) / "sent140_users" / "tweets.parquet")
    sizes = tweets.groupby("user_id")["label"].agg(["size", "nunique"])
    users = list(sizes[(sizes["size"] == 3) & (sizes["nunique"] == 1)].index[:3])
    users += list(sizes[(sizes["size"] >= 8) & (sizes["nunique"] == 2)].index[:3])
    path = tmp_path / "tweets.parquet"
    tweets[tweets["user_id"].isin(users)].to_parquet(path)
    folder = run(tmp_path, "run-id=tiny", f"dataset={path}", "min-samples=0", "mode=fedper", "fraction-train=1.0",
                 "num-rounds=2", "batch-size=4")
    frame = pd.read_parquet(folder / "clients.parquet")
    round2 = frame[frame["round"] == 2]
    single = round2[(round2["metric"] == "single_label")].set_index("client_id")["value"]
    assert single.sum() == 3 and len(single) == 6
    assert set(round2[round2["metric"] == "acc"]["client_id"]) == set(users)
    heads = [load_weights(p)["head.weight"] for p in sorted((folder / "client_state").glob("p*/round-0002.safetensors"))]
    assert len(heads) == 6 and not torch.equal(heads[0], heads[1])  # each user keeps their own head


def test_bad_run_configs_fail_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = [")
    with pytest.raises(FedrexError, match="malformed TOML"):
        load_settings(str(bad), [])
    with pytest.raises(FedrexError, match="unknown run-config key 'nmu-rounds'"):
        load_settings(None, ["nmu-rounds=3"])
    with pytest.raises(FedrexError, match="strategy must be one of"):
        load_settings(None, ["strategy=fedsgd"])
    with pytest.raises(FedrexError, match="expected int"):
        load_settings(None, ["num-rounds=2.5"])
    with pytest.raises(FedrexError, match="not supported"):
        load_settings(None, ["dp=true", "expl-weight=1"])
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "run.json").write_text("{}")
    with pytest.raises(FedrexError, match="already holds a run; use --resume"):  # not a stale "success"
        simulate(load_settings(None, ["run-id=taken", f"runs-dir={tmp_path / 'runs'}"]))
    with pytest.raises(FedrexError, match="device-mix: unknown tier"):
        simulate(load_settings(None, ["device-mix=iphone=1", f"runs-dir={tmp_path / 'runs'}"]))
    # a start model whose weights changed since they were written (checked without torch, before Ray)
    import shutil

    from models.artifact import resolve_artifact

    changed = tmp_path / "changed-start"
    shutil.copytree(resolve_artifact("sst2-student"), changed)
    weights = bytearray((changed / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(FedrexError, match="model.safetensors is not the file that was written"):
        simulate(load_settings(None, [f"artifact={changed}", f"runs-dir={tmp_path / 'runs'}"]))
    assert not list((tmp_path / "runs").glob(".flower*"))  # refused before Flower started


def test_flwr_run_dot_runs_the_flower_app(tmp_path):
    """The repository is a Flower App: `flwr run .` starts Flower's own local SuperLink, which runs
    the ServerApp and ClientApps from pyproject.toml's components with its run config. Under DP with
    the device's own noise (the default; every other Flower run in the tests replays its noise), so
    that path runs through Flower too: every trained user reports a privacy cost."""
    import os
    import subprocess
    import sys

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    runs = tmp_path / "runs"
    overrides = (f'min-samples=300 num-rounds=1 attack-examples=3 fidelity-examples=3 local-max-steps=5 '
                 f'dp=true run-id="via-flwr" runs-dir="{runs}"')
    try:
        result = subprocess.run([str(Path(bin_dir) / "flwr"), "run", ".", "--run-config", overrides,
                                 "--federation-config", "num-supernodes=8", "--stream"],
                                cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                                timeout=600)
    finally:
        subprocess.run(["pkill", "-f", f"flower-superlink.*{tmp_path.name}"], check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_parquet(runs / "via-flwr" / "clients.parquet")
    assert frame[frame["metric"] == "acc"]["client_id"].nunique() == 8
    settings = json.loads((runs / "via-flwr" / "run.json").read_text())["settings"]
    assert settings["dp"] is True and settings["dp-reproducible-noise"] is False
    # the users trained in round 1 spent privacy; every user's profile reports its ledger, 0 if it never trained
    spent = frame[(frame["metric"] == "epsilon") & (frame["round"] == 1)]
    trained = spent[spent["model"] == "train"].set_index("client_id")["value"]
    profile = spent[spent["model"] == "client"].set_index("client_id")["value"]
    assert len(trained) >= 2 and (trained > 0).all() and len(profile) == 8
    assert profile[trained.index].to_numpy() == pytest.approx(trained.to_numpy())
    assert (profile.drop(trained.index) == 0).all()


def test_the_staged_app_is_the_bundle_flwr_run_dot_builds(tmp_path):
    """`fedrex simulate` hands `flwr run` a staged copy of the app's files (no virtual environment to
    walk): the bundle built from it is Flower's own bundle of the repository, byte for byte, and of a
    small app whose ignored folders, virtual environment and symlinks hold files Flower would skip."""
    from flwr.cli.build import build_fab_from_disk

    from simulations.app_bundle import STAGED_APP_PREFIX, stage_app

    root = Path(__file__).resolve().parents[1]
    assert build_fab_from_disk(stage_app(root, tmp_path / "repo")) == build_fab_from_disk(root)

    app = tmp_path / "app"
    for folder in ("pkg", "runs/old", ".venv/lib", "pkg/__pycache__"):
        (app / folder).mkdir(parents=True)
    (app / "pyproject.toml").write_bytes((root / "pyproject.toml").read_bytes())
    (app / ".gitignore").write_text("runs/\n*.pyc\n")
    for name in ("pkg/a.py", "pkg/notes.md", "pkg/data.bin", "runs/old/b.py", ".venv/lib/c.py", "pkg/__pycache__/d.py",
                 "pkg/e.pyc"):
        (app / name).write_text("x = 1\n")
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "a.py")
    staged = stage_app(app, tmp_path / "staged")
    assert staged.parent.name.startswith(STAGED_APP_PREFIX) and staged.parent.parent == tmp_path / "staged"
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == [
        ".gitignore", "pkg/a.py", "pkg/notes.md", "pyproject.toml"]
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    # a negated pattern takes a file in an ignored folder back: Flower keeps it, so must the staged copy
    (app / ".gitignore").write_text("runs/\n!runs/old/b.py\n*.pyc\n")
    staged = stage_app(app, tmp_path / "staged-negated")
    assert (staged / "runs" / "old" / "b.py").exists()
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)


