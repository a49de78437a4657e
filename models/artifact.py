"""Saving and loading FedREX models without pickle.

An artifact folder holds ``config.json`` (architecture, labels, tokenizer length, a format tag),
``model.safetensors`` (float weights) and ``model.int8.safetensors`` (weights quantized to int8,
one symmetric scale per output row; biases and other 1-D tensors stay float32). Loading reads
JSON and safetensors only, so a corrupted or foreign file is an error, never code execution.
``config.json`` records the SHA-256 of each weight file as written (``sha256``), and loading checks
it: a weight file changed or truncated since is refused, even where it still parses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import FedrexError
from models.files import atomic_write_bytes, atomic_write_json
from models.packaged import candidates

if TYPE_CHECKING:  # torch is imported where tensors are made: `fedrex simulate` checks an artifact without it
    import torch

FORMAT = "fedrex-model/1"
INT8_SUFFIX, SCALE_SUFFIX = "::int8", "::scale"
FLOAT_FILE, INT8_FILE = "model.safetensors", "model.int8.safetensors"


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row symmetric int8 for every float tensor with >= 2 dims; everything else as is."""
    import torch

    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        if tensor.is_floating_point() and tensor.dim() >= 2:
            rows = tensor.reshape(tensor.shape[0], -1)
            scale = (rows.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            out[name + INT8_SUFFIX] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(tensor.shape)
            out[name + SCALE_SUFFIX] = scale.float()
        else:
            out[name] = tensor
    return out


def dequantize_state(qstate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in qstate.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if name.endswith(INT8_SUFFIX):
            base = name[: -len(INT8_SUFFIX)]
            scale = qstate[base + SCALE_SUFFIX]
            out[base] = (tensor.float().reshape(tensor.shape[0], -1) * scale[:, None]).reshape(tensor.shape)
        else:
            out[name] = tensor
    return out


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> str:
    """Write ``state`` atomically; returns the file's SHA-256 (hex), for whoever records it."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in state.items()})
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def _recorded_bytes(path: Path, sha256: str | None, recorded_in: str) -> bytes:
    """The file's bytes, refused when they are not the ones its record names (see ``load_weights``)."""
    path = Path(path)
    if not path.exists():
        raise FedrexError(f"{path} does not exist")
    if recorded_in and sha256 is None:
        raise FedrexError(f"{recorded_in} records no SHA-256 for {path.name} (removed from the record, or written "
                          "before FedREX recorded them), so the file cannot be checked and is not loaded; "
                          "re-create it")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FedrexError(f"{path} is not the file that was written: its SHA-256 differs from the one recorded "
                          f"in {recorded_in or 'its record'} ({len(data)} bytes now); it was changed or truncated "
                          "since, so it is not loaded")
    return data


def _parsed(path: Path, data: bytes, load) -> dict:
    try:
        return dict(sorted(load(data).items()))  # by name, as safetensors' own file reader gives them
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise FedrexError(f"{path} is not a valid safetensors file ({type(exc).__name__}); re-create it") from None


def _recorded_weights(folder: Path, config: dict, name: str, load) -> dict:
    """An artifact's weight file ``name``, checked against the digest its config.json records."""
    path = Path(folder) / name
    return _parsed(path, _recorded_bytes(path, config.get("sha256", {}).get(name), f"{folder}/config.json"), load)


def load_weights(path: Path, sha256: str | None = None, recorded_in: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with ``sha256`` (what ``save_weights`` returned, kept in
    ``recorded_in``), a file whose bytes changed since is refused before it is parsed. A file read
    through its record (``recorded_in``) must have a digest there: deleting the digest from the
    record must not be a way to load a changed file."""
    from safetensors.torch import load

    return _parsed(Path(path), _recorded_bytes(path, sha256, recorded_in), load)


def check_artifact(folder: Path) -> dict:
    """An artifact's config, once its float weights (what a run starts from) are checked as loading
    them checks them (recorded digest, valid safetensors) and the config agrees with itself, all
    without torch: what `fedrex simulate` checks before Flower starts, in a command that then only
    relays Flower's output. Whether each tensor's shape fits the network is left to loading it (the
    ServerApp's first step: the run then fails with that one line)."""
    from safetensors.numpy import load

    config = read_config(folder)
    _recorded_weights(folder, config, FLOAT_FILE, load)
    network = config.get("network")
    if not isinstance(network, dict) or network.get("num_labels") != config.get("num_labels"):
        raise FedrexError(f"{folder}/config.json: its network ({network!r}) does not match its num_labels "
                          f"({config.get('num_labels')!r})")
    return config


def save_artifact(folder: Path, model: torch.nn.Module, config: dict) -> dict:
    """Write config + float + int8 weights; returns {"float_bytes", "int8_bytes"}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    digests = {FLOAT_FILE: save_weights(folder / FLOAT_FILE, state),
               INT8_FILE: save_weights(folder / INT8_FILE, quantize_state(state))}
    atomic_write_json(folder / "config.json", {"format": FORMAT, **config, "sha256": digests})
    return {"float_bytes": (folder / FLOAT_FILE).stat().st_size, "int8_bytes": (folder / INT8_FILE).stat().st_size}


def device_package(folder: Path) -> dict:
    """Bytes a device must hold to run this artifact: config, int8 weights, the WordPiece
    vocabulary (gzip'd vocab.txt, from which ``models.tokenizer.tokenizer_from_vocab`` rebuilds the
    exact tokenizer) and the word normaliser when the artifact has one."""
    from models.normalizer import FILE as NORMALIZER_FILE
    from models.tokenizer import vocab_gz_bytes

    folder = Path(folder)
    parts = {"config": (folder / "config.json").stat().st_size,
             "int8_weights": (folder / "model.int8.safetensors").stat().st_size,
             "vocab_gz": vocab_gz_bytes()}
    if (folder / NORMALIZER_FILE).exists():
        parts["normalizer"] = (folder / NORMALIZER_FILE).stat().st_size
    return {**parts, "total": sum(parts.values())}


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FedrexError(f"{folder} is not a FedREX artifact (no config.json); run `fedrex distill` first")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FedrexError(f"{path} is corrupted (not JSON)") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise FedrexError(f"{path} is not a FedREX model config (format {config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    return config


PACKAGED = Path(__file__).resolve().parent / "artifacts"  # artifacts shipped with FedREX, by name
# (where `flwr run` runs the code from an App Bundle without weights, ``models.packaged`` finds
# them in the installed package)


def resolve_artifact(name_or_folder: str) -> Path:
    """A packaged artifact's name (``models/artifacts/<name>``) or an artifact folder: the first
    candidate that holds both its config and its weights."""
    for folder in [Path(name_or_folder), *candidates(f"models/artifacts/{name_or_folder}")]:
        if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
            return folder
    shipped = ", ".join(sorted(p.parent.name for p in PACKAGED.glob("*/model.safetensors"))) or "none here"
    raise FedrexError(f"artifact {name_or_folder!r} is neither an artifact folder nor a packaged artifact "
                      f"(shipped: {shipped}); make one with `fedrex distill --out FOLDER`")


def load_artifact(folder: Path, int8: bool = False) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from ``config.json`` and load its (float or int8) weights."""
    from models.networks import build_network

    config = read_config(folder)
    model = build_network(config["network"])
    from safetensors.torch import load

    state = _recorded_weights(folder, config, INT8_FILE if int8 else FLOAT_FILE, load)
    if int8:
        state = dequantize_state(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise FedrexError(f"weights in {folder} do not match its config: {str(err).splitlines()[0]}") from None
    model.eval()
    return model, config
