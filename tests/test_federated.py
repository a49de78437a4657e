"""Federated personalization through Flower's real simulation engine (Ray), on real critics: per-client
rows, personal state across rounds, DP accounting, resume after a crash, a kill -9 or Ctrl-C, two runs
side by side, a Ray cluster of two nodes, users evaluated together, a pool of nodes serving every user."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from models.artifact import load_weights
from simulated import SMALL, run, tidy
from simulations.simulate import load_settings, simulate

pytestmark = pytest.mark.slow


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


def test_a_server_that_dies_mid_run_fails_loudly_and_a_resume_gives_the_uninterrupted_rows(baseline, tmp_path, capsys):
    """The ServerApp raises when round 3 starts (the crash-server-round drill): `fedrex run` exits
    non-zero with one error line naming the cause, run.json says failed and why, and no report is
    written as if the run had finished. Rounds 1-2 stay saved, and they are the rows a second run of
    the same config and seed gives (the baseline); a resume runs on to the baseline's rows."""
    from simulations.cli import main

    args = ["run", "--runs-dir", str(tmp_path)]
    for pair in [*SMALL, "crash-server-round=3", "run-id=crashed"]:
        args += ["--run-config", pair]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fedrex: error: the run failed (round 3: RuntimeError: failure drill: crash-server-round=3)" in err
    folder = tmp_path / "crashed"
    meta = json.loads((folder / "run.json").read_text())
    assert meta["status"] == "failed" and "failure drill" in meta["failure"] and meta["completed_rounds"] == 2
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "run_failed" and e["round"] == 3 and "Traceback" in e["traceback"] for e in events)
    assert not (folder / "report.md").exists()
    first = tidy(baseline)
    pd.testing.assert_frame_equal(tidy(folder), first[first["round"] <= 2].reset_index(drop=True))
    # the drill fired once: a resume runs on to the end
    simulate(load_settings(None, []), {"resume": str(folder)})
    meta = json.loads((folder / "run.json").read_text())
    assert meta["status"] == "completed" and meta["completed_rounds"] == 3 and "failure" not in meta
    resumed = tidy(folder)
    pd.testing.assert_frame_equal(resumed, first)
    assert sorted(resumed["round"].unique()) == [0, 1, 2, 3]  # round 0: the start, evaluated once


# a mode that keeps personal weights on the device, under DP (a ledger per user): what a resume must restore
STATEFUL = ("mode=ditto", "dp=true", "dp-reproducible-noise=true", "attack-examples=2", "fidelity-examples=2")


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    return run(tmp_path_factory.mktemp("stateful"), "run-id=stateful", *STATEFUL)


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
    from simulations.localhost import flag_value, group_members, matching_pids
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
    port = flag_value(superlink, "--port")
    assert port, f"the SuperLink of {home} names no port"
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

    from simulations.localhost import flag_value, matching_pids, parent_pids
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
            port = flag_value(link, "--port")
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


def test_users_evaluated_together_in_one_message_give_the_rows_of_one_message_each(stateful, tmp_path):
    """evaluate-batch=3: 8 users in messages of 3, 3 and 2, most evaluated on another user's node
    (their personal state, the Ditto model trained in an earlier round, read from the run dir), give
    every row that the stateful run's one message per user gives, to the last digit: accuracy, the
    attacks, the explanations' fidelity and agreement with the start and the global model."""
    together = run(tmp_path, "run-id=together", *STATEFUL, "num-rounds=2", "evaluate-batch=3")
    whole = tidy(stateful)
    pd.testing.assert_frame_equal(tidy(together), whole[whole["round"] <= 2].reset_index(drop=True))
    messages = {}
    for folder in (stateful, together):
        rounds = pd.read_parquet(folder / "rounds.parquet")
        counts = rounds[rounds["metric"].isin(["evaluate_messages", "evaluate_replied"]) & (rounds["round"] <= 2)]
        messages[folder.name] = counts.groupby(["round", "metric"])["value"].first().to_dict()
    assert {"adv_acc.char", "comprehensiveness", "start_agreement_spearman"} <= set(whole["metric"])
    assert messages["together"] == {**{(r, "evaluate_messages"): 3.0 for r in (0, 1, 2)},
                                    **{(r, "evaluate_replied"): 8.0 for r in (0, 1, 2)}}
    # evaluate-batch=0 (auto) groups 8 users in messages of 1 or 2, never 3: the rows above came two ways
    assert all(messages["stateful"][(r, "evaluate_messages")] in (4.0, 8.0) for r in (0, 1, 2))


def test_ditto_and_dp_keep_personal_state_and_epsilon_grows(stateful):
    """The stateful run (Ditto under DP, half the users train each round): each user's epsilon
    grows with every round it trains in, it keeps a personal model from its first training on (and
    only then), and its device saved personal state in exactly the rounds it trained."""
    frame = pd.read_parquet(stateful / "clients.parquet")
    trained = frame[(frame["model"] == "train") & (frame["metric"] == "epsilon")]
    eps = trained.pivot(index="partition_id", columns="round", values="value")
    for spent in (row.dropna() for _, row in eps.iterrows()):
        assert (spent > 0).all() and spent.is_monotonic_increasing and spent.is_unique, spent
    assert (eps.notna().sum(axis=1) >= 2).any()  # someone trained twice: growth was checked
    first_round = trained.groupby("partition_id")["round"].min()
    has_personal = frame[frame["metric"] == "has_personal"]
    expected = has_personal["round"] >= has_personal["partition_id"].map(first_round).fillna(99)
    assert has_personal["value"].tolist() == expected.astype(float).tolist() and expected.any() and (~expected).any()
    saved = {(int(p.parent.name[1:]), int(p.stem.split("-")[1])) for p in (stateful / "client_state").glob("p*/round-*.safetensors")}
    assert saved == set(zip(trained["partition_id"], trained["round"]))
    latest = max(saved, key=lambda s: s[1])
    personal = load_weights(stateful / "client_state" / f"p{latest[0]:05d}" / f"round-{latest[1]:04d}.safetensors")
    global_after = load_weights(stateful / "checkpoints" / "round-0003.safetensors")
    assert not torch.equal(personal["head.weight"], global_after["head.weight"])


def test_a_pool_of_nodes_serving_every_user_gives_the_rows_of_a_node_per_user(baseline, stateful, tmp_path):
    """The default serves every user from a pool of simulated SuperNodes (3 here), each message naming the
    user it is for (personal state from the run folder, as after a resume); a SuperNode per user
    (simulation-nodes=0, as a fleet of devices is) gives the same rows, to the last digit, attacks,
    fidelity and personal models included."""
    per_user = run(tmp_path, "run-id=per-user", "simulation-nodes=0", "num-rounds=2")
    first = tidy(baseline)
    pd.testing.assert_frame_equal(tidy(per_user), first[first["round"] <= 2].reset_index(drop=True))
    users = tidy(baseline)["client_id"].nunique()
    assert json.loads((baseline / "run.json").read_text())["pool_nodes"] == 3 < users
    assert "pool_nodes" not in json.loads((per_user / "run.json").read_text())
    # a mode that keeps personal weights on the device, under DP (a ledger per user): in a pool another
    # node may serve the user next round, so state comes from the run folder, never a node's memory
    pooled = tidy(stateful)
    pd.testing.assert_frame_equal(pooled, tidy(run(tmp_path, "run-id=ditto-per-user", "simulation-nodes=0", *STATEFUL)))
    assert (pooled["metric"] == "epsilon").any() and (pooled["metric"] == "has_personal").any()
