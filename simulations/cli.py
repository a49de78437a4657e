"""The `fedrex` command. Subcommands import their modules lazily so `--help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys

from models.errors import FedrexError
from models.partitioning import PARTITIONERS


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="rt_critics",
                        help="registry name (sst2, ag_news, sent140_users, rt_critics), local file or hub id")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-dir", default=None, help="local data folder (default: $FEDREX_DATA_DIR)")
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--user-column")
    parser.add_argument("--time-column")
    parser.add_argument("--num-labels", type=int)


def _add_partition_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partitioner", default="natural", choices=PARTITIONERS)
    parser.add_argument("--num-partitions", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--min-samples", type=int, default=0)
    parser.add_argument("--bootstrap-rows", type=int, default=10, help="bootstrap: rows each synthetic user draws")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrex", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect datasets and partitions")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    describe = data_commands.add_parser("describe", help="per-client statistics of a partitioning")
    _add_data_args(describe)
    _add_partition_args(describe)
    describe.add_argument("--format", choices=["table", "json"], default="table")
    describe.set_defaults(handler="simulations.describe:describe")

    distill = commands.add_parser("distill", help="distill the robust, explainable global model")
    distill.add_argument("--dataset", default="sst2")
    distill.add_argument("--out", required=True, help="artifact folder to write")
    distill.add_argument("--quick", action="store_true", help="small subsets and few steps (minutes)")
    distill.add_argument("--network", choices=["student", "fastgrnn", "prado"])
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--data-dir", default=None)
    distill.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override any DistillConfig field, e.g. --set objective.expl=0 --set epochs=5")
    distill.set_defaults(handler="simulations.distill_cmd:run")

    copies = commands.add_parser("train-on-copies",
                                 help="fine-tune an artifact on substitution copies of its training text (SAFER's training)")
    copies.add_argument("--artifact", default="sst2-student", help="parent: a packaged name or an artifact folder")
    copies.add_argument("--out", required=True, help="artifact folder to write")
    copies.add_argument("--source", default="wordnet",
                        help="where each word's substitutes come from: wordnet, embedding or wordnet+embedding")
    copies.add_argument("--rate", type=float, default=0.75, help="chance that a table word is swapped in a copy")
    copies.add_argument("--symmetric", action="store_true",
                        help="close the table under its relation: every substitute is a word of it whose "
                             "substitutes hold the words listing it (what the smoothed package draws from)")
    copies.add_argument("--compact", action="store_true",
                        help="the table closed over the words the normaliser knows, each word's substitutes in "
                             "alphabetical order, stored as a graph over the normaliser's words (55 KB for SST-2; it holds a third "
                             "fewer of PWWS's candidates than --symmetric)")
    copies.add_argument("--epochs", type=int, default=2, help="passes, each over fresh copies of every sentence")
    copies.add_argument("--seed", type=int, default=0)
    copies.add_argument("--rows", type=int, default=0, help="train on the first N rows only (0: all)")
    copies.add_argument("--attack-samples", type=int, default=200,
                        help="evaluation rows attacked for the card (0: clean accuracy only)")
    copies.set_defaults(handler="server.copies:run")

    certs = commands.add_parser("certs", help="TLS certificates and SuperNode keys for a secure deployment")
    certs.add_argument("--out", required=True, help="folder to write")
    certs.add_argument("--supernodes", type=int, default=3, help="how many SuperNode key pairs")
    certs.add_argument("--host", action="append", default=[], help="extra SuperLink host name or IP (repeatable)")
    certs.set_defaults(handler="simulations.certs:certs_cmd")

    for name, handler, helptext in (
        ("simulate", "simulations.simulate:simulate_cmd", "run a federated simulation (Flower + Ray)"),
        ("run", "simulations.simulate:run_cmd", "the main job: distill (cached) + simulate + report"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--config", default=None,
                         help="TOML run config overriding the defaults (the main job): a file, or a packaged name (large)")
        sub.add_argument("--run-config", action="append", metavar="KEY=VALUE", help="override one setting")
        sub.add_argument("--runs-dir", default=None, help="where run folders go (default: runs)")
        sub.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
        if name == "simulate":
            sub.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
            sub.add_argument("--stop-after", type=int, default=0, metavar="N",
                             help="stop cleanly after round N (resume later)")
        sub.set_defaults(handler=handler)

    report = commands.add_parser("report", help="write report.md and report.html for a run")
    report.add_argument("run_dir")
    report.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                        help="another run to compare methods with (repeatable)")
    report.set_defaults(handler="analysis.report:report_cmd")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Library progress bars (datasets, flwr-datasets' tqdm) drown our own progress lines.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    try:
        module = __import__(module_name, fromlist=[func_name])
        return int(getattr(module, func_name)(args) or 0)
    except FedrexError as err:
        print(f"fedrex: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedrex: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
