"""`fedrex report RUN_DIR`: report.md and a self-contained report.html (plots embedded as PNG
data URIs) in the run folder, plus the PNGs under report/. Every table is computed by the
functions in ``analysis.load`` from the run's parquet files, so an analyst can reproduce each
number in pandas."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import (compare_runs, device_rounds, failures, fairness, fairness_by_tier, last_attacked_round,
                           last_round, load_run, missing_rounds, participation, participation_by_tier, per_client,
                           personalization_gain, promise_table, robustness_tradeoff, round_summary, run_info,
                           time_to_accuracy)
from models.files import atomic_write_bytes  # no torch: analysis runs where torch is not installed


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    _plt().close(fig)
    atomic_write_bytes(path, image.getvalue())  # a full disk leaves the old plot or none, never half of one
    return path


def make_plots(df: pd.DataFrame, folder: Path) -> dict[str, Path]:
    plt = _plt()
    plots: dict[str, Path] = {}
    gain = personalization_gain(df) if {"global", "personal"} <= set(df["model"].astype(str)) else pd.DataFrame()
    if len(gain):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for model in ("global", "personal"):
            values = np.sort(gain[model].to_numpy())
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=model)
        ax.set(xlabel="per-client accuracy", ylabel="share of clients", title="Accuracy CDF")
        ax.legend()
        plots["Per-client accuracy CDF, global vs personalized"] = _save(fig, folder, "accuracy_cdf")

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.hist(gain["gain"], bins=20, color="tab:green")
        ax.axvline(0, color="black", lw=1)
        ax.set(xlabel="personal - global accuracy", ylabel="clients", title="Personalization gain")
        plots["Personalization gain per client"] = _save(fig, folder, "gain_histogram")

    tradeoff = robustness_tradeoff(df)
    if len(tradeoff):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for (model, attack), part in tradeoff.groupby(["model", "attack"]):
            ax.scatter(part["clean_acc"], part["adv_acc"], s=14, alpha=0.7, label=f"{model}, {attack}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set(xlabel="clean accuracy (attacked rows)", ylabel="accuracy under attack", title="Robustness per client")
        ax.legend()
        plots["Clean vs attacked accuracy per client"] = _save(fig, folder, "robustness")

    wide = per_client(df)
    fid_cols = [c for c in wide.columns if c.split(".")[1] in ("comprehensiveness", "sufficiency", "agreement_spearman")]
    if fid_cols:
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        data = [wide[c].dropna() for c in fid_cols]
        ax.boxplot(data, tick_labels=[c.replace(".", "\n") for c in fid_cols])
        ax.set(title="Explanation fidelity per client")
        ax.tick_params(axis="x", labelsize=7)
        plots["Explanation fidelity distributions"] = _save(fig, folder, "fidelity")

    summary = round_summary(df)
    if len(summary):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for (model, part), color in zip(summary.groupby("model"), ("tab:blue", "tab:green", "tab:orange")):
            ax.errorbar(part["round"], part["mean"], yerr=part["ci95"], marker="o", capsize=3, color=color,
                        label=f"{model} mean per user (95% CI)")
            ax.plot(part["round"], part["pooled"], ls="--", marker=".", color=color, label=f"{model} pooled over rows")
        ax.set(xlabel="round (0 = starting model)", ylabel="accuracy", title="Accuracy per round")
        ax.set_xticks(sorted(summary["round"].unique()))
        ax.legend(fontsize=7)
        plots["Metrics per round"] = _save(fig, folder, "per_round")

    timeline = device_rounds(df)
    if len(timeline) and "finish_clock_s" in timeline:
        plots["Device timeline (virtual clock)"] = timeline_plot(timeline, folder)

    counts = participation(df)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(counts.to_numpy(), bins=np.arange(counts.max() + 2) - 0.5 if len(counts) else 1, color="tab:purple")
    ax.set(xlabel="rounds trained", ylabel="clients", title="Participation per client")
    plots["Participation per client"] = _save(fig, folder, "participation")
    return plots




STATUS_COLORS = {"ok": "tab:green", "straggler": "tab:orange", "dropped": "tab:red", "abandoned": "tab:brown",
                 "failed": "black"}


def timeline_plot(timeline: pd.DataFrame, folder: Path, max_clients: int = 40) -> Path:
    """Each reporting device's training rounds on the virtual clock, coloured by status; clients
    sorted by tier (the first ``max_clients`` that took part)."""
    plt = _plt()
    timed = timeline.dropna(subset=["finish_clock_s"])
    order = (timed[["client_id", "tier"]].drop_duplicates("client_id").sort_values(["tier", "client_id"])
             .head(max_clients))
    row_of = {c: i for i, c in enumerate(order["client_id"])}
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.16 * len(row_of) + 1)))
    for status, part in timed[timed["client_id"].isin(row_of)].groupby("status"):
        starts = (part["finish_clock_s"] - part["round_s"]) / 60
        ax.barh([row_of[c] for c in part["client_id"]], part["round_s"] / 60, left=starts, height=0.7,
                color=STATUS_COLORS.get(status, "grey"), label=status)
    ax.set_yticks(range(len(row_of)), [f"{c[:14]} ({t})" for c, t in zip(order["client_id"], order["tier"])],
                  fontsize=5)
    ax.set(xlabel="virtual clock (minutes)", title="Device rounds: download + compute + upload")
    ax.legend(fontsize=7)
    return _save(fig, folder, "device_timeline")


def tables(run_dir, df: pd.DataFrame, compare: list) -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {
        "Promises per user: accuracy, accuracy under attack, faithfulness (round 0 and the last round)":
            promise_table(df),
        "Summary per round (acc)": round_summary(df)}
    if {"global", "personal"} <= set(df["model"].astype(str)):
        out["Fairness at the last evaluated round (acc)"] = fairness(df).reset_index()
        gain = personalization_gain(df).sort_values("personal")
        out["Bottom 5 clients (personal acc)"] = gain.head(5).reset_index()
        out["Top 5 clients (personal acc)"] = gain.tail(5).iloc[::-1].reset_index()
    tradeoff = robustness_tradeoff(df)
    if len(tradeoff):  # per client: the share of its attacked rows still right under each attack
        out[f"Robustness per attack at round {last_attacked_round(df)} (per-client means on the attacked rows)"] = (
            tradeoff.groupby(["model", "attack"])[["clean_acc", "adv_acc", "drop"]].mean().reset_index())
    by_tier = participation_by_tier(df)
    if len(by_tier):
        out["Participation by device tier (share of client-rounds per status)"] = by_tier
        out["Fairness by device tier (last evaluated round)"] = fairness_by_tier(df)
        out["Accuracy against virtual time"] = time_to_accuracy(run_dir, df)
    if compare:
        out["Method comparison"] = compare_runs([run_dir, *compare])
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    """A plain GitHub table with 4-decimal floats, "–" where a value does not apply (NaN)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = [("–" if np.isnan(v) else f"{v:.4f}") if isinstance(v, (float, np.floating)) else str(v)
                 for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failures_by_client(failed: pd.DataFrame) -> pd.DataFrame:
    """One row per client that failed: how many replies, in which rounds and phases (most first)."""
    rows = [{"client": client, "failed replies": len(group),
             "rounds": ", ".join(str(r) for r in sorted(group["round"].astype(int).unique())),
             "phases": ", ".join(sorted(group["phase"].astype(str).unique()))}
            for client, group in failed.groupby(failed["client_id"].astype(str))]
    return pd.DataFrame(rows).sort_values(["failed replies", "client"], ascending=[False, True], ignore_index=True)


def write_report(run_dir, compare: list | None = None) -> Path:
    run_dir = Path(run_dir)
    compare = list(compare or [])
    info, df = run_info(run_dir), load_run(run_dir)
    settings = info["settings"]
    plots = make_plots(df, run_dir / "report")
    missing, failed = missing_rounds(run_dir, df), failures(df)

    title = f"# FedREX run {info['run_id']}"
    if info.get("status") == "failed":  # said first: the tables below stop where the run died
        title += f": FAILED ({info.get('failure', 'no reason recorded')})"
    md = [title, "",
          f"{settings.get('dataset')} ({settings.get('partitioner')}), strategy {settings.get('strategy')}, "
          f"mode {settings.get('mode')}, {info.get('completed_rounds')}/{settings.get('num-rounds')} rounds, "
          f"status {info.get('status')}, seed {settings.get('seed')}; last evaluated round {last_round(df)}.", ""]
    attacked, evaluated = last_attacked_round(df), last_round(df)
    if attacked is not None and attacked < evaluated:  # stopped or failed between round 0 and the last
        md += [f"**Round {evaluated} measured accuracy alone** (`evaluate-between=clean`): attacks and "
               f"explanations were last measured at round {attacked}.", ""]
    if missing:
        md += [f"**Missing rounds:** {', '.join(map(str, missing))} (not completed: resume with "
               f"`fedrex simulate --resume {run_dir}`).", ""]
    if len(failed):
        per = failed.groupby(["round", "phase"]).size().reset_index(name="failed clients")
        md += [f"**Failed clients:** {len(failed)} replies of {failed['client_id'].nunique()} clients failed or "
               "timed out (per round and phase, then per client); the reasons are in events.jsonl.", "",
               markdown_table(per), "", markdown_table(failures_by_client(failed)), ""]
    for title, frame in tables(run_dir, df, compare).items():
        md += [f"## {title}", "", markdown_table(frame), ""]
    for title, path in plots.items():
        md += [f"## {title}", "", f"![{title}](report/{path.name})", ""]
    text = "\n".join(md)
    atomic_write_bytes(run_dir / "report.md", text.encode())
    atomic_write_bytes(run_dir / "report.html", to_html(text, plots).encode())
    return run_dir / "report.md"


def to_html(markdown_text: str, plots: dict[str, Path]) -> str:
    """A minimal, dependency-free rendering: headings, paragraphs, tables; images inlined."""
    body, table = [], []

    def flush_table():
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r) <= set("|-")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                                  for r in rest) + "</table>")
            table.clear()

    images = {f"report/{p.name}": p for p in plots.values()}
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            data = base64.b64encode(images[src.rstrip(")")].read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>FedREX report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def report_cmd(args) -> int:
    from analysis.load import RunFolderError
    from models.errors import FedrexError  # the command's error line; the library stays plain

    try:
        path = write_report(args.run_dir, args.compare)
    except RunFolderError as err:
        raise FedrexError(str(err)) from None
    print(path)
    return 0
