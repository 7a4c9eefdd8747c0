"""Data pipeline throughput on the Shakespeare corpus, next to what training consumes.

    python bench/data_throughput.py [--data shakespeare] [--seq-len 256] [--batch-size 8]
        [--workers 2] [--tiny-tok-s N] [--a-tok-s N]

Rows: raw `Tokenizer.encode_batch` over the same text (the practical limit of any path that
tokenizes), the streaming path, the pre-tokenized path's tokenize step (Ray Data and
in-process) and read step. tokens/s counts training tokens (batch x seq_len per batch)
for loaders and tokenizer output for tokenizing. The `x tiny` / `x A` columns divide by
the tokens/s one training step of each preset consumes (given on the command line), i.e.
how many times faster than the trainer the data arrives.
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

# tiny: measured on this 2-core machine by `bench/model_step.py` (forward+backward, per-step
# path, batch 4 x 256, 1 thread): 503 tokens/s. A: what one H100 consumes at 40% MFU, from the
# model's exact training FLOPs per token (989 TFLOP/s dense bf16 peak).
DEFAULT_TINY_TOK_S = 503.0
DEFAULT_A_TOK_S = 0.4 * 989e12 / GPTConfig.preset("A").flops_per_token(training=True)


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
    p.add_argument("--a-tok-s", type=float, default=DEFAULT_A_TOK_S,
                   help="tokens/s of one training step of preset A")
    args = p.parse_args()

    tok = load_tokenizer(args.tokenizer)
    spec = DataSpec.parse(args.data)
    texts = [r["text"] for plan in plan_split(spec, "train")
             for r in iter_plan_records(plan) if not r["skip"]]
    kw = {"batch_size": args.batch_size, "seq_len": args.seq_len, "split": "train"}
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
        started = init_ray(args.workers)  # timed apart: a fixed cost, not throughput
        ray_start = time.perf_counter() - t0
        try:
            for workers, label in ((args.workers, f"Ray Data, {args.workers} CPUs"),
                                   (0, "in-process")):
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

    for name, rate, flag, default in (("tiny", args.tiny_tok_s, "--tiny-tok-s",
                                       DEFAULT_TINY_TOK_S),
                                      ("A", args.a_tok_s, "--a-tok-s", DEFAULT_A_TOK_S)):
        note = {"tiny": "CPU, bench/model_step.py", "A": "one H100 at 40% MFU, derived"}[name]
        note = note if rate == default else "given"
        rows.append((f"training step, preset {name}", rate, f"{flag} ({note})"))

    print(f"\ndata throughput: {spec.name} train split, {len(texts)} documents, seq_len "
          f"{args.seq_len}, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'path':<40} {'tokens/s':>12} {'x tiny':>9} {'x A':>8}  notes")
    for label, rate, notes in rows:
        print(f"{label:<40} {rate:>12,.0f} {rate / args.tiny_tok_s:>9.2f} "
              f"{rate / args.a_tok_s:>8.2f}  {notes}")


if __name__ == "__main__":
    main()
