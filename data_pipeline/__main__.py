"""Command line: `python -m data_pipeline {tokenizer train, data, tokenize, inspect}`.

`make tokenizer` and `make data` call `tokenizer train` and `data`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator

from .datajob import ROWS_PER_SHARD
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


def sample_texts(spec: DataSpec, sample_bytes: int, threads: int,
                 counts: dict[str, int]) -> list[str]:
    """A sample of about `sample_bytes` of UTF-8 text from the train split, spread evenly over
    its shards-to-be (files or parquet row-group chunks: each gives an equal share, from its
    start), read by `threads` threads (object-store reads overlap). Deterministic."""
    from concurrent.futures import ThreadPoolExecutor

    from .datajob import ROWS_PER_SHARD, plan_tasks, task_records

    tasks = [t for t in plan_tasks(DataSpec(sources=spec.sources, val_sources=spec.val_sources,
                                            val_fraction=spec.val_fraction, name=spec.name),
                                   ROWS_PER_SHARD) if t["split"] == "train"]
    quota = max(1, sample_bytes // max(1, len(tasks)))

    def read(task: dict) -> tuple[list[str], dict[str, int]]:
        texts: list[str] = []
        skipped: dict[str, int] = {}
        got = 0
        for rec in task_records(task):
            if rec["skip"]:
                skipped[rec["skip"]] = skipped.get(rec["skip"], 0) + 1
                continue
            texts.append(rec["text"])
            got += len(rec["text"].encode("utf-8"))
            if got >= quota:
                break
        return texts, skipped

    out: list[str] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for texts, skipped in pool.map(read, tasks):  # in task order: deterministic
            out += texts
            for k, n in skipped.items():
                counts[k] = counts.get(k, 0) + n
    counts["docs"] = len(out)
    counts["tasks"] = len(tasks)
    return out


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import os

    from .datajob import expand_storage, storage_root

    spec = DataSpec.parse(expand_storage(args.data))
    out = expand_storage(args.out) if args.out else (
        f"{storage_root()}/tokenizers/{spec.name or 'data'}-{args.vocab}")
    counts: dict[str, int] = {}
    t0 = time.time()
    if args.max_docs is not None:  # the first N documents (small corpora, tests)
        texts = list(_train_texts(spec, counts, args.max_docs))
    else:
        texts = sample_texts(spec, int(args.sample_bytes), args.threads, counts)
    read_s = time.time() - t0
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    t1 = time.time()
    tok = train_tokenizer(texts, args.vocab, show_progress=not args.quiet)
    train_s = time.time() - t1
    docs = counts.pop("docs", 0)
    counts.pop("tasks", None)
    info = {"data": spec.to_dict(), "vocab": args.vocab, "sample_bytes": n_bytes,
            "sample_docs": docs, "skipped": counts, "read_seconds": round(read_s, 3),
            "train_seconds": round(train_s, 3), "threads": os.environ.get("RAYON_NUM_THREADS")
            or os.cpu_count(), "sha256": tok.sha256}
    path = tok.save(out, info)
    print(f"sampled {docs:,} train documents ({n_bytes / 1e6:,.1f} MB) of {spec.name!r} in "
          f"{read_s:.1f} s ({n_bytes / 1e6 / max(read_s, 1e-9):,.1f} MB/s, {args.threads} "
          f"reader threads); skipped: {counts or 'none'}")
    print(f"trained byte-level BPE in {train_s:.1f} s: {n_bytes / 1e6 / max(train_s, 1e-9):,.2f} "
          f"MB/s on {info['threads']} threads")
    print(f"wrote {path}: vocab_size={tok.vocab_size} padded_vocab_size="
          f"{tok.padded_vocab_size} bos_id={tok.bos_id} eos_id={tok.eos_id} "
          f"sha256={tok.sha256[:12]}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import os

    from .datajob import expand_storage, format_report, run_job, storage_root, submit_data_job

    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")) and not args.no_submit:
        argv = args.argv[1:]  # the same command, run by the job's driver on the head
        sid = submit_data_job(argv, address)
        print(f"submitted the data job {sid} to the Ray cluster at {address}; follow it with "
              f"`ray job logs {sid} --follow`; if it stops, submit the same command again: "
              "it resumes")
        return 0
    spec = DataSpec.parse(expand_storage(args.data))
    tok = load_tokenizer(expand_storage(args.tokenizer))
    tok_name = os.path.basename(os.path.dirname(tok.path or "")) or "tok"
    out = expand_storage(args.out) if args.out else (
        f"{storage_root()}/data/{spec.name or 'data'}.{tok_name}")
    manifest = run_job(spec, tok, out, workers=args.workers, rows_per_shard=args.rows_per_shard,
                       progress=not args.quiet)
    print(format_report(manifest, out))
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
    tt.add_argument("--out", default="",
                    help="output folder or URL for tokenizer.json (default "
                         "$STORAGE/tokenizers/<spec name>-<vocab>)")
    tt.add_argument("--sample-bytes", type=float, default=1e9,
                    help="train on about this much text, spread evenly over the train files")
    tt.add_argument("--threads", type=int, default=8, help="threads reading the sample")
    tt.add_argument("--max-docs", type=int, default=None,
                    help="instead of a sample: the first N documents")
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

    dj = sub.add_parser("data", help="resumable pre-tokenization into megatron shards on "
                        "storage, with Ray Data (see data_pipeline/datajob.py)")
    dj.add_argument("--data", required=True, help="data spec: name, path, glob, URL or spec file")
    dj.add_argument("--tokenizer", required=True, help="tokenizer.json or its folder (or URL)")
    dj.add_argument("--out", default="", help="output folder or URL (default "
                    "$STORAGE/data/<spec name>.<tokenizer folder name>)")
    dj.add_argument("--workers", type=int, default=None,
                    help="Ray CPUs on this machine (default: all; $RAY_ADDRESS: the cluster); "
                         "0 = in this process without Ray")
    dj.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD,
                    help="parquet rows per shard (whole row groups)")
    dj.add_argument("--no-submit", action="store_true",
                    help="with an http:// RAY_ADDRESS: run here instead of as a Ray job")
    dj.add_argument("--quiet", action="store_true")
    dj.set_defaults(func=cmd_data)

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
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
