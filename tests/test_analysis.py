"""Reports and pandas analysis of a tiny real run (6 critics, 2 rounds, one crashing client, and
faults injected by the clients: raises, NaN weights, a tensor of another shape; two of them
malicious, training a backdoor)."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.load import (fairness, last_round, load_run, participation, per_client, personalization_gain,
                           robustness_tradeoff, round_summary)
from analysis.report import write_report

pytestmark = pytest.mark.slow
# seed 0 draws, for the 6 critics over 2 rounds, every kind below at least once on a client that
# does not crash anyway (the test checks it), and leaves some clients training in every round
FAULTS = "fault-rates=nan=0.25,inf=0.2,shape=0.15,raise=0.1"
POISONED = ["malicious-fraction=0.34", "poison-kind=backdoor"]  # 2 of the 6 critics train a trigger in


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    from simulations.simulate import load_settings, simulate

    runs = tmp_path_factory.mktemp("runs")
    settings = load_settings(None, ["dataset=rt_critics", "min-samples=350", "num-rounds=2", "fraction-train=1.0",
                                    "local-max-steps=8", "attack-examples=5", "fidelity-examples=5", "ig-steps=4", "evaluate-every=1",
                                    "client-attacks=char,synonym", "crash-clients=1", FAULTS, *POISONED, "run-id=tiny",
                                    f"runs-dir={runs}"])
    run_dir = simulate(settings)
    write_report(run_dir)
    return run_dir


def md_tables(text: str) -> dict[str, list[list[str]]]:
    """Tables of report.md by their heading."""
    out, heading = {}, None
    for block in text.split("\n\n"):
        if block.startswith("## "):
            heading = block[3:].strip()
        elif block.startswith("|") and heading:
            rows = [r.strip("|").split("|") for r in block.splitlines() if not set(r) <= set("|-")]
            out[heading] = [[c.strip() for c in r] for r in rows]
    return out


def test_the_promise_table_equals_the_pandas_computation(reported_run):
    """Round 0 and the last round, global and personal: accuracy, accuracy under each attack,
    comprehensiveness and the share harmed, per user, recomputed from the parquet by hand."""
    raw = pd.read_parquet(reported_run / "clients.parquet")
    title = "Promises per user: accuracy, accuracy under attack, faithfulness (round 0 and the last round)"
    table = md_tables((reported_run / "report.md").read_text())[title]
    head, rows = table[0], {(int(r[0]), r[1]): dict(zip(table[0], r)) for r in table[1:]}
    assert set(rows) == {(0, "global"), (0, "personal"), (2, "global"), (2, "personal")}
    assert {"acc under char mean", "acc under synonym mean", "comprehensiveness mean", "harmed"} <= set(head)

    def values(rnd, model, metric):
        part = raw[(raw["round"] == rnd) & (raw["model"] == model) & (raw["metric"] == metric)]
        return part.set_index("client_id")["value"]

    for (rnd, model), row in rows.items():
        for column, metric in (("acc mean", "acc"), ("acc on attacked rows mean", "acc_attacked_rows"),
                               ("acc under char mean", "adv_acc.char"),
                               ("acc under synonym mean", "adv_acc.synonym"),
                               ("comprehensiveness mean", "comprehensiveness"),
                               ("random maps mean", "comprehensiveness_random"),
                               ("agreement with round 0 mean", "start_agreement_spearman")):
            assert float(row[column]) == pytest.approx(values(rnd, model, metric).mean(), abs=5e-5), (rnd, model, column)
        gain = values(rnd, "personal", "acc") - values(rnd, "global", "acc")
        expected = "–" if model == "global" else f"{(gain < 0).mean():.4f}"
        assert row["harmed"] == expected
    # round 0's global model is the start: its maps agree with themselves
    assert float(rows[(0, "global")]["agreement with round 0 mean"]) == pytest.approx(1.0)


def test_load_run_has_proper_dtypes(reported_run):
    df = load_run(reported_run)
    for column in ("run_id", "client_id", "model", "metric"):
        assert isinstance(df[column].dtype, pd.CategoricalDtype)
    assert df["value"].dtype == np.float64 and df["round"].dtype == np.int64


def test_every_report_number_equals_the_pandas_computation(reported_run):
    raw = pd.read_parquet(reported_run / "clients.parquet")  # plain pandas, no FedREX helpers
    tables = md_tables((reported_run / "report.md").read_text())
    summary = tables["Summary per round (acc)"]
    acc = raw[raw["metric"] == "acc"]
    n_test = raw[raw["metric"] == "n_test"].set_index(["round", "client_id"])["value"]
    assert sorted({int(r[0]) for r in summary[1:]}) == [0, 1, 2]  # round 0: the starting model
    for row in summary[1:]:
        rnd, model, clients, pooled, mean, ci95, median, p10, minimum = row
        part = acc[(acc["round"] == int(rnd)) & (acc["model"] == model)]
        values = part["value"]
        weights = np.array([n_test[(int(rnd), c)] for c in part["client_id"]])
        assert int(clients) == len(values)
        assert float(pooled) == pytest.approx((values.to_numpy() * weights).sum() / weights.sum(), abs=5e-5)
        assert float(ci95) == pytest.approx(1.96 * values.std(ddof=1) / np.sqrt(len(values)), abs=5e-5)
        assert float(mean) == pytest.approx(values.mean(), abs=5e-5)
        assert float(median) == pytest.approx(values.median(), abs=5e-5)
        assert float(p10) == pytest.approx(values.quantile(0.1), abs=5e-5)
        assert float(minimum) == pytest.approx(values.min(), abs=5e-5)
    last = acc[acc["round"] == acc["round"].max()].pivot(index="client_id", columns="model", values="value")
    harmed = (last["personal"] < last["global"]).mean()
    fair = {r[0]: r for r in tables["Fairness at the last evaluated round (acc)"][1:]}
    assert float(fair["personal"][6]) == pytest.approx(harmed, abs=5e-5)
    assert float(fair["global"][3]) == pytest.approx(last["global"].median(), abs=5e-5)
    worst = np.sort(last["personal"].to_numpy())[: int(np.ceil(0.1 * len(last)))].mean()
    assert float(fair["personal"][5]) == pytest.approx(worst, abs=5e-5)
    bottom = tables["Bottom 5 clients (personal acc)"][1:]
    expected = last.sort_values("personal").head(5)
    assert [r[0] for r in bottom] == list(expected.index)


def test_helpers_agree_with_each_other(reported_run):
    df = load_run(reported_run)
    wide = per_client(df)
    gain = personalization_gain(df)
    assert np.allclose(gain["gain"], wide.loc[gain.index, "personal.acc"] - wide.loc[gain.index, "global.acc"])
    trade = robustness_tradeoff(df)
    assert set(trade["model"]) == {"global", "personal"}
    assert set(trade["attack"]) == {"char", "synonym"}  # each named attack, under its own metric name
    assert {"global.adv_acc.char", "global.adv_acc.synonym", "global.queries.synonym"} <= set(wide.columns)
    assert np.allclose(trade["drop"], trade["clean_acc"] - trade["adv_acc"])
    assert (trade["drop"] >= 0).all()  # same rows: an attack cannot raise accuracy
    assert fairness(df).loc["personal", "clients"] == len(gain)
    assert len(round_summary(df)) == 6  # rounds 0, 1, 2 x {global, personal}


def test_html_is_one_file_with_its_images_inside(reported_run):
    page = (reported_run / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 5
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert 'src="report/' not in page and "http" not in page.split("<body>")[1][:2000]
    pngs = sorted((reported_run / "report").glob("*.png"))
    assert {p.stem for p in pngs} >= {"accuracy_cdf", "gain_histogram", "robustness", "fidelity", "per_round",
                                      "participation"}


def test_crashed_and_faulty_clients_are_recorded_named_and_nothing_is_lost(reported_run):
    """Every client that crashed, raised or replied with a NaN or a misshapen tensor has a failed
    row in exactly its rounds and an event saying why; the others trained and were aggregated, the
    weights stay finite, and every client is still evaluated."""
    from client.faults import drawn_fault
    from models.artifact import load_weights
    from models.run_settings import RunSettings

    df = load_run(reported_run)
    settings = RunSettings.from_flower(json.loads((reported_run / "run.json").read_text())["settings"])
    pid_of = df.drop_duplicates("client_id").set_index("client_id")["partition_id"].astype(int)
    crashed = pid_of.index[pid_of == 1][0]
    faults = {(r, int(p)): drawn_fault(settings, r, int(p)) for r in (1, 2) for p in pid_of}
    assert {f for (r, p), f in faults.items() if p != 1} >= {"nan", "inf", "shape", "raise"}
    failed = df[df["metric"] == "failed"]
    for rnd in (1, 2):
        expected = {c for c, p in pid_of.items() if p == 1 or faults[(rnd, int(p))]}
        got = set(failed[(failed["round"] == rnd) & (failed["model"] == "train")]["client_id"].astype(str))
        assert got == expected and len(expected) < len(pid_of), rnd
    events = [json.loads(line) for line in (reported_run / "events.jsonl").read_text().splitlines()]
    errors = " ".join(e.get("error", "") for e in events)
    for why in ("injected crash", "injected fault", "NaN or infinite", "another shape or dtype"):
        assert why in errors, why
    raised = {(r, p) for (r, p), f in faults.items() if f == "raise" or p == 1}
    trained = {c: 2 - sum((r, int(p)) in raised for r in (1, 2)) for c, p in pid_of.items()}
    assert participation(df).to_dict() == trained  # NaN/shape replies trained, then were refused
    assert participation(df)[crashed] == 0
    for tensor in load_weights(reported_run / "checkpoints" / "round-0002.safetensors").values():
        assert torch.isfinite(tensor.float()).all()
    text = (reported_run / "report.md").read_text()
    assert "Failed clients" in text and crashed in text
    # the per-client table: each failed client's count of failed replies, the crashed one's in both rounds
    lines = text.splitlines()
    start = lines.index("| client | failed replies | rounds | phases |") + 2
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start:] if line.startswith("|")
            ][: failed["client_id"].nunique()]
    assert {c: int(n) for c, n, _, _ in rows} == failed["client_id"].astype(str).value_counts().to_dict()
    assert [r for r in rows if r[0] == crashed][0][2] == "1, 2"
    evaluated = df[(df["metric"] == "acc") & (df["round"] == 2)]["client_id"].nunique()
    assert evaluated == df["client_id"].nunique()  # failing in training does not stop evaluation


def test_the_malicious_users_are_the_seeded_ones_and_every_user_reports_the_triggers_success(reported_run):
    """Through the real ClientApp: the users that say they are malicious are exactly the seeded
    draw, and every evaluated user reports the trigger's success for both models, in [0, 1]."""
    from models.poisoning import malicious_partitions
    from models.run_settings import RunSettings

    df = load_run(reported_run)
    settings = RunSettings.from_flower(json.loads((reported_run / "run.json").read_text())["settings"])
    last = df[df["round"] == 2]
    roles = last[(last["model"] == "client") & (last["metric"] == "malicious")].set_index("partition_id")["value"]
    said = {int(p) for p, v in roles.items() if v == 1}
    assert len(roles) == 6 and said == malicious_partitions(settings.seed, settings.malicious_fraction, 6)
    assert 0 < len(said) < 6
    from analysis.load import roles as role_of  # the same draw, by client, as pandas users read it

    names = last.drop_duplicates("client_id").set_index("client_id")["partition_id"].astype(int)
    assert {c: ("malicious" if p in said else "benign") for c, p in names.items()} == role_of(df).to_dict()
    never_evaluated = df[~((df["client_id"] == names.index[0]) & (df["model"] == "client"))]
    assert role_of(never_evaluated)[str(names.index[0])] == "unknown"  # said nothing in a poisoned run
    assert set(role_of(df[df["model"] != "client"])) == {"benign"}  # a run where nobody says: no poisoning
    success = last[last["metric"] == "backdoor_success"].dropna(subset=["value"])
    assert set(success["model"]) == {"global", "personal"} and success["value"].between(0, 1).all()


def test_a_run_with_missing_rounds_still_reports_and_names_them(reported_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(reported_run, partial)
    meta = json.loads((partial / "run.json").read_text())
    meta["settings"]["num-rounds"] = 4
    meta["status"] = "stopped"
    (partial / "run.json").write_text(json.dumps(meta))
    text = write_report(partial).read_text()
    assert "Missing rounds:** 3, 4" in text


def test_a_failed_run_says_so_first_and_a_bad_folder_gets_one_error_line(reported_run, tmp_path, capsys):
    from simulations.cli import main

    failed = tmp_path / "failed"
    shutil.copytree(reported_run, failed)
    meta = json.loads((failed / "run.json").read_text())
    meta.update(status="failed", failure="round 3: RuntimeError: boom")
    (failed / "run.json").write_text(json.dumps(meta))
    first = write_report(failed).read_text().splitlines()[0]
    assert first == "# FedREX run tiny: FAILED (round 3: RuntimeError: boom)"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    empty = tmp_path / "empty"
    shutil.copytree(reported_run, empty)
    (empty / "clients.parquet").write_bytes(b"PAR1 truncated")
    for folder, message in ((tmp_path / "nonexistent", "does not exist"), (broken, "not valid JSON"),
                            (empty, "is not readable")):
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedrex: error: ") and message in err[0], err


def test_a_report_on_a_full_disk_is_one_error_line_and_keeps_the_old_report(reported_run, tmp_path, capsys,
                                                                           monkeypatch, full_disk):
    """The disk fills while `fedrex report` writes a plot, report.md or report.html: one error line,
    no temporary file left, and the report already there stays whole."""
    from simulations.cli import main

    full = tmp_path / "full"
    shutil.copytree(reported_run, full)
    before = {p: p.read_bytes() for p in [full / "report.md", full / "report.html", *(full / "report").glob("*.png")]}
    plots = len(list((full / "report").glob("*.png")))
    for full_at in (1, plots, plots + 1, plots + 2):  # the first plot, the last one, report.md, report.html
        writes = full_disk(full_at)
        assert main(["report", str(full)]) == 2
        monkeypatch.undo()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedrex: error: cannot write ") and "No space left" in err[0], err
        assert not list(full.rglob(".report*")) and not list((full / "report").glob(".*"))
        assert writes[0] == full_at  # nothing written after the failed file
    assert {p: p.read_bytes() for p in before} == before


def test_compare_runs_gives_one_row_per_run_and_model(reported_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(reported_run, other)
    meta = json.loads((other / "run.json").read_text())
    meta["run_id"], meta["settings"]["mode"] = "other", "ditto"
    (other / "run.json").write_text(json.dumps(meta))
    from analysis.load import compare_runs

    table = compare_runs([reported_run, other])
    assert len(table) == 4 and set(table["mode"]) == {"finetune", "ditto"}
    wide = per_client(load_run(reported_run))
    first = table[(table["run_id"] == "tiny") & (table["model"] == "global")].iloc[0]
    assert first["acc_attacked_rows_mean"] == pytest.approx(wide["global.acc_attacked_rows"].mean())
    write_report(reported_run, [other])
    assert "## Method comparison" in (reported_run / "report.md").read_text()


def test_the_label_prior_reference_matches_a_hand_computation():
    """Start model + user label prior (benchmarks/references.py): log p(y|x) + log of the user's
    add-one smoothed training label frequencies. Labels [1, 1, 1, 0] -> (1+1, 3+1) / 6."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from references import with_label_prior

    log_probs = np.log(np.array([[0.6, 0.4], [0.45, 0.55], [0.9, 0.1]]))
    adjusted = with_label_prior(log_probs, np.array([1, 1, 1, 0]))
    by_hand = np.array([[np.log(0.6) + np.log(2 / 6), np.log(0.4) + np.log(4 / 6)],
                        [np.log(0.45) + np.log(2 / 6), np.log(0.55) + np.log(4 / 6)],
                        [np.log(0.9) + np.log(2 / 6), np.log(0.1) + np.log(4 / 6)]])
    np.testing.assert_allclose(adjusted, by_hand)
    assert adjusted.argmax(1).tolist() == [1, 1, 0]  # the prior flips the first row, not the confident third
    assert with_label_prior(log_probs, np.array([0, 1])).argmax(1).tolist() == log_probs.argmax(1).tolist()


def test_a_run_stopped_after_a_clean_round_reports_the_robustness_it_last_measured():
    """With ``evaluate-between=clean`` a run stopped at round 5 measured attacks last at round 0:
    the robustness table comes from round 0, not an empty round 5."""
    from analysis.load import last_attacked_round

    rows = [(0, "a", "global", "acc", 0.8), (0, "a", "global", "adv_acc.char", 0.5),
            (0, "a", "global", "acc_attacked_rows", 0.7), (5, "a", "global", "acc", 0.9)]
    df = pd.DataFrame(rows, columns=["round", "client_id", "model", "metric", "value"])
    assert last_attacked_round(df) == 0 and last_round(df) == 5
    trade = robustness_tradeoff(df)  # by default the last round that measured an attack
    assert trade[["clean_acc", "adv_acc"]].values.tolist() == [[0.7, 0.5]]
    assert last_attacked_round(df[df["metric"] == "acc"]) is None and robustness_tradeoff(df[df["metric"] == "acc"]).empty


def test_a_compression_row_measured_before_a_config_field_existed_is_still_known():
    """benchmarks/compression.py keeps a row whose stored config predates a field (it reads as the
    value rows ran with before it, ADDED_FIELDS), measures a row that sets the field anew, and
    refuses a row missing a field it has no such value for."""
    import sys
    from dataclasses import replace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compression import base_config, row_config, row_key

    config = base_config("sst2", quick=True, seed=0)
    stored = config.as_dict()
    del stored["adv_space"]  # the field the ASCC row added
    del stored["objective"]["erasure"]  # one ObjectiveConfig gained after the SST-2 rows were measured
    row = {"name": "FedREX student", "config": stored}
    assert row_key("FedREX student", row_config(row)) == row_key("FedREX student", config)
    assert row_key("FedREX student", replace(config, adv_space="synonyms")) != row_key("FedREX student", config)
    del stored["epochs"]
    with pytest.raises(SystemExit, match="epochs"):
        row_config(row)
