"""Deployment exports of a compact model and the measurements taken on them.

- TorchScript (``torch.jit.script``, frozen) of the int8-weight model: runs with libtorch alone,
  exact for every input length (a trace would unroll FastGRNN's loop to the traced length).
- ONNX: the model is exported with the dynamo exporter (dynamic batch and length), then
  ONNX Runtime's dynamic quantization turns its weights (embedding gather, convolutions, matmuls)
  into int8: ``model.int8.onnx`` is a single self-contained file.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.errors import FedrexError


def export_torchscript(model, path: Path, example_ids: torch.Tensor) -> Path:
    module, _ = deployable(model, example_ids)
    module.save(str(path))
    return Path(path)


def export_onnx_int8(model, path: Path, example_ids: torch.Tensor, output: str = "logits") -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model.eval()
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        float_path = os.path.join(tmp, "model.onnx")
        batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=4096)
        try:
            torch.onnx.export(model, (example_ids,), float_path, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch, 1: length},), input_names=["ids"],
                              output_names=[output])
        except Exception as exc:
            raise FedrexError(f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}") from None
        quantize_dynamic(float_path, str(path), weight_type=QuantType.QInt8)
    return path


class _Body(torch.nn.Module):
    """The network without its head: ids -> features (``TokenClassifier.features``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.features(ids)


def body_onnx_int8(model, example_ids: torch.Tensor) -> bytes:
    """The body a device without torch runs (``client/onnx_client.py``): ONNX with int8 weights
    (dynamic quantization), ids [B, L] -> features [B, D], as bytes to send in a message."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx_int8(_Body(model).eval(), Path(tmp) / "body.int8.onnx", example_ids, output="features")
        return path.read_bytes()


def onnx_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids.astype(np.int64)})[0]


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings; keep them off the user's terminal."""
    import logging
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def deployable(model, example: torch.Tensor):
    """The model in the form a device runs: ``torch.jit.script`` (every compact network compiles:
    loops, masks and variable lengths stay exact), frozen; a model that does not script (the
    Hugging Face teacher) is traced on ``example`` instead. Returns (module, form)."""
    model.eval()
    with _quiet():
        try:
            return torch.jit.freeze(torch.jit.script(model)), "torchscript"
        except Exception:  # noqa: BLE001 - any scripting failure falls back to tracing
            with torch.no_grad():
                return torch.jit.freeze(torch.jit.trace(model, example, check_trace=False)), "torchscript-trace"


@torch.no_grad()
def latency_ms(model, id_rows: list[np.ndarray], warmup: int = 5) -> dict:
    """CPU latency of one sentence at a time (batch 1) on one thread, in deployable form
    (``deployable``), the same way for every model: median and p90 in ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tensors = [torch.from_numpy(np.asarray(r, dtype=np.int64)).view(1, -1) for r in id_rows]
        module, form = deployable(model, tensors[0])
        for t in tensors[:warmup]:
            module(t)
        times = []
        for t in tensors:
            start = time.perf_counter()
            module(t)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {"median": statistics.median(times), "p90": float(np.percentile(times, 90)), "form": form}
