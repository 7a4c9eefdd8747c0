"""Command line: `python -m data_pipeline {tokenizer train, tokenize, inspect}`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator

from .spec import DataSpec
from .tokenizer import DEFAULT_TOKENIZER, load_tokenizer, train_tokenizer


def _train_texts(spec: DataSpec, counts: dict[str, int], max_docs: int | None) -> Iterator[str]:
    from .sources import hub_records, iter_plan_records, plan_split, probe

    plans = plan_split(spec, "train")
    probe(plans)
    n = 0
    for plan in plans:
        records = hub_records(plan) if plan.fmt == "hub" else iter_plan_records(plan)
        for rec in records:
            if rec["skip"]:
                counts[rec["skip"]] = counts.get(rec["skip"], 0) + 1
                continue
            counts["docs"] = counts.get("docs", 0) + 1
            yield rec["text"]
            n += 1
            if max_docs is not None and n >= max_docs:
                return


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    spec = DataSpec.parse(args.data)
    counts: dict[str, int] = {}
    t0 = time.time()
    tok = train_tokenizer(_train_texts(spec, counts, args.max_docs), args.vocab,
                          show_progress=not args.quiet)
    path = tok.save(args.out)
    print(f"trained byte-level BPE on {counts.pop('docs', 0)} train documents of "
          f"{spec.name!r} in {time.time() - t0:.1f} s; skipped: {counts or 'none'}")
    print(f"wrote {path}: vocab_size={tok.vocab_size} padded_vocab_size="
          f"{tok.padded_vocab_size} bos_id={tok.bos_id} eos_id={tok.eos_id}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .pretok import format_summary, tokenize_spec

    tok = load_tokenizer(args.tokenizer)
    manifest = tokenize_spec(args.data, tok, args.out, workers=args.workers,
                             progress=not args.quiet)
    print(format_summary(manifest, args.out))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .loader import build_loader

    tok = load_tokenizer(args.tokenizer)
    loader = build_loader(args.data, tok, split=args.split, batch_size=args.batch_size,
                          seq_len=args.seq_len, seed=args.seed, path=args.path)
    print(f"{loader.path} loader over {args.data!r} ({args.split}), tokenizer {tok}")
    shown = 0
    for inputs, targets in loader:
        for row in range(inputs.shape[0]):
            window = inputs[row].tolist() + [int(targets[row, -1])]
            print(f"--- window {shown} ({len(window)} tokens) ---")
            print(tok.decode(window))
            shown += 1
            if shown >= args.windows:
                break
        if shown >= args.windows:
            break
    print("--- stats ---")
    print(json.dumps(loader.stats(), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline",
                                description="trmgpt data pipeline tools")
    sub = p.add_subparsers(dest="command", required=True)

    tp = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = tp.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer on a spec's train split")
    tt.add_argument("--data", required=True, help="data spec: name, path, glob, URL or spec file")
    tt.add_argument("--vocab", type=int, required=True, help="vocabulary size (incl. specials)")
    tt.add_argument("--out", required=True, help="output directory for tokenizer.json")
    tt.add_argument("--max-docs", type=int, default=None, help="train on at most N documents")
    tt.add_argument("--quiet", action="store_true")
    tt.set_defaults(func=cmd_tokenizer_train)

    tk = sub.add_parser("tokenize", help="pre-tokenize a spec into megatron indexed shards")
    tk.add_argument("--data", required=True, help="data spec: name, path, glob, URL or spec file")
    tk.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    tk.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.json or its dir")
    tk.add_argument("--workers", type=int, default=None,
                    help="Ray CPUs on this machine (default: all; $RAY_ADDRESS joins a "
                         "cluster); 0 = in this process without Ray")
    tk.add_argument("--quiet", action="store_true", help="no progress bar")
    tk.set_defaults(func=cmd_tokenize)

    ins = sub.add_parser("inspect", help="print a few decoded windows and the loader stats")
    ins.add_argument("--data", required=True, help="data spec or tokenized directory")
    ins.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    ins.add_argument("--split", default="train", choices=("train", "val"))
    ins.add_argument("--path", default="auto", choices=("auto", "stream", "pretok"))
    ins.add_argument("--seq-len", type=int, default=64)
    ins.add_argument("--batch-size", type=int, default=2)
    ins.add_argument("--windows", type=int, default=3)
    ins.add_argument("--seed", type=int, default=0)
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
