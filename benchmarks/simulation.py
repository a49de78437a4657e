"""Simulation overhead: FedREX's real client work under Flower's simulation engine (Ray) versus a
plain Python loop doing exactly the same work in one process, and the peak memory of each.

    python benchmarks/simulation.py [--registered 100,500,1000] [--per-round 10,100] [--rounds 2]

For every (registered clients N, clients per round K) it
1. runs `fedrex simulate` in a subprocess on SST-2 cut into N Dirichlet(1.0) partitions, K clients
   training per round (adversarial hardening on, a few local steps, no evaluation phase, so the
   work is the training the overhead question is about), and samples the proportional set size
   (PSS: shared memory-mapped pages counted once) of its whole process tree, Ray's included;
2. replays the same rounds in a plain loop (`--plain RUN_DIR`, its own subprocess): for each round
   the partitions the simulation sampled, the same `train_round` with the same seeds, FedAvg.
Overhead = simulation seconds / plain-loop seconds, for the rounds alone and end to end (Ray start,
client discovery included). Results go to results/simulation.json (after each cell, so a rerun
skips what is done) and results/simulation.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from simulations.localhost import matching_pids, pss_mb, tree_pids  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402

WORK = ["dataset=sst2", "partitioner=dirichlet", "alpha=1.0", "fraction-evaluate=0", "attack-examples=0",
        "fidelity-examples=0", "local-max-steps=5", "batch-size=16", "adv-weight=0.5", "mode=finetune",
        "seed=0"]


# ----------------------------------------------------------------------------- memory sampling
def run_sampled(command: list[str], env: dict, marker: str | None = None,
                progress: Path | None = None) -> tuple[int, float, float, str, float]:
    """Run ``command``; return (exit code, wall seconds, peak PSS of its process tree in MB, with
    the trees of the SuperLinks it started when ``marker`` names them, stderr tail, seconds until
    the run's first round began: the ``since`` of the first phase its ``progress`` file
    (progress.json) named; NaN if none was seen)."""
    start = time.time()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, first_round = [0.0], [float("nan")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if progress is not None and first_round[0] != first_round[0] and progress.exists():
                now = json.loads(progress.read_text())
                if now["phase"] in ("train", "evaluate"):
                    first_round[0] = dt.datetime.fromisoformat(now["since"]).timestamp() - start
            # the detached SuperLinks `fedrex simulate` starts through `flwr run` (their FLWR_HOME lies
            # in the run's folder, ``marker``): Ray runs under them, not under the command
            links = matching_pids("flower-superlink", marker) if marker else []
            # one set: the SuperLink is also the command's descendant, and summing the two trees
            # counted it, Ray included, twice (the peaks measured before this fix were about 2x)
            peak[0] = max(peak[0], pss_mb(tree_pids(process.pid, *links)))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr_lines = []
    for line in process.stderr:  # stream progress through, keep the tail for errors
        stderr_lines.append(line)
        if line.startswith(("[round", "[fedrex]", "[plain]")):
            print("   " + line.rstrip(), file=sys.stderr, flush=True)
    process.wait()
    stop.set()
    sampler.join()
    return process.returncode, time.time() - start, peak[0], "".join(stderr_lines[-30:]), first_round[0]


# ----------------------------------------------------------------------------- the plain loop
def plain_replay(run_dir: Path) -> dict:
    """Replay a simulation's training rounds in one process: same partitions, same seeds, FedAvg."""
    import torch

    from client.data import federation, load_local_data
    from client.local import train_round
    from client.state import ClientState
    from models.networks import build_network
    from models.run_settings import RunSettings
    from models.protocol import NORMALIZER
    from server.app import global_model, start_config

    setup_start = time.time()
    meta = json.loads((run_dir / "run.json").read_text())
    settings = RunSettings.from_flower(meta["settings"])
    model, config = global_model(settings)
    network = config["network"]
    normalizer = start_config(settings, network).get(NORMALIZER)  # what the simulation's clients were sent
    weights = model.state_dict()
    rows = pd.read_parquet(run_dir / "clients.parquet")
    trained = rows[(rows["model"] == "train") & (rows["metric"] == "n_train")]
    federation(settings)  # load and partition once, before the clock starts (as the simulation does)
    setup_seconds = time.time() - setup_start
    round_seconds = []
    for round_number in sorted(trained["round"].unique()):
        start = time.time()
        total, summed = 0, None
        for pid in sorted(trained.loc[trained["round"] == round_number, "partition_id"].unique()):
            local = load_local_data({"partition-id": int(pid)}, settings, network["num_labels"], normalizer)
            sent, _ = train_round(lambda: build_network(network), weights, local.train, settings, ClientState(),
                                  int(round_number), int(pid), 0.0, local.tokenizer)
            n = len(local.train)
            total += n
            summed = ({k: v.double() * n for k, v in sent.items()} if summed is None
                      else {k: summed[k] + v.double() * n for k, v in sent.items()})
        weights = {**weights, **{k: (v / total).to(weights[k].dtype) for k, v in summed.items()}}  # buffers stay
        round_seconds.append(time.time() - start)
        print(f"[plain] round {round_number}: {round_seconds[-1]:.1f}s", file=sys.stderr, flush=True)
    return {"setup_seconds": setup_seconds, "round_seconds": round_seconds, "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- the grid
def measure(registered: int, per_round: int, rounds: int, workdir: Path, env: dict, extra: list[str]) -> dict:
    run_id = f"n{registered}-k{per_round}"
    pairs = [*WORK, f"num-partitions={registered}", f"fraction-train={per_round / registered}",
             f"min-train-clients={per_round}", f"num-rounds={rounds}", f"run-id={run_id}",
             f"runs-dir={workdir}", *extra]
    command = [sys.executable, "-m", "simulations.cli", "simulate"]
    for pair in pairs:
        command += ["--run-config", pair]
    code, sim_wall, sim_pss, tail, first_round = run_sampled(command, env, marker=str(workdir),
                                                             progress=workdir / run_id / "progress.json")
    if code != 0:
        raise SystemExit(f"simulation {run_id} failed:\n{tail}")
    run_dir = workdir / run_id
    rounds_frame = pd.read_parquet(run_dir / "rounds.parquet")
    sim_rounds = rounds_frame[(rounds_frame["model"] == "round") & (rounds_frame["metric"] == "seconds")]["value"]
    out_json = workdir / f"{run_id}-plain.json"
    code, plain_wall, plain_pss, tail, _ = run_sampled(
        [sys.executable, __file__, "--plain", str(run_dir), "--plain-out", str(out_json)], env)
    if code != 0:
        raise SystemExit(f"plain replay of {run_id} failed:\n{tail}")
    plain = json.loads(out_json.read_text())
    sim_round_s, plain_round_s = float(sim_rounds.sum()), float(sum(plain["round_seconds"]))
    return {"registered": registered, "per_round": per_round, "rounds": rounds, "extra": extra,
            "sim_wall_s": sim_wall, "sim_rounds_s": sim_round_s, "sim_peak_pss_mb": sim_pss,
            "sim_first_round_s": first_round,
            "plain_wall_s": plain_wall, "plain_rounds_s": plain_round_s, "plain_peak_pss_mb": plain_pss,
            "overhead_rounds": sim_round_s / plain_round_s, "overhead_wall": sim_wall / plain_wall,
            "plain_torch_threads": plain["torch_threads"]}


def table(rows: list[dict]) -> str:
    head = ["registered", "per round", "variant", "sim rounds s", "plain rounds s", "overhead (rounds)",
            "sim wall s", "plain wall s", "overhead (wall)", "command to first round s", "sim peak PSS MiB",
            "plain peak PSS MiB"]
    def first(row: dict) -> str:  # measured since the column was added; "–" before
        seconds = row.get("sim_first_round_s", float("nan"))
        return "–" if seconds != seconds else f"{seconds:.1f}"

    body = [[str(r["registered"]), str(r["per_round"]), variant(r), f"{r['sim_rounds_s']:.1f}", f"{r['plain_rounds_s']:.1f}",
             f"{r['overhead_rounds']:.2f}x", f"{r['sim_wall_s']:.1f}", f"{r['plain_wall_s']:.1f}",
             f"{r['overhead_wall']:.2f}x", first(r), f"{r['sim_peak_pss_mb']:.0f}", f"{r['plain_peak_pss_mb']:.0f}"]
            for r in rows]
    return markdown_table(pd.DataFrame(body, columns=head))


def variant(row: dict) -> str:
    """A row's settings beyond WORK; synthetic users are named as such (a load test)."""
    text = " ".join(row["extra"]) or "default"
    return text + (" (SYNTHETIC users: a load test)" if "partitioner=bootstrap" in row["extra"] else "")


def plot(rows: list[dict], path: Path) -> None:
    """Time and memory against registered users, one line per variant measured at several sizes
    (the plain loop's beside the simulation's): the README's scale figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = {}
    for row in rows:
        lines.setdefault(f"{' '.join(row['extra']) or 'default'}, {row['per_round']} per round", []).append(row)
    lines = {k: sorted(v, key=lambda r: r["registered"]) for k, v in lines.items() if len(v) > 1}
    if not lines:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, series in lines.items():
        users = [r["registered"] for r in series]
        axes[0].plot(users, [r["sim_wall_s"] for r in series], "o-", label=f"simulation wall ({name})")
        axes[0].plot(users, [r["sim_rounds_s"] for r in series], "s--", label=f"simulation rounds ({name})")
        axes[0].plot(users, [r["plain_wall_s"] for r in series], "o:", label=f"plain loop wall ({name})")
        axes[0].plot(users, [r.get("sim_first_round_s", float("nan")) for r in series], "^-", label=f"command to first round ({name})")
        axes[1].plot(users, [r["sim_peak_pss_mb"] / 1024 for r in series], "o-", label=f"simulation ({name})")
        axes[1].plot(users, [r["plain_peak_pss_mb"] / 1024 for r in series], "o:", label=f"plain loop ({name})")  # MiB -> GiB
    for ax, title, unit in ((axes[0], "time", "seconds"), (axes[1], "peak PSS of the process tree", "GiB")):
        ax.set_xscale("log")
        ax.set_xlabel("registered users")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registered", default="100,500,1000")
    parser.add_argument("--per-round", default="10,100")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra run-config for every cell (a variant, e.g. client-cpus=2)")
    parser.add_argument("--workdir", default="/tmp/fedrex-simbench")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    parser.add_argument("--plain-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        atomic_write_json(Path(args.plain_out), plain_replay(Path(args.plain)))
        return 0
    env = {**os.environ, "TQDM_DISABLE": "1"}
    workdir = Path(args.workdir)
    json_path = Path(args.out) / "simulation.json"
    done = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    rows = list(done)
    for registered in map(int, args.registered.split(",")):
        for per_round in map(int, args.per_round.split(",")):
            if per_round > registered:
                continue
            if any(r["registered"] == registered and r["per_round"] == per_round and r["extra"] == args.set
                   and r["rounds"] == args.rounds for r in done):
                print(f"[bench] N={registered} K={per_round}: already measured", file=sys.stderr)
                continue
            print(f"[bench] N={registered} registered, K={per_round} per round, {args.rounds} rounds",
                  file=sys.stderr, flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            rows.append(measure(registered, per_round, args.rounds, workdir, env, args.set))
            atomic_write_json(json_path, {"machine": {"cpus": os.cpu_count()}, "rows": rows})
    md = table(rows)
    atomic_write_bytes(json_path.with_suffix(".md"), (md + "\n").encode())
    plot(rows, json_path.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
