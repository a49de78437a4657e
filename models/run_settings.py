"""The settings of a federated run, shared by the ServerApp and the ClientApp.

``RunSettings``' defaults are the one source of every default: they are the main job
(`fedrex run`), pyproject.toml's ``[tool.flwr.app.config]`` repeats them for `flwr run .` (a test
keeps the two equal), and a TOML file or ``--run-config k=v`` only overrides. Flower hands both
apps a flat ``run_config`` (hyphenated keys); ``RunSettings.from_flower`` parses and validates it
once, with one clear error per bad key, through ``parse_value``, the one key=value parser (the
distillation's ``--set`` uses it too). It lives in ``models/`` because both apps import it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from dataclasses import dataclass

from models.errors import FedrexError
from models.personalization import MODES
from models.protocol import EVALUATE_BETWEEN, EXPL_ANCHORS, FAULTS, PERTURBATIONS, POISONINGS, check_attacks
from models.training_config import ADV_SPACES, OPTIMIZERS, ObjectiveConfig


def new_run_id() -> str:
    """A run's id: when it started (UTC) and 6 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
KRUM_FAMILY = ("krum", "multikrum", "bulyan")  # strategies told how many Byzantine replies to expect
# how a strategy that averages weighs each reply (aggregate-weights): by its training rows (Flower's
# default) or each user the same, so a user with many rows cannot outweigh the others
AGGREGATE_WEIGHTS = ("examples", "uniform")
PROXIMAL_STRATEGIES = ("fedprox",)  # strategies whose clients add the proximal term
# run controls: in the run config (pyproject lists them, so `flwr run` accepts them) but not
# settings and not part of a run's identity; the ServerApp reads them
CONTROL_KEYS = ("resume", "stop-after")
DEVICE_ASSIGNMENTS = ("random", "label")  # device-assign (server.fleet.assign_by_label)


@dataclass(frozen=True)
class RunSettings:
    # data and partitioning
    dataset: str = "rt_critics"
    data_dir: str = ""
    partitioner: str = "natural"
    num_partitions: int = 0
    alpha: float = 0.5
    min_samples: int = 0
    bootstrap_rows: int = 10  # partitioner bootstrap (synthetic users, a load test): rows each user draws
    test_fraction: float = 0.2
    seed: int = 0
    max_length: int = 64
    # global model: a packaged artifact name (models/artifacts/<name>) or folder; "" = distill a
    # quick one (cached) on distill-dataset
    artifact: str = "sst2-student"
    distill_dataset: str = "sst2"
    # the start artifact's word normaliser (when it ships one) in front of the model on every client:
    # training, evaluation and the attacks all see normalised text (the defended device package)
    normalizer: bool = True
    # federation
    strategy: str = "fedavg"
    num_rounds: int = 10  # the benchmark sweep: 3 rounds barely move the global model, 10 do
    fraction_train: float = 0.2
    min_train_clients: int = 2
    fraction_evaluate: float = 1.0
    evaluate_every: int = 5  # evaluation costs ~10x a training round; round 0 and the last always run
    # what the evaluations between round 0 and the last measure: "clean" accuracy alone (a learning
    # curve at a fifth of the cost: attacks and fidelity are four fifths of an evaluation) or "full"
    evaluate_between: str = "clean"
    proximal_mu: float = 0.01
    server_lr: float = 0.01  # fedadam's eta
    server_momentum: float = 0.9  # fedavgm's momentum (server learning rate 1)
    trimmed_beta: float = 0.2
    krum_byzantine: int = 1  # Byzantine replies per round the Krum family (KRUM_FAMILY) expects
    multikrum_select: int = 0  # replies multikrum averages; 0: the round's replies minus krum-byzantine
    # bound each user's influence before aggregation: every training reply's update (reply - sent,
    # L2 norm over the shared tensors) is scaled down to at most update-clip x the median norm of
    # the round's aggregated replies (0: off); a boosted or scaled update then counts as a typical one
    update_clip: float = 0.0
    aggregate_weights: str = "examples"  # AGGREGATE_WEIGHTS
    round_timeout: float = 600.0
    # simulation engine: CPU cores Ray reserves per client actor (actors = cores / client-cpus)
    # and torch threads each client uses
    client_cpus: int = 1  # whole cores: the supported simulation path (flwr run) reserves integers
    client_threads: int = 1
    # users one evaluation message carries in simulation (models.protocol.USERS): each
    # message costs the engine far more than a user's forward passes, so 0 (auto) spreads the
    # evaluated users over 4 messages per concurrent client worker; 1: a message per user, as a
    # fleet of devices gets (and does always: device files, device simulation, ONNX devices)
    evaluate_batch: int = 0
    # simulated SuperNodes: N > 0, a pool of N nodes serving every user, each message naming the user
    # it is for (models.protocol.USERS), so registering, discovering and polling cost what N nodes
    # cost, not what every user does (benchmarks/simulation.py: 8 keep two client actors busy); 0,
    # one node per user (every user a node, as in a fleet of devices)
    simulation_nodes: int = 8
    # local training
    local_epochs: float = 1.0
    local_max_steps: int = 30
    batch_size: int = 16
    lr: float = 3e-3  # the benchmark sweep: +1.6 points pooled over 1e-3 on critics after 10 rounds
    client_optimizer: str = "adamw"  # of the shared weights: "adamw" or "sgd" (fresh every round)
    balanced_loss: bool = False  # logit-adjusted CE against each client's own label prior
    # adversarial hardening and explanation preservation
    adv_weight: float = 0.5
    adv_ratio: float = 0.5
    adv_epsilon: float = 0.1
    adv_steps: int = 2
    # where the hardening's adversary searches (models.training_config.ADV_SPACES): "ball", PGD in
    # an L2 ball around each token's vector; "synonyms", ASCC in the convex hull of the vectors of
    # each word and its WordNet synonyms (models.robust.synonym_hull)
    adv_space: str = "ball"
    expl_weight: float = 0.0
    expl_erasure: float = 0.0  # erasure-consistency term (models.objectives.erasure_loss), same anchor
    expl_anchor: str = "start"  # whose saliency maps the explanation term keeps (models.protocol.EXPL_ANCHORS)
    # distillation from the start model on the client's own rows (Learning without Forgetting):
    # the global model keeps the start's answers where the client's labels do not pull it away
    start_kd: float = 0.0
    # perturbed-text hardening: each local epoch this share of the client's training rows is
    # replaced by a copy with the attacks' own edits (models.augment), drawn fresh every round
    perturb_share: float = 0.0
    perturb_kinds: str = "char,synonym"  # comma-separated transformations of models.augment
    # share of a perturbed row's words edited (stopwords aside); 0: the attacks' own word budget.
    # More than the budget trains on heavier copies than any attack makes (SAFER-style)
    perturb_words: float = 0.0
    # differential privacy (Opacus DP-SGD on the update that leaves the device)
    dp: bool = False
    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0  # > 0: pick the noise multiplier for this budget over all rounds
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    # simulation only: seed the DP noise from (seed, round, partition) so a run can be replayed; off,
    # the noise comes from OS entropy the server cannot know. Refused on real devices.
    dp_reproducible_noise: bool = False
    # personalization
    mode: str = "finetune"
    personal_epochs: float = 1.0
    personal_lr: float = 1e-3  # learning rate of weights that stay on the device (fine-tunes, heads, ditto)
    ditto_lambda: float = 0.1
    prior_l2: float = 1.0  # mode prior: L2 weight on the per-user logit bias
    holdout: float = 0.25  # modes mix/select: share of a user's training rows held in for validation
    # per-client evaluation
    attack_examples: int = 10
    attack_budget: float = 0.2
    client_attacks: str = "char"  # comma-separated recipes of models.attacks (char, synonym, char-beam, ...)
    fidelity_examples: int = 10
    ig_steps: int = 8
    # bookkeeping
    runs_dir: str = "runs"
    run_id: str = ""
    # simulated devices (client/device.py, server/fleet.py): built-in tiers drawn per client
    # ("flagship=0.3,low-end=0.5,rpi4=0.2") or a FedScale trace folder; "" = every client an ideal
    # device (instant, always available), the plain simulation
    device_mix: str = ""
    device_trace: str = ""
    # who gets which device: "random" (drawn per client) or "label" (the same devices re-dealt,
    # slowest to the users with the fewest positive rows: slow tiers hold different users)
    device_assign: str = "random"
    device_ms_per_sample: float = 0.0  # the reference device's training cost; 0 = measure once per run
    device_min_memory_mb: float = 0.0  # eligibility (Bonawitz et al. 2019 ask for >= 2048)
    over_selection: float = 1.3  # select this many times the round's goal count (Bonawitz et al. 2019)
    round_deadline: float = 0.0  # virtual seconds; later reports are stragglers; 0 = no deadline
    min_report_share: float = 0.8  # fewer ok reports than this share of the goal: the round is abandoned
    # failure drills: comma-separated partition ids whose device raises in train (client/device.py)
    crash_clients: str = ""
    # poisoned clients (simulation): this share of all users, drawn from the seed, are malicious and
    # do poison-kind (models.protocol.POISONINGS) in every round they train; poison-boost scales a
    # sign-flip's or scale's update; backdoor: the trigger word, prefixed to half of the client's
    # rows, teaches backdoor-target (benign users' rows measure its success)
    malicious_fraction: float = 0.0
    poison_kind: str = "label-flip"
    poison_boost: float = 10.0
    backdoor_trigger: str = "cf"
    backdoor_target: int = 1
    # fault injection: "kind=rate,..." (kinds: models.protocol.FAULTS); each training client draws at
    # most one fault per round from (seed, round, partition), so a run's faults are reproducible
    fault_rates: str = ""
    # failure drill: the ServerApp raises when this round starts (0: never), as a crashed strategy would
    crash_server_round: int = 0
    # comma-separated partition ids whose simulated device has no torch: ONNX body + numpy head
    # (client/onnx_client.py; mode head only)
    onnx_clients: str = ""

    def last_round(self, control: dict) -> int:
        """The round a run (or resume) with these run controls is asked to end at: all of them, or
        ``stop-after``'s (a global round number)."""
        stop_after = int(control.get("stop-after") or 0)
        return min(self.num_rounds, stop_after) if stop_after else self.num_rounds

    def attacks(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.client_attacks.split(",") if a.strip())

    def faults(self) -> dict[str, float]:
        """``fault-rates`` as {kind: rate}; one clear error for a malformed value."""
        rates = {}
        for part in (p.strip() for p in self.fault_rates.split(",") if p.strip()):
            kind, _, rate = part.partition("=")
            if kind.strip() in rates:
                raise FedrexError(f"fault-rates names {kind.strip()!r} twice")
            try:
                rates[kind.strip()] = float(rate)
            except ValueError:
                raise FedrexError(f"fault-rates: {part!r} is not kind=rate") from None
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise FedrexError(f"fault-rates: unknown fault {sorted(unknown)[0]!r}; faults: {', '.join(FAULTS)}")
        if any(not 0 <= r <= 1 for r in rates.values()) or sum(rates.values()) > 1:
            raise FedrexError(f"fault-rates: each rate must be in [0, 1] and they must sum to <= 1, got {self.fault_rates!r}")
        return rates

    def searches_synonym_hull(self) -> bool:
        """Whether the hardening's adversary mixes each token with its synonyms (ASCC): it needs
        WordNet and each batch's candidates (``models.robust.synonym_hull``)."""
        return self.adv_weight > 0 and self.adv_space == "synonyms"

    def perturbations(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.perturb_kinds.split(",") if k.strip())

    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_flower(cls, run_config: dict) -> "RunSettings":
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, raw in run_config.items():
            if key in CONTROL_KEYS:
                continue
            name = key.replace("-", "_")
            if name not in known:
                valid = ", ".join(sorted(k.replace("_", "-") for k in known))
                raise FedrexError(f"unknown run-config key {key!r}; valid keys: {valid}")
            values[name] = parse_value(raw, known[name].default, f"run-config {key}")
        settings = cls(**values)
        settings.validate()
        return settings

    def to_flower(self) -> dict:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "RunSettings":
        return dataclasses.replace(self, **changes)

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(adv=self.adv_weight, kd=self.start_kd, expl=self.expl_weight, erasure=self.expl_erasure,
                               adv_ratio=self.adv_ratio,
                               adv_epsilon=self.adv_epsilon, adv_steps=self.adv_steps)

    def validate(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (self.aggregate_weights in AGGREGATE_WEIGHTS,
             f"aggregate-weights must be one of {', '.join(AGGREGATE_WEIGHTS)}, got {self.aggregate_weights!r}"),
            (0 <= self.update_clip < float("inf") and self.krum_byzantine >= 0 and self.multikrum_select >= 0,
             "update-clip must be finite and >= 0, krum-byzantine and multikrum-select >= 0"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.client_optimizer in OPTIMIZERS,
             f"client-optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.client_optimizer!r}"),
            (self.num_rounds >= 1, f"num-rounds must be >= 1, got {self.num_rounds}"),
            (0 < self.fraction_train <= 1, f"fraction-train must be in (0, 1], got {self.fraction_train}"),
            (0 <= self.fraction_evaluate <= 1, f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}"),
            (self.evaluate_every >= 1, f"evaluate-every must be >= 1, got {self.evaluate_every}"),
            (self.evaluate_between in EVALUATE_BETWEEN,
             f"evaluate-between must be one of {', '.join(EVALUATE_BETWEEN)}, got {self.evaluate_between!r}"),
            (self.min_train_clients >= 1, "min-train-clients must be >= 1"),
            (self.client_cpus >= 1 and self.client_threads >= 1, "client-cpus and client-threads must be >= 1"),
            (self.evaluate_batch >= 0, f"evaluate-batch must be >= 0 (0: auto), got {self.evaluate_batch}"),
            (self.simulation_nodes >= 0,
             f"simulation-nodes must be >= 0 (0: a node per user), got {self.simulation_nodes}"),
            (self.local_epochs > 0 and self.local_max_steps >= 1, "local-epochs must be > 0 and local-max-steps >= 1"),
            # lr = 0 is allowed: a round that cannot learn must return the model bit for bit (a drill)
            (self.batch_size >= 1 and self.lr >= 0 and self.personal_lr >= 0,
             "batch-size must be >= 1, lr and personal-lr >= 0"),
            (self.prior_l2 > 0 and 0 < self.holdout < 1, "prior-l2 must be > 0 and holdout in (0, 1)"),
            (not self.dp or self.noise_multiplier > 0 or self.target_epsilon > 0,
             "dp needs noise-multiplier > 0 or target-epsilon > 0"),
            (self.max_grad_norm > 0 and 0 < self.delta < 1, "max-grad-norm must be > 0 and delta in (0, 1)"),
            (not (self.dp and self.strategy in PROXIMAL_STRATEGIES),
             f"dp with strategy {self.strategy} is not supported: its proximal term has no per-sample gradients, "
             "so DP-SGD would silently drop it"),
            (not (self.dp and self.expl_weight > 0),
             "dp with expl-weight > 0 is not supported (Opacus cannot take per-sample gradients of a gradient)"),
            (not (self.dp and self.expl_erasure > 0),
             "dp with expl-erasure > 0 is not supported (DP-SGD clips one forward pass per sample; the term adds another)"),
            (self.expl_erasure >= 0 and self.start_kd >= 0, "expl-erasure and start-kd must be >= 0"),
            (not (self.dp and self.start_kd > 0),
             "dp with start-kd > 0 is not supported (DP-SGD's Poisson batches carry no start-model answers)"),
            (self.expl_anchor in EXPL_ANCHORS,
             f"expl-anchor must be one of {', '.join(EXPL_ANCHORS)}, got {self.expl_anchor!r}"),
            (0 < self.attack_budget <= 1, f"attack-budget must be in (0, 1], got {self.attack_budget}"),
            (self.attack_examples >= 0 and self.fidelity_examples >= 0, "attack/fidelity examples must be >= 0"),
            (0 <= self.perturb_share <= 1, f"perturb-share must be in [0, 1], got {self.perturb_share}"),
            (0 <= self.perturb_words <= 1, f"perturb-words must be in [0, 1], got {self.perturb_words}"),
            (self.adv_space in ADV_SPACES, f"adv-space must be one of {', '.join(ADV_SPACES)}, got {self.adv_space!r}"),
            (not (self.dp and self.searches_synonym_hull()),
             "dp with adv-space synonyms is not supported (Opacus clips one embedding lookup per token)"),
            (not (self.dp and self.perturb_share > 0),
             "dp with perturb-share > 0 is not supported (DP-SGD samples fixed rows; perturbed rows change every epoch)"),
            (self.perturb_share == 0 or (self.perturbations() and set(self.perturbations()) <= set(PERTURBATIONS)),
             f"perturb-kinds must name some of {', '.join(PERTURBATIONS)}, got {self.perturb_kinds!r}"),
            (bool(self.faults()) or not self.fault_rates.strip(), "fault-rates names no fault"),
            (0 <= self.malicious_fraction < 1, f"malicious-fraction must be in [0, 1), got {self.malicious_fraction}"),
            (self.poison_kind in POISONINGS,
             f"poison-kind must be one of {', '.join(POISONINGS)}, got {self.poison_kind!r}"),
            (self.poison_boost > 0 and self.backdoor_trigger.strip() != "" and self.backdoor_target >= 0,
             "poison-boost must be > 0, backdoor-trigger a word and backdoor-target a label"),
            (not (self.malicious_fraction > 0 and self.onnx_clients),
             "malicious-fraction with onnx-clients is not supported (poisoning runs on the torch path)"),
            (not (self.device_mix and self.device_trace), "give device-mix or device-trace, not both"),
            (self.device_assign in DEVICE_ASSIGNMENTS,
             f"device-assign must be one of {', '.join(DEVICE_ASSIGNMENTS)}, got {self.device_assign!r}"),
            (self.over_selection >= 1, f"over-selection must be >= 1, got {self.over_selection}"),
            (self.round_deadline >= 0 and self.device_ms_per_sample >= 0 and self.device_min_memory_mb >= 0,
             "round-deadline, device-ms-per-sample and device-min-memory-mb must be >= 0"),
            (0 < self.min_report_share <= 1, f"min-report-share must be in (0, 1], got {self.min_report_share}"),
            (not self.onnx_clients or self.mode == "head",
             f"onnx-clients take part in mode=head runs only (a device without torch trains the head); "
             f"mode is {self.mode}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FedrexError(message)
        if self.attack_examples > 0:
            if not check_attacks(self.attacks()):
                raise FedrexError("client-attacks names no attack; set attack-examples=0 to measure none")
        wanted = [(self.dp, "dp", "supports_dp"),
                  (self.strategy in PROXIMAL_STRATEGIES, f"strategy {self.strategy} (proximal term)",
                   "supports_proximal"),
                  (self.adv_weight > 0, "adv-weight > 0 (hardening)", "supports_hardening"),
                  (self.perturb_share > 0, "perturb-share > 0 (hardening)", "supports_hardening"),
                  # terms of the torch shared update, as hardening is (mode head trains a numpy head)
                  (self.expl_weight > 0 or self.expl_erasure > 0 or self.start_kd > 0,
                   "expl-weight, expl-erasure or start-kd > 0 (terms of the shared update's loss)", "supports_hardening")]
        for asked, what, capability in wanted:
            if asked and not getattr(MODES[self.mode], capability):
                able = ", ".join(n for n, m in MODES.items() if getattr(m, capability))
                raise FedrexError(f"mode {self.mode} does not support {what}; modes that do: {able}")
        self.objective().validate()


def parse_value(raw, default, key: str):
    """``raw`` (a string from the command line, or a TOML/Flower value) as the type of ``default``:
    bool, int, float, str, a tuple of str (comma-separated), or None for "none" where the default
    is None. One clear error otherwise."""
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes", "on"):
                return True
            if str(raw).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int) and not isinstance(raw, bool):
            as_float = float(raw)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if isinstance(default, float) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in str(raw).split(",") if part.strip())
        if default is None:
            return None if str(raw).lower() == "none" else raw
        if isinstance(default, str):
            return str(raw)
    except (TypeError, ValueError):
        pass
    raise FedrexError(f"{key}={raw!r}: expected {type(default).__name__}")


def split_pairs(pairs: list[str], what: str = "--run-config") -> dict:
    """``["key=value", ...]`` -> {key: value-string}; quotes around a value are dropped."""
    values = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise FedrexError(f"{what} {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        values[key.strip()] = raw.strip().strip('"')
    return values
