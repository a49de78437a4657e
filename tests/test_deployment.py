"""The deployment path: a real SuperLink and two real SuperNodes on localhost, each SuperNode
holding its own user's reviews in a file (as a phone or a Raspberry Pi would), and `flwr run .`
submitting the FedREX app to them. Nothing here goes through the simulation engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from models.datasets import data_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(log: Path, text: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{log.name} never said {text!r}:\n{log.read_text(errors='replace')[-3000:]}")


def test_superlink_and_supernodes_run_the_app_on_device_files(tmp_path):
    reviews = pd.read_parquet(data_dir() / "rt_critics" / "reviews.parquet")
    critics = reviews["user_id"].value_counts().index[:2]
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "PATH": str(BIN) + os.pathsep + os.environ["PATH"], "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    processes = []

    def start(name: str, *args: str) -> Path:
        log = tmp_path / f"{name}.log"
        processes.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path,
                                          stdout=log.open("w"), stderr=subprocess.STDOUT))
        return log

    try:
        link_log = start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                         "--port", str(port))
        wait_for(link_log, "Uvicorn running")
        for i, critic in enumerate(critics):
            data_file = tmp_path / f"device{i}.csv"
            reviews[reviews["user_id"] == critic].head(60)[["text", "label"]].to_csv(data_file, index=False)
            node_config = f'data-file="{data_file}" client-id="{critic}" state-dir="{tmp_path / f"state{i}"}"'
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                  "--port", str(free_port()), "--node-config", node_config)
        wait_for(link_log, "activate-node", 60)
        time.sleep(2)  # both nodes: the second registers right after the first
        overrides = (f'num-rounds=2 evaluate-every=1 fraction-train=1.0 mode="fedper" attack-examples=3 '
                     f'fidelity-examples=3 '
                     f'local-max-steps=5 run-id="deployed" runs-dir="{tmp_path / "runs"}"')
        result = subprocess.run([str(BIN / "flwr"), "run", ".", "deploy", "--run-config", overrides, "--stream"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "runs" / "deployed" / "clients.parquet")
    accuracy = frame[frame["metric"] == "acc"]
    # Every device reported, under the name its own node config gave it, at the start (round 0) and
    # after both rounds, for both models.
    assert set(accuracy["client_id"]) == set(critics)
    assert accuracy.groupby(["round", "client_id", "model"]).size().to_dict() == {
        (r, c, m): 1 for r in (0, 1, 2) for c in critics for m in ("global", "personal")}
    # fedper's personal head lives on the device, in the state folder its node config named.
    for i in range(2):
        assert sorted(p.name for p in (tmp_path / f"state{i}").rglob("round-*.safetensors")) == \
            ["round-0001.safetensors", "round-0002.safetensors"]
    has_personal = frame[(frame["metric"] == "has_personal") & (frame["round"] == 2)]
    assert (has_personal["value"] == 1.0).all() and len(has_personal) == 2
