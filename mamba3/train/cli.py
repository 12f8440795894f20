"""`mamba3 train --config configs/tiny.toml [--set train.lr=1e-3] [--train.lr 1e-3] ...`

Distributed: ``torchrun --nproc_per_node 2 -m mamba3.train.cli --config ... --set train.parallel=fsdp``.
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, apply_overrides, parse_value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a language model from a TOML config",
                              description="Any config field can be overridden with --set section.field=value "
                                          "or --section.field value (values parsed as TOML).")
    p.add_argument("--config", default=None, help="TOML run config (e.g. configs/tiny.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_train)


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Pull ``--section.field value`` / ``--section.field=value`` pairs out of ``argv``."""
    rest, pairs, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            key = a[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise ConfigError(f"{key}: missing value after --{key}")
            pairs.append((key, value))
        else:
            rest.append(a)
        i += 1
    return rest, pairs


def run_train(args: argparse.Namespace) -> int:
    import json
    import tomllib

    from .config import TrainConfig
    from .loop import main

    pairs = list(getattr(args, "dotted_overrides", []))
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    d = {}
    if args.config:
        with open(args.config, "rb") as f:
            d = tomllib.load(f)
    cfg = TrainConfig.from_dict(apply_overrides(d, [(k, parse_value(v)) for k, v in pairs]))
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    main(cfg)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, pairs = split_overrides(argv)
        parser = argparse.ArgumentParser(prog="mamba3")
        add_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["train", *rest])
        args.dotted_overrides = pairs
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
