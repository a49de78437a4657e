"""What unequal devices and production round rules do to the main job: the 118 critics as ideal
devices (the main job itself, the reference), then as a fleet of flagship phones, low-end phones
and Raspberry Pi 4s (`device-mix = "flagship=0.3,low-end=0.5,rpi4=0.2"`) with no deadline, the
packaged `fleet` config's 20 s deadline, and an 8 s deadline that a low-end phone's upload cannot
meet; then the same fleet with the devices dealt by label (`device-assign=label`: the slowest
devices held by the critics with the fewest positive reviews), without and with the 8 s deadline:
what a deadline does when slow devices hold different users. Every fleet row uses the same
reference ms per sample (measured once here) so the rows differ only in their rules.

    python benchmarks/fleet.py [--rounds 10]

Per row: accuracy pooled over every held-out review (global and personal, start and end),
virtual time the rounds took, rounds abandoned and device statuses over the run (counts of
client-rounds), and per tier the updates each
client contributed and its global and personal accuracy at the end (the participation bias).
Writes results/fleet.json (after each row; a rerun skips rows already there) and results/fleet.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from analysis.load import (device_rounds, fairness_by_tier, load_run, per_client, round_summary,  # noqa: E402
                           time_to_accuracy)
from analysis.report import markdown_table  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402

MIX = "device-mix=flagship=0.3,low-end=0.5,rpi4=0.2"
ROWS = {
    "ideal devices (the main job)": [],
    "fleet, no deadline": [MIX],
    "fleet, deadline 20 s (config fleet)": [MIX, "round-deadline=20"],
    "fleet, deadline 8 s": [MIX, "round-deadline=8"],
    "fleet by label, no deadline": [MIX, "device-assign=label"],
    "fleet by label, deadline 8 s": [MIX, "device-assign=label", "round-deadline=8"],
}
RESULTS = ROOT / "results"


def reference_ms() -> dict:
    from models.run_settings import RunSettings
    from server.app import global_model
    from server.fleet import measure_ms_per_sample

    settings = RunSettings()
    return measure_ms_per_sample(global_model(settings)[0], settings)


def measure(name: str, pairs: list[str], rounds: int, ms: float, work: Path) -> dict:
    from simulations.simulate import load_settings, simulate

    run_id = "row-" + str(list(ROWS).index(name))
    settings = load_settings(None, [*pairs, f"num-rounds={rounds}", f"device-ms-per-sample={ms}", f"run-id={run_id}",
                                    f"runs-dir={work}"])
    shutil.rmtree(work / run_id, ignore_errors=True)  # a row not in the results is measured from scratch
    start = time.time()
    run_dir = simulate(settings)
    return summarize(name, pairs, run_dir, time.time() - start)


def summarize(name: str, pairs: list[str], run_dir: Path, wall: float) -> dict:
    import pandas as pd

    df = load_run(run_dir)
    summary = round_summary(df).set_index(["round", "model"])
    last = int(summary.index.get_level_values(0).max())
    row = {"row": name, "settings": pairs, "wall_s": wall,
           **{f"{m}_pooled_{r}": float(summary.loc[(r, m), "pooled"]) for m in ("global", "personal")
              for r in (0, last)}}
    wide = per_client(df, last)  # the share of held-out reviews the global model calls fresh, and the truth
    weights = wide["client.n_test"]
    row["global_called_positive"] = float(np.average(wide["global.pred_positive"], weights=weights))
    row["true_positive"] = float(np.average(wide["client.test_positive"], weights=weights))
    statuses = device_rounds(df)
    if len(statuses):
        row["statuses"] = {k: int(v) for k, v in statuses["status"].value_counts().items()}
        rounds = pd.read_parquet(run_dir / "rounds.parquet")
        row["abandoned_rounds"] = int(rounds[rounds["metric"] == "abandoned"]["value"].sum())
        clock = time_to_accuracy(run_dir, df)
        row["virtual_hours"] = float(clock["virtual_hours"].max())
        row["by_tier"] = fairness_by_tier(df).to_dict(orient="records")
    return row


def tables(rows: list[dict]) -> str:
    import pandas as pd

    def count(r, status):
        return str(r["statuses"].get(status, 0)) if "statuses" in r else "–"

    main = pd.DataFrame([{
        "row": r["row"], "global start": r["global_pooled_0"],
        "global end": r[next(k for k in r if k.startswith("global_pooled_") and k != "global_pooled_0")],
        "personal end": r[next(k for k in r if k.startswith("personal_pooled_") and k != "personal_pooled_0")],
        "called positive (true)": f"{r['global_called_positive']:.2f} ({r['true_positive']:.2f})"
        if "global_called_positive" in r else "–",
        "virtual minutes": r.get("virtual_hours", float("nan")) * 60,
        "rounds abandoned": str(r["abandoned_rounds"]) if "abandoned_rounds" in r else "–",
        **{status: count(r, status) for status in ("ok", "straggler", "dropped", "abandoned", "unavailable")}}
        for r in rows])
    tiers = pd.DataFrame([{"row": r["row"], **t} for r in rows for t in r.get("by_tier", [])])
    out = markdown_table(main)
    if len(tiers):
        out += "\n\nPer tier at the last round (updates per client over the run; accuracy mean and p10):\n\n"
        out += markdown_table(tiers)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--work", default="/tmp/fedrex-fleet")
    parser.add_argument("--from-runs", action="store_true",
                        help="re-read the saved rows' run folders under --work (no new runs), e.g. for a new column")
    args = parser.parse_args()
    path = RESULTS / "fleet.json"
    saved = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if saved.get("rounds") not in (None, args.rounds):
        saved = {"rows": []}
    if "reference_ms_per_forward" not in saved:  # older results timed a few steps of the mix: measure all again
        reference = reference_ms()
        saved = {"rows": [], "reference_ms_per_sample": reference["train"], "reference_ms_per_forward": reference["forward"]}
    saved["rounds"] = args.rounds
    ms = saved["reference_ms_per_sample"]
    print(f"[fleet] reference {ms:.3f} ms per training sample, {saved['reference_ms_per_forward']:.3f} per forward "
          "pass (one thread)", file=sys.stderr, flush=True)
    if args.from_runs:
        saved["rows"] = [summarize(r["row"], r["settings"], Path(args.work) / f"row-{list(ROWS).index(r['row'])}",
                                   r["wall_s"]) for r in saved["rows"]]
        atomic_write_json(path, saved)
    done = {r["row"] for r in saved["rows"]}
    for name, pairs in ROWS.items():
        if name in done:
            continue
        print(f"[fleet] {name}", file=sys.stderr, flush=True)
        saved["rows"].append(measure(name, pairs, args.rounds, ms, Path(args.work)))
        atomic_write_json(path, saved)
    text = ("# Devices and round rules on the main job\n\n"
            f"`python benchmarks/fleet.py --rounds {args.rounds}` (seed 0, 118 critics, 20% of them a round's goal; "
            f"reference {ms:.2f} ms per training sample).\n\n" + tables(saved["rows"]) + "\n")
    atomic_write_bytes(RESULTS / "fleet.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
