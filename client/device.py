"""Device profiles: what kind of machine each client is, for the simulation's virtual clock.

A profile says how fast a device trains (``slowdown``: its milliseconds per training sample as a
multiple of the reference, one core of the machine running the simulation, measured once per run
for the run's model), how fast it talks (download/upload kbit/s and a round-trip latency), how
much memory it has, how often it walks away mid-round (``dropout``, per round), and when it may
take part at all (``active``: [start, end) windows in seconds of a repeating ``period_s``, as
FedScale's availability traces have them). The server turns profiles into virtual round times and
statuses (``server/fleet.py``); profiles travel to it as plain dicts (``as_record``) in the reply
to the query message, so the server needs nothing from this module.

Where profiles come from (``profile_for``), first match wins:
1. ``device-trace``: FedScale's published formats (``client_device_capacity``, optionally
   ``client_behave_trace`` beside it), as pickles or their JSON conversion. Pickles are read by
   an unpickler that refuses every class (only dicts, lists, strings and numbers load), so a trace
   file cannot run code.
2. ``device-mix``: built-in tiers drawn per client with (seed, partition id), e.g.
   ``flagship=0.3,low-end=0.5,rpi4=0.2``.
3. Neither: the ideal device of a plain simulation (instant, always available, never drops out).

``crash-clients`` (a failure drill) is a property of the device too: such a device raises in train.
So is its runtime: ``torch`` where torch is installed, else ``onnx`` (body under onnxruntime, head
in numpy: ``client/onnx_client.py``); ``onnx-clients`` makes simulated devices take the ONNX path
and a real device may say ``runtime`` in its node config.
Imports: the standard library and numpy only, so a real device can import this module.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import pickle
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.errors import FedrexError
from models.protocol import RUNTIMES

DAY_S = 86_400.0


@dataclass(frozen=True)
class Tier:
    """A kind of device; per-client values are drawn around these (see ``draw``)."""

    slowdown: float  # ms per training sample / the reference's
    down_kbps: float
    up_kbps: float
    latency_s: float
    memory_mb: float
    dropout: float  # chance per round that the device leaves mid-round (user picks up the phone)
    window_start_h: float  # availability: a daily window (charging, idle, on Wi-Fi) starting here...
    window_hours: tuple[float, float]  # ...lasting between these many hours; (24, 24) = always on
    source: str


# The anchor (slowdown 1 = one core of the simulating machine ~ one flagship-phone core) is an
# assumption, not a measurement; the ratios between tiers and the other figures are sourced or
# labelled as round assumptions. A FedScale trace replaces all of them with measured ones.
TIERS: dict[str, Tier] = {
    "flagship": Tier(
        slowdown=1.0, down_kbps=50_000, up_kbps=15_000, latency_s=0.05, memory_mb=6_144, dropout=0.06,
        window_start_h=23.0, window_hours=(5.0, 9.0),
        source="anchor (assumption): one core of the simulating machine. Dropout 6%: Bonawitz et al. 2019 "
               "(6-10% of selected devices drop out). Window: available while charging, idle and on Wi-Fi, "
               "mostly at night (Bonawitz et al. 2019; FLASH trace, Yang et al.). Bandwidth: round Wi-Fi figures "
               "(assumption)."),
    "low-end": Tier(
        slowdown=3.8, down_kbps=10_000, up_kbps=2_000, latency_s=0.15, memory_mb=2_048, dropout=0.10,
        window_start_h=23.5, window_hours=(3.0, 7.0),
        source="slowdown 3.8 = MobileNet 1.0 float, 1 thread, Pixel 2 123.3 ms / iPhone 8 32.2 ms (TensorFlow Lite "
               "performance benchmarks page). Dropout 10%: the top of Bonawitz et al.'s 6-10%. Memory 2 GB: "
               "Bonawitz et al.'s eligibility floor. Bandwidth: round LTE figures (assumption)."),
    "rpi4": Tier(
        slowdown=6.0, down_kbps=100_000, up_kbps=50_000, latency_s=0.02, memory_mb=1_024, dropout=0.02,
        window_start_h=0.0, window_hours=(24.0, 24.0),
        source="slowdown 6 (assumption): a Cortex-A72 core at 1.5 GHz, Geekbench 596 against 7,401 for an Apple "
               "M1 core (12x, forum figures quoted on pgmusic.com), taken as half as fast as a flagship core. "
               "Memory 1 GB: the smallest Raspberry Pi 4. Always on, wired Ethernet (assumption)."),
}

IDEAL = {"tier": "ideal", "slowdown": 0.0, "down_kbps": math.inf, "up_kbps": math.inf, "latency_s": 0.0,
         "memory_mb": math.inf, "dropout": 0.0, "period_s": DAY_S, "active": [[0.0, DAY_S]]}


@dataclass
class DeviceProfile:
    tier: str
    slowdown: float
    down_kbps: float
    up_kbps: float
    latency_s: float
    memory_mb: float
    dropout: float
    period_s: float = DAY_S
    active: list = field(default_factory=lambda: [[0.0, DAY_S]])
    crashes: bool = False  # failure drill (crash-clients): raises in train
    runtime: str = "torch"  # models.protocol.RUNTIMES

    def as_record(self) -> str:
        """The profile as the server receives it (JSON; infinities as null)."""
        values = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}
        return json.dumps(values)

    @classmethod
    def from_record(cls, text: str) -> "DeviceProfile":
        values = json.loads(text)
        return cls(**{k: (math.inf if v is None else v) for k, v in values.items()})


def parse_mix(text: str) -> dict[str, float]:
    """``flagship=0.3,low-end=0.7`` -> normalised shares; one clear error per mistake."""
    shares = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, share = part.partition("=")
        name = name.strip()
        if name not in TIERS:
            raise FedrexError(f"device-mix: unknown tier {name!r}; tiers: {', '.join(TIERS)}")
        try:
            shares[name] = float(share) if share else 1.0
        except ValueError:
            raise FedrexError(f"device-mix: {part!r} is not tier=share") from None
        if shares[name] < 0:
            raise FedrexError(f"device-mix: share of {name} is negative")
    total = sum(shares.values())
    if not shares or total <= 0:
        raise FedrexError("device-mix names no tier with a positive share")
    return {k: v / total for k, v in shares.items()}


def draw(tier_name: str, rng: np.random.Generator) -> DeviceProfile:
    """One device of a tier: speed with lognormal spread (sigma 0.25, as FedScale's lognormal
    completion-time model has it), its own daily window."""
    tier = TIERS[tier_name]
    slowdown = tier.slowdown * float(rng.lognormal(0.0, 0.25))
    low, high = tier.window_hours
    hours = float(rng.uniform(low, high))
    if hours >= 24:
        active = [[0.0, DAY_S]]
    else:
        start = ((tier.window_start_h + float(rng.normal(0.0, 1.5))) % 24) * 3600
        end = start + hours * 3600
        active = [[start, end]] if end <= DAY_S else [[0.0, end - DAY_S], [start, DAY_S]]
    return DeviceProfile(tier_name, slowdown, tier.down_kbps, tier.up_kbps, tier.latency_s, tier.memory_mb,
                         tier.dropout, DAY_S, active)


# ----------------------------------------------------------------------------- FedScale traces
class _DataOnlyUnpickler(pickle.Unpickler):
    """Loads dicts, lists, tuples, strings and numbers; refuses any class or function, so a
    trace file cannot make the loader run code."""

    def find_class(self, module, name):
        raise FedrexError(f"the trace pickle asks for {module}.{name}: only plain dicts, lists, strings and "
                          "numbers are accepted (convert it to JSON)")


def load_trace_file(path: Path):
    """A FedScale trace as plain data: JSON, or a pickle read with the data-only unpickler."""
    data = Path(path).read_bytes()
    if data[:1] in (b"{", b"["):
        return json.loads(data)
    try:
        return _DataOnlyUnpickler(io.BytesIO(data)).load()
    except FedrexError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise FedrexError(f"{path}: neither JSON nor a readable pickle ({err})") from None


def _trace_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".json", stem + ".pkl", stem + ".pickle"):
        if (folder / name).exists():
            return folder / name
    return None


FEDSCALE_KBIT = 1024 / 1000  # FedScale's kbit in FedREX's (1,000-bit) kbit


@lru_cache(maxsize=2)
def fedscale_profiles(location: str) -> list[DeviceProfile]:
    """Profiles from FedScale's files: ``client_device_capacity`` ({client: {'computation': ms per
    sample, 'communication': kbit/s}}) and, when present, ``client_behave_trace`` ({client:
    {'active': [s], 'inactive': [s], 'finish_time': s, ...}}), in client-id order. ``location`` is
    the folder holding them or the capacity file itself.

    FedScale's computation figure is inference latency of its own models; its median device is
    taken as the reference (slowdown = computation / median), so the trace sets the spread of
    speeds and the run's measured reference sets the scale. One bandwidth serves both directions.
    FedScale sizes updates in kbit of 1,024 bits (its aggregator: bytes / 1024 x 8), so its
    'communication' figure is converted to FedREX's kbit/s of 1,000 bits (x 1.024)."""
    where = Path(location)
    capacity_path = where if where.is_file() else _trace_path(where, "client_device_capacity")
    if capacity_path is None:
        raise FedrexError(f"device-trace {location}: no client_device_capacity(.json|.pkl) there")
    capacity = load_trace_file(capacity_path)
    behave_path = _trace_path(capacity_path.parent, "client_behave_trace")
    behave = load_trace_file(behave_path) if behave_path else {}
    if not isinstance(capacity, dict) or not capacity:
        raise FedrexError(f"{capacity_path}: expected a non-empty dict of client id -> capacity")
    try:
        ids = sorted(capacity, key=lambda k: (str(type(k)), k))
        compute = np.array([float(capacity[k]["computation"]) for k in ids])
        comm = np.array([float(capacity[k]["communication"]) for k in ids]) * FEDSCALE_KBIT
    except (KeyError, TypeError, ValueError) as err:
        raise FedrexError(f"{capacity_path}: every entry needs numeric 'computation' and 'communication' ({err})") \
            from None
    if (compute <= 0).any() or (comm <= 0).any():
        raise FedrexError(f"{capacity_path}: computation and communication must be positive")
    median = float(np.median(compute))
    profiles = []
    for i, key in enumerate(ids):
        period, active = DAY_S, [[0.0, DAY_S]]
        trace = behave.get(key) if isinstance(behave, dict) else None
        if trace is not None:
            try:
                period = float(trace["finish_time"])
                active = [[float(a), float(b)] for a, b in zip(trace["active"], trace["inactive"])]
            except (KeyError, TypeError, ValueError) as err:
                raise FedrexError(f"{behave_path}: client {key!r} lacks finish_time/active/inactive ({err})") from None
        profiles.append(DeviceProfile("fedscale", float(compute[i] / median), float(comm[i]), float(comm[i]),
                                      0.0, math.inf, 0.0, period, active))
    return profiles


def profile_for(settings, partition_id: int, node_config: dict | None = None) -> DeviceProfile:
    """This client's device (see the module docstring for the order)."""
    node_config = node_config or {}
    if "device-profile" in node_config:  # a real device may describe itself
        profile = DeviceProfile.from_record(str(node_config["device-profile"]))
    elif settings.device_trace:
        profiles = fedscale_profiles(settings.device_trace)
        profile = profiles[partition_id % len(profiles)]
    elif settings.device_mix:
        mix = parse_mix(settings.device_mix)
        rng = np.random.default_rng([settings.seed, partition_id, 0xDE71CE])
        names = list(mix)
        profile = draw(names[int(rng.choice(len(names), p=[mix[n] for n in names]))], rng)
    else:
        profile = DeviceProfile(**{k: (list(map(list, v)) if k == "active" else v) for k, v in IDEAL.items()})
    profile.crashes = str(partition_id) in partition_list(settings.crash_clients)
    profile.runtime = str(node_config.get("runtime") or (
        "onnx" if str(partition_id) in partition_list(settings.onnx_clients) or importlib.util.find_spec("torch") is None
        else "torch"))
    if profile.runtime not in RUNTIMES:
        raise FedrexError(f"runtime {profile.runtime!r} in the node config: use one of {', '.join(RUNTIMES)}")
    return profile


def partition_list(text: str) -> set[str]:
    """``"3, 7"`` -> {"3", "7"}: the partition ids a drill setting names."""
    return {p.strip() for p in text.split(",") if p.strip()}
