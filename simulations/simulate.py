"""`fedrex simulate` and `fedrex run`: Flower's simulation engine (Ray) on one machine.

The settings are resolved once here (config file, then --run-config overrides) and handed to the
ServerApp and ClientApp factories, so the apps see exactly what `flwr run .` would give them.
Everything that can fail on bad input (settings, data, partitioning, the global model's files) is
checked before Ray starts, so a mistake costs a one-line error, not a stack of actor logs (a start
model whose tensors do not fit its own config.json is the exception: the ServerApp finds it when it
loads the model, and the run fails with that one line).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path

from models.datasets import DATA_DIR_ENV
from models.files import atomic_write_bytes
from models.errors import FedrexError
from models.partitioning import SYNTHETIC
from models.run_settings import RunSettings, new_run_id, split_pairs
from simulations.app_bundle import stage_app
from simulations.localhost import free_ports, port_open
from simulations.watchdog import stop_simulation


def load_settings(config_file: str | None, pairs: list[str] | None, base: dict | None = None) -> RunSettings:
    values: dict = dict(base or {})
    if config_file:
        path = Path(config_file)
        if not path.exists():
            folder = resources.files("simulations") / "configs"
            packaged = folder / f"{config_file}.toml"
            if not packaged.is_file():
                names = ", ".join(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))
                raise FedrexError(f"config {config_file!r} is neither a file nor a packaged config ({names})")
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
    """Load data, partitions and device profiles, and make sure the global model exists; returns
    the client count. Without torch when the run names an artifact (``check_artifact``): this
    command then only waits for Flower and relays its output, and torch would cost it about a second
    to import and 0.2 GB held for the whole run."""
    from client.data import federation
    from client.device import fedscale_profiles, parse_mix
    from models.artifact import check_artifact, resolve_artifact

    if settings.device_mix:
        parse_mix(settings.device_mix)
    if settings.device_trace:
        fedscale_profiles(settings.device_trace)
    fed = federation(settings)
    count = fed.num_partitions
    if settings.artifact:
        config = check_artifact(resolve_artifact(settings.artifact))
    else:  # a quick distillation (cached), which needs torch anyway
        from server.app import global_model

        _, config = global_model(settings)
    if config["num_labels"] != fed.num_labels:
        raise FedrexError(f"the global model has {config['num_labels']} labels but {settings.dataset} has {fed.num_labels}")
    if count < settings.min_train_clients:
        raise FedrexError(f"{count} clients < min-train-clients {settings.min_train_clients}")
    return count


FLOWER_NOISE = ("INFO", "WARNING", "DEBUG", "Successfully", "Starting local SuperLink", "Using SuperLink",
                "Flower configuration", "\x1b[")  # Flower's and Ray's own lines, shown with --verbose


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_dir() -> Path:
    """The Flower App (this repository: pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise FedrexError(f"{root} holds no pyproject.toml: install FedREX from its repository (pip install -e .) "
                          "so that `flwr run` can build the app")
    return root


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def simulate(settings: RunSettings, control: dict | None = None, verbose: bool = False) -> Path:
    """Run (or resume) a simulation with Flower's supported local path, `flwr run` against a
    managed local SuperLink in simulation mode (Ray), and return the run folder. The resolved
    settings and run controls (resume, stop-after) travel as the run config; the ServerApp and
    ClientApp are pyproject's components, in the very App Bundle `flwr run .` builds (from a staged
    copy of its files: ``simulations.app_bundle``)."""
    control = {k: v for k, v in dict(control or {}).items() if v}
    if control.get("resume"):
        from server.store import RunStore  # pandas: imported once the simulation is over, unless resuming

        folder = Path(control["resume"]).resolve()
        control["resume"] = str(folder)
        settings = RunSettings.from_flower(RunStore.open(folder).meta["settings"])
    elif not settings.run_id:
        settings = settings.replace(run_id=new_run_id())
    # The simulation runs in Flower's processes with another working directory, and on a Ray cluster
    # (RAY_ADDRESS) in processes that never saw this shell's environment: absolute paths, and the
    # data folder named in the settings rather than left to $FEDREX_DATA_DIR.
    data_dir = settings.data_dir or os.environ.get(DATA_DIR_ENV, "")
    settings = settings.replace(runs_dir=str(Path(settings.runs_dir).resolve()),
                                data_dir=str(Path(data_dir).resolve()) if data_dir else "")
    run_dir = Path(control["resume"]) if control.get("resume") else Path(settings.runs_dir) / settings.run_id
    if not control.get("resume") and (run_dir / "run.json").exists():
        raise FedrexError(f"{run_dir} already holds a run; use --resume {run_dir} or another run id")
    num_clients = check_before_start(settings)
    who = (f"{settings.partitioner}: SYNTHETIC users of {settings.bootstrap_rows} rows drawn from {settings.dataset}, "
           "a load test" if settings.partitioner in SYNTHETIC else f"{settings.dataset}, {settings.partitioner}")
    print(f"[fedrex] {num_clients} clients ({who}), run dir {run_dir}", file=sys.stderr, flush=True)
    # Ray: the cluster RAY_ADDRESS names (its nodes say what they have), else a new local one of this
    # machine's cores; never a cluster someone else left running here, which Ray would join unasked
    ray_address = os.environ.get("RAY_ADDRESS") or "local"
    if ray_address != "local":
        # a message carrying several users, or one a pool node serves, reads the user's saved state
        # from the run folder, which on a cluster of machines lives on whichever machine trained
        # them: a node per user there, and one message per user
        settings = settings.replace(evaluate_batch=settings.evaluate_batch or 1, simulation_nodes=0)
    # Flower's own default is 2 CPUs per simulated client (one actor on a 2-core machine).
    nodes = min(settings.simulation_nodes, num_clients) if settings.simulation_nodes else num_clients
    federation = {"num-supernodes": nodes, "client-resources-num-cpus": settings.client_cpus,
                  "client-resources-num-gpus": 0.0, "init-args-log-to-driver": verbose}
    if ray_address == "local":
        federation["init-args-num-cpus"] = os.cpu_count() or 1
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           # offline: the app's dependencies are this environment's, never installed at run time
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences Ray's GPU-visibility FutureWarning
           "RAY_ADDRESS": ray_address,
           **superlink_env(settings)}
    home, port = env["FLWR_HOME"], env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    started_here = not port_open(port)
    # the app's files alone, so that `flwr run` does not walk a virtual environment (app_bundle.py); in
    # the run's Flower home, where the watchdog removes it after a kill -9 (simulations/watchdog.py)
    staged = stage_app(app_dir(), Path(home))
    config_file = Path(settings.runs_dir) / f".{settings.run_id}.run-config.toml"
    try:
        atomic_write_bytes(config_file, "".join(f"{k} = {toml_value(v)}\n"
                                                for k, v in {**settings.to_flower(), **control}.items()).encode())
    except FedrexError:
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise
    command = [str(bin_dir / "flwr"), "run", str(staged), "--run-config", str(config_file),
               "--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation.items()), "--stream"]
    start = time.time()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated run cleans up as an interrupted one
    # a kill -9 of this process skips the cleanup below: the watchdog (its own session) does it then
    watchdog = subprocess.Popen([sys.executable, "-m", "simulations.watchdog", str(os.getpid()), home, port],
                                cwd=app_dir(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True) if started_here else None
    interrupted = False
    try:
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as process:
            for line in process.stdout:
                if verbose or not line.strip() or not line.lstrip().startswith(FLOWER_NOISE):
                    if line.strip():
                        sys.stderr.write(line)
                        sys.stderr.flush()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        config_file.unlink(missing_ok=True)
        shutil.rmtree(staged.parent, ignore_errors=True)
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        if started_here:  # the managed SuperLink this call started, and the simulation processes it started
            # in sessions of their own (they name its address); a SuperLink the user started stays
            stop_simulation(home, port)
        # the ServerApp this call stopped could not say so (a SuperLink the user started runs on)
        if interrupted and started_here and (run_dir / "run.json").exists():
            from server.store import RunStore

            store = RunStore.open(run_dir)
            store.fail(f"interrupted (Ctrl-C or SIGTERM) after round {store.completed_rounds}; "
                       f"`fedrex simulate --resume {run_dir}` continues")
    store = check_finished(run_dir, settings, control, process.returncode)
    print(f"[fedrex] {store.completed_rounds}/{settings.num_rounds} rounds in {time.time() - start:.0f}s -> {run_dir}",
          file=sys.stderr)
    return run_dir


def superlink_env(settings: RunSettings) -> dict[str, str]:
    """Where this run's managed SuperLink lives: its FLWR_HOME (database, log) and its two ports
    (runtime HTTP API and Control API). Each run gets a home of its own under the runs folder and
    free ports, so simulations started side by side each get their own SuperLink instead of
    joining the first one's. A user who sets FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (and
    FLWR_LOCAL_CONTROL_API_PORT, FLWR_HOME) chooses them: a SuperLink already answering there is
    used, and left running."""
    chosen = {key: os.environ[key] for key in ("FLWR_HOME", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT",
                                                "FLWR_LOCAL_CONTROL_API_PORT") if os.environ.get(key)}
    http_port, control_port = free_ports(2)
    return {"FLWR_HOME": str(Path(settings.runs_dir) / ".flower" / settings.run_id),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            **chosen}


def check_finished(run_dir: Path, settings: RunSettings, control: dict, returncode: int):
    """The run's store if the simulation did all it was asked (every round, or up to --stop-after);
    else one error naming the cause. `flwr run --stream` exits 0 even when the ServerApp raised, so
    run.json decides: the ServerApp records ``failed`` and the reason before it dies, and a run
    that is still ``running`` or short of its rounds died without a word (it is marked failed)."""
    from server.store import RunStore

    if not (run_dir / "run.json").exists():
        raise FedrexError(f"the simulation ended (flwr exit code {returncode}) before creating {run_dir}/run.json; "
                          "run again with --verbose to see Flower's and Ray's logs")
    store = RunStore.open(run_dir)
    asked = settings.last_round(control)
    status = store.meta.get("status")
    if status == "failed":
        cause = store.meta.get("failure", "no reason recorded")
    elif returncode != 0 or status == "running" or store.completed_rounds < asked:
        cause = (f"the simulation ended (flwr exit code {returncode}, run.json status {status!r}) after round "
                 f"{store.completed_rounds} of {asked}")
        store.fail(cause)
    else:
        return store
    raise FedrexError(f"the run failed ({cause}); details in {run_dir}/events.jsonl (--verbose shows Flower's logs); "
                      f"{store.completed_rounds} rounds are saved: `fedrex simulate --resume {run_dir}` continues")


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
