"""Deployment exports of a compact model and the measurements taken on them.

- TorchScript (``torch.jit.trace``) of the int8-weight model: runs with libtorch alone.
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
    model.eval()
    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(model, example_ids)
    traced.save(str(path))
    return Path(path)


def export_onnx_int8(model, path: Path, example_ids: torch.Tensor) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model.eval()
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        float_path = os.path.join(tmp, "model.onnx")
        batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=4096)
        try:
            torch.onnx.export(model, (example_ids,), float_path, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch, 1: length},), input_names=["ids"],
                              output_names=["logits"])
        except Exception as exc:
            raise FedrexError(f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}") from None
        quantize_dynamic(float_path, str(path), weight_type=QuantType.QInt8)
    return path


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


@torch.no_grad()
def latency_ms(model, id_rows: list[np.ndarray], warmup: int = 5) -> dict:
    """CPU latency of one sentence at a time (batch 1) on one thread: median and p90 in ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        tensors = [torch.from_numpy(np.asarray(r, dtype=np.int64)).view(1, -1) for r in id_rows]
        for t in tensors[:warmup]:
            model(t)
        times = []
        for t in tensors:
            start = time.perf_counter()
            model(t)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {"median": statistics.median(times), "p90": float(np.percentile(times, 90))}
