"""A device's first training step, as a device pays it at every message: one core, one thread, a
fresh process (a device's ClientApp is a new process per message), the default settings, one critic.

    python benchmarks/first_training.py --label NAME [--repeats 2]

For each repeat and each kind (a local training round, a personal fit) it starts a fresh process
pinned to one core (`taskset -c 0`) that loads the critic with the most training rows among the
first 30, times that one call, and reports whether torch's compiler (torch._dynamo) got imported.
Rows are kept in results/first_training.{json,md} by label, so the same script run in a checkout of
an earlier release (`--label`) puts the two side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "first_training.json"

CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from client.data import federation, load_local_data
from client.local import personal_model, train_round
from client.state import ClientState
from models.networks import build_network
from models.protocol import NORMALIZER
from models.run_settings import RunSettings
from server.app import global_model, start_config
settings = RunSettings()
model, config = global_model(settings)
network = config["network"]
normalizer = start_config(settings, network).get(NORMALIZER)
weights = model.state_dict()
federation(settings)
local = max((load_local_data({{"partition-id": p}}, settings, network["num_labels"], normalizer) for p in range(30)),
            key=lambda l: len(l.train))
build = lambda: build_network(network)
start = time.perf_counter()
if {kind!r} == "training round":
    train_round(build, weights, local.train, settings, ClientState(), 1, local.partition_id, 0.0, local.tokenizer)
else:
    personal_model(build, weights, ClientState(), settings, local.train, 1)
print(json.dumps({{"seconds": time.perf_counter() - start, "rows": len(local.train),
                  "compiler_imported": "torch._dynamo" in sys.modules}}))
"""


def measure(kind: str) -> dict:
    code = "import json\n" + CHILD.format(root=str(ROOT), kind=kind)
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"}, timeout=600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="what is measured, e.g. the release")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    rows = [r for r in (json.loads(out.read_text())["rows"] if out.exists() else []) if r["label"] != args.label]
    for repeat in range(args.repeats):
        for kind in ("training round", "personal fit"):
            row = {"label": args.label, "kind": kind, "repeat": repeat, **measure(kind)}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    sys.path.insert(0, str(ROOT))
    from models.files import atomic_write_bytes, atomic_write_json

    atomic_write_json(out, {"machine": {"cpus": os.cpu_count()}, "rows": rows})
    lines = ["| label | kind | rows | seconds (each repeat) | torch._dynamo imported |", "|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        for kind in ("training round", "personal fit"):
            mine = [r for r in rows if r["label"] == label and r["kind"] == kind]
            seconds = " / ".join(f"{r['seconds']:.2f}" for r in mine)
            imported = " / ".join(str(r["compiler_imported"]) for r in mine)
            lines.append(f"| {label} | {kind} | {mine[0]['rows']} | {seconds} | {imported} |")
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
