"""What evaluating every user costs in the simulation, against a plain loop doing the same work.

    python benchmarks/evaluation.py [--users-with 5] [--batches 1,0]
    python benchmarks/evaluation.py --sst2-users 10000 --batches 0

Every Sentiment140 user with at least ``--users-with`` tweets (1,473 at 5), or SST-2 train cut
iid into ``--sst2-users`` users (10,000: 6-7 rows each; scale beyond Sentiment140's 2,875 users), is evaluated at round 0
(the start model and its local fine-tune, no attacks, no fidelity: the cost is the per-message
overhead the scale issue is about). For each ``evaluate-batch`` (1: one message per user, as a
fleet of devices gets; 0: auto, several users per message) a `fedrex simulate` run with one round,
``--stop-after 0`` not being a thing, trains 1% of users once; its round-0 seconds are the
evaluation alone (rounds.parquet). The plain loop calls the same client evaluation code
(``client.app._evaluate_user``) for the same users in one process, one thread, with the same
messages. Every run must give the plain loop's rows (checked), so the times compare the same work.
Results: results/evaluation.json (one cell per population; a run replaces its own) and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402

WORK = ["num-rounds=1", "fraction-train=0.01", "attack-examples=0", "fidelity-examples=0", "seed=0"]


def population(users_with: int, sst2_users: int) -> tuple[str, list[str]]:
    """(name, run-config pairs) of the users evaluated."""
    if sst2_users:
        return (f"SST-2 train cut iid into {sst2_users} users",
                ["dataset=sst2", "partitioner=iid", f"num-partitions={sst2_users}"])
    return f"Sentiment140 users with >= {users_with} tweets", ["dataset=sent140_users", f"min-samples={users_with}"]


def plain_loop(users: list[str], out: Path) -> None:
    """Round 0's evaluation of every user, in this process: the messages the server would send,
    handed to the client's evaluation code directly (no Flower engine, no Ray)."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app
    from client.data import federation
    from models.personalization import get_mode
    from models.protocol import ARRAYS, CONFIG, FROZEN, split_state
    from server.app import global_model, start_config
    from simulations.simulate import load_settings

    torch.set_num_threads(1)
    start = time.time()
    settings = load_settings(None, [*WORK, *users, f"runs-dir={out.parent}"])
    model, config = global_model(settings)
    shared, frozen = split_state(model.state_dict(), get_mode(settings.mode).shared_keys(model))
    round_config = {**start_config(settings, config["network"]), "run-id": "plain", "global-round": 0,
                    "run-dir": str(out.parent / "plain-run")}
    count = federation(settings).num_partitions
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    setup = time.time() - start
    start, rows = time.time(), []
    for pid in range(count):
        msg = Message(RecordDict({ARRAYS: ArrayRecord(shared), FROZEN: ArrayRecord(frozen),
                                  CONFIG: ConfigRecord(dict(round_config))}), dst_node_id=1,
                      message_type=MessageType.EVALUATE)
        context = Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": count},
                          state=RecordDict(), run_config=settings.to_flower())
        details, _ = client_app._evaluate_user(msg, context)
        rows.append(details)
    atomic_write_json(out, {"setup_s": setup, "evaluate_s": time.time() - start, "users": count, "rows": rows})


def simulated(users: list[str], batch: int, workdir: Path) -> dict:
    run_id = f"batch-{batch}"
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--runs-dir", str(workdir)]
    for pair in [*WORK, *users, f"evaluate-batch={batch}", f"run-id={run_id}"]:
        command += ["--run-config", pair]
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.time() - start
    rounds = pd.read_parquet(workdir / run_id / "rounds.parquet")
    value = lambda r, m: float(rounds[(rounds["round"] == r) & (rounds["metric"] == m)]["value"].iloc[0])  # noqa: E731
    return {"evaluate_batch": batch, "wall_s": wall, "evaluate_s": value(0, "seconds"),
            "messages": value(0, "evaluate_messages"), "users": value(0, "evaluate_replied"),
            "run_dir": str(workdir / run_id)}


def round0_rows(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "clients.parquet")
    frame = frame[(frame["round"] == 0) & frame["model"].isin(["global", "personal"])]
    return frame[["partition_id", "model", "metric", "value"]].sort_values(["partition_id", "model", "metric"]) \
        .reset_index(drop=True)


def plain_rows(rows: list[dict]) -> pd.DataFrame:
    out = []
    for details in rows:
        for key, value in details.items():
            model, _, metric = key.partition(".")
            if model in ("global", "personal"):
                out.append({"partition_id": int(details["partition_id"]), "model": model, "metric": metric,
                            "value": float(value)})
    return pd.DataFrame(out).sort_values(["partition_id", "model", "metric"]).reset_index(drop=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users-with", type=int, default=5)
    parser.add_argument("--sst2-users", type=int, default=0, help="evaluate SST-2 cut iid into this many users instead")
    parser.add_argument("--batches", default="1,0")
    parser.add_argument("--workdir", default="/tmp/fedrex-evalbench")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--plain-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    name, users = population(args.users_with, args.sst2_users)
    if args.plain_out:
        plain_loop(users, Path(args.plain_out))
        return 0
    workdir = Path(args.workdir)
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    workdir.mkdir(parents=True)
    print(f"[bench] {name}: plain loop", file=sys.stderr, flush=True)
    plain_file = workdir / "plain.json"
    start = time.time()
    subprocess.run([sys.executable, __file__, "--users-with", str(args.users_with), "--sst2-users", str(args.sst2_users),
                    "--plain-out", str(plain_file)], cwd=ROOT, check=True)
    plain = {**json.loads(plain_file.read_text()), "wall_s": time.time() - start}
    expected = plain_rows(plain.pop("rows"))
    rows = []
    for batch in map(int, args.batches.split(",")):
        print(f"[bench] simulation, evaluate-batch={batch}", file=sys.stderr, flush=True)
        row = simulated(users, batch, workdir)
        got = round0_rows(Path(row["run_dir"]))
        pd.testing.assert_frame_equal(got, expected[got.columns.tolist()], check_dtype=False)  # the same work
        rows.append(row)
    path = Path(args.out) / "evaluation.json"
    cells = load_cells(path)
    cells[name] = {"population": users, "machine": {"cpus": os.cpu_count()}, "plain": plain, "rows": rows}
    atomic_write_json(path, {"cells": cells})
    md = table(cells)
    atomic_write_bytes(Path(args.out) / "evaluation.md", (md + "\n").encode())
    print(md)
    return 0


def load_cells(path: Path) -> dict:
    """The populations measured so far (a file from before populations holds one: Sentiment140's)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if "cells" in saved:
        return saved["cells"]
    name, users = population(saved["users_with"], 0)
    return {name: {**saved, "population": users}}


def table(cells: dict) -> str:
    body = []
    for name, cell in sorted(cells.items(), key=lambda item: item[1]["plain"]["users"]):  # the file sorts its keys
        plain = cell["plain"]
        body.append([name, "plain loop (1 process, 1 thread)", str(plain["users"]), "–", f"{plain['evaluate_s']:.1f}",
                     f"{1000 * plain['evaluate_s'] / plain['users']:.1f}", "1.00x", f"{plain['wall_s']:.0f}"])
        for r in cell["rows"]:
            how = "one message per user" if r["evaluate_batch"] == 1 else (
                f"evaluate-batch={r['evaluate_batch']}" if r["evaluate_batch"] else "auto batches (the default)")
            body.append([name, f"simulation, {how}", f"{r['users']:.0f}", f"{r['messages']:.0f}",
                         f"{r['evaluate_s']:.1f}", f"{1000 * r['evaluate_s'] / r['users']:.1f}",
                         f"{r['evaluate_s'] / plain['evaluate_s']:.2f}x", f"{r['wall_s']:.0f}"])
    return markdown_table(pd.DataFrame(body, columns=["population", "how", "users evaluated", "messages",
                                                      "evaluating every user, s", "ms per user", "vs the plain loop",
                                                      "whole command, s"]))


if __name__ == "__main__":
    sys.exit(main())
