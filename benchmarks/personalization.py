"""Personalization experiment on real users, with the reference rows every such table needs.

    python benchmarks/personalization.py [--datasets rt_critics,sent140_users] [--part methods|sweep|seeds|all]
        [--rounds 3] [--set KEY=VALUE ...]

- ``methods``: one run per personalization mode (hardened, the default), plus the default mode
  without hardening (does hardening still pay?);
- ``sweep``: one change at a time from the defaults on rt_critics (client learning rate, local
  steps, logit-adjusted loss, server optimizer), to choose and justify the defaults;
- ``seeds``: the headline rows again with seeds 1 and 2 (per-user accuracy on a few test rows is
  noisy: the table reports the spread).

Each run is one `fedrex simulate` subprocess (its run folder kept under --runs-dir). Every user is
evaluated at round 0 (the starting model, and its local fine-tune: no federation) and after the
last round, on its own held-out, chronologically later rows. Reference rows (``references.py``)
use exactly the same per-user split. Results: results/personalization.json (after each run; a
rerun skips runs already there) and results/personalization.md.
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.load import load_run, per_client, round_summary  # noqa: E402
from analysis.report import markdown_table  # noqa: E402
from benchmarks.references import reference_accuracy  # noqa: E402
from models.artifact import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.run_settings import RunSettings  # noqa: E402
from simulations.simulate import load_settings  # noqa: E402

# Who takes part: sent140 is cut to users with >= 10 tweets (1-row test sets make per-user
# accuracy a coin flip).
DATASETS = {"rt_critics": ["dataset=rt_critics"], "sent140_users": ["dataset=sent140_users", "min-samples=10"]}
MODES = ["finetune", "prior", "mix", "select", "ditto", "fedper"]
HEADLINE = ["prior", "mix"]
SWEEP = [  # (name, change from the defaults)
    ("defaults", []),
    ("lr 3e-4", ["lr=0.0003"]),
    ("lr 3e-3", ["lr=0.003"]),
    ("10 local steps", ["local-max-steps=10"]),
    ("balanced loss", ["balanced-loss=true"]),
    ("fedavgm (momentum 0.9)", ["strategy=fedavgm"]),
    ("fedadam (eta 1e-3)", ["strategy=fedadam", "server-lr=0.001"]),
    ("fedprox (mu 0.01)", ["strategy=fedprox"]),
    ("no hardening", ["adv-weight=0"]),
]


def runs_for(part: str, datasets: list[str]) -> list[tuple[str, str, list[str]]]:
    """(dataset, row name, run-config pairs) for one part of the experiment."""
    out = []
    for dataset in datasets:
        if part == "methods":
            out += [(dataset, mode, [f"mode={mode}"]) for mode in MODES]
            out.append((dataset, f"{RunSettings().mode}, no hardening", ["adv-weight=0"]))
        elif part == "seeds":
            out += [(dataset, f"{mode} (seed {seed})", [f"mode={mode}", f"seed={seed}"])
                    for mode in HEADLINE for seed in (1, 2)]
        elif part == "sweep" and dataset == "rt_critics":
            out += [(dataset, f"sweep: {name}", ["attack-examples=0", "fidelity-examples=0", *pairs])
                    for name, pairs in SWEEP]
    return out


def summarise(run_dir: Path) -> dict:
    """Round 0 and the last round: per-user accuracy (mean, CI, median, p10), pooled accuracy,
    share of rows called positive, share of users harmed, accuracy under the character attack."""
    df = load_run(run_dir)
    summary = round_summary(df).set_index(["round", "model"])
    last = int(df.loc[df["metric"] == "acc", "round"].max())
    row: dict = {"last_round": last}
    for rnd, tag in ((0, "r0"), (last, "final")):
        for model in ("global", "personal"):
            if (rnd, model) in summary.index:
                stats = summary.loc[(rnd, model)]
                for stat in ("clients", "pooled", "mean", "ci95", "median", "p10"):
                    row[f"{tag}_{model}_{stat}"] = float(stats[stat])
        wide = per_client(df, rnd)
        weights = wide["client.n_test"]
        for model in ("global", "personal"):
            if f"{model}.pred_positive" in wide:
                row[f"{tag}_{model}_pred_positive"] = float(np.average(wide[f"{model}.pred_positive"], weights=weights))
            if f"{model}.adv_acc" in wide:
                row[f"{tag}_{model}_adv_acc"] = float(wide[f"{model}.adv_acc"].mean())
        if "client.test_positive" in wide:
            row[f"{tag}_true_positive"] = float(np.average(wide["client.test_positive"], weights=weights))
        if rnd == last:
            gain = (wide["personal.acc"] - wide["global.acc"]).dropna()
            row["share_harmed"] = float((gain < 0).mean())
            row["per_user"] = {"global": wide["global.acc"].dropna().to_dict(),
                               "personal": wide["personal.acc"].dropna().to_dict()}
    return row


def run_one(dataset: str, name: str, pairs: list[str], rounds: int, extra: list[str], runs_dir: Path) -> dict:
    config = [*DATASETS[dataset], f"num-rounds={rounds}", f"evaluate-every={rounds}", *pairs, *extra]
    run_id = "".join(c if c.isalnum() else "-" for c in f"{dataset}-{name}").strip("-")
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--runs-dir", str(runs_dir)]
    for pair in [*config, f"run-id={run_id}"]:
        command += ["--run-config", pair]
    if (runs_dir / run_id).exists():  # a half-finished earlier attempt: start it again cleanly
        shutil.rmtree(runs_dir / run_id)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    return {"dataset": dataset, "name": name, "config": config, "run_id": run_id, "seconds": time.time() - start,
            **summarise(runs_dir / run_id)}


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def user_stats(values) -> dict:
    values = np.asarray(list(values), dtype=float)
    return {"mean": values.mean(), "ci95": 1.96 * values.std(ddof=1) / np.sqrt(values.size), "median": np.median(values),
            "p10": np.percentile(values, 10), "clients": values.size}


def table(dataset: str, refs: dict, rows: list[dict]) -> str:
    """One dataset's table: references, round 0, then each method (mean over seeds where run)."""
    head = ["row", "users", "per-user acc mean ± 95% CI", "median / p10", "pooled acc", "called positive (true)",
            "harmed", "acc under char attack"]
    body = []
    for name, per_user in refs.items():
        s = user_stats(per_user.values())
        body.append([f"reference: {name}", str(s["clients"]), f"{fmt(s['mean'])} ± {fmt(s['ci95'])}",
                     f"{fmt(s['median'])} / {fmt(s['p10'])}", "", "", "", ""])
    base = next((r for r in rows if r["name"] == RunSettings().mode), rows[0] if rows else None)
    if base:
        for model, label in (("global", "FedREX global model, round 0 (start)"),
                             ("personal", f"local fine-tune of the start model, no federation ({base['name']})")):
            body.append([label, str(int(base[f"r0_{model}_clients"])),
                         f"{fmt(base[f'r0_{model}_mean'])} ± {fmt(base[f'r0_{model}_ci95'])}",
                         f"{fmt(base[f'r0_{model}_median'])} / {fmt(base[f'r0_{model}_p10'])}",
                         fmt(base[f"r0_{model}_pooled"]),
                         f"{fmt(base.get(f'r0_{model}_pred_positive'), 2)} ({fmt(base.get('r0_true_positive'), 2)})",
                         "", fmt(base.get(f"r0_{model}_adv_acc"))])
    for r in rows:
        for model in ("global", "personal"):
            if model == "global" and r["name"] != base["name"] and not r["name"].startswith("sweep") \
                    and "no hardening" not in r["name"]:
                continue  # the global model of every mode row is the same federation's; shown once
            seeds = r.get("seed_means")
            spread = f" (seeds: {', '.join(fmt(v) for v in seeds)})" if seeds and model == "personal" else ""
            body.append([f"{r['name']}: {model}, round {r['last_round']}", str(int(r[f"final_{model}_clients"])),
                         f"{fmt(r[f'final_{model}_mean'])} ± {fmt(r[f'final_{model}_ci95'])}{spread}",
                         f"{fmt(r[f'final_{model}_median'])} / {fmt(r[f'final_{model}_p10'])}",
                         fmt(r[f"final_{model}_pooled"]),
                         f"{fmt(r.get(f'final_{model}_pred_positive'), 2)} ({fmt(r.get('final_true_positive'), 2)})",
                         f"{100 * r['share_harmed']:.0f}%" if model == "personal" else "",
                         fmt(r.get(f"final_{model}_adv_acc"))])
    return f"### {dataset}\n\n" + markdown_table(pd.DataFrame(body, columns=head))


def with_seeds(rows: list[dict]) -> list[dict]:
    """Attach the other seeds' personal means to each headline row."""
    out = []
    for r in rows:
        if "(seed" in r["name"]:
            continue
        others = [o["final_personal_mean"] for o in rows
                  if o["dataset"] == r["dataset"] and o["name"].startswith(f"{r['name']} (seed")]
        out.append({**r, "seed_means": [r["final_personal_mean"], *others]} if others else r)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="rt_critics,sent140_users")
    parser.add_argument("--part", default="all", choices=["methods", "sweep", "seeds", "all"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs-dir", default="/tmp/fedrex-personalization")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    json_path = Path(args.out) / "personalization.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    rows, refs = saved.get("rows", []), saved.get("references", {})
    started = time.time()
    for dataset in datasets:
        if dataset not in refs:
            print(f"[bench] {dataset}: reference rows", file=sys.stderr, flush=True)
            settings = load_settings(None, DATASETS[dataset])
            refs[dataset] = reference_accuracy(settings, settings.distill_dataset, settings.prior_l2)
            atomic_write_json(json_path, {"rows": rows, "references": refs})
    parts = ["methods", "sweep", "seeds"] if args.part == "all" else [args.part]
    for part in parts:
        for dataset, name, pairs in runs_for(part, datasets):
            if any(r["dataset"] == dataset and r["name"] == name for r in rows):
                print(f"[bench] {dataset} / {name}: already measured", file=sys.stderr)
                continue
            print(f"[bench] {dataset} / {name} ({time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)
            rows.append(run_one(dataset, name, pairs, args.rounds, args.set, Path(args.runs_dir)))
            atomic_write_json(json_path, {"rows": rows, "references": refs})
    md = "\n\n".join(table(d, refs[d], with_seeds([r for r in rows if r["dataset"] == d])) for d in refs)
    atomic_write_bytes(json_path.with_suffix(".md"), (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
