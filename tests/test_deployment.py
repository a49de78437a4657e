"""The deployment path: a real SuperLink and two real SuperNodes on localhost, each SuperNode
holding its own user's reviews in a file (as a phone or a Raspberry Pi would), and `flwr run .`
submitting the FedREX app to them. Nothing here goes through the simulation engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from models.datasets import data_dir
from simulations.localhost import free_port, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Cluster:
    """Flower processes started for one test (SuperLink, SuperNodes), each logging to a file, all
    stopped on exit; ``env`` points the `flwr` CLI at a private FLWR_HOME whose config.toml names
    the federation ``name`` (``connection``: its TOML lines beside the address)."""

    def __init__(self, tmp_path: Path, name: str, connection: str):
        self.tmp_path, self.port, self.processes = tmp_path, free_port(), []
        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                                          f'address = "127.0.0.1:{self.port}"\n{connection}\n')
        self.env = {**os.environ, "PATH": str(BIN) + os.pathsep + os.environ["PATH"], "FLWR_HOME": str(home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_LOG_LEVEL": "DEBUG"}  # timestamped logs, which the message profile reads

    def start(self, name: str, *args: str) -> Path:
        log = self.tmp_path / f"{name}.log"
        self.processes.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, cwd=self.tmp_path,
                                               stdout=log.open("w"), stderr=subprocess.STDOUT))
        return log

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def test_superlink_and_supernodes_run_the_app_on_device_files(tmp_path):
    reviews = pd.read_parquet(data_dir() / "rt_critics" / "reviews.parquet")
    critics = reviews["user_id"].value_counts().index[:2]
    with Cluster(tmp_path, "deploy", "insecure = true") as cluster:
        link_log = cluster.start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                 "--port", str(cluster.port))
        wait_for(link_log, "Uvicorn running")
        for i, critic in enumerate(critics):
            data_file = tmp_path / f"device{i}.csv"
            reviews[reviews["user_id"] == critic].head(60)[["text", "label"]].to_csv(data_file, index=False)
            node_config = f'data-file="{data_file}" client-id="{critic}" state-dir="{tmp_path / f"state{i}"}"'
            cluster.start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{cluster.port}",
                          "--port", str(free_port()), "--node-config", node_config)
        # a third device whose data file is malformed (no label column): it fails alone, and says why
        broken = tmp_path / "broken.csv"
        reviews.head(5)[["text"]].assign(stars=3).to_csv(broken, index=False)
        cluster.start("supernode-broken", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{cluster.port}",
                      "--port", str(free_port()), "--node-config",
                      f'data-file="{broken}" client-id="broken" state-dir="{tmp_path / "state-broken"}"')
        deadline = time.time() + 60
        while link_log.read_text().count("activate-node") < 3 and time.time() < deadline:
            time.sleep(0.5)
        assert link_log.read_text().count("activate-node") >= 3, link_log.read_text()[-2000:]
        overrides = (f'num-rounds=2 evaluate-every=1 fraction-train=1.0 mode="fedper" attack-examples=3 '
                     f'fidelity-examples=3 '
                     f'local-max-steps=5 run-id="deployed" runs-dir="{tmp_path / "runs"}"')
        result = cluster.flwr("run", ".", "deploy", "--run-config", overrides, "--stream")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "runs" / "deployed" / "clients.parquet")
    events = (tmp_path / "runs" / "deployed" / "events.jsonl").read_text()
    assert "takes no part in this run" in events and "label" in events, events[-2000:]
    accuracy = frame[frame["metric"] == "acc"]
    # Every device reported, under the name its own node config gave it, at the start (round 0) and
    # after both rounds, for both models.
    assert set(accuracy["client_id"]) == set(critics)
    assert accuracy.groupby(["round", "client_id", "model"]).size().to_dict() == {
        (r, c, m): 1 for r in (0, 1, 2) for c in critics for m in ("global", "personal")}
    # fedper's personal head lives on the device, in the state folder its node config named, under
    # the run's id: another run on the same device starts from nothing, not from this run's heads
    for i in range(2):
        saved = sorted((tmp_path / f"state{i}").rglob("*.safetensors"))
        assert [(p.relative_to(tmp_path / f"state{i}").parts[:2], p.name) for p in saved] == \
            [(("deployed", "client_state"), "round-0001.safetensors"), (("deployed", "client_state"), "round-0002.safetensors")]
    has_personal = frame[(frame["metric"] == "has_personal") & (frame["round"] == 2)]
    assert (has_personal["value"] == 1.0).all() and len(has_personal) == 2
    # the device's log holds every step of its messages, Flower's and the ClientApp's own marks
    # (client/timeline.py), in order: the profile benchmarks/device_shape.py reports
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from device_shape import SERVER_TURN, STEPS, message_profile

    profile = message_profile(tmp_path / "supernode0.log", link_log)
    assert {kind: p["messages"] for kind, p in profile.items()} == {"train": 2, "evaluate": 3}
    evaluate_only = {"the global model measured", "the personal model fitted and measured"}
    train_only = {"training", "personal state saved"}
    for kind, others in (("train", evaluate_only), ("evaluate", train_only)):
        steps = profile[kind]["median_s"]
        assert set(steps) == {label for _, label in STEPS} - others | {SERVER_TURN}, (kind, steps)
        assert all(seconds >= 0 for seconds in steps.values()), steps
    assert profile["train"]["median_s"]["training"] > 0


def test_tls_and_supernode_auth_admit_registered_devices_and_refuse_the_rest(tmp_path):
    """A SuperLink over TLS with SuperNode authentication; three SuperNodes whose public keys were
    registered (`flwr supernode register`) run a round; a fourth with an unregistered key is
    refused and never becomes a client; every admitted device writes its per-client rows. A fifth,
    registered, claims the first critic's user with rows of its own: neither claimant takes part
    (nothing tells the server which is genuine), both are recorded, and the other two users are
    bound to their nodes in run.json."""
    from simulations.certs import make_certificates

    reviews = pd.read_parquet(data_dir() / "rt_critics" / "reviews.parquet")
    critics = list(reviews["user_id"].value_counts().index[:3])
    certs = make_certificates(tmp_path / "certs", supernodes=5)
    with Cluster(tmp_path, "secure", f'root-certificates = "{certs["ca"]}"') as cluster:
        link_log = cluster.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs["ca"]),
                                 "--ssl-certfile", str(certs["server_cert"]), "--ssl-keyfile", str(certs["server_key"]),
                                 "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                 "--port", str(cluster.port))
        wait_for(link_log, "Uvicorn running")
        for key in [*certs["supernode_keys"][:3], certs["supernode_keys"][4]]:
            registered = cluster.flwr("supernode", "register", f"{key}.pub", "secure", timeout=120)
            assert registered.returncode == 0, registered.stdout[-2000:] + registered.stderr[-2000:]
        node_logs = []
        impostor_rows = reviews[reviews["user_id"] == critics[1]].tail(40)
        for i, critic in enumerate([*critics, "intruder", critics[0]]):
            data_file = tmp_path / f"device{i}.csv"
            rows = reviews[reviews["user_id"] == (critic if i < 3 else critics[0])].head(40) if i < 4 else impostor_rows
            rows[["text", "label"]].to_csv(data_file, index=False)
            node_config = f'data-file="{data_file}" client-id="{critic}" state-dir="{tmp_path / f"state{i}"}"'
            node_logs.append(cluster.start(f"supernode{i}", "flower-supernode", "--root-certificates", str(certs["ca"]),
                                           "--auth-supernode-private-key", str(certs["supernode_keys"][i]),
                                           "--superlink", f"127.0.0.1:{cluster.port}", "--port", str(free_port()),
                                           "--max-retries", "3", "--node-config", node_config))
        deadline = time.time() + 90
        while time.time() < deadline and link_log.read_text(errors="replace").count("activate-node") < 4:
            time.sleep(0.5)
        time.sleep(2)
        overrides = (f'num-rounds=1 evaluate-every=1 fraction-train=1.0 attack-examples=2 fidelity-examples=0 '
                     f'local-max-steps=3 run-id="secure" runs-dir="{tmp_path / "runs"}"')
        result = cluster.flwr("run", ".", "secure", "--run-config", overrides, "--stream")
        intruder_exit = cluster.processes[4].poll()  # still running would mean it was let in
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "runs" / "secure" / "clients.parquet")
    accuracy = frame[frame["metric"] == "acc"]
    # the two users with one registered device each; not the intruder, not the user claimed twice
    assert set(accuracy["client_id"]) == set(critics[1:])
    assert accuracy.groupby(["round", "client_id", "model"]).size().to_dict() == {
        (r, c, m): 1 for r in (0, 1) for c in critics[1:] for m in ("global", "personal")}
    events = (tmp_path / "runs" / "secure" / "events.jsonl").read_text()
    assert events.count("none of them takes part") == 2, events[-2000:]
    bound = json.loads((tmp_path / "runs" / "secure" / "run.json").read_text())["device_nodes"]
    assert sorted(bound) == sorted(critics[1:])
    # The SuperLink refused the unregistered key (Flower's ApiError 2004) and that SuperNode gave up.
    intruder = node_logs[3].read_text(errors="replace")
    assert "Failed to activate SuperNode" in intruder, intruder[-2000:]
    assert intruder_exit not in (None, 0)
    assert "ApiError:2004" in link_log.read_text(errors="replace")
