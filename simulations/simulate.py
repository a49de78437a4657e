"""`fedrex simulate` and `fedrex run`: Flower's simulation engine (Ray) on one machine.

The settings are resolved once here (config file, then --run-config overrides) and handed to the
ServerApp and ClientApp factories, so the apps see exactly what `flwr run .` would give them.
Everything that can fail on bad input (settings, data, partitioning, the global model) is checked
before Ray starts, so a mistake costs a one-line error, not a stack of actor logs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path

from models.errors import FedrexError
from models.run_settings import RunSettings, split_pairs


def load_settings(config_file: str | None, pairs: list[str] | None, base: dict | None = None) -> RunSettings:
    values: dict = dict(base or {})
    if config_file:
        path = Path(config_file)
        if not path.exists():
            packaged = resources.files("simulations") / "configs" / f"{config_file}.toml"
            if not packaged.is_file():
                raise FedrexError(f"config {config_file!r} is neither a file nor a packaged config (large)")
            text = packaged.read_text()
        else:
            text = path.read_text()
        try:
            values.update(tomllib.loads(text))
        except tomllib.TOMLDecodeError as err:
            raise FedrexError(f"{config_file}: malformed TOML ({err})") from None
    values.update(split_pairs(pairs))
    return RunSettings.from_flower(values)


def check_before_start(settings: RunSettings) -> int:
    """Load data and partitions, and make sure the global model exists; returns the client count."""
    from client.data import federation
    from server.app import global_model

    fed = federation(settings)
    count = fed.num_partitions
    _, config = global_model(settings)
    if config["num_labels"] != fed.num_labels:
        raise FedrexError(f"the global model has {config['num_labels']} labels but {settings.dataset} has {fed.num_labels}")
    if count < settings.min_train_clients:
        raise FedrexError(f"{count} clients < min-train-clients {settings.min_train_clients}")
    return count


def simulate(settings: RunSettings, control: dict | None = None, verbose: bool = False) -> Path:
    """Run (or resume) a simulation; returns the run folder."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app
    from server.store import RunStore, new_run_id

    control = dict(control or {})
    if control.get("resume"):
        folder = Path(control["resume"])
        saved = RunStore.open(folder).meta["settings"]
        settings = RunSettings.from_flower(saved)
    elif not settings.run_id:
        settings = settings.replace(run_id=new_run_id())
    num_clients = check_before_start(settings)
    run_dir = Path(control["resume"]) if control.get("resume") else Path(settings.runs_dir) / settings.run_id
    print(f"[fedrex] {num_clients} clients ({settings.dataset}, {settings.partitioner}), run dir {run_dir}",
          file=sys.stderr, flush=True)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    overrides = settings.to_flower()
    # Silences Ray's FutureWarning about GPU visibility; no client here asks for a GPU.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    start = time.time()
    run_simulation(
        server_app=build_server_app(overrides, control),
        client_app=build_client_app(overrides),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": settings.client_cpus, "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                                      "log_to_driver": verbose}},
        verbose_logging=verbose,
    )
    store = RunStore.open(run_dir) if (run_dir / "run.json").exists() else None
    if store is None or store.meta.get("status") == "running":
        raise FedrexError(f"the simulation stopped before finishing; see {run_dir}/events.jsonl, "
                          f"then `fedrex simulate --resume {run_dir}`")
    print(f"[fedrex] {store.completed_rounds}/{settings.num_rounds} rounds in {time.time() - start:.0f}s -> {run_dir}",
          file=sys.stderr)
    return run_dir


def simulate_cmd(args) -> int:
    settings = load_settings(args.config, args.run_config,
                             {"runs-dir": args.runs_dir} if args.runs_dir else None)
    control = {"resume": args.resume, "stop-after": args.stop_after}
    run_dir = simulate(settings, control, args.verbose)
    print(run_dir)
    return 0


def run_cmd(args) -> int:
    """distill (or reuse the cached quick artifact) + simulate + report."""
    settings = load_settings(args.config, args.run_config,
                             {"runs-dir": args.runs_dir} if args.runs_dir else None)
    run_dir = simulate(settings, {}, args.verbose)
    from analysis.report import write_report

    report = write_report(run_dir)
    print(report)
    return 0
