"""Data pipeline throughput on the Shakespeare corpus, next to what training consumes.

    python bench/data_throughput.py [--data shakespeare] [--seq-len 256] [--batch-size 8]
        [--workers 2] [--tiny-tok-s N] [--a-mfu 0.4] [--a-tok-s N] [--json FILE]

Rows: raw `Tokenizer.encode_batch` over the same text (the practical limit of any path that
tokenizes), the streaming path, the pre-tokenized path's tokenize step (Ray Data and
in-process) and read step. tokens/s counts training tokens (batch x seq_len per batch)
for loaders and tokenizer output for tokenizing. The `x tiny` / `x A` columns divide by
the tokens/s one training step of each preset consumes, i.e. how many times faster than the
trainer the data arrives: tiny's as given (`make bench` passes the real trainer's, measured by
bench/overhead.py in the same run), A's derived from its exact training FLOPs per token, one
H100 SXM's dense bf16 peak (989 TFLOP/s) and a stated MFU (--a-mfu, 40% unless measured).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from data_pipeline import DEFAULT_TOKENIZER, DataSpec, build_loader, load_tokenizer  # noqa: E402
from data_pipeline.pretok import init_ray, tokenize_spec  # noqa: E402
from data_pipeline.sources import iter_plan_records, plan_split  # noqa: E402
from model import GPTConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

# tiny: the real trainer on this 2-core machine, one rank, one thread (bench/overhead.py, ZeRO-0,
# batch 4 x 256); `make bench` passes the figure of its own run. A: one H100 SXM at A_MFU.
DEFAULT_TINY_TOK_S = 870.0
H100_BF16 = 989e12
A_MFU = 0.40
A_FLOPS_PER_TOKEN = GPTConfig.preset("A").flops_per_token(training=True)
DEFAULT_A_TOK_S = A_MFU * H100_BF16 / A_FLOPS_PER_TOKEN


def _loader_rate(loader) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    tokens = sum(x.numel() for x, _ in loader)
    seconds = time.perf_counter() - t0
    return tokens / seconds, tokens, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DataLoader workers (stream) and Ray CPUs (tokenize)")
    p.add_argument("--tiny-tok-s", type=float, default=DEFAULT_TINY_TOK_S,
                   help="tokens/s of one training step of the tiny preset")
    p.add_argument("--tiny-source", default="",
                   help="where --tiny-tok-s comes from (for the table's note)")
    p.add_argument("--a-mfu", type=float, default=A_MFU,
                   help="MFU of preset A on one H100 SXM, for its tokens/s")
    p.add_argument("--a-tok-s", type=float, default=0.0,
                   help="tokens/s of preset A's training (overrides --a-mfu)")
    p.add_argument("--json", help="write the figures here (for bench/report.py)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a few documents, no Ray, no DataLoader workers")
    args = p.parse_args()
    a_derived = not args.a_tok_s
    if a_derived:
        args.a_tok_s = args.a_mfu * H100_BF16 / A_FLOPS_PER_TOKEN

    tok = load_tokenizer(args.tokenizer)
    spec = DataSpec.parse(args.data)
    texts = [r["text"] for plan in plan_split(spec, "train")
             for r in iter_plan_records(plan) if not r["skip"]]
    kw = {"batch_size": args.batch_size, "seq_len": args.seq_len, "split": "train"}
    if args.quick:  # a few hundred batches' worth of loading, the same code
        texts, args.workers = texts[:2], 0
        kw["num_samples"] = 64 * args.batch_size
    rows: list[tuple[str, float, str]] = []

    best = 0.0
    for _ in range(3):  # the first pass fills the BPE word cache: report the steady state
        t0 = time.perf_counter()
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        best = max(best, n_tokens / (time.perf_counter() - t0))
    rows.append(("encode_batch, raw (rayon threads)", best, f"{n_tokens:,} tokens, best of 3"))

    for workers in sorted({0, args.workers}):
        loader = build_loader(spec, tok, path="stream", num_workers=workers, **kw)
        rate, tokens, sec = _loader_rate(loader)
        rows.append((f"stream, {workers} DataLoader workers", rate,
                     f"{tokens:,} tokens in {sec:.1f} s incl. start"))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # timed apart: a fixed cost, not throughput
        started = init_ray(args.workers) if args.workers else False
        ray_start = time.perf_counter() - t0
        try:
            ways = [(args.workers, f"Ray Data, {args.workers} CPUs")] if args.workers else []
            for workers, label in [*ways, (0, "in-process")]:
                out = os.path.join(tmp, f"tok{workers}")
                m = tokenize_spec(spec, tok, out, workers=workers, progress=False)["totals"]
                extra = f" (+{ray_start:.1f} s ray.init)" if workers else ""
                rows.append((f"pretok tokenize, {label}", m["tokens_per_s"],
                             f"{m['tokens']:,} tokens in {m['seconds']:.1f} s{extra}"))
        finally:
            if started:
                ray.shutdown()
        for workers in sorted({0, args.workers}):
            t0 = time.perf_counter()
            loader = build_loader(os.path.join(tmp, "tok0"), tok, path="pretok",
                                  num_workers=workers, **kw)
            built = time.perf_counter() - t0
            rate, tokens, sec = _loader_rate(loader)
            rows.append((f"pretok read, {workers} DataLoader workers", rate,
                         f"{tokens:,} tokens in {sec:.1f} s (+{built:.1f} s index build)"))

    tiny_note = args.tiny_source or ("real trainer, 1 rank, this CPU (default)"
                                     if args.tiny_tok_s == DEFAULT_TINY_TOK_S else "given")
    rows.append(("training step, preset tiny", args.tiny_tok_s, f"--tiny-tok-s ({tiny_note})"))
    a_note = (f"one H100 SXM at {args.a_mfu:.0%} MFU: {args.a_mfu:.2f} x 989e12 / "
              f"{A_FLOPS_PER_TOKEN / 1e9:.2f} GFLOP/token" if a_derived else "--a-tok-s, given")
    rows.append(("training step, preset A", args.a_tok_s, a_note))

    print(f"\ndata throughput: {spec.name} train split, {len(texts)} documents, seq_len "
          f"{args.seq_len}, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'path':<40} {'tokens/s':>12} {'x tiny':>9} {'x A':>8}  notes")
    for label, rate, notes in rows:
        print(f"{label:<40} {rate:>12,.0f} {rate / args.tiny_tok_s:>9.2f} "
              f"{rate / args.a_tok_s:>8.2f}  {notes}")
    write_json(args.json, {
        "data": spec.name, "documents": len(texts), "seq_len": args.seq_len,
        "batch_size": args.batch_size, "workers": args.workers,
        "tiny_tok_s": args.tiny_tok_s, "a_tok_s": args.a_tok_s,
        "a_mfu": args.a_mfu if a_derived else None, "a_flops_per_token": A_FLOPS_PER_TOKEN,
        "h100_bf16_peak": H100_BF16,
        "rows": [{"path": label, "tokens_per_s": rate, "x_tiny": rate / args.tiny_tok_s,
                  "x_a": rate / args.a_tok_s, "notes": notes} for label, rate, notes in rows]})


if __name__ == "__main__":
    main()
