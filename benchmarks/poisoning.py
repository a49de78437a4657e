"""Poisoned clients on rt_critics: what each poisoning does to the benign users, under FedAvg and
Flower's robust aggregators (issue #17).

    python benchmarks/poisoning.py [--fractions 0,0.2] [--strategies fedavg,fedmedian,fedtrimmedavg,krum]
                                   [--kinds label-flip,sign-flip,scale,backdoor] [--rounds 10]

One `fedrex simulate` per cell: the defaults (10 rounds, 20% of the 118 critics per round), no
text attacks, with ``malicious-fraction`` of the critics malicious (an exact seeded draw: 24 of 118
at 0.2) doing ``poison-kind`` every round they train (sign-flip and scale boosted x10). An
aggregator is a strategy by name, or ``fedavg-clip`` (FedAvg with every update clipped to the
round's median update norm: ``update-clip=1.0``). The Krum family is told to expect as many
Byzantine replies per round as the malicious share of a round's 23 replies (5 at 0.2, the same in
its clean cell; Bulyan at most 5, the most its 4f + 3 <= 23 allows). Every cell measures the benign users only, on their held-out rows:
the global and personal model's per-user mean accuracy and, for the backdoor, the share of their
negative rows the model gets right that the trigger word turns positive (the clean cells measure
the trigger alone, with no malicious user); each poisoned cell's drop is against its strategy's
clean cell on the same benign users. Results: results/poisoning.json (after each cell; a rerun skips cells already
there) and results/poisoning.md, with the drop against each strategy's clean cell.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from analysis.load import ci95, load_rounds, load_run  # noqa: E402
from analysis.report import markdown_table  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.run_settings import KRUM_FAMILY, STRATEGIES  # noqa: E402

CLIENTS_PER_ROUND = 23  # 20% of the 118 critics


def cell_pairs(aggregator: str, fraction: float, kind: str, rounds: int, expected: float) -> list[str]:
    """``expected``: the largest malicious share of the grid, which the Krum family is told to
    expect in every cell (clean ones too), so its clean cost is measured with the setting that defends."""
    strategy, clip = (aggregator[: -len("-clip")], True) if aggregator.endswith("-clip") else (aggregator, False)
    if strategy not in STRATEGIES:
        raise SystemExit(f"unknown aggregator {aggregator!r}: a strategy ({', '.join(STRATEGIES)}) or one + '-clip'")
    pairs = ["dataset=rt_critics", f"num-rounds={rounds}", f"evaluate-every={rounds}", "attack-examples=0",
             "fidelity-examples=0", f"strategy={strategy}", f"malicious-fraction={fraction}", f"poison-kind={kind}"]
    if strategy in KRUM_FAMILY:
        byzantine = max(1, round(expected * CLIENTS_PER_ROUND))
        if strategy == "bulyan":
            byzantine = min(byzantine, (CLIENTS_PER_ROUND - 3) // 4)
        pairs.append(f"krum-byzantine={byzantine}")
    if clip:
        pairs.append("update-clip=1.0")
    return pairs


def run_cell(name: str, pairs: list[str], runs: Path) -> dict:
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--runs-dir", str(runs)]
    for pair in [*pairs, f"run-id={name}"]:
        command += ["--run-config", pair]
    if (runs / name).exists():
        shutil.rmtree(runs / name)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    return {**summarize(runs / name), "seconds": time.time() - started}


def summarize(run_dir: Path) -> dict:
    """Benign users' per-user means at the last round (every user when nobody is malicious)."""
    df = load_run(run_dir)
    last = int(df["round"].max())
    wide = df[df["round"] == last].pivot_table(index="client_id", columns=["model", "metric"], values="value",
                                               observed=True)
    benign = wide[wide[("client", "malicious")] == 0] if ("client", "malicious") in wide else wide
    out = {"benign_users": int(len(benign)), "users": int(len(wide)),
           # per user, so a poisoned cell is compared with its clean cell on the same (benign) users
           "global_by_user": {str(c): float(v) for c, v in benign[("global", "acc")].dropna().items()}}
    for model in ("global", "personal"):
        acc = benign[(model, "acc")].dropna().to_numpy()
        out[f"{model}_acc"], out[f"{model}_ci95"] = float(acc.mean()), ci95(acc)
        if (model, "backdoor_success") in benign:
            out[f"{model}_backdoor"] = float(benign[(model, "backdoor_success")].dropna().mean())
    failed = df[df["metric"] == "failed"]
    out["failed_client_rounds"] = int(len(failed))
    rounds = load_rounds(run_dir)  # rounds a strategy aggregated nothing in (Bulyan short of replies)
    out["skipped_rounds"] = int(rounds[(rounds["model"] == "round") & (rounds["metric"] == "aggregation_skipped")]
                                ["value"].sum())
    return out


def clean_on(clean: dict, users: dict) -> float:
    """The clean cell's global per-user mean over ``users`` (a poisoned cell's benign users)."""
    return sum(clean["global_by_user"][u] for u in users) / len(users)


def gap(row: dict, clean: dict | None) -> str:
    """Points between ``row`` and a clean cell on ``row``'s benign users ("" for the cell itself)."""
    if clean is None or clean is row:
        return ""
    return f"{100 * (row['global_acc'] - clean_on(clean, row['global_by_user'])):+.1f}"


def table(rows: list[dict]) -> str:
    clean = {(r["strategy"]): r for r in rows if r["fraction"] == 0}
    lines = []
    for r in sorted(rows, key=lambda r: (r["kind"] if r["fraction"] else "", r["strategy"], r["fraction"])):
        lines.append({
            "poisoning": "none (clean)" if r["fraction"] == 0 else r["kind"],
            "malicious": f"{r['fraction']:.0%}", "aggregator": r["strategy"],
            "benign users": r["benign_users"],
            "benign global acc ± 95% CI": f"{r['global_acc']:.3f} ± {r['global_ci95']:.3f}",
            "vs its clean cell, same users (points)": gap(r, clean.get(r["strategy"])),
            # the bar: the clean run, plain FedAvg
            "vs clean FedAvg, same users (points)": gap(r, clean.get("fedavg")),
            "benign personal acc": f"{r['personal_acc']:.3f}",
            "trigger success (global / personal)": (f"{r['global_backdoor']:.3f} / {r['personal_backdoor']:.3f}"
                                                    if "global_backdoor" in r else ""),
            "seconds": f"{r['seconds']:.0f}"})
    return markdown_table(pd.DataFrame(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0,0.2")
    parser.add_argument("--strategies", default="fedavg,fedmedian,fedtrimmedavg,krum,multikrum,bulyan,fedavg-clip")
    parser.add_argument("--kinds", default="backdoor,scale,sign-flip,label-flip")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs-dir", default="/tmp/fedrex-poisoning")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    path = Path(args.out) / "poisoning.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    cells, fractions = [], [float(f) for f in args.fractions.split(",")]
    for fraction in fractions:
        for aggregator in args.strategies.split(","):
            # a clean cell runs once, as a backdoor run with nobody malicious (it measures the trigger alone)
            for kind in (["backdoor"] if fraction == 0 else args.kinds.split(",")):
                cells.append((aggregator, fraction, kind))
    for row in rows:  # re-read every kept cell whose run folder is here: a newer summary applies to it too
        if (Path(args.runs_dir) / row["name"] / "clients.parquet").exists():
            row.update(summarize(Path(args.runs_dir) / row["name"]))
    started = time.time()
    for aggregator, fraction, kind in cells:
        name = f"{aggregator}-{kind}-{round(100 * fraction)}"
        pairs = cell_pairs(aggregator, fraction, kind, args.rounds, max(fractions))
        if any(r["name"] == name and r["config"] == pairs for r in rows):
            continue
        print(f"[poisoning] {name} ({time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)
        rows = [r for r in rows if r["name"] != name]  # measured with other settings: replaced
        rows.append({"name": name, "strategy": aggregator, "fraction": fraction, "kind": kind, "config": pairs,
                     **run_cell(name, pairs, Path(args.runs_dir))})
        save(path, rows)
    save(path, rows)  # also when no cell ran: the re-read summaries and the table's columns are current
    print(table(rows))
    return 0


def save(path: Path, rows: list[dict]) -> None:
    atomic_write_json(path, {"rows": rows})
    atomic_write_bytes(path.with_suffix(".md"), (table(rows) + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())
