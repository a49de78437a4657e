"""Federated personalization through Flower's real simulation engine (Ray), on real critics and
tweets: learning rounds, per-client rows, personal state across rounds, DP accounting, resume."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from models.artifact import load_weights
from models.errors import FedrexError
from simulations.simulate import load_settings, simulate

pytestmark = pytest.mark.slow

# 8 critics with >= 300 reviews; tiny per-client evaluation to keep each round to seconds.
SMALL = ["dataset=rt_critics", "min-samples=300", "num-rounds=3", "evaluate-every=1", "fraction-train=0.5",
         "local-max-steps=10", "attack-examples=5", "fidelity-examples=5", "ig-steps=4", "seed=3",
         "simulation-nodes=3",  # fewer nodes than its 8 users: a pool serves them
         # every round measured alike, so a shorter run's rows are the longer run's first rounds (with
         # the default, `clean`, the last round of a shorter run measures attacks that the longer skips)
         "evaluate-between=full"]


def run(tmp: Path, *pairs, control=None) -> Path:
    settings = load_settings(None, [*SMALL, *pairs, f"runs-dir={tmp}"])
    return simulate(settings, control)


def tidy(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "clients.parquet")
    timing = frame["metric"].isin(["train_seconds", "seconds"])
    return frame[~timing].drop(columns="run_id").sort_values(["round", "partition_id", "model", "metric"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run(tmp_path_factory.mktemp("runs"), "run-id=baseline")


def test_a_round_changes_the_global_weights(baseline):
    from server.app import global_model
    from models.run_settings import RunSettings

    start, _ = global_model(RunSettings())
    after = load_weights(baseline / "checkpoints" / "round-0003.safetensors")
    changed = [k for k, v in start.state_dict().items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert "head.weight" in changed and "embedding.weight" in changed


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


def test_every_evaluated_client_has_global_and_personal_accuracy(baseline):
    frame = pd.read_parquet(baseline / "clients.parquet")
    acc = frame[frame["metric"] == "acc"]
    per_round = acc.groupby(["round", "model"])["client_id"].nunique()
    assert (per_round == 8).all() and len(per_round) == 8  # rounds 0 (the start) to 3 x {global, personal}
    assert set(acc["client_id"]) >= {"Geoff Andrew"}
    assert acc["value"].between(0, 1).all()
    meta = json.loads((baseline / "run.json").read_text())
    assert meta["completed_rounds"] == 3 and meta["status"] == "completed"
    rounds = pd.read_parquet(baseline / "rounds.parquet")
    summary = rounds[(rounds["round"] == 3) & (rounds["model"] == "personal") & (rounds["metric"] == "acc")]
    by_stat = dict(zip(summary["stat"], summary["value"]))
    values = acc[(acc["round"] == 3) & (acc["model"] == "personal")]["value"]
    assert by_stat["median"] == pytest.approx(values.median())
    assert by_stat["min"] == pytest.approx(values.min())


def test_same_config_and_seed_give_the_same_rows_and_a_resumed_run_those_of_an_uninterrupted_one(baseline, tmp_path):
    folder = run(tmp_path, "run-id=interrupted", control={"stop-after": 2})
    assert json.loads((folder / "run.json").read_text())["completed_rounds"] == 2
    first = tidy(baseline)  # a second run of the same config and seed: the same rows, round by round
    pd.testing.assert_frame_equal(tidy(folder), first[first["round"] <= 2].reset_index(drop=True))
    simulate(load_settings(None, []), {"resume": str(folder)})
    resumed = tidy(folder)
    pd.testing.assert_frame_equal(resumed, tidy(baseline))
    assert sorted(resumed["round"].unique()) == [0, 1, 2, 3]  # round 0: the start, evaluated once


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


def test_a_server_that_dies_mid_run_fails_loudly_and_writes_no_report(tmp_path, capsys):
    """The ServerApp raises when round 2 starts (the crash-server-round drill): `fedrex run` exits
    non-zero with one error line naming the cause, run.json says failed and why, round 1 stays
    saved for a resume, and no report is written as if the run had finished."""
    from simulations.cli import main

    args = ["run", "--runs-dir", str(tmp_path)]
    for pair in [*SMALL, "fraction-evaluate=0", "crash-server-round=2", "run-id=crashed"]:
        args += ["--run-config", pair]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fedrex: error: the run failed (round 2: RuntimeError: failure drill: crash-server-round=2)" in err
    meta = json.loads((tmp_path / "crashed" / "run.json").read_text())
    assert meta["status"] == "failed" and "failure drill" in meta["failure"] and meta["completed_rounds"] == 1
    events = [json.loads(line) for line in (tmp_path / "crashed" / "events.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "run_failed" and e["round"] == 2 and "Traceback" in e["traceback"] for e in events)
    assert not (tmp_path / "crashed" / "report.md").exists()
    # the drill fired once: a resume runs on to the end
    simulate(load_settings(None, []), {"resume": str(tmp_path / "crashed")})
    meta = json.loads((tmp_path / "crashed" / "run.json").read_text())
    assert meta["status"] == "completed" and meta["completed_rounds"] == 3 and "failure" not in meta


# a mode that keeps personal weights on the device, under DP (a ledger per user): what a resume must restore
STATEFUL = ("mode=ditto", "dp=true", "dp-reproducible-noise=true", "attack-examples=0", "fidelity-examples=0")


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    return run(tmp_path_factory.mktemp("stateful"), "run-id=stateful", *STATEFUL)


def test_the_watchdog_stops_what_a_killed_run_left_and_spares_the_next_runs_superlink(tmp_path):
    """Stand-in processes, no Flower: after its parent dies the watchdog stops the SuperLink of the
    run's FLWR_HOME and port, and a process left in the group of the simulation process (as Ray's are)
    even when the named simulation process was killed first (nothing named is left in that group);
    a SuperLink in the same FLWR_HOME on another port (the resumed run's) and a user's own process
    that mentions the address keep running."""
    import subprocess
    import time

    from simulations.watchdog import alive

    def stand_in(*words, code="import time; time.sleep(120)"):
        return subprocess.Popen([sys.executable, "-c", code, *words], start_new_session=True,
                                stdout=subprocess.PIPE, text=True)

    home, port, next_port = str(tmp_path / "home"), "41999", "42001"
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


def _simulate_in_background(*args, stderr: Path | None = None):
    """`fedrex simulate` in a session of its own (as a terminal runs it), its stderr into a file."""
    import subprocess

    # Ctrl-C as a terminal delivers it: a test run started in the background (`pytest &`) inherits
    # SIGINT ignored, and so would the child, which Python then never interrupts
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", *args],
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.DEVNULL, stderr=open(stderr, "w") if stderr else subprocess.DEVNULL)


def _kill_during(process, folder: Path, round_number: int, phase: str, how: int | None = None,
                 ready=lambda: True, committed: int | None = None) -> dict:
    """``how`` (default kill -9; SIGINT: a terminal's Ctrl-C) to the simulation's process group
    while ``phase`` of ``round_number`` is under way (progress.json), then check that it was: the
    round is not committed (run.json counts ``committed`` rounds: ``round_number - 1`` unless said),
    and nothing FedREX started is left. ``ready``: a further condition to wait for within the phase.
    Returns run.json as the interruption left it."""
    import os
    import signal
    import time

    how = signal.SIGKILL if how is None else how

    from simulations.app_bundle import STAGED_APP_PREFIX
    from simulations.localhost import group_members, matching_pids
    from simulations.watchdog import alive, simulation_groups

    progress, deadline, seen = folder / "progress.json", time.time() + 300, None
    while time.time() < deadline and process.poll() is None:
        seen = json.loads(progress.read_text()) if progress.exists() else None
        if seen and (seen["round"], seen["phase"]) == (round_number, phase) and ready():
            break
        time.sleep(0.02)
    assert seen and (seen["round"], seen["phase"]) == (round_number, phase), f"never saw {phase} of round {round_number}: {seen}"
    # this run's processes, and only this run's (other simulations may share the machine): its managed
    # SuperLink (FLWR_HOME under the runs folder), its port, and the groups of all it started (Ray's too)
    home = str(folder.parent / ".flower" / folder.name)
    (superlink,) = matching_pids("flower-superlink", home + "/")
    args = Path(f"/proc/{superlink}/cmdline").read_bytes().split(b"\0")
    port = args[args.index(b"--port") + 1].decode()
    groups = simulation_groups(home, port)
    # and, found by name rather than by group (a check of the watchdog, not by it): the simulation
    # processes and the Ray session each one started (its folder ends in the starting process's id)
    simulations = matching_pids("flwr-simulation", f"\x00127.0.0.1:{port}\x00")
    # while the run goes on the command only relays Flower's output: its check before the start needs
    # no torch (simulations/simulate.py check_before_start)
    assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()
    os.killpg(process.pid, how)
    if how == signal.SIGKILL:  # the whole run dies at this point, the ServerApp with it (the watchdog
        for pid in simulations:  # alone would stop it within a second: a short phase could end first);
            os.kill(pid, signal.SIGKILL)  # the watchdog stops the rest
    # kill -9 leaves the cleanup to the watchdog; Ctrl-C is `fedrex simulate`'s own: one line, code 130
    assert process.wait(timeout=120) == (-signal.SIGKILL if how == signal.SIGKILL else 130)

    def leftovers():
        ray = set().union(*(matching_pids("/tmp/ray/session_", f"_{pid}/") for pid in simulations))
        return group_members(groups | simulation_groups(home, port)) | ray | {pid for pid in simulations if alive(pid)}

    deadline = time.time() + 60
    while leftovers() and time.time() < deadline:
        time.sleep(0.5)

    def command_line(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            return "(ended)"

    left = {pid: command_line(pid) for pid in leftovers()}
    assert not left, f"still running: {left}"  # the SuperLink, the simulation and Ray (own sessions) were stopped
    deadline = time.time() + 30  # the staged copy of the app goes too (the watchdog's last step after a kill -9)
    while list(Path(home).glob(f"{STAGED_APP_PREFIX}*")) and time.time() < deadline:
        time.sleep(0.2)
    assert not list(Path(home).glob(f"{STAGED_APP_PREFIX}*"))
    # the ServerApp (Ctrl-C: until `fedrex simulate` stopped it) must not have finished the round
    after = json.loads(progress.read_text())
    assert after["round"] == round_number and after["phase"] != "committed", f"the round went on: {after}"
    meta = json.loads((folder / "run.json").read_text())
    assert meta["completed_rounds"] == (round_number - 1 if committed is None else committed)
    return meta


def test_kill_9_mid_train_and_mid_evaluate_and_ctrl_c_resume_to_the_uninterrupted_run(stateful, tmp_path):
    """kill -9 of `fedrex simulate`'s process group in round 2's training, then of a resume while it
    starts, then of the resumed run in round 2's evaluation, then Ctrl-C of the next resume in round 3's training (one line, exit code
    130): nothing FedREX started is left any time, and a last resume gives the uninterrupted run's
    final weights bit for bit and its rows (personal ditto models included), although clients had
    written state of the lost rounds. The one difference is the privacy ledger, by design: a user
    who trained in a lost round counts its budget as spent (its noisy update had left), so its
    epsilon is above the uninterrupted run's from that round on, and only its."""
    import numpy as np

    command = ["--runs-dir", str(tmp_path)]
    for pair in [*SMALL, *STATEFUL, "run-id=killed"]:
        command += ["--run-config", pair]
    folder = tmp_path / "killed"
    # kill -9: nobody is left to say what happened, so run.json still says running: the resume decides
    assert _kill_during(_simulate_in_background(*command), folder, 2, "train")["status"] == "running"
    # the resume itself, killed while it starts (progress.json: "starting" after the last committed round)
    assert _kill_during(_simulate_in_background("--resume", str(folder)), folder, 1, "starting",
                        committed=1)["status"] == "running"
    assert _kill_during(_simulate_in_background("--resume", str(folder)), folder, 2, "evaluate")["status"] == "running"
    lost = {int(p.parent.name[1:]) for p in (folder / "client_state").glob("p*/round-0002.json")}
    assert json.loads((folder / "progress.json").read_text())["phase"] == "evaluate"  # not the resume's start
    # Ctrl-C of the next resume once a user has saved its round-3 state (so the lost round charges it)
    errors = tmp_path / "ctrl-c.err"
    meta = _kill_during(_simulate_in_background("--resume", str(folder), stderr=errors), folder, 3, "train",
                        how=signal.SIGINT, ready=lambda: any((folder / "client_state").glob("p*/round-0003.json")))
    said = errors.read_text()
    assert "fedrex: interrupted" in said and "Traceback" not in said, said
    assert meta["status"] == "failed" and meta["failure"].startswith("interrupted (Ctrl-C or SIGTERM) after round 2")
    lost_3 = {int(p.parent.name[1:]) for p in (folder / "client_state").glob("p*/round-0003.json")}
    assert lost_3
    simulate(load_settings(None, []), {"resume": str(folder)})
    assert json.loads((folder / "progress.json").read_text())["phase"] == "committed"
    final = load_weights(folder / "checkpoints" / "round-0003.safetensors")
    for key, tensor in load_weights(stateful / "checkpoints" / "round-0003.safetensors").items():
        assert torch.equal(final[key], tensor), key
    resumed, whole = tidy(folder), tidy(stateful)
    is_eps = resumed["metric"] == "epsilon"
    pd.testing.assert_frame_equal(resumed[~is_eps].reset_index(drop=True), whole[~is_eps].reset_index(drop=True))
    round_2_trainers = set(whole[(whole["round"] == 2) & (whole["model"] == "train")]["partition_id"])
    assert lost == round_2_trainers and lost  # every user the resume retrained had state of the lost round
    eps_resumed, eps_whole = resumed[is_eps].reset_index(drop=True), whole[whole["metric"] == "epsilon"].reset_index(drop=True)
    pd.testing.assert_frame_equal(eps_resumed.drop(columns="value"), eps_whole.drop(columns="value"))  # same keys
    # charged: a lost round's trainers, from that round on (round 3's: those done before the Ctrl-C)
    charged = (((eps_resumed["round"] >= 2) & eps_resumed["partition_id"].isin(lost))
               | ((eps_resumed["round"] >= 3) & eps_resumed["partition_id"].isin(lost_3))).to_numpy()
    assert charged.any() and (~charged).any()
    assert (eps_resumed["value"].to_numpy()[charged] > eps_whole["value"].to_numpy()[charged]).all()
    np.testing.assert_array_equal(eps_resumed["value"].to_numpy()[~charged], eps_whole["value"].to_numpy()[~charged])


def test_two_simulations_side_by_side_each_give_the_rows_they_give_alone(baseline, tmp_path):
    """Two `fedrex simulate` started together: each starts a SuperLink of its own (free ports, its
    own home), both run at once, and each gives the rows the uninterrupted baseline gives for its
    rounds (before, the second joined the first one's SuperLink on the fixed port)."""
    import subprocess
    import time

    from simulations.localhost import matching_pids, parent_pids
    from simulations.watchdog import alive

    def start(run_id: str, rounds: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "simulations.cli", "simulate", "--runs-dir", str(tmp_path)]
        for pair in [*SMALL, f"run-id={run_id}", f"num-rounds={rounds}"]:
            command += ["--run-config", pair]
        return subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def superlinks() -> set[int]:
        """The SuperLinks of this test's runs; not a SuperLink's child caught between its fork and
        its exec, which still shows the SuperLink's command line (CI counted 3 once)."""
        found, parents = matching_pids("flower-superlink", str(tmp_path)), parent_pids()
        return {pid for pid in found if pid in parents and parents[pid] not in found}

    def simulation_processes(links: set[int]) -> set[int]:
        """The simulation processes those SuperLinks started, and the Ray sessions they started."""
        found = set()
        for link in links:
            try:
                args = Path(f"/proc/{link}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            port = args[args.index(b"--port") + 1].decode() if b"--port" in args else None
            if port:
                found |= matching_pids("flwr-simulation", f"\x00127.0.0.1:{port}\x00")
        return found | set().union(*(matching_pids("/tmp/ray/session_", f"_{pid}/") for pid in found))

    processes = [start("side-a", 1), start("side-b", 2)]
    most_superlinks, seen = 0, set()
    while any(process.poll() is None for process in processes):
        links = superlinks()
        most_superlinks = max(most_superlinks, len(links))
        seen |= links | simulation_processes(links)
        time.sleep(0.5)
    outputs = [process.stdout.read() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert most_superlinks == 2
    first = tidy(baseline)
    for run_id, rounds in (("side-a", 1), ("side-b", 2)):
        pd.testing.assert_frame_equal(tidy(tmp_path / run_id), first[first["round"] <= rounds].reset_index(drop=True))
    # a normal exit leaves nothing running: SuperLinks, simulation processes, Ray's
    assert len(seen) > 4  # two SuperLinks, their simulation processes and Ray sessions were seen
    deadline = time.time() + 30
    while any(alive(pid) for pid in seen) and time.time() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in seen if alive(pid)]
    assert not matching_pids("flower-superlink", str(tmp_path))


def test_a_simulation_on_a_two_node_ray_cluster_runs_clients_on_both_and_gives_the_same_rows(baseline, tmp_path):
    """An existing Ray cluster (a head and a second node, one CPU each, on this machine) named by
    RAY_ADDRESS: `fedrex simulate` joins it instead of starting Ray, its clients run on both nodes
    (the run's events name the Ray node of every reply), and the rows are the local run's."""
    import os
    import subprocess

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        command = [sys.executable, "-m", "simulations.cli", "simulate", "--runs-dir", str(tmp_path)]
        for pair in [*SMALL, "run-id=on-ray", "num-rounds=1"]:
            command += ["--run-config", pair]
        result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                                env={**os.environ, "RAY_ADDRESS": cluster.address}, timeout=600)
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "on-ray" / "events.jsonl").read_text().splitlines()]
    workers = [e["workers"] for e in events if "workers" in e]
    assert {(e["round"], e["phase"]) for e in events if "workers" in e} == {(0, "evaluate"), (1, "train"), (1, "evaluate")}
    assert len(set().union(*workers)) == 2  # both Ray nodes served clients
    assert all(sum(w.values()) == 8 for w, e in zip(workers, events) if e.get("phase") == "evaluate")
    first = tidy(baseline)
    pd.testing.assert_frame_equal(tidy(tmp_path / "on-ray"), first[first["round"] <= 1].reset_index(drop=True))


def test_users_evaluated_together_in_one_message_give_the_rows_of_one_message_each(tmp_path):
    """evaluate-batch=3: 8 users in messages of 3, 3 and 2, most evaluated on another user's node
    (their personal state, the Ditto model trained in round 1, read from the run dir), give every
    row that one message per user gives, to the last digit."""
    alone = run(tmp_path, "run-id=alone", "mode=ditto", "num-rounds=1", "evaluate-batch=1")
    together = run(tmp_path, "run-id=together", "mode=ditto", "num-rounds=1", "evaluate-batch=3")
    pd.testing.assert_frame_equal(tidy(together), tidy(alone))
    messages = {}
    for name in ("alone", "together"):
        rounds = pd.read_parquet(tmp_path / name / "rounds.parquet")
        counts = rounds[rounds["metric"].isin(["evaluate_messages", "evaluate_replied"])]
        messages[name] = counts.groupby(["round", "metric"])["value"].first().to_dict()
    assert messages["alone"] == {(r, m): 8.0 for r in (0, 1) for m in ("evaluate_messages", "evaluate_replied")}
    assert messages["together"] == {**{(r, "evaluate_messages"): 3.0 for r in (0, 1)},
                                    **{(r, "evaluate_replied"): 8.0 for r in (0, 1)}}


def test_ditto_and_dp_keep_personal_state_and_epsilon_grows(tmp_path):
    folder = run(tmp_path, "run-id=ditto", "mode=ditto", "dp=true", "noise-multiplier=1.0", "fraction-train=1.0",
                 "num-rounds=2", "adv-weight=0.5")
    frame = pd.read_parquet(folder / "clients.parquet")
    eps = frame[(frame["model"] == "train") & (frame["metric"] == "epsilon")].pivot(index="client_id", columns="round",
                                                                                    values="value")
    assert len(eps) == 8 and (eps[1] > 0).all() and (eps[2] > eps[1]).all()
    has_personal = frame[(frame["metric"] == "has_personal") & (frame["round"] == 2)]["value"]
    assert (has_personal == 1).all()
    state_files = sorted((folder / "client_state").glob("p*/round-0002.safetensors"))
    assert len(state_files) == 8
    personal = load_weights(state_files[0])
    global_after = load_weights(folder / "checkpoints" / "round-0002.safetensors")
    assert not torch.equal(personal["head.weight"], global_after["head.weight"])


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
    the ServerApp and ClientApps from pyproject.toml's components with its run config."""
    import os
    import subprocess
    import sys

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    runs = tmp_path / "runs"
    overrides = (f'min-samples=300 num-rounds=1 attack-examples=3 fidelity-examples=3 local-max-steps=5 '
                 f'run-id="via-flwr" runs-dir="{runs}"')
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


def test_a_pool_of_nodes_serving_every_user_gives_the_rows_of_a_node_per_user(baseline, stateful, tmp_path):
    """The default serves every user from a pool of simulated SuperNodes (3 here), each message naming the
    user it is for (personal state from the run folder, as after a resume); a SuperNode per user
    (simulation-nodes=0, as a fleet of devices is) gives the same rows, to the last digit, attacks,
    fidelity and personal models included."""
    per_user = run(tmp_path, "run-id=per-user", "simulation-nodes=0")
    pd.testing.assert_frame_equal(tidy(per_user), tidy(baseline))
    users = tidy(baseline)["client_id"].nunique()
    assert json.loads((baseline / "run.json").read_text())["pool_nodes"] == 3 < users
    assert "pool_nodes" not in json.loads((per_user / "run.json").read_text())
    # a mode that keeps personal weights on the device, under DP (a ledger per user): in a pool another
    # node may serve the user next round, so state comes from the run folder, never a node's memory
    pooled = tidy(stateful)
    pd.testing.assert_frame_equal(pooled, tidy(run(tmp_path, "run-id=ditto-per-user", "simulation-nodes=0", *STATEFUL)))
    assert (pooled["metric"] == "epsilon").any() and (pooled["metric"] == "has_personal").any()
