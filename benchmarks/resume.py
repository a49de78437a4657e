"""A resume after kill -9 at scale (issue #21): does every sampled user get back exactly its
personal state?

    python benchmarks/resume.py [--users 10000] [--per-round 100] [--rounds 4] [--kill-round 3]

1. An uninterrupted run (`fedrex simulate`): SST-2 train cut iid into N users, K of them training
   per round, in a mode that keeps a personal head on the device (fedper) under DP with
   reproducible noise (so a privacy ledger per user, and two runs can be compared to the bit); no
   evaluation phase.
2. The same config again, its whole process group killed with SIGKILL (the simulation process too)
   once round `--kill-round`'s training is under way and some user has saved state of that round:
   state of a round that never committed.
3. `fedrex simulate --resume` of the killed run.

Then every saved state file of every user (personal weights, tensor by tensor and dtype; the ledger
and counters) of the resumed run against the uninterrupted run's, the final global weights, and the
per-client rows. By design the ledger of a user who trained in the lost round counts that round as
spent (its noisy update may have left the device), so those ledgers hold one entry more and their
epsilon is higher; every other ledger, every weight and every other row must be equal. Training
time (`train_seconds`) is a measurement, not state, and is left out.
Results: results/resume.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from models.artifact import load_weights  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from simulations.localhost import flag_value, matching_pids  # noqa: E402
from simulations.watchdog import alive  # noqa: E402

TIMINGS = ("train_seconds", "seconds")


def simulate(args: list[str], log: Path) -> subprocess.Popen:
    """`fedrex simulate` in a session of its own, as a terminal starts it."""
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", *args], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env={**os.environ, "TQDM_DISABLE": "1"})


def finish(process: subprocess.Popen, log: Path) -> float:
    start = time.time()
    if process.wait() != 0:
        raise SystemExit(f"fedrex simulate failed:\n{log.read_text()[-3000:]}")
    return time.time() - start


def kill_during(process: subprocess.Popen, run_dir: Path, round_number: int, saved: int) -> dict:
    """SIGKILL to the run's process group and its simulation process once ``round_number``'s
    training is under way and ``saved`` users have saved state of it; returns progress.json as it was."""
    progress, deadline = run_dir / "progress.json", time.time() + 1800
    while time.time() < deadline and process.poll() is None:
        seen = json.loads(progress.read_text()) if progress.exists() else {}
        if ((seen.get("round"), seen.get("phase")) == (round_number, "train")
                and len(list((run_dir / "client_state").glob(f"p*/round-{round_number:04d}.json"))) >= saved):
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"never saw round {round_number}'s training with {saved} users' saved state (exit {process.poll()})")
    home = str(run_dir.parent / ".flower" / run_dir.name)
    ports = {flag_value(link, "--port") for link in matching_pids("flower-superlink", home + "/")} - {None}
    simulations = set().union(*(matching_pids("flwr-simulation", f"\x00127.0.0.1:{p}\x00") for p in ports))
    os.killpg(process.pid, signal.SIGKILL)
    for pid in simulations:  # the ServerApp dies with the run, as in a power cut
        os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 120  # the watchdog stops the SuperLink and Ray's processes
    while time.time() < deadline and (matching_pids("flower-superlink", home + "/") or any(map(alive, simulations))):
        time.sleep(0.5)
    return seen


def state_files(run_dir: Path) -> dict[str, Path]:
    folder = run_dir / "client_state"
    return {str(p.relative_to(folder)): p for p in sorted(folder.glob("p*/round-*"))}


def charged(user: str, round_number: int, lost_users: set[str], kill_round: int) -> bool:
    """Whether a ledger of this user and round counts the lost round: a user with state of the
    lost round, from that round on."""
    return user in lost_users and round_number >= kill_round


def compare_states(whole: Path, resumed: Path, lost_users: set[str], kill_round: int) -> dict:
    """Every user's saved state of both runs, file by file; ``lost_users``: the folders that held
    state of the lost round when the run was killed. A ledger file the lost round charges must hold
    exactly one entry more than the uninterrupted run's (the entries are (noise, rate, steps) and
    alike, so which one is extra cannot be told); every other ledger file must be equal."""
    ours, theirs = state_files(resumed), state_files(whole)
    out = {"users_with_state": len({name.split("/")[0] for name in theirs}), "state_files": len(theirs),
           "same_file_names": sorted(ours) == sorted(theirs), "weights_files": 0, "weights_files_equal": 0,
           "ledger_files": 0, "ledger_files_equal": 0, "ledger_files_to_charge": 0, "ledger_files_charged": 0,
           "ledger_files_wrong": 0}
    for name in sorted(set(ours) & set(theirs)):
        if name.endswith(".safetensors"):
            a, b = load_weights(ours[name]), load_weights(theirs[name])
            out["weights_files"] += 1
            out["weights_files_equal"] += int(a.keys() == b.keys() and all(
                a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a))
        elif name.endswith(".json"):
            a, b = (json.loads(p.read_text()) for p in (ours[name], theirs[name]))
            out["ledger_files"] += 1
            ledger_a, ledger_b = a.pop("dp_history"), b.pop("dp_history")
            a.pop("train_seconds"), b.pop("train_seconds")  # a measurement, not state
            user, round_number = name.split("/")[0], int(name.split("-")[-1].split(".")[0])
            if charged(user, round_number, lost_users, kill_round):
                out["ledger_files_to_charge"] += 1
                if a == b and len(ledger_a) == len(ledger_b) + 1 and any(
                        ledger_a[:i] + ledger_a[i + 1:] == ledger_b for i in range(len(ledger_a))):
                    out["ledger_files_charged"] += 1
                else:
                    out["ledger_files_wrong"] += 1
            elif a == b and ledger_a == ledger_b:
                out["ledger_files_equal"] += 1
            else:
                out["ledger_files_wrong"] += 1
    return out


def tidy(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "clients.parquet")
    frame = frame[~frame["metric"].isin(TIMINGS)]
    return frame.drop(columns="run_id").sort_values(["round", "partition_id", "model", "metric"]).reset_index(drop=True)


def compare_rows(whole: pd.DataFrame, resumed: pd.DataFrame, lost_users: set[str], kill_round: int) -> dict:
    """Every per-client row equal, but epsilon where the lost round charges the user: higher there."""
    if not whole.drop(columns="value").equals(resumed.drop(columns="value")):
        return {"rows_same_keys": False, "rows_equal_but_charged_epsilon": False, "epsilon_rows_charged": 0,
                "epsilon_rows_charged_higher": 0}
    is_charged = (whole["metric"] == "epsilon") & pd.Series(
        [charged(f"p{pid:05d}", r, lost_users, kill_round) for pid, r in zip(whole["partition_id"], whole["round"])],
        index=whole.index)
    return {"rows_same_keys": True,
            "rows_equal_but_charged_epsilon": bool(whole[~is_charged]["value"].equals(resumed[~is_charged]["value"])),
            "epsilon_rows_charged": int(is_charged.sum()),
            "epsilon_rows_charged_higher": int((resumed[is_charged]["value"].to_numpy()
                                                > whole[is_charged]["value"].to_numpy()).sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--kill-round", type=int, default=3)
    parser.add_argument("--kill-after-saved", type=int, default=20,
                        help="kill once this many of the round's users have saved state of it")
    parser.add_argument("--workdir", default="/tmp/fedrex-resume")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    if not 1 < args.kill_round <= args.rounds:
        raise SystemExit("--kill-round must be after round 1 and at most --rounds")
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    pairs = ["dataset=sst2", "partitioner=iid", f"num-partitions={args.users}",
             f"fraction-train={args.per_round / args.users}", f"min-train-clients={args.per_round}",
             f"num-rounds={args.rounds}", "fraction-evaluate=0", "attack-examples=0", "fidelity-examples=0",
             "local-max-steps=5", "batch-size=16", "mode=fedper", "dp=true", "dp-reproducible-noise=true", "seed=0"]

    def command(run_id: str) -> list[str]:
        return ["--runs-dir", str(workdir), *[a for p in [*pairs, f"run-id={run_id}"] for a in ("--run-config", p)]]

    print(f"[resume] uninterrupted run: {args.users} users, {args.per_round} a round, {args.rounds} rounds",
          file=sys.stderr, flush=True)
    whole_s = finish(simulate(command("whole"), workdir / "whole.log"), workdir / "whole.log")
    print(f"[resume] killed run: SIGKILL in round {args.kill_round}'s training", file=sys.stderr, flush=True)
    started = time.time()
    killed = workdir / "killed"
    seen = kill_during(simulate(command("killed"), workdir / "killed.log"), killed, args.kill_round,
                       args.kill_after_saved)
    killed_after_s = time.time() - started
    lost_users = {p.parent.name for p in (killed / "client_state").glob(f"p*/round-{args.kill_round:04d}.json")}
    committed = json.loads((killed / "run.json").read_text())["completed_rounds"]
    print(f"[resume] killed after {killed_after_s:.0f} s ({len(lost_users)} users had saved round {args.kill_round}); resuming",
          file=sys.stderr, flush=True)
    resume_s = finish(simulate(["--resume", str(killed)], workdir / "resume.log"), workdir / "resume.log")

    states = compare_states(workdir / "whole", killed, lost_users, args.kill_round)
    final = f"checkpoints/round-{args.rounds:04d}.safetensors"
    a, b = load_weights(killed / final), load_weights(workdir / "whole" / final)
    rows_whole = tidy(workdir / "whole")
    rows = compare_rows(rows_whole, tidy(killed), lost_users, args.kill_round)
    trained = rows_whole[(rows_whole["model"] == "train") & (rows_whole["metric"] == "n_train")]
    result = {
        "users": args.users, "per_round": args.per_round, "rounds": args.rounds, "kill_round": args.kill_round,
        "sampled_users": int(trained["partition_id"].nunique()),
        "committed_when_killed": committed, "progress_when_killed": seen,
        "users_with_state_of_the_lost_round": len(lost_users),
        "uninterrupted_s": round(whole_s, 1), "killed_after_s": round(killed_after_s, 1), "resume_s": round(resume_s, 1),
        **states,
        "final_weights_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        **rows,
    }
    # the kill landed inside the round (nothing of it committed, some users held its state), every
    # user has all its files back, every weight is equal, and exactly the ledgers and epsilons the
    # lost round charges differ, each by that round
    result["every_sampled_user_restored"] = bool(
        committed == args.kill_round - 1 and lost_users and result["final_weights_equal"]
        and states["same_file_names"] and states["users_with_state"] == result["sampled_users"]
        and states["weights_files_equal"] == states["weights_files"] and states["ledger_files_wrong"] == 0
        and states["ledger_files_charged"] == states["ledger_files_to_charge"] >= len(lost_users)
        and rows["rows_equal_but_charged_epsilon"]
        and rows["epsilon_rows_charged_higher"] == rows["epsilon_rows_charged"] > 0)
    out = Path(args.out)
    atomic_write_json(out / "resume.json", {"machine": {"cpus": os.cpu_count()}, "result": result})
    table = markdown_table(pd.DataFrame([[k, json.dumps(v) if isinstance(v, dict) else str(v)]
                                         for k, v in result.items()], columns=["measure", "value"]))
    atomic_write_bytes(out / "resume.md", (table + "\n").encode())
    print(table)
    return 0 if result["every_sampled_user_restored"] else 1


if __name__ == "__main__":
    sys.exit(main())
