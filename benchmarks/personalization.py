"""Personalization experiment: modes x adversarial hardening (and one DP run) on real users.

    python benchmarks/personalization.py [--datasets rt_critics,sent140_users] [--rounds 3]
        [--modes finetune,fedper,fedrep,ditto] [--set KEY=VALUE ...]

Each cell is one `fedrex simulate` run (its own subprocess, its run folder kept under --runs-dir);
every client is evaluated once, after the last round, on its own held-out rows. The table reads
the runs' parquet with `analysis.load` (as any analyst would): per-user accuracy of the global and
the personal model (mean / median / p10), share of users harmed by personalization, accuracy
under the character attack, comprehensiveness of the personal model's explanations, agreement
with the global model's, and the largest epsilon any client spent when DP is on. Results go to
results/personalization.json (after each cell; a rerun skips cells already there) and .md.
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

from analysis.load import fairness, load_run, per_client  # noqa: E402
from analysis.report import markdown_table  # noqa: E402
from models.artifact import atomic_write_bytes, atomic_write_json  # noqa: E402

# Per dataset: which users take part (sent140 is cut to users with >= 10 tweets: 1-row test sets
# make per-user accuracy a coin) and how many train per round.
DATASETS = {
    "rt_critics": ["dataset=rt_critics", "fraction-train=0.2"],
    "sent140_users": ["dataset=sent140_users", "min-samples=10", "fraction-train=0.2"],
}
COMMON = ["partitioner=natural", "local-max-steps=30", "attack-examples=10", "fidelity-examples=10", "seed=0"]


def cells(modes: list[str]) -> list[tuple[str, list[str]]]:
    grid = [(f"{mode}{' +adv' if adv else ''}", [f"mode={mode}", f"adv-weight={adv}"])
            for mode in modes for adv in (0.0, 0.5)]
    return grid + [("finetune +adv +DP", ["mode=finetune", "adv-weight=0.5", "dp=true", "noise-multiplier=1.0"])]


def summarise(run_dir: Path) -> dict:
    df = load_run(run_dir)
    table = fairness(df)
    wide = per_client(df)
    row = {"clients": int(table.loc["personal", "clients"])}
    for model in ("global", "personal"):
        for stat in ("mean", "median", "p10"):
            row[f"{model}_acc_{stat}"] = float(table.loc[model, stat])
        if f"{model}.adv_acc" in wide:
            row[f"{model}_adv_acc_mean"] = float(wide[f"{model}.adv_acc"].mean())
        if f"{model}.comprehensiveness" in wide:
            row[f"{model}_comprehensiveness_mean"] = float(wide[f"{model}.comprehensiveness"].mean())
    row["share_harmed"] = float(table.loc["personal", "share_harmed"])
    if "personal.agreement_spearman" in wide:
        row["agreement_spearman_mean"] = float(wide["personal.agreement_spearman"].mean())
    epsilon = df[(df["metric"] == "epsilon")]["value"]
    row["epsilon_max"] = float(epsilon.max()) if len(epsilon) and epsilon.max() > 0 else None
    return row


def table(rows: list[dict]) -> str:
    head = ["dataset", "method", "users", "global mean / median / p10", "personal mean / median / p10", "harmed",
            "adv acc global / personal", "compr. personal", "agreement", "epsilon"]

    def fmt(value) -> str:
        return "–" if value is None else f"{value:.3f}"

    body = [[r["dataset"], r["method"], str(r["clients"]),
             " / ".join(fmt(r[f"global_acc_{s}"]) for s in ("mean", "median", "p10")),
             " / ".join(fmt(r[f"personal_acc_{s}"]) for s in ("mean", "median", "p10")),
             f"{100 * r['share_harmed']:.0f}%",
             f"{fmt(r.get('global_adv_acc_mean'))} / {fmt(r.get('personal_adv_acc_mean'))}",
             fmt(r.get("personal_comprehensiveness_mean")), fmt(r.get("agreement_spearman_mean")),
             "–" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.1f}"] for r in rows]
    return markdown_table(pd.DataFrame(body, columns=head))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="rt_critics,sent140_users")
    parser.add_argument("--modes", default="finetune,fedper,fedrep,ditto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs-dir", default="/tmp/fedrex-personalization")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    json_path = Path(args.out) / "personalization.json"
    rows = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    started = time.time()
    for dataset in args.datasets.split(","):
        for method, pairs in cells(args.modes.split(",")):
            config = [*COMMON, *DATASETS[dataset], *pairs, f"num-rounds={args.rounds}",
                      f"evaluate-every={args.rounds}", *args.set]
            if any(r["dataset"] == dataset and r["config"] == config for r in rows):
                print(f"[bench] {dataset} / {method}: already measured", file=sys.stderr)
                continue
            run_id = f"{dataset}-{method.replace(' ', '').replace('+', '-')}"
            print(f"[bench] {dataset} / {method} ({time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "simulations.cli", "simulate", "--runs-dir", args.runs_dir]
            for pair in [*config, f"run-id={run_id}"]:
                command += ["--run-config", pair]
            run_dir = Path(args.runs_dir) / run_id
            if run_dir.exists():  # a half-finished earlier attempt: start it again cleanly
                shutil.rmtree(run_dir)
            cell_start = time.time()
            subprocess.run(command, cwd=ROOT, check=True)
            rows.append({"dataset": dataset, "method": method, "config": config, "run_id": run_id,
                         "seconds": time.time() - cell_start, **summarise(run_dir)})
            atomic_write_json(json_path, {"rows": rows})
    md = table(rows)
    atomic_write_bytes(json_path.with_suffix(".md"), (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
