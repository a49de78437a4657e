"""Read a FedREX run folder into pandas. Only files are read (parquet, JSON): a run copied to a
laptop is analysed there with pandas, pyarrow and matplotlib. The one FedREX module imported is
``models/protocol.py``, plain Python that names the metrics the clients write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from models.protocol import (ACC_ATTACKED_ROWS, DEVICE, DEVICE_STATUSES, DEVICE_TIERS, MODELS, attack_metric,
                             metric_key)

CATEGORICAL = ["run_id", "client_id", "model", "metric"]
CLIENT_COLUMNS = ["run_id", "round", "client_id", "partition_id", "model", "metric", "value"]
ROUND_COLUMNS = ["run_id", "round", "model", "metric", "stat", "value"]


class RunFolderError(ValueError):
    """A folder that is not a readable FedREX run (`fedrex report` turns it into one error line)."""


def run_file(run_dir, name: str, missing: str) -> Path:
    """``run_dir``/``name``, or one RunFolderError: the folder does not exist, or lacks the file
    (``missing`` says what that means)."""
    if not Path(run_dir).is_dir():
        raise RunFolderError(f"{run_dir} does not exist")
    path = Path(run_dir) / name
    if not path.exists():
        raise RunFolderError(f"{run_dir} has no {name}: {missing}")
    return path


def load_run(run_dir) -> pd.DataFrame:
    """The tidy per-client table: run_id, round, client_id, partition_id, model, metric, value."""
    path = run_file(run_dir, "clients.parquet", "not a FedREX run folder, or no round was committed yet")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own types for truncated or foreign files
        raise RunFolderError(f"{path} is not readable ({type(exc).__name__}: {exc})") from None
    if set(CLIENT_COLUMNS) - set(frame.columns):
        raise RunFolderError(f"{path} holds no rows of a FedREX run")
    frame = _committed(run_dir, frame)
    if frame.empty:
        raise RunFolderError(f"{path} holds no rows of a committed round (run.json: completed_rounds)")
    for column in CATEGORICAL:
        frame[column] = frame[column].astype("category")
    frame["round"] = frame["round"].astype("int64")
    frame["partition_id"] = frame["partition_id"].astype("int64")
    frame["value"] = frame["value"].astype("float64")
    return frame


def load_rounds(run_dir) -> pd.DataFrame:
    """The per-round summaries (rounds.parquet): run_id, round, model, metric, stat, value."""
    path = Path(run_dir) / "rounds.parquet"
    frame = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=ROUND_COLUMNS)
    return _committed(run_dir, frame)


def _committed(run_dir, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without rows of a round run.json does not count as committed: a run killed in the
    middle of a commit may have rewritten clients.parquet and rounds.parquet, but not yet run.json,
    the commit point (server/store.py), and a resume runs that round again."""
    try:
        completed = int(json.loads((Path(run_dir) / "run.json").read_text())["completed_rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return frame  # no readable run.json: the table as it is (run_info says what is wrong)
    try:
        return frame[frame["round"].astype("int64") <= completed].reset_index(drop=True)
    except (TypeError, ValueError):  # a round column that is not numbers: left for the caller to refuse
        return frame


def run_info(run_dir) -> dict:
    path = run_file(run_dir, "run.json", "not a FedREX run folder")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or "settings" not in info or "run_id" not in info:
        raise RunFolderError(f"{path} is not a FedREX run.json (no run_id or settings)")
    return info


def last_round(df: pd.DataFrame, metric: str = "acc") -> int:
    rounds = df.loc[df["metric"] == metric, "round"]
    return int(rounds.max()) if len(rounds) else int(df["round"].max())


def last_attacked_round(df: pd.DataFrame) -> int | None:
    """The last round that measured robustness (an ``adv_acc`` figure): with ``evaluate-between=clean``
    a run stopped between round 0 and its last round has measured only accuracy since round 0.
    None when the run measured no attack at all."""
    prefix = attack_metric("adv_acc", "")
    rounds = df.loc[df["metric"].astype(str).str.startswith(prefix), "round"]
    return int(rounds.max()) if len(rounds) else None


def per_client(df: pd.DataFrame, round: int | None = None) -> pd.DataFrame:
    """Wide: one row per client, one column per ``model.metric`` (at ``round``, default the last
    evaluated round)."""
    round = last_round(df) if round is None else round
    rows = df[df["round"] == round]
    wide = rows.pivot_table(index="client_id", columns=["model", "metric"], values="value", aggfunc="last",
                            observed=True)
    wide.columns = [f"{m}.{k}" for m, k in wide.columns]
    return wide.sort_index()


def roles(df: pd.DataFrame) -> pd.Series:
    """Per client: ``malicious`` or ``benign``, as the client said (``client.malicious`` 1/0: the
    run's seeded draw, ``malicious-fraction``, recorded in every round the client is evaluated).
    In a poisoned run a client never evaluated said nothing: ``unknown``; in a run without poisoning
    (no client said anything) every client is ``benign``."""
    said = df[(df["model"] == "client") & (df["metric"] == "malicious")]
    told = dict(zip(said["client_id"].astype(str), said["value"]))
    unsaid = "unknown" if told else "benign"
    clients = sorted(df["client_id"].astype(str).unique())
    return pd.Series([unsaid if c not in told else "malicious" if told[c] == 1 else "benign" for c in clients],
                     index=clients, name="role")


def personalization_gain(df: pd.DataFrame, metric: str = "acc", round: int | None = None) -> pd.DataFrame:
    """Per client: global, personal and gain = personal - global for ``metric``."""
    wide = per_client(df, round)
    out = pd.DataFrame({"global": wide[f"global.{metric}"], "personal": wide[f"personal.{metric}"]})
    out["gain"] = out["personal"] - out["global"]
    return out.dropna()


def fairness(df: pd.DataFrame, metric: str = "acc", round: int | None = None) -> pd.DataFrame:
    """Per model: mean, median, p10, worst-decile mean of ``metric`` across clients, and the share
    of clients whose personal model is worse than the global one (harmed by personalization)."""
    gain = personalization_gain(df, metric, round)
    rows = []
    for model in ("global", "personal"):
        values = np.sort(gain[model].to_numpy())
        worst = values[: max(1, int(np.ceil(0.1 * len(values))))]
        rows.append({"model": model, "clients": len(values), "mean": values.mean(), "median": np.median(values),
                     "p10": np.percentile(values, 10), "worst_decile_mean": worst.mean()})
    table = pd.DataFrame(rows).set_index("model")
    table["share_harmed"] = [np.nan, float((gain["gain"] < 0).mean())]
    return table


def attacks_measured(wide: pd.DataFrame) -> list[str]:
    """The attacks whose ``adv_acc`` a per-client table holds, in the order first seen."""
    prefix = f".{attack_metric('adv_acc', '')}"
    return list(dict.fromkeys(c.split(prefix, 1)[1] for c in wide.columns if prefix in c))


def robustness_tradeoff(df: pd.DataFrame, round: int | None = None) -> pd.DataFrame:
    """Per client, model and attack: clean accuracy and accuracy under that attack on the same rows
    (the attacked subset, ``acc_attacked_rows``), and the drop between them; at ``round``, by default
    the last round that measured an attack (``last_attacked_round``; empty when none did)."""
    round = last_attacked_round(df) if round is None else round
    if round is None:
        return pd.DataFrame()
    wide = per_client(df, round)
    parts = []
    for model in MODELS:
        for attack in attacks_measured(wide):
            adv = metric_key(model, attack_metric("adv_acc", attack))
            if adv not in wide:
                continue
            clean = wide.get(metric_key(model, ACC_ATTACKED_ROWS), wide[metric_key(model, "acc")])
            part = pd.DataFrame({"model": model, "attack": attack, "clean_acc": clean, "adv_acc": wide[adv]})
            part["drop"] = part["clean_acc"] - part["adv_acc"]
            parts.append(part)
    return pd.concat(parts).reset_index().dropna() if parts else pd.DataFrame()


def promise_table(df: pd.DataFrame) -> pd.DataFrame:
    """The model's three promises per user, on the same rows, at round 0 (the start, and its local
    fine-tune) and at the last evaluated round (global and personal): per-user mean accuracy (every
    held-out row) with its 95% half-width and pooled accuracy; clean accuracy on the attacked rows
    (``attack-examples`` of them, the same in every round) and accuracy under each attack on them;
    comprehensiveness of the model's own IG rationales beside that of random maps on the same rows,
    agreement of its maps with the start model's (round 0's; Spearman), for the personal model
    agreement with the global model's and the share of users it harms (personal < global accuracy)."""
    last = last_round(df)
    out = []
    for rnd in dict.fromkeys([0, last]):
        wide = per_client(df, rnd)
        n_test = wide.get("client.n_test", pd.Series(1.0, index=wide.index))
        for model in MODELS:
            acc = wide.get(metric_key(model, "acc"))
            if acc is None or not acc.notna().any():
                continue
            row = {"round": rnd, "model": model, "users": int(acc.notna().sum())}
            attacks = attacks_measured(wide)
            columns = [("acc", "acc")] + ([("acc on attacked rows", ACC_ATTACKED_ROWS)] if attacks else [])
            columns += [(f"acc under {a}", attack_metric("adv_acc", a)) for a in attacks]
            columns += [("comprehensiveness", "comprehensiveness"), ("random maps", "comprehensiveness_random"),
                        ("agreement with round 0", "start_agreement_spearman"),
                        ("agreement with global", "agreement_spearman")]
            for name, metric in columns:
                values = wide.get(metric_key(model, metric), pd.Series(dtype=float)).dropna().to_numpy()
                row[f"{name} mean"], row[f"{name} ci95"] = (values.mean(), ci95(values)) if values.size else (np.nan,) * 2
            valid = acc.notna() & n_test.notna()
            row["acc pooled"] = float(np.average(acc[valid], weights=n_test[valid])) if n_test[valid].sum() else np.nan
            gain = (acc - wide.get(metric_key("global", "acc"), acc)).dropna()
            row["harmed"] = float((gain < 0).mean()) if model == "personal" and len(gain) else np.nan
            out.append(row)
    return pd.DataFrame(out)


def round_summary(df: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """Per round (round 0 = the starting model) and model: clients evaluated, pooled value over
    every evaluated row (weighted by each client's test rows), mean with its 95% confidence
    half-width, median, p10 and min of ``metric``. With one or two test rows per user the median
    moves in steps of 0.5; the pooled value and the mean's interval say what a round did."""
    rows = df[df["metric"] == metric]
    n_test = df[(df["model"] == "client") & (df["metric"] == "n_test")][["round", "client_id", "value"]]
    rows = rows.merge(n_test.rename(columns={"value": "n_test"}), on=["round", "client_id"], how="left")
    out = []
    for (rnd, model), group in rows.groupby(["round", "model"], observed=True):
        values, weights = group["value"].to_numpy(), group["n_test"].fillna(0).to_numpy()
        finite = np.isfinite(values)
        values, weights = values[finite], weights[finite]
        if not values.size:
            continue
        out.append({"round": int(rnd), "model": str(model), "clients": int(values.size),
                    "pooled": float(np.average(values, weights=weights)) if weights.sum() else np.nan,
                    "mean": float(values.mean()), "ci95": ci95(values), "median": float(np.median(values)),
                    "p10": float(np.percentile(values, 10)), "min": float(values.min())})
    return pd.DataFrame(out, columns=["round", "model", "clients", "pooled", "mean", "ci95", "median", "p10", "min"])


def ci95(values: np.ndarray) -> float:
    """Half-width of the normal 95% interval of the mean (NaN for fewer than 2 values). The server
    has its twin in ``server.aggregate``: analysis imports nothing from FedREX's packages."""
    return float(1.96 * values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else np.nan


def participation(df: pd.DataFrame) -> pd.Series:
    """Rounds in which each client trained (clients that never trained count 0)."""
    trained = df[(df["model"] == "train") & (df["metric"] == "n_train")].groupby("client_id", observed=True)["round"]
    counts = trained.nunique()
    everyone = pd.Index(df["client_id"].unique().astype(str), name="client_id")
    counts.index = counts.index.astype(str)
    return counts.reindex(everyone, fill_value=0).sort_values(ascending=False)


def failures(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[df["metric"] == "failed"]
    return rows[["round", "client_id", "model"]].rename(columns={"model": "phase"}).reset_index(drop=True)


def missing_rounds(run_dir, df: pd.DataFrame) -> list[int]:
    planned = int(run_info(run_dir)["settings"].get("num-rounds", 0))
    present = set(int(r) for r in df["round"].unique())
    return [r for r in range(1, planned + 1) if r not in present]


def compare_runs(run_dirs: list) -> pd.DataFrame:
    """One row per run x method: the run's strategy and mode, and fairness of ``acc`` (every
    held-out row) at its last evaluated round, for both models; beside each attack's accuracy, the
    clean accuracy on the same attacked rows (the all-rows figure is another population)."""
    rows = []
    for run_dir in run_dirs:
        info, df = run_info(run_dir), load_run(run_dir)
        settings = info["settings"]
        table = fairness(df)
        wide = per_client(df)
        for model, stats in table.iterrows():
            row = {"run_id": info["run_id"], "strategy": settings.get("strategy"), "mode": settings.get("mode"),
                   "dp": settings.get("dp"), "adv_weight": settings.get("adv-weight"), "model": model,
                   "round": last_round(df), **stats.to_dict()}
            attacked_rows = metric_key(model, ACC_ATTACKED_ROWS)
            if attacks_measured(wide) and attacked_rows in wide:
                row["acc_attacked_rows_mean"] = wide[attacked_rows].mean()
            for attack in attacks_measured(wide):
                column = metric_key(model, attack_metric("adv_acc", attack))
                if column in wide:
                    row[f"adv_acc_mean.{attack}"] = wide[column].mean()
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ devices
def device_profiles(df: pd.DataFrame) -> pd.DataFrame:
    """One row per client of a run with device simulation: its tier (name) and profile numbers."""
    rows = df[df["model"] == "profile"]
    if not len(rows):
        return pd.DataFrame()
    wide = rows.pivot_table(index="client_id", columns="metric", values="value", aggfunc="last", observed=True)
    wide["tier"] = [DEVICE_TIERS[int(t)] for t in wide["tier"]]
    return wide


def device_rounds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (training round, client) the fleet saw: status (name), virtual times, tier."""
    rows = df[df["model"] == DEVICE]
    if not len(rows):
        return pd.DataFrame()
    wide = rows.pivot_table(index=["round", "client_id"], columns="metric", values="value", aggfunc="last",
                            observed=True).reset_index()
    wide["status"] = [DEVICE_STATUSES[int(s)] for s in wide["status"]]
    tiers = device_profiles(df)["tier"]
    wide["tier"] = wide["client_id"].astype(str).map(tiers.rename(index=str))
    return wide


def participation_by_tier(df: pd.DataFrame) -> pd.DataFrame:
    """Per tier: clients, and per client per training round the share of each status (the rest
    of the rounds the device was available but not selected), with the mean virtual round time
    of the devices that reported."""
    rounds, profiles = device_rounds(df), device_profiles(df)
    if not len(rounds):
        return pd.DataFrame()
    n_rounds = rounds["round"].nunique()
    out = []
    for tier, group in profiles.groupby("tier"):
        mine = rounds[rounds["tier"] == tier]
        row = {"tier": tier, "clients": len(group)}
        for status in DEVICE_STATUSES:
            row[status] = float((mine["status"] == status).sum()) / (len(group) * n_rounds)
        reported = mine[mine["status"].isin(["ok", "straggler", "abandoned"])]
        row["round_s"] = float(reported["round_s"].mean()) if len(reported) else np.nan
        out.append(row)
    return pd.DataFrame(out)


def fairness_by_tier(df: pd.DataFrame, round: int | None = None) -> pd.DataFrame:
    """Per tier: aggregated updates per client over the run (status ok) and mean, p10 of the
    global and personal accuracy at the last evaluated round: what the round rules did to the
    users of slow or rarely available devices."""
    profiles = device_profiles(df)
    if not len(profiles):
        return pd.DataFrame()
    rounds, wide = device_rounds(df), per_client(df, round)
    wide.index = wide.index.astype(str)
    ok = rounds[rounds["status"] == "ok"].groupby(rounds["client_id"].astype(str), observed=True).size()
    out = []
    for tier, group in profiles.groupby("tier"):
        ids = group.index.astype(str)
        row = {"tier": tier, "clients": len(ids), "updates_per_client": float(ok.reindex(ids, fill_value=0).mean())}
        for model in MODELS:
            column = f"{model}.acc"
            values = wide[column].reindex(ids).dropna() if column in wide else pd.Series(dtype=float)
            row[f"{model}_mean"] = float(values.mean()) if len(values) else np.nan
            row[f"{model}_p10"] = float(np.percentile(values, 10)) if len(values) else np.nan
        out.append(row)
    return pd.DataFrame(out)


def time_to_accuracy(run_dir, df: pd.DataFrame) -> pd.DataFrame:
    """Per evaluated round: the virtual clock when it ended (rounds.parquet) and the global and
    personal pooled accuracy: accuracy against device time rather than rounds."""
    rounds = load_rounds(run_dir)
    clock = rounds[(rounds["model"] == "round") & (rounds["metric"] == "virtual_clock_s")].set_index("round")["value"]
    if not len(clock):
        return pd.DataFrame()
    clock.loc[0] = 0.0
    summary = round_summary(df)
    wide = summary.pivot_table(index="round", columns="model", values="pooled")
    wide.columns = [f"{m}_pooled" for m in wide.columns]
    wide.insert(0, "virtual_hours", clock.reindex(wide.index) / 3600)
    return wide.reset_index()
