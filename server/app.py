"""The FedREX ServerApp: distributes the distilled global model, runs the chosen Flower strategy,
and persists every client's metrics each round (resumable)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from models.artifact import load_artifact, resolve_artifact
from models.normalizer import FILE as NORMALIZER_FILE
from models.errors import FedrexError
from models.personalization import get_mode
from models.protocol import CONFIG, DEVICE, DEVICE_STATUSES, NORMALIZER, split_state
from models.run_settings import CONTROL_KEYS, RunSettings
from server.fleet import Fleet, assign_by_label, measure_ms_per_sample, parse_profile, profile_rows
from server.identity import Claim, settle_claims
from server.pool import UserGrid, query_messages, virtual_node
from server.recorder import Recorder
from server.store import RunStore
from server.strategy import ProgressGrid, make_strategy


def log(message: str) -> None:
    print(f"[server] {message}", file=sys.stderr, flush=True)


def start_folder(settings: RunSettings) -> Path:
    """The start artifact's folder: the one ``artifact`` names (a packaged name or a folder), or a
    quick distillation (cached) when it is empty."""
    if settings.artifact:
        return resolve_artifact(settings.artifact)
    from server.distill import DistillConfig, distill
    from models.datasets import cache_dir

    folder = cache_dir() / "artifacts" / f"{settings.distill_dataset}-quick-s{settings.seed}-L{settings.max_length}"
    if not (folder / "card.json").exists():
        log(f"no artifact given: distilling a quick global model on {settings.distill_dataset} into {folder}")
        distill(DistillConfig.quick(dataset=settings.distill_dataset, seed=settings.seed,
                                    max_length=settings.max_length), folder)
    return folder


def global_model(settings: RunSettings):
    return load_artifact(start_folder(settings))


def start_config(settings: RunSettings, network: dict) -> dict:
    """What every message's config carries besides the weights: the network, and the start
    artifact's word normaliser (its gzip'd word list) when the run puts it in front of the model.
    An artifact without one runs undefended, as it was built."""
    config = {"network": json.dumps(network)}
    path = start_folder(settings) / NORMALIZER_FILE
    if settings.normalizer and path.exists():
        config[NORMALIZER] = path.read_bytes()
    return config


def discover_clients(grid: Grid, settings: RunSettings, base_config: dict,
                     store: RunStore) -> tuple[dict, dict, dict, set, Grid]:
    """Ask every connected node who it is: node id -> partition id, partition id -> client id,
    partition id -> device profile (a dict; ``client/device.py``), the partition ids of
    simulated nodes (they read any partition: an evaluate message may carry several users), and
    the grid the strategy is to use (with ``simulation-nodes``, ``server.pool.UserGrid``: every
    user a virtual node). A node that cannot answer (its data file is malformed, say) takes no
    part, and the run's events.jsonl says why; the rest go on."""
    config = ConfigRecord(dict(base_config))
    messages = [Message(RecordDict({CONFIG: config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in sorted(grid.get_node_ids())]
    infos = _answers(grid.send_and_receive(messages, timeout=settings.round_timeout), store)
    # a simulation's nodes serve every user (simulation-nodes); devices, each its own user, never; nor
    # on a Ray cluster, where a user's saved state lies on the machine that served it last
    on_cluster = os.environ.get("RAY_ADDRESS", "local") not in ("", "local")
    if (settings.simulation_nodes and not on_cluster and infos
            and all(int(info.get("simulated", 0)) for info in infos.values())):
        pool = sorted(infos)
        num_users = int(infos[pool[0]]["num-users"])
        replies = grid.send_and_receive(query_messages(pool, num_users, config, MessageType.QUERY),
                                        timeout=settings.round_timeout)
        infos = {virtual_node(info["partition-id"]): info for info in _answers(replies, store, batched=True)}
        grid = UserGrid(grid, pool, [int(info["partition-id"]) for info in infos.values()])
        log(f"{len(infos)} users served by a pool of {len(pool)} simulated nodes")
        store.note(pool_nodes=len(pool))  # run.json says how the users were served
    partition_of, client_of, profiles, positive, simulated = {}, {}, {}, {}, set()
    claims = [Claim(node, int(info["partition-id"]), str(info["client-id"]), bool(int(info.get("simulated", 0))))
              for node, info in infos.items()]
    accepted, notes, binding = settle_claims(claims, {k: int(v) for k, v in store.meta.get("device_nodes", {}).items()})
    for claim, note in notes:  # a second claimant of a user, or a user's device under a new node id
        log(f"node {claim.node}: {note}")
        store.event(phase="query", node_id=claim.node, client_id=claim.client_id, error=note)
    if binding:
        store.note(device_nodes=binding)
    for claim in accepted:
        info, pid = infos[claim.node], claim.partition_id
        partition_of[claim.node] = pid
        client_of[pid] = claim.client_id
        if claim.simulated:
            simulated.add(pid)
        if DEVICE in info:
            profiles[pid] = parse_profile(str(info[DEVICE]))
            positive[pid] = float(info.get("train-positive", 0.0))
    if len(partition_of) < settings.min_train_clients:
        raise FedrexError(f"only {len(partition_of)} clients answered; min-train-clients is {settings.min_train_clients}")
    if settings.device_assign == "label":
        profiles = assign_by_label(profiles, positive)
    return partition_of, client_of, profiles, simulated, grid


def _answers(replies, store: RunStore, batched: bool = False):
    """The query replies' infos: node -> info, or (``batched``: replies naming their users) a list
    of infos; a node that failed is recorded and left out."""
    out = [] if batched else {}
    for msg in replies:
        if msg.has_error():
            log(f"node {msg.metadata.src_node_id} did not answer the query: {msg.error.reason}")
            store.event(phase="query", node_id=msg.metadata.src_node_id,
                        error=f"takes no part in this run: {msg.error.reason}")
        elif batched:
            out.extend(json.loads(str(msg.content.config_records["info"]["users"])))
        else:
            out[msg.metadata.src_node_id] = dict(msg.content.config_records["info"])
    return out


def onnx_devices(settings: RunSettings, model, profiles: dict, client_of: dict) -> tuple[set, bytes]:
    """The devices without torch (their profile's runtime) and, when there are any, the run's body
    exported once as ONNX int8 for them; such devices train only the head (mode head)."""
    onnx = {pid for pid, profile in profiles.items() if profile.get("runtime") == "onnx"}
    if not onnx:
        return set(), b""
    if settings.mode != "head":
        names = ", ".join(sorted(client_of[p] for p in onnx)[:3])
        raise FedrexError(f"{len(onnx)} devices have no torch ({names}...): they take part in mode=head runs only")
    import torch

    from models.export import body_onnx_int8

    body = body_onnx_int8(model, torch.full((2, 8), 1996, dtype=torch.int64))  # any ids: shapes are dynamic
    log(f"{len(onnx)} devices without torch get the body as ONNX int8 ({len(body) / 1024:.0f} KB)")
    return onnx, body


def start_fleet(settings: RunSettings, store: RunStore, model, profiles: dict) -> Fleet:
    """The round rules and virtual clock; the reference ms per sample is measured once per run
    (or given) and kept in run.json, and a resumed run continues the clock where it stopped."""
    fleet = Fleet(profiles, settings, 0.0)
    if not fleet.enabled:
        return fleet
    train = settings.device_ms_per_sample or store.meta.get("device_ms_per_sample")
    share = store.meta.get("device_forward_share")  # a forward pass alone, as a share of a training sample
    if not train or share is None:
        measured = measure_ms_per_sample(model, settings)
        share = measured["forward"] / measured["train"] if share is None else share
        if not train:
            train = measured["train"]
            log(f"device reference: {train:.3f} ms per training sample (a forward pass alone: {share:.2f} of it) "
                "on one thread of this machine")
    store.note(device_ms_per_sample=float(train), device_forward_share=float(share))
    fleet.ms_per_sample, fleet.ms_per_forward = float(train), float(train) * float(share)
    rounds = store.read_rounds()
    # rows of a round after the committed one (a crash between rounds.parquet and run.json) do not count
    clock = rounds[(rounds["model"] == "round") & (rounds["metric"] == "virtual_clock_s")
                   & (rounds["round"] <= store.completed_rounds)]
    fleet.clock = float(clock.sort_values("round")["value"].iloc[-1]) if len(clock) else 0.0
    fleet.dropped_in = dropped_devices(store)
    return fleet


def dropped_devices(store: RunStore) -> dict[int, int]:
    """Partition id -> round, for devices whose last training round (up to the committed one) ended
    ``dropped``: a resumed run still tells them to drop what they computed there."""
    clients = store.read_parts(upto=store.completed_rounds)
    status = clients[(clients["model"] == DEVICE) & (clients["metric"] == "status")
                     & (clients["value"] != DEVICE_STATUSES.index("unavailable"))]
    last = status.sort_values("round").groupby("partition_id").tail(1)
    dropped = last[last["value"] == DEVICE_STATUSES.index("dropped")]
    return {int(pid): int(rnd) for pid, rnd in zip(dropped["partition_id"], dropped["round"])}


def open_store(settings: RunSettings, control: dict) -> tuple[RunStore, int]:
    identity = settings.to_flower()
    if control.get("resume"):
        store = RunStore.open(Path(str(control["resume"])))
        store.resume()
        return store, store.completed_rounds
    return RunStore.create(Path(settings.runs_dir), identity, settings.run_id), 0


def run_federated(grid: Grid, settings: RunSettings, control: dict | None = None) -> RunStore:
    """Run (or resume) the federation. Whatever stops it early is recorded in run.json (``failed``,
    with the reason) before it propagates, for `fedrex simulate` and `flwr run .` alike."""
    control = control or {}
    store, offset = open_store(settings, control)
    if control.get("resume") and settings.crash_server_round:  # a drill fires once: the resume runs on
        log(f"crash-server-round={settings.crash_server_round} was a drill of the first attempt: this resume runs on")
        settings = settings.replace(crash_server_round=0)
    try:
        return _run_rounds(grid, settings, control, store, offset)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        store.fail(f"round {store.completed_rounds + 1}: {reason}", traceback=traceback.format_exc())
        raise


def _run_rounds(grid: Grid, settings: RunSettings, control: dict, store: RunStore, offset: int) -> RunStore:
    if offset >= settings.num_rounds:
        log(f"{store.folder} already completed {offset} rounds")
        store.finish()
        return store
    store.progress(offset, "starting")  # a resumed run's progress.json no longer shows the dead run's phase
    model, config = global_model(settings)
    network = config["network"]
    store.meta["network"] = network
    shared_keys = get_mode(settings.mode).shared_keys(model)
    start_shared = split_state(model.state_dict(), shared_keys)[0]  # round 0's: the explanation anchor
    resumed = store.has_checkpoint(offset)
    if offset > 0 and not resumed:  # never a silent restart from the start model under a resumed run's name
        raise FedrexError(f"{store.folder}/run.json counts {offset} completed rounds but "
                          f"{store.checkpoint_path(offset)} is missing: the run cannot be resumed from it")
    current = store.load_checkpoint(offset) if resumed else model.state_dict()
    current = {k: current[k] for k in model.state_dict()}  # the model's order, whatever the file's
    shared, frozen = split_state(current, shared_keys)
    log(f"run {store.run_id}: {settings.strategy}, mode {settings.mode}, rounds {offset + 1}..{settings.num_rounds}"
        f" -> {store.folder} ({len(shared)} shared tensors, {len(frozen)} kept as the artifact defines them)")
    # run-id: a device keys its saved state by it (client/app.py state_folder), from the query on
    base_config = {**start_config(settings, network), "run-id": store.run_id}
    store.meta["normalizer_bytes"] = len(base_config.get(NORMALIZER, b""))  # run.json says what defended the run
    if NORMALIZER in base_config:
        log(f"every client puts the start model's word normaliser in front of it ({len(base_config[NORMALIZER]) / 1024:.0f} KB)")
    elif settings.normalizer:
        log("the start artifact ships no word normaliser: every client serves the bare model")
    partition_of, client_of, profiles, simulated, grid = discover_clients(grid, settings, base_config, store)
    recorder = Recorder(store, settings, offset, partition_of, client_of, frozen)
    fleet = start_fleet(settings, store, model, profiles)
    if fleet.enabled and offset == 0:
        recorder.profile_rows({pid: profile_rows(p) for pid, p in profiles.items()})
    onnx_partitions, onnx_body = onnx_devices(settings, model, profiles, client_of)
    strategy = make_strategy(settings, recorder, frozen, fleet, onnx_partitions, onnx_body, start_shared,
                             batchable=frozenset() if fleet.enabled else frozenset(simulated) - set(onnx_partitions))
    if resumed:  # FedAvgM's momentum, FedAdam's moments: as they were after round `offset`
        strategy.load_optimizer_state(store.load_server_state(offset), list(shared))
    progress_grid = ProgressGrid(grid, show=recorder.show_progress)
    last = settings.last_round(control)
    round_config = {**base_config, "run-dir": str(store.folder.resolve())}
    if offset == 0 and settings.fraction_evaluate > 0:  # round 0: every user's start, before any training
        replies = progress_grid.send_and_receive(
            strategy.configure_evaluate(0, ArrayRecord(shared), ConfigRecord(dict(round_config)), grid),
            timeout=settings.round_timeout)
        strategy.aggregate_evaluate(0, replies)
        recorder.commit_round(0, ArrayRecord(shared))
    strategy.start(grid=progress_grid, initial_arrays=ArrayRecord(shared),
                   num_rounds=last - offset, timeout=settings.round_timeout,
                   train_config=ConfigRecord(dict(round_config)), evaluate_config=ConfigRecord(dict(round_config)),
                   evaluate_fn=recorder.commit)
    if store.completed_rounds < last:  # Flower's loop ended without committing every round it was asked for
        raise FedrexError(f"the strategy's loop ended after round {store.completed_rounds} of {last}")
    store.finish("completed" if store.completed_rounds >= settings.num_rounds else "stopped")
    log(f"run {store.run_id}: {store.completed_rounds}/{settings.num_rounds} rounds done, outputs in {store.folder}")
    return store


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run` (and `fedrex simulate`, which calls it) hands the run config: the settings plus
    the run controls (CONTROL_KEYS), which are not part of a run's identity."""
    settings = RunSettings.from_flower(context.run_config)
    run_federated(grid, settings, {k: context.run_config[k] for k in CONTROL_KEYS if k in context.run_config})
