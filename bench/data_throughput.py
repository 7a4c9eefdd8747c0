"""Data pipeline throughput on the Shakespeare corpus, next to what training consumes; and
`make tokenizer` / `make data` against raw HF tokenizers on a FineWeb-Edu-shaped corpus.

    python bench/data_throughput.py [--data shakespeare] [--seq-len 256] [--batch-size 8]
        [--workers 2] [--tiny-tok-s N] [--a-mfu 0.4] [--a-tok-s N] [--json FILE]
        [--fw-vocab 8192] [--fw-files 8] [--only-fineweb]

The FineWeb-Edu section: the whole embedded corpus cut into ~2 kB documents, written as parquet
in FineWeb-Edu's shape (data_pipeline/synthetic.py, broken records included), then
  * tokenizer training (`python -m data_pipeline tokenizer train`'s code: an even sample read by
    threads, HF's BPE trainer on all cores): MB of text per second;
  * raw `encode_batch` of the same good documents: on all cores (rayon) and on one thread (a
    subprocess with RAYON_NUM_THREADS=1), best of 3;
  * the data job (`make data`'s code): Ray Data on --workers CPUs, one rayon thread per worker,
    per core = tokens / summed task seconds (read + tokenize + write + commit of every shard),
    and the job's wall time with Ray's start-up; and in-process (--workers 0).
Goal: the data job's tokens/s per core >= 0.8 of raw encode_batch's per core.

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
import json
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


def fineweb_section(tok_path: str, workers: int, vocab: int, files: int, quick: bool,
                    rows_per_shard: int = 1024) -> tuple[list[tuple[str, float, str]], dict]:
    """Rows (label, rate, notes) and figures of make tokenizer / make data against raw HF."""
    import glob
    import subprocess

    from data_pipeline import embedded_corpus, train_tokenizer
    from data_pipeline.__main__ import sample_texts
    from data_pipeline.datajob import run_job
    from data_pipeline.synthetic import paragraphs, write_fineweb_like

    plays = sorted(glob.glob(os.path.join(embedded_corpus(), "*", "*.txt")))
    texts = [Path(p).read_text(encoding="utf-8") for p in (plays[:2] if quick else plays)]
    docs = paragraphs(texts, 2000)
    out: dict = {}
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        written = write_fineweb_like(tmp + "/fw", docs, files=files, rows_per_group=32)
        spec = DataSpec.from_dict({"name": "fineweb-like", "val_fraction": 0.001, "sources": [
            {"path": tmp + "/fw/sample/10BT/*.parquet", "name": "fineweb-edu"}]})
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        sample = sample_texts(spec, 1 << 40, 8, counts)  # the whole train split
        read_s = time.perf_counter() - t0
        mb = sum(len(t.encode("utf-8")) for t in sample) / 1e6
        t0 = time.perf_counter()
        trained = train_tokenizer(sample, vocab)
        train_s = time.perf_counter() - t0
        rows.append((f"tokenizer train, BPE {vocab}, {os.cpu_count()} threads", mb / train_s,
                     f"MB/s of text: {mb:.1f} MB in {train_s:.1f} s (+{read_s:.1f} s reading "
                     f"{counts.get('tasks', 0)} parquet shares, {mb / read_s:.0f} MB/s)"))
        tok_dir = tmp + "/tok"
        trained.save(tok_dir)
        tok = load_tokenizer(tok_dir)
        good = list(sample)

        def raw_best(n: int = 3) -> tuple[float, int]:
            best, n_tok = 0.0, 0
            for _ in range(n):
                t0 = time.perf_counter()
                n_tok = sum(len(ids) for ids in tok.encode_batch(good))
                best = max(best, n_tok / (time.perf_counter() - t0))
            return best, n_tok

        raw_all, n_tok = raw_best()
        code = ("import sys,time,json\nsys.path.insert(0, sys.argv[1])\n"
                "from data_pipeline import load_tokenizer\n"
                "tok=load_tokenizer(sys.argv[2]); texts=json.load(open(sys.argv[3]))\n"
                "rates=[]\nfor _ in range(3):\n t0=time.perf_counter(); "
                "n=sum(len(i) for i in tok.encode_batch(texts)); "
                "rates.append(n/(time.perf_counter()-t0))\nprint(rates[0], max(rates))\n")
        Path(tmp, "texts.json").write_text(json.dumps(good))
        one = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent.parent),
                              tok_dir, tmp + "/texts.json"], capture_output=True, text=True,
                             env={**os.environ, "RAYON_NUM_THREADS": "1"}, check=True)
        # first pass: a fresh process's cold BPE word cache, as in a data job's new worker
        raw_cold, raw_one = (float(x) for x in one.stdout.strip().splitlines()[-1].split())
        cores = os.cpu_count() or 1
        rows.append((f"raw encode_batch, {cores} rayon threads", raw_all,
                     f"{n_tok:,} tokens, best of 3; per core {raw_all / cores:,.0f}"))
        rows.append(("raw encode_batch, 1 thread", raw_one,
                     f"RAYON_NUM_THREADS=1, best of 3; its first pass (cold BPE cache, as a "
                     f"fresh worker's) {raw_cold:,.0f}"))
        ways = ([(workers, f"Ray Data, {workers} workers")] if workers and not quick else [])
        for w, label in [*ways, (0, f"in-process, {cores} rayon threads")]:
            t0 = time.perf_counter()
            m = run_job(spec, tok, f"{tmp}/out{w}", workers=w, rows_per_shard=rows_per_shard,
                        progress=False)["totals"]
            wall = time.perf_counter() - t0
            per_core = m["tokens_per_task_s"] / (1 if w else cores)
            rows.append((f"make data, {label}", per_core * (w or cores),
                         f"per core {per_core:,.0f} = {per_core / (raw_all / cores):.2f} x raw "
                         f"all-core per core, {per_core / raw_one:.2f} x raw 1-thread "
                         f"(x{per_core / raw_cold:.2f} its cold pass); "
                         f"{m['shards']} shards; wall {wall:.1f} s incl. start-up "
                         f"({m['tokens'] / wall:,.0f} tokens/s)"))
            out[f"data_w{w}"] = {**m, "wall_s": wall, "per_core": per_core}
        out.update(documents=written["docs"], mb=mb, raw_all=raw_all, raw_one=raw_one,
                   raw_one_cold=raw_cold, rows_per_shard=rows_per_shard,
                   cores=cores, tokens=n_tok, vocab=vocab, train_mb_s=mb / train_s,
                   read_mb_s=mb / read_s, expect=written["expect"])
    return rows, out


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
    p.add_argument("--fw-vocab", type=int, default=8192, help="BPE vocabulary (FineWeb part)")
    p.add_argument("--fw-files", type=int, default=8, help="parquet files (FineWeb part)")
    p.add_argument("--only-fineweb", action="store_true", help="only the FineWeb-Edu section")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a few documents, no Ray, no DataLoader workers")
    args = p.parse_args()
    a_derived = not args.a_tok_s
    if a_derived:
        args.a_tok_s = args.a_mfu * H100_BF16 / A_FLOPS_PER_TOKEN

    fw_rows, fw = fineweb_section(args.tokenizer, args.workers, args.fw_vocab, args.fw_files,
                                  args.quick)
    print(f"\nmake tokenizer / make data on a FineWeb-Edu-shaped corpus ({fw['documents']} "
          f"documents, {fw['mb']:.1f} MB, BPE {fw['vocab']}), {os.cpu_count()} CPUs")
    print(f"{'path':<44} {'rate':>12}  notes")
    for label, rate, notes in fw_rows:
        print(f"{label:<44} {rate:>12,.1f}  {notes}")
    if args.only_fineweb:
        write_json(args.json, {"fineweb": {**fw, "rows": [
            {"path": a, "rate": b, "notes": c} for a, b, c in fw_rows]}})
        return
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
        "fineweb": {**fw, "rows": [{"path": a, "rate": b, "notes": c} for a, b, c in fw_rows]},
        "rows": [{"path": label, "tokens_per_s": rate, "x_tiny": rate / args.tiny_tok_s,
                  "x_a": rate / args.a_tok_s, "notes": notes} for label, rate, notes in rows]})


if __name__ == "__main__":
    main()
