"""Personalization experiment on real users, with the reference rows every such table needs.

    python benchmarks/personalization.py [--datasets rt_critics,sent140_users]
        [--part hardening|methods|faithfulness|sweep|seeds|levers|all] [--rounds 3] [--set KEY=VALUE ...]

- ``hardening``: the default run (the defended start: student + word normaliser, embedding-PGD
  hardening), then one change each: no hardening, perturbed-text hardening added, perturbed text
  instead of PGD, the undefended start (no normaliser), and a start trained on WordNet
  substitution copies (``sst2-student-copies``, ``fedrex train-on-copies``): what each defence buys;
- ``methods``: one run per other personalization mode, the default mode under DP (and under DP's
  per-sample clipping alone, nearly noiseless: the mechanism check), and the combinations of what worked alone (``COMBINATIONS``);
- ``faithfulness``: the explanation term (``expl-weight``) anchored to the start model's maps, at
  several weights, and anchored to the received model's (the old behaviour): comprehensiveness
  and agreement with the round-0 maps per round, beside random maps, with accuracy and time;
- ``sweep``: one change at a time from the defaults on rt_critics (client learning rate, local
  steps, logit-adjusted loss, server optimizer), to choose and justify the defaults;
- ``seeds``: the headline rows and the hardening rows ``SEEDED_HARDENING`` again with seeds 1 and
  2 (per-user accuracy on a few test rows is noisy: the tables report the spread);
- ``levers``: the settings that may keep the tweets' global model at its round-0 accuracy
  (``LEVERS``), each with seeds 0 to 4 (``LEVER_SEEDS``), under prior-shift, explanations measured.

Each run is one `fedrex simulate` subprocess (its run folder kept under --runs-dir). Every user is
evaluated at round 0 (the starting model, and its local fine-tune: no federation) and after the
last round, on its own held-out, chronologically later rows; every held-out row is attacked (char
and synonym: ``EVALUATION``), the same rows with the same draws in every round. Reference rows
(``references.py``) use exactly the same per-user split and tokenizer. Results: results/personalization.json (after each run; a
rerun skips runs already there) and results/personalization.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.load import ci95, load_run, per_client, round_summary  # noqa: E402
from analysis.report import markdown_table  # noqa: E402
from references import (TEACHER_ROWS, central_student_accuracy, reference_accuracy, start_model_accuracy,  # noqa: E402
                        teacher_accuracy)
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.attacks import RECIPES_VERSION  # noqa: E402
from models.datasets import REGISTRY  # noqa: E402
from models.run_settings import RunSettings, parse_value  # noqa: E402
from simulations.simulate import load_settings  # noqa: E402
from server.app import start_config, start_folder  # noqa: E402

# Who takes part: sent140 is cut to users with >= 10 tweets (1-row test sets make per-user
# accuracy a coin flip).
DATASETS = {"rt_critics": ["dataset=rt_critics"], "sent140_users": ["dataset=sent140_users", "min-samples=10"]}
MODES = ["finetune", "prior", "prior-shift", "mix", "select", "ditto", "fedper"]
# the rows run again with seeds 1 and 2: the default (its runs also hold the global model and round
# 0) and each dataset's best personal rows of seed 0 (a mode, or a row of COMBINATIONS)
SEEDED = {"rt_critics": [RunSettings().mode, "fedper", "select"],
          "sent140_users": [RunSettings().mode, "prior-shift", "prior-shift + balanced loss + start-kd 1.0"]}
# the hardening rows run again with seeds 1 and 2: what hardening buys is judged against them
ASCC = "ASCC (adversary in the synonyms' hull)"
SEEDED_HARDENING = ("no hardening", "+ perturbed text", "start trained on WordNet copies (sst2-student-copies)", ASCC)
# every method run attacks every held-out row with both recipes (10 per user are too few to compare)
ATTACKS = ("char", "synonym")
# a round that attacks every held-out row of 118 critics can take longer than the default round
# timeout on a busy machine: a user whose reply misses it would silently leave the row's averages
EVALUATION = [f"client-attacks={','.join(ATTACKS)}", "attack-examples=100000", "round-timeout=14400"]
COPIES_START = "sst2-student-copies"
HARDENING = [  # (row name, change from the defaults): what each defence buys, one change each
    ("no hardening", ["adv-weight=0"]),
    ("+ perturbed text", ["perturb-share=0.5"]),
    ("perturbed text instead of PGD", ["perturb-share=0.5", "adv-weight=0"]),
    # SAFER-style heavier copies: half of every perturbed row's words edited, 2.5x the attacks' budget
    ("+ perturbed text, half the words", ["perturb-share=0.5", "perturb-words=0.5"]),
    # ASCC: the adversary mixes each token's vector with its WordNet synonyms' instead of a ball
    (ASCC, ["adv-space=synonyms"]),
    ("undefended start (no normaliser)", ["normalizer=false"]),
    # the start itself trained on WordNet substitution copies (`fedrex train-on-copies`: same
    # network, normaliser and package size): what a start robust to synonym swaps gives the rounds
    ("start trained on WordNet copies (sst2-student-copies)", [f"artifact={COPIES_START}"]),
]
FAITHFULNESS = [  # (row name, change from the defaults): the explanation term's anchor and parts
    ("no explanation term (expl 0, the defaults)", []),
    ("expl 1.0, anchored to the received model", ["expl-weight=1.0", "expl-anchor=received"]),
    ("expl 1.0, anchored to the start", ["expl-weight=1.0"]),
    ("expl 1.0 + erasure 1.0, anchored to the start", ["expl-weight=1.0", "expl-erasure=1.0"]),
    ("start-kd 1.0 (distil the start model on own rows)", ["start-kd=1.0"]),
]
COMBINATIONS = [  # (row name, change from the defaults): what works on its own, together
    ("prior-shift + start-kd 3.0", ["mode=prior-shift", "start-kd=3.0"]),
    # the one lever that kept the tweets' called-positive share honest on every seed (*levers*)
    ("prior-shift + balanced loss + start-kd 1.0", ["mode=prior-shift", "balanced-loss=true", "start-kd=1.0"]),
    # ASCC's robustness with the start's answers kept on the client's rows (its rationales fall without)
    ("ASCC + start-kd 1.0", ["adv-space=synonyms", "start-kd=1.0"]),
    # ... or with its deletion behaviour and maps kept instead (the start-anchored explanation terms)
    ("ASCC + expl 1.0 + erasure 1.0", ["adv-space=synonyms", "expl-weight=1.0", "expl-erasure=1.0"]),
    # ... or simply at half its weight: where robustness and explanations meet
    ("ASCC at adv-weight 0.25", ["adv-space=synonyms", "adv-weight=0.25"]),
]
DP_ROW = f"{RunSettings().mode} +DP (noise 1.0)"
DP_CLIPPING_ONLY = f"{RunSettings().mode} +DP clipping only (noise 0.0001, not private)"
CENTRAL = "central FedREX student (start model fine-tuned on pooled user rows, 2 epochs)"
# the same central fine-tune with public rows mixed in: what the federation's users' rows add to the public
# data when nothing is federated (server learning on those rows was tried and removed: README)
CENTRAL_PUBLIC = "central FedREX student on pooled user rows + twice as many SST-2 train rows (2 epochs)"
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
    ("lr 3e-3, 10 rounds", ["lr=0.003", "num-rounds=10", "evaluate-every=10"]),
    ("lr 3e-3, 20 rounds", ["lr=0.003", "num-rounds=20", "evaluate-every=20"]),
    ("lr 3e-3, fedavgm, 10 rounds", ["lr=0.003", "strategy=fedavgm", "num-rounds=10", "evaluate-every=10"]),
    ("lr 3e-3, 50% per round, 10 rounds", ["lr=0.003", "fraction-train=0.5", "num-rounds=10", "evaluate-every=10"]),
]


SWEEP_SENT140 = [  # the global model loses accuracy on tweets: what each remedy does (one change each)
    ("sgd lr 0.1", ["client-optimizer=sgd", "lr=0.1"]),
    ("balanced loss", ["balanced-loss=true"]),
    ("lr 1e-3", ["lr=0.001"]),
    ("5 local epochs", ["local-epochs=5"]),
    ("start-kd 1.0 (distil the start model on own rows)", ["start-kd=1.0"]),
    ("start-kd 3.0", ["start-kd=3.0"]),
    ("fedprox (mu 0.1)", ["strategy=fedprox", "proximal-mu=0.1"]),
    ("balanced loss, lr 1e-3", ["balanced-loss=true", "lr=0.001"]),
]


# The levers on the tweets' global model (those that held it at its round-0 accuracy on one seed,
# and the balanced loss alone and with a light start-kd), with every seed: each under prior-shift
# (the shared weights train as under finetune, so one run gives the global model and the best
# personal mode), explanations measured, no attacks.
LEVERS = [
    ("defaults", []),
    ("start-kd 10", ["start-kd=10.0"]),
    ("sgd lr 0.1 + start-kd 3 + balanced loss", ["client-optimizer=sgd", "lr=0.1", "start-kd=3.0",
                                                 "balanced-loss=true"]),
    ("balanced loss", ["balanced-loss=true"]),
    ("balanced loss + start-kd 1", ["balanced-loss=true", "start-kd=1.0"]),
    # between the light start-kd that keeps the share honest and start-kd 10 that keeps the maps
    ("balanced loss + start-kd 2", ["balanced-loss=true", "start-kd=2.0"]),
    ("balanced loss + start-kd 3", ["balanced-loss=true", "start-kd=3.0"]),
    # start-kd 10 keeps the start's answers; the start-anchored terms its maps and deletion behaviour
    ("start-kd 10 + expl 1.0 + erasure 1.0", ["start-kd=10.0", "expl-weight=1.0", "expl-erasure=1.0"]),
]
LEVER_SEEDS = (0, 1, 2, 3, 4)  # seeds 3 and 4 tell whether a lever holding on 2 of 3 seeds is the rule


def runs_for(part: str, datasets: list[str]) -> list[tuple[str, str, list[str]]]:
    """(dataset, row name, run-config pairs) for one part of the experiment."""
    out = []
    mode = RunSettings().mode
    for dataset in datasets:
        if part == "hardening":
            out.append((dataset, mode, [f"mode={mode}", *EVALUATION]))
            out += [(dataset, f"{mode}, {name}", [*EVALUATION, *pairs]) for name, pairs in HARDENING]
        elif part == "faithfulness":
            out += [(dataset, f"{mode}, {name}", [*EVALUATION, *pairs]) for name, pairs in FAITHFULNESS]
        elif part == "methods":
            out += [(dataset, m, [f"mode={m}", *EVALUATION]) for m in MODES if m != mode]
            out += [(dataset, name, [*EVALUATION, *pairs]) for name, pairs in COMBINATIONS]
            out.append((dataset, DP_ROW, ["dp=true", "noise-multiplier=1.0", *EVALUATION]))
            # DP's mechanism check: per-sample clipping with next to no noise (not private: its epsilon
            # is astronomical), to tell which half of DP-SGD moves accuracy, robustness and faithfulness
            out.append((dataset, DP_CLIPPING_ONLY, ["dp=true", "noise-multiplier=0.0001",
                                                     "dp-reproducible-noise=true", *EVALUATION]))
        elif part == "seeds":
            changes = {**{m: [f"mode={m}"] for m in MODES}, **dict(COMBINATIONS)}
            out += [(dataset, f"{name} (seed {seed})", [*changes[name], f"seed={seed}", *EVALUATION])
                    for name in SEEDED.get(dataset, [mode]) for seed in (1, 2)]
            out += [(dataset, f"{mode}, {name} (seed {seed})", [*EVALUATION, *pairs, f"seed={seed}"])
                    for name, pairs in HARDENING if name in SEEDED_HARDENING for seed in (1, 2)]
        elif part == "levers":
            out += [(dataset, f"lever: {name} (seed {seed})", ["mode=prior-shift", f"seed={seed}", "attack-examples=0",
                                                               *pairs])
                    for name, pairs in LEVERS for seed in LEVER_SEEDS]
        elif part == "sweep":
            sweep = SWEEP if dataset == "rt_critics" else SWEEP_SENT140
            out += [(dataset, f"sweep: {name}", ["attack-examples=0", "fidelity-examples=0", *pairs])
                    for name, pairs in sweep]
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
            for attack in ATTACKS:
                if f"{model}.adv_acc.{attack}" in wide:
                    row[f"{tag}_{model}_adv_acc_{attack}"] = float(wide[f"{model}.adv_acc.{attack}"].mean())
                    row[f"{tag}_{model}_acc_attacked_rows"] = float(wide[f"{model}.acc_attacked_rows"].mean())
            for metric in ("comprehensiveness", "comprehensiveness_random", "start_agreement_spearman"):
                if f"{model}.{metric}" in wide:
                    row[f"{tag}_{model}_{metric}"] = float(wide[f"{model}.{metric}"].mean())
        if "client.test_positive" in wide:
            row[f"{tag}_true_positive"] = float(np.average(wide["client.test_positive"], weights=weights))
        if rnd == last:
            epsilon = wide.get("client.epsilon")
            row["epsilon_max"] = float(epsilon.max()) if epsilon is not None and epsilon.max() > 0 else None
            gain = (wide["personal.acc"] - wide["global.acc"]).dropna()
            row["share_harmed"] = float((gain < 0).mean())
            row["per_user"] = {"global": wide["global.acc"].dropna().to_dict(),
                               "personal": wide["personal.acc"].dropna().to_dict()}
    return row


def run_id_of(dataset: str, name: str) -> str:
    """The run folder's name of one row of the experiment."""
    return "".join(c if c.isalnum() else "-" for c in f"{dataset}-{name}").strip("-")


def run_one(dataset: str, name: str, pairs: list[str], rounds: int, extra: list[str], runs_dir: Path) -> dict:
    config = [*DATASETS[dataset], f"num-rounds={rounds}", f"evaluate-every={rounds}", *pairs, *extra]
    run_id = run_id_of(dataset, name)
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--runs-dir", str(runs_dir)]
    for pair in [*config, f"run-id={run_id}"]:
        command += ["--run-config", pair]
    if (runs_dir / run_id).exists():  # a half-finished earlier attempt: start it again cleanly
        shutil.rmtree(runs_dir / run_id)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    frame = pd.read_parquet(runs_dir / run_id / "clients.parquet")
    failed = frame[frame["metric"] == "failed"]
    if len(failed):  # a row over a subset of the users is not the row it claims to be
        raise SystemExit(f"{run_id}: {failed['client_id'].nunique()} users failed in rounds "
                         f"{sorted(failed['round'].unique())} (see its events.jsonl); the row is not recorded")
    created = json.loads((runs_dir / run_id / "run.json").read_text())["created"]
    return {"dataset": dataset, "name": name, "config": config, "run_id": run_id, "created": created,
            "seconds": time.time() - start, "attacks_version": RECIPES_VERSION, "data": data_rule(dataset),
            "objectives": OBJECTIVES_VERSION,
            "start": start_id(config),
            **summarise(runs_dir / run_id)}


def same_run(row: dict, folder: Path) -> bool:
    """Whether ``folder`` still holds the run ``row`` was measured from: the same creation time
    (rows measured before it was recorded: a run with no failed user, which is all run_one ever
    records; a later failed attempt of the same name leaves its folder behind)."""
    if not (folder / "clients.parquet").exists() or not (folder / "run.json").exists():
        return False
    if "created" in row:
        return json.loads((folder / "run.json").read_text()).get("created") == row["created"]
    frame = pd.read_parquet(folder / "clients.parquet", columns=["metric"])
    return not (frame["metric"] == "failed").any()


def data_rule(dataset: str) -> str:
    """What FedREX's copy of ``dataset`` leaves out (rt_critics: SST-2 train's texts), so rows measured
    on another copy are known as such."""
    disjoint = REGISTRY[dataset].disjoint_from if dataset in REGISTRY else None
    return f"without {disjoint[0]} {disjoint[1]} texts" if disjoint else ""


STALE_DATA = " †"
STALE_START = " §"
STALE_OBJECTIVE = " ¶"
# 2: the balanced loss adjusts the adversarial term's cross-entropy too (version 1 left its logits
# plain, so at adv-weight 0.5 every client still taught the shared model its label prior)
OBJECTIVES_VERSION = 2
STALE_NOTES = {
    STALE_DATA: "† measured on an older copy of the data (rt_critics before it left out the 99 reviews SST-2 "
                "train holds, 0.8% of its rows); not re-run since.",
    STALE_START: "§ measured from the older start: the same student behind version 1 of the word normaliser "
                 "(most frequent correction, no context, no hyphenated or two-letter words); not re-run since.",
    STALE_OBJECTIVE: "¶ measured with the balanced loss before it adjusted the adversarial term too (its PGD "
                     "cross-entropy still taught each client's label prior); not re-run since.",
}


def start_id(config: list[str]) -> str:
    """Which start model a run with these settings gets, as a hash of what the clients receive
    (the artifact's weights, and its word normaliser unless the run drops it), so that rows and
    references measured from another start are known as such. Reads only the two keys that
    choose the start: rows keep settings later releases removed."""
    return _start_id(config_value(config, "artifact"), config_value(config, "normalizer"))


def config_value(config: list[str], key: str):
    """One setting of a row's run config (later pairs override earlier ones), parsed as RunSettings
    parses it, or its default where the config leaves it out."""
    default = getattr(RunSettings(), key.replace("-", "_"))
    value = dict(pair.split("=", 1) for pair in config).get(key)
    return default if value is None else parse_value(value, default, key)


@lru_cache(maxsize=None)
def _start_id(artifact: str, normalizer: bool) -> str:
    settings = RunSettings(artifact=artifact, normalizer=normalizer)
    digest = hashlib.sha256((start_folder(settings) / "model.safetensors").read_bytes())
    digest.update(start_config(settings, {}).get("normalizer", b""))
    return digest.hexdigest()[:16]


def stale_mark(row: dict) -> str:
    """'' for a row measured on today's data copy from today's start with today's objectives, else
    its footnote marks."""
    mark = STALE_DATA if row.get("data", "") != data_rule(row["dataset"]) else ""
    mark += STALE_START if row.get("start") != start_id(start_config_of(row)) else ""
    config = row["config"]
    affected = (config_value(config, "balanced-loss")  # with no PGD term the fix changed nothing
                and config_value(config, "adv-weight") > 0 and config_value(config, "adv-ratio") > 0)
    return mark + (STALE_OBJECTIVE if affected and row.get("objectives", 1) < OBJECTIVES_VERSION else "")


def marks_of(rows) -> str:
    """Every footnote mark the rows carry, each once, in the footnotes' order."""
    found = "".join(stale_mark(r) for r in rows)
    return "".join(mark for mark in STALE_NOTES if mark.strip() in found)


def start_config_of(row: dict) -> list[str]:
    """A row's run settings as far as its start goes: rows from before the defended start (no
    ``attacks_version``) ran the bare student, which was then the default."""
    return row["config"] if "attacks_version" in row else [*row["config"], "normalizer=false"]


def stale(row: dict) -> bool:
    return bool(stale_mark(row))


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def user_stats(values) -> dict:
    values = np.asarray(list(values), dtype=float)
    return {"mean": values.mean(), "ci95": ci95(values), "median": np.median(values),
            "p10": np.percentile(values, 10), "clients": values.size}


def _row(label: str, r: dict, tag: str, model: str, harmed: bool = False, spread: str = "") -> list[str]:
    return [label + stale_mark(r), str(int(r[f"{tag}_{model}_clients"])),
            f"{fmt(r[f'{tag}_{model}_mean'])} ± {fmt(r[f'{tag}_{model}_ci95'])}{spread}",
            f"{fmt(r[f'{tag}_{model}_median'])} / {fmt(r[f'{tag}_{model}_p10'])}", fmt(r[f"{tag}_{model}_pooled"]),
            f"{fmt(r.get(f'{tag}_{model}_pred_positive'), 2)} ({fmt(r.get(f'{tag}_true_positive'), 2)})",
            f"{100 * r['share_harmed']:.0f}%" if harmed else "",
            f"{fmt(r.get(f'{tag}_{model}_acc_attacked_rows'))} -> "
            + " / ".join(fmt(r.get(f"{tag}_{model}_adv_acc_{a}")) for a in ATTACKS)
            if r.get(f"{tag}_{model}_acc_attacked_rows") is not None else "–",
            fmt(r.get(f"{tag}_{model}_comprehensiveness")), epsilon_cell(r.get("epsilon_max")) if model == "global" else ""]


def epsilon_cell(epsilon: float | None) -> str:
    """A run's epsilon; one above a million (noise too small to hide anything) says so."""
    return "not private (> 1e6)" if epsilon is not None and epsilon > 1e6 else fmt(epsilon, 1)


HEAD = ["row", "users", "per-user acc mean ± 95% CI", "median / p10", "pooled acc", "called positive (true)",
        "harmed", f"acc clean -> under {' / '.join(ATTACKS)} (every held-out row)", "comprehensiveness", "epsilon"]


def table(dataset: str, refs: dict, rows: list[dict], refs_mark: str = "") -> str:
    """One dataset's table: references, round 0, then the global model after the federation and
    each mode's personal model (personal seeds' means where run). ``refs_mark``: the references'
    footnote marks (measured on another data copy or from another start)."""
    body = []
    for name, per_user in refs.items():
        s = user_stats(per_user.values())
        body.append([f"reference: {name}{refs_mark}", str(s["clients"]), f"{fmt(s['mean'])} ± {fmt(s['ci95'])}",
                     f"{fmt(s['median'])} / {fmt(s['p10'])}", "", "", "", "", "", ""])
    rows = [r for r in rows if not r["name"].startswith("sweep")]
    base = next((r for r in rows if r["name"] == RunSettings().mode), rows[0] if rows else None)
    if base:
        body.append(_row("FedREX global model, round 0 (the start)", base, "r0", "global"))
        body.append(_row("local fine-tune of the start model, no federation", base, "r0", "personal"))
    for r in rows:
        other_start = not math.isclose(r["r0_global_mean"], base["r0_global_mean"], abs_tol=1e-9)
        if r is not base and other_start:
            body.append(_row(f"{r['name']}: global model, round 0 (its start)", r, "r0", "global"))
        if r is base or r["name"].startswith(f"{base['name']},") or "+DP" in r["name"]:
            body.append(_row(f"{r['name']}: global model, round {r['last_round']}", r, "final", "global"))
        seeds = r.get("seed_means")
        spread = f" (seeds {', '.join(fmt(v) for v in seeds)})" if seeds else ""
        body.append(_row(f"{r['name']}: personal model, round {r['last_round']}", r, "final", "personal", True,
                         spread))
    return f"### {dataset}\n\n" + markdown_table(pd.DataFrame(body, columns=HEAD)) + footnote(rows, refs_mark)


def footnote(rows: list[dict], marks: str = "") -> str:
    """The notes for the marks the rows (and ``marks``, e.g. the references') carry."""
    found = marks_of(rows) + marks
    return "".join(f"\n\n{note}" for mark, note in STALE_NOTES.items() if mark in found)


def sweep_table(dataset: str, rows: list[dict]) -> str:
    """The global model per sweep run: what one change from the run's settings did."""
    body = []
    for r in rows:
        effective = dict(pair.split("=", 1) for pair in r["config"])  # later pairs override earlier ones
        change = " ".join(f"{k}={v}" for k, v in effective.items()
                          if k not in ("dataset", "attack-examples", "fidelity-examples", "evaluate-every"))
        start = ("bare student (before the defended start)" if "attacks_version" not in r
                 else "bare student" if "normalizer=false" in r["config"] else "student + normaliser")
        body.append([change, start + stale_mark(r), fmt(r["r0_global_pooled"]), fmt(r["final_global_pooled"]),
                     f"{fmt(r['final_global_mean'])} ± {fmt(r['final_global_ci95'])}",
                     f"{fmt(r.get('final_global_pred_positive'), 2)} ({fmt(r.get('final_true_positive'), 2)})",
                     f"{r['seconds']:.0f}"])
    head = ["settings (everything else: the defaults of the time)", "start", "pooled acc, round 0",
            "pooled acc, last round",
            "per-user mean ± 95% CI", "called positive (true)", "seconds"]
    return f"### {dataset}: sweep of the federation's settings (global model)\n\n" + markdown_table(
        pd.DataFrame(body, columns=head)) + footnote(rows)


def hardening_seeds_table(dataset: str, rows: list[dict]) -> str:
    """The defaults and the seeded hardening rows, seeds 0/1/2 each: clean accuracy and accuracy
    under each attack (every held-out row, per-user mean), global and personal, and their means."""
    mode, body = RunSettings().mode, []
    for name in [mode, *(f"{mode}, {h}" for h in SEEDED_HARDENING)]:
        runs = [next((r for r in rows if r["name"] == label and not stale(r)), None)
                for label in (name, f"{name} (seed 1)", f"{name} (seed 2)")]
        if any(r is None for r in runs):
            continue
        cells = []
        for key in ("final_global_mean", *(f"final_global_adv_acc_{a}" for a in ATTACKS),
                    "final_personal_mean", *(f"final_personal_adv_acc_{a}" for a in ATTACKS)):
            values = [r.get(key) for r in runs]
            cells.append(" / ".join(fmt(v) for v in values)
                         + (f" ({fmt(float(np.mean(values)))})" if None not in values else ""))
        body.append([name, *cells])
    if not body:
        return ""
    head = ["row (seeds 0 / 1 / 2 (mean))", "global clean", *(f"global under {a}" for a in ATTACKS),
            "personal clean", *(f"personal under {a}" for a in ATTACKS)]
    return (f"### {dataset}: hardening, seeds 0/1/2 (every held-out row attacked, per-user means)\n\n"
            + markdown_table(pd.DataFrame(body, columns=head)))


def levers_table(dataset: str, rows: list[dict]) -> str:
    """Per lever, each seed's global model (pooled and per-user mean accuracy against round 0's,
    share called positive against the truth, comprehensiveness against round 0's) and
    prior-shift's personal mean."""
    body = []
    for name, _ in LEVERS:  # each lever with the seeds it was run with, named in its row
        seeds = [seed for seed in LEVER_SEEDS if any(r["name"] == f"lever: {name} (seed {seed})" for r in rows)]
        runs = [next(r for r in rows if r["name"] == f"lever: {name} (seed {seed})") for seed in seeds]
        if not runs:
            continue

        def each(key, digits=3):
            return " / ".join(fmt(r.get(key), digits) for r in runs)

        body.append([name + marks_of(runs), "/".join(map(str, seeds)), fmt(runs[0]["r0_global_pooled"]),
                     each("final_global_pooled"), fmt(runs[0]["r0_global_mean"]), each("final_global_mean"),
                     f"{each('final_global_pred_positive', 2)} ({fmt(runs[0].get('final_true_positive'), 2)})",
                     fmt(runs[0].get("r0_global_comprehensiveness")), each("final_global_comprehensiveness"),
                     each("final_personal_mean"), each("share_harmed", 2)])
    head = ["lever (prior-shift, every user's explanations)", "seeds", "global pooled, round 0",
            "global pooled, last round (each seed)", "global per-user mean, round 0", "global per-user mean, last round",
            "called positive (true)", "comprehensiveness, round 0",
            "global comprehensiveness, last round", "personal mean (prior-shift)", "harmed"]
    return (f"### {dataset}: levers on the global model\n\n"
            + markdown_table(pd.DataFrame(body, columns=head)) + footnote(rows))


def faithfulness_table(dataset: str, rows: list[dict]) -> str:
    """The global model's explanations through the rounds, per explanation-term setting: its own
    IG rationales' comprehensiveness at round 0 and after, random maps' on the same rows, agreement
    with the round-0 maps, and what the setting costs in accuracy, robustness and time."""
    mode = RunSettings().mode
    chosen = [r for r in rows if r["name"] in {f"{mode}, {n}" for n, _ in FAITHFULNESS}]
    body = []
    for r in chosen:
        body.append([r["name"] + stale_mark(r), f"{fmt(r.get('r0_global_comprehensiveness'))} ({fmt(r.get('r0_global_comprehensiveness_random'))})",
                     f"{fmt(r.get('final_global_comprehensiveness'))} ({fmt(r.get('final_global_comprehensiveness_random'))})",
                     fmt(r.get("final_global_start_agreement_spearman")),
                     fmt(r.get("final_personal_comprehensiveness")), fmt(r["final_global_pooled"]),
                     fmt(r["final_personal_mean"]),
                     " / ".join(fmt(r.get(f"final_global_adv_acc_{a}")) for a in ATTACKS), f"{r['seconds']:.0f}"])
    head = ["row", "comprehensiveness, round 0 (random maps)", "global, last round (random maps)",
            "agreement with round 0 (Spearman)", "personal comprehensiveness", "global pooled acc",
            "personal mean acc", f"global under {' / '.join(ATTACKS)}", "seconds"]
    return f"### {dataset}: explanations through the rounds (global model)\n\n" + markdown_table(
        pd.DataFrame(body, columns=head)) + footnote(chosen)


def with_seeds(rows: list[dict]) -> list[dict]:
    """Attach the other seeds' personal means to each headline row."""
    out = []
    for r in rows:
        if "(seed" in r["name"]:
            continue
        others = [o["final_personal_mean"] for o in rows  # seeds of the same data copy only
                  if o["dataset"] == r["dataset"] and o["name"].startswith(f"{r['name']} (seed")
                  and stale_mark(o) == stale_mark(r)]
        out.append({**r, "seed_means": [r["final_personal_mean"], *others]} if others else r)
    return out


def references_measured_on(dataset: str) -> str:
    """The data copy and start model a dataset's reference rows are measured on."""
    return f"{data_rule(dataset)}; start {start_id(DATASETS[dataset])}"


def references_mark(dataset: str, measured_on: str) -> str:
    """The footnote marks of references measured on ``measured_on`` (``references_measured_on``
    then): a dataset left out of this run's ``--datasets`` keeps references that may be stale."""
    data, _, start = measured_on.partition("; start ")
    return ((STALE_DATA if data != data_rule(dataset) else "")
            + (STALE_START if start != start_id(DATASETS[dataset]) else ""))


def save(path: Path, rows: list[dict], refs: dict, refs_data: dict) -> None:
    """``refs_data``: what each dataset's references were measured on (``references_measured_on``)."""
    atomic_write_json(path, {"attacks_version": RECIPES_VERSION, "rows": rows, "references": refs,
                             "data": {dataset: refs_data.get(dataset, "") for dataset in refs}})


def check_start(row: dict, refs: dict) -> None:
    """The offline "start model" reference and what the clients reported at round 0 are the same
    model on the same rows: a run with the default start must reproduce it to the last digit."""
    if start_id(row["config"]) != start_id(DATASETS[row["dataset"]]) or "r0_global_mean" not in row:
        return  # a row run from another start (the bare student, another artifact)
    offline = float(np.mean(list(refs["start model"].values())))
    if abs(offline - row["r0_global_mean"]) > 1e-9:
        raise SystemExit(f"round 0 ({row['r0_global_mean']:.6f}) is not the start model reference ({offline:.6f}): "
                         "the clients and the references see different rows or tokenizers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="rt_critics,sent140_users")
    parser.add_argument("--part", default="all", choices=["hardening", "methods", "faithfulness", "sweep", "seeds", "levers",
                                                             "all"])
    parser.add_argument("--rounds", type=int, default=RunSettings().num_rounds)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", default="", help="run only the rows of the part whose name contains this")
    parser.add_argument("--runs-dir", default="/tmp/fedrex-personalization")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    json_path = Path(args.out) / "personalization.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    rows, refs = saved.get("rows", []), saved.get("references", {})
    if saved.get("attacks_version") != RECIPES_VERSION:  # older attack recipes or an older start model
        print("[bench] dropping method rows and references measured with older attacks or start", file=sys.stderr)
        rows, refs = [r for r in rows if r["name"].startswith("sweep")], {}
    refs_data = dict(saved.get("data", {}))
    for dataset in datasets:  # references on an older copy of the data or from another start: measured again
        if dataset in refs and refs_data.get(dataset, "") != references_measured_on(dataset):
            del refs[dataset]
        refs_data[dataset] = references_measured_on(dataset)
    started = time.time()
    for dataset in datasets:
        if dataset not in refs:
            print(f"[bench] {dataset}: reference rows", file=sys.stderr, flush=True)
            settings = load_settings(None, DATASETS[dataset])
            refs[dataset] = {**reference_accuracy(settings, settings.distill_dataset, settings.prior_l2),
                             **start_model_accuracy(settings)}
            save(json_path, rows, refs, refs_data)
        if CENTRAL not in refs[dataset]:
            print(f"[bench] {dataset}: {CENTRAL}", file=sys.stderr, flush=True)
            refs[dataset][CENTRAL] = central_student_accuracy(load_settings(None, DATASETS[dataset]))
            save(json_path, rows, refs, refs_data)
        if CENTRAL_PUBLIC not in refs[dataset]:
            print(f"[bench] {dataset}: {CENTRAL_PUBLIC}", file=sys.stderr, flush=True)
            refs[dataset][CENTRAL_PUBLIC] = central_student_accuracy(load_settings(None, DATASETS[dataset]),
                                                                     public_share=2.0)
            save(json_path, rows, refs, refs_data)
        if any(name not in refs[dataset] for name in TEACHER_ROWS):
            print(f"[bench] {dataset}: the MiniLM teacher, alone and fine-tuned centrally", file=sys.stderr, flush=True)
            refs[dataset].update(teacher_accuracy(load_settings(None, DATASETS[dataset])))
            save(json_path, rows, refs, refs_data)
    for row in rows:  # re-read every kept run: a newer summary (columns) applies to older rows too
        # (not a row of an older data copy, nor a folder that holds another run by now)
        if not stale(row) and same_run(row, Path(args.runs_dir) / row["run_id"]):
            row.update(summarise(Path(args.runs_dir) / row["run_id"]))
    parts = ["hardening", "methods", "faithfulness", "sweep", "seeds", "levers"] if args.part == "all" else [args.part]
    for part in parts:
        for dataset, name, pairs in runs_for(part, datasets):
            if args.only not in name:
                continue
            if any(r["dataset"] == dataset and r["name"] == name and not stale(r) for r in rows):
                print(f"[bench] {dataset} / {name}: already measured", file=sys.stderr)
                continue
            print(f"[bench] {dataset} / {name} ({time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)
            row = run_one(dataset, name, pairs, args.rounds, args.set, Path(args.runs_dir))
            check_start(row, refs[dataset])
            older = [i for i, r in enumerate(rows) if r["dataset"] == dataset and r["name"] == name]
            if older:  # measured on an older copy of the data: the new row takes its place
                rows[older[0]] = row
            else:
                rows.append(row)
            save(json_path, rows, refs, refs_data)
    md = "\n\n".join(table(d, refs[d], with_seeds([r for r in rows if r["dataset"] == d]),
                             references_mark(d, refs_data.get(d, ""))) for d in refs)
    for dataset in refs:
        expl = [r for r in rows if r["dataset"] == dataset and any(r["name"].endswith(n) for n, _ in FAITHFULNESS)]
        if expl:
            md += "\n\n" + faithfulness_table(dataset, [r for r in rows if r["dataset"] == dataset])
        sweep = [r for r in rows if r["name"].startswith("sweep") and r["dataset"] == dataset]
        if sweep:
            md += "\n\n" + sweep_table(dataset, sweep)
        levers = [r for r in rows if r["name"].startswith("lever: ") and r["dataset"] == dataset]
        if levers:
            md += "\n\n" + levers_table(dataset, levers)
        seeded = hardening_seeds_table(dataset, [r for r in rows if r["dataset"] == dataset])
        if seeded:
            md += "\n\n" + seeded
    atomic_write_bytes(json_path.with_suffix(".md"), (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
