"""`mamba3 train --config configs/tiny.toml [--set train.lr=1e-3] [--train.lr 1e-3] ...`

Distributed: ``torchrun --nproc_per_node 2 -m mamba3.train.cli --config ... --train.parallel fsdp``.
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
    g = p.add_argument_group("field overrides (--section.field VALUE)")
    for key in override_keys():
        g.add_argument(f"--{key}", dest=_DEST + key.replace(".", "__"), default=None, metavar="V",
                       help=argparse.SUPPRESS if key.startswith("model.") and key != "model.preset" else None)
    p.set_defaults(func=run_train)


_DEST = "override__"


def override_keys() -> list[str]:
    """Every ``section.field`` of TrainConfig, plus ``model.preset`` and the ModelConfig fields."""
    import dataclasses

    from ..models import ModelConfig
    from .config import SECTIONS

    keys = ["model.preset"] + [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def run_train(args: argparse.Namespace) -> int:
    try:
        return _run_train(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _run_train(args: argparse.Namespace) -> int:
    import json
    import tomllib

    from .config import TrainConfig
    from .loop import main

    pairs = [(k[len(_DEST):].replace("__", "."), v) for k, v in vars(args).items()
             if k.startswith(_DEST) and v is not None]
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
    """``python -m mamba3.train.cli ...`` (for torchrun): the arguments of ``mamba3 train``."""
    parser = argparse.ArgumentParser(prog="mamba3")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
