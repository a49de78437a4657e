"""`fedrex distill`: train and export the global model, then print its card in brief."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from models.files import atomic_write_json
from simulations.overrides import apply_overrides


def run(args) -> int:
    from server.distill import DistillConfig, distill

    config = DistillConfig.quick() if args.quick else DistillConfig()
    config = apply_overrides(config, [f"dataset={args.dataset}", f"seed={args.seed}", *(args.set or [])])
    if args.data_dir:
        config = apply_overrides(config, [f"data_dir={args.data_dir}"])
    if args.network:
        config = apply_overrides(config, [f"network={args.network}"])
    card = distill(config, Path(args.out))
    # The card says how to make this artifact again (same code, config and seed -> same weights).
    card["reproduce"] = {"command": "fedrex " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["distill"] else "fedrex distill",
                         "config": config.as_dict(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    atomic_write_json(Path(args.out) / "card.json", card)
    print(format_card(card))
    print(f"wrote {args.out}/card.json")
    return 0


def format_card(card: dict) -> str:
    lines = [
        f"model            {card['config']['network']}  ({card['params']:,} params, int8 {card['int8_bytes'] / 1024:.0f} KB)",
        f"clean accuracy   {card['clean_acc']:.4f}  (int8 {card['int8_acc']:.4f}, agreement {card['int8_agreement']:.3f})",
    ]
    if "teacher" in card:
        lines.append(f"teacher accuracy {card['teacher']['clean_acc']:.4f}")
    for name, summary in card["attacks"].items():
        lines.append(f"under {name:<10} acc {summary['adv_acc']:.4f}  success {summary['success_rate']:.3f}  "
                     f"words {summary['words_changed_pct']:.1f}%  queries {summary['queries']:.1f}")
    fid = card["fidelity"]
    lines.append(f"fidelity         comprehensiveness {fid['comprehensiveness']:.4f}  sufficiency {fid['sufficiency']:.4f}"
                 + (f"  teacher spearman {fid['agreement_spearman']:.3f}" if "agreement_spearman" in fid else ""))
    if "normalized" in card:
        norm = card["normalized"]
        lines.append(f"normaliser       clean acc {norm['clean_acc']:.4f}"
                     + "".join(f", {k} {v['adv_acc']:.4f}" for k, v in norm["attacks"].items())
                     + f" ({norm['ms_per_sentence']:.2f} ms/sentence)")
    lines.append(f"latency          {card['latency_ms']['median']:.2f} ms/sentence (batch 1, 1 thread, "
                 f"{card['latency_ms'].get('form', 'eager')})")
    if "device_package" in card:
        lines.append(f"device package   {card['device_package']['total'] / 1024:.0f} KB (int8 weights, vocabulary"
                     + (", normaliser)" if "normalizer" in card["device_package"] else ")"))
    if "onnx_agreement" in card:
        lines.append(f"onnx int8        {card['onnx_int8_bytes'] / 1024:.0f} KB, agrees with PyTorch on {card['onnx_agreement']:.1%}")
    return "\n".join(lines)
