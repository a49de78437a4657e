"""Why comprehensiveness falls through the rounds: a check of the confidence hypothesis.

    python benchmarks/faithfulness_check.py [--runs-dir /tmp/fedrex-personalization] [--rows 4]

ERASER comprehensiveness is a drop in probability, p(y|x) - p(y|x without the rationale), so a
model that answers less confidently scores lower even when its rationales rank the same tokens
(agreement with the round-0 maps stays high). The check: on the same held-out rows of every user
(the first ``--rows`` of each), for the start model and for the final global model (its checkpoint)
of each faithfulness run, of DP, of DP's per-sample clipping alone and of ASCC hardening: the mean confidence,
comprehensiveness of the model's own IG maps, of random maps, and comprehensiveness after temperature scaling the final model to the start model's
mean confidence (the maps' ranking does not change with the temperature: IG is linear in the
logit). If the tempered score is back at the start's, the fall is the model's confidence, not its
rationales. Results: results/faithfulness_check.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.report import markdown_table  # noqa: E402
from models.artifact import load_weights  # noqa: E402
from models.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.attribution import eraser_scores, integrated_gradients, random_attributions  # noqa: E402
from models.encoded import EncodedData  # noqa: E402
from models.training import predict_logits  # noqa: E402
from personalization import ASCC, DATASETS, DP_CLIPPING_ONLY, DP_ROW, FAITHFULNESS, run_id_of  # noqa: E402
from references import start_tokenizer, user_splits  # noqa: E402
from server.app import global_model  # noqa: E402
from simulations.simulate import load_settings  # noqa: E402


class Tempered(torch.nn.Module):
    """``model`` with its logits divided by ``temperature`` (same predictions, other confidence)."""

    def __init__(self, model, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, ids):
        return self.model(ids) / self.temperature


def confidence(model, data: EncodedData) -> float:
    return float(torch.softmax(torch.from_numpy(predict_logits(model, data)), -1).max(-1).values.mean())


def temperature_for(model, data: EncodedData, target: float) -> float:
    """The temperature at which ``model``'s mean confidence on ``data`` is ``target`` (bisection
    on log T: confidence falls as T grows)."""
    low, high = -5.0, 5.0
    for _ in range(60):
        mid = (low + high) / 2
        if confidence(Tempered(model, float(np.exp(mid))), data) > target:
            low = mid
        else:
            high = mid
    return float(np.exp((low + high) / 2))


def measure(model, data: EncodedData, target: float | None) -> dict:
    model.eval()
    attr = integrated_gradients(model, data, n_steps=8)
    out = {"accuracy": float((predict_logits(model, data).argmax(1) == data.labels).mean()),
           "confidence": confidence(model, data),
           "comprehensiveness": eraser_scores(model, data, attr)["comprehensiveness"],
           "comprehensiveness_random": eraser_scores(model, data, random_attributions(data, 0))["comprehensiveness"]}
    if target is not None:
        temperature = temperature_for(model, data, target)
        out.update(temperature=temperature,
                   comprehensiveness_at_start_confidence=eraser_scores(Tempered(model, temperature), data,
                                                                       attr)["comprehensiveness"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="/tmp/fedrex-personalization")
    parser.add_argument("--rows", type=int, default=4, help="held-out rows per user")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results, body = {}, []
    for dataset, pairs in DATASETS.items():
        settings = load_settings(None, pairs)
        tokenizer = start_tokenizer(settings)
        texts, labels = [], []
        for _, _, _, test_x, test_y in user_splits(settings):
            texts += test_x[: args.rows]
            labels += list(test_y[: args.rows])
        data = EncodedData([np.asarray(r) for r in tokenizer.encode_ids(texts)], np.asarray(labels), texts)
        start, _ = global_model(settings)
        rows = {"start model (round 0)": measure(start, data, None)}
        target = rows["start model (round 0)"]["confidence"]
        mode = settings.mode
        for name in [*(f"{mode}, {name}" for name, _ in FAITHFULNESS), DP_ROW, DP_CLIPPING_ONLY, f"{mode}, {ASCC}"]:
            checkpoint = sorted((Path(args.runs_dir) / run_id_of(dataset, name) / "checkpoints").glob(
                "round-*.safetensors"))
            if not checkpoint:
                print(f"[check] {dataset} / {name}: no run folder, skipped", file=sys.stderr)
                continue
            model, _ = global_model(settings)
            model.load_state_dict({**model.state_dict(), **load_weights(checkpoint[-1])})
            rows[f"{name}: global, {checkpoint[-1].stem}"] = measure(model, data, target)
            print(f"[check] {dataset} / {name}: {rows[f'{name}: global, {checkpoint[-1].stem}']}", file=sys.stderr)
        results[dataset] = {"rows_per_user": args.rows, "texts": len(texts), "models": rows}
        for name, r in rows.items():
            body.append([dataset, name, f"{r['accuracy']:.3f}", f"{r['confidence']:.3f}", f"{r['comprehensiveness']:.3f}",
                         f"{r['comprehensiveness_random']:.3f}", f"{r['temperature']:.2f}" if "temperature" in r else "–",
                         f"{r['comprehensiveness_at_start_confidence']:.3f}" if "temperature" in r else "–"])
    atomic_write_json(Path(args.out) / "faithfulness_check.json", results)
    head = ["dataset", "model", "accuracy", "mean confidence", "comprehensiveness", "random maps",
            "temperature to the start's confidence", "comprehensiveness at the start's confidence"]
    md = markdown_table(pd.DataFrame(body, columns=head))
    atomic_write_bytes(Path(args.out) / "faithfulness_check.md", (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
