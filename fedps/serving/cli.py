"""``fedps serve``: the sub-command's arguments and what it runs (kept light: grpc loads on use)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve this party's part of a trained model over gRPC (online joint inference)",
        description="Serve this party's part of a trained vertical LR or SecureBoost model (docs/operations.md, "
                    "'Online serving'), or build its online feature store with --build-store.")
    serve.add_argument("--conf", required=True, help="the party's TOML file, with a [serving] section")
    serve.add_argument("--model", help="the party's output folder of the training job to serve")
    serve.add_argument("--build-store", metavar="PARQUET",
                       help="instead of serving: build the SQLite store (serving.store, or --out) "
                            "from this Parquet file or folder of the party's features")
    serve.add_argument("--out", help="--build-store: the store file to write (default: serving.store)")
    serve.add_argument("--id-column", default="id", help="--build-store: the id column (default: id); "
                                                        "PSI output is keyed by its psi_hash column")
    serve.add_argument("--label-column", default="y", help="--build-store: a column never stored (default: y)")
    serve.add_argument("--features", default="", help="--build-store: comma-separated feature columns "
                                                      "(default: every numeric column)")
    serve.add_argument("--missing-ok", action="store_true",
                       help="--build-store: keep null/NaN values as missing (SecureBoost routes them; "
                            "a vertical LR model refuses such a store)")
    serve.add_argument("--format", default="auto", choices=("auto", "parquet", "libsvm", "tag_value"),
                       help="--build-store: the source's format (auto: libsvm for .libsvm/.svm, else Parquet); "
                            "LibSVM and tag:value files make a store of sparse rows, for a sparse LR model")
    serve.add_argument("--labelled", action="store_true",
                       help="--build-store, LibSVM or tag:value: each line has a label after the id")
    serve.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a configuration key, serving.* included (repeatable)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # refused handshakes are counted, not logged per try
    from fedps.errors import ConfigError
    from fedps.serving import config as serving_config

    party, serving = serving_config.load(args.conf, args.set)
    if args.build_store:
        from fedps.serving.keys import hasher, load_id_key
        from fedps.serving.store import build_store

        target = args.out or serving.store
        if not target:
            raise ConfigError("--build-store needs serving.store or --out: where to write the store")
        key = load_id_key(serving.id_key_file) if serving.id_hash == "hmac" else None
        summary = build_store(args.build_store, target, id_column=args.id_column,
                              key_of=hasher(serving.id_hash, key), id_hash=serving.id_hash,
                              label_column=args.label_column,
                              features=[f for f in args.features.split(",") if f], missing_ok=args.missing_ok,
                              fmt=args.format, labelled=args.labelled)
        print(json.dumps(summary))
        return 0
    if not args.model:
        raise ConfigError("fedps serve needs --model (the party's output folder of the training job)")
    from fedps.serving.server import serve_forever

    print(f"fedps serve: {party.party.name} ({party.party.role}) starting", file=sys.stderr, flush=True)
    return serve_forever(party, serving, args.model)
