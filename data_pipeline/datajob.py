"""`make data`: a resumable pre-tokenization job from a raw corpus to megatron shards on storage.

    python -m data_pipeline data --data SPEC --tokenizer PATH --out DIR_OR_URL [--workers N]

The job is a list of tasks fixed before anything runs: one per input file, or per group of
parquet row groups (`--rows-per-shard`) so that a few large files still spread over many
workers, or one per hub dataset streamed with `datasets`. Each task makes one shard
(`<split>-<source>-<label>-<part>.bin/.idx`, one document per sequence, EOS appended) and
commits it: the `.bin` and `.idx` are uploaded first (on a local disk under a temporary name,
then renamed; on an object store each PUT is atomic), then `<prefix>.done.json` with its counts
and sizes. A shard exists for the job, for a resume and for every reader only once its marker
does, and a reader only ever sees shards through `manifest.json`, written last.

Resume: run the same command again. `_job.json` (written first) records the task list, the spec
and the tokenizer's hash; a second run with another plan or tokenizer into the same folder is
refused. Tasks whose marker is there and whose files have the recorded sizes are skipped; the
others run again from the start of their input, so a shard's bytes never depend on whether the
job was interrupted (tests/test_data_job.py compares them).

Engines: Ray Data (`ray.data.from_items(tasks).map(...)`) on the local Ray, the Ray cluster at
`$RAY_ADDRESS` (joined from its head: `ray://` or `auto`), or, when `$RAY_ADDRESS` is the job
API's `http://` address, a Ray job there running this same command (`submit_data_job`).
`--workers 0` runs the tasks in this process (the same bytes out).

The manifest holds what training checks before it starts (`check_tokenized`): documents, tokens
and skipped records by reason per source, the tokenizer's hash and vocabulary, and every shard
with its sizes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

from .sources import SourcePlan, _filter_split, hub_records, iter_file_records, plan_split, probe
from .spec import DataSpec, Source
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_str

MANIFEST_FORMAT = "trmgpt-pretok-v1"  # the format spec.spec_from_manifest and PretokLoader read
JOB_FILE = "_job.json"
ROWS_PER_SHARD = 100_000  # FineWeb-Edu: ~1k tokens a document -> ~100M tokens, ~200 MB a shard
ENCODE_BATCH = 1024


# ---------------------------------------------------------------- where things go


def storage_root() -> str:
    """`$STORAGE` of the recipes: $TRMGPT_STORAGE (what the cluster's nodes have), else $STORAGE
    (what `make cluster-up STORAGE=...` takes), else the local folder `storage/` of the repo."""
    root = os.environ.get("TRMGPT_STORAGE") or os.environ.get("STORAGE")
    if root:
        return root.rstrip("/")
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "storage")


def expand_storage(path: str) -> str:
    """`$STORAGE/...` or `${STORAGE}/...` in a recipe path -> under `storage_root()`."""
    for var in ("${STORAGE}", "$STORAGE"):
        if path.startswith(var):
            return storage_root() + path[len(var):]
    return path


# ---------------------------------------------------------------- reading records


def _text_record(value: Any) -> dict:
    """One parquet/hub cell as a record: what real dumps hold besides a good string is counted.
    null -> missing_field; bytes that are valid UTF-8 are text, others undecodable; any other
    type (an int, a list) -> wrong_type; blank -> empty."""
    if isinstance(value, str):
        return {"text": value, "skip": "" if value.strip() else "empty"}
    if value is None:
        return {"text": "", "skip": "missing_field"}
    if isinstance(value, bytes):
        try:
            return _text_record(value.decode("utf-8"))
        except UnicodeDecodeError:
            return {"text": "", "skip": "undecodable"}
    return {"text": "", "skip": "wrong_type"}


def parquet_row_groups(path: str) -> list[int]:
    """Rows of every row group of a parquet file (raises on a file that is no parquet)."""
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _parquet_records(path: str, text_field: str, groups: list[int]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                for g in groups:
                    for _ in range(pf.metadata.row_group(g).num_rows):
                        yield {"text": "", "skip": "missing_field"}
                return
            for g in groups:
                col = pf.read_row_group(g, columns=[text_field]).column(0)
                for value in col.to_pylist():
                    yield _text_record(value)
    except FileNotFoundError:
        raise
    except (OSError, ValueError):  # a corrupt page or footer: the rest of the task is lost
        yield {"text": "", "skip": "unreadable"}


def task_records(task: dict) -> Iterator[dict]:
    """Records `{"text", "skip"}` of one task, after the split's filter (runs in workers)."""
    source = Source(path=task["source"], text_field=task["text_field"],
                    format="hub" if task["fmt"] == "hub" else "auto",
                    hub_config=task["hub_config"], hub_split=task["hub_split"])
    plan = SourcePlan(0, source, task["split"], [] if task["fmt"] == "hub" else [task["file"]],
                      task["fmt"], task["keep"], task["doc_fraction"])
    if task["fmt"] == "hub":
        records: Any = hub_records(plan)
    elif task["row_groups"] is not None:
        records = _parquet_records(task["file"], task["text_field"], task["row_groups"])
    else:
        fmt = task["fmt"] if task["fmt"] != "auto" else _infer(task["file"])
        records = iter_file_records(task["file"], fmt, task["text_field"])
    yield from _filter_split(iter(records), plan)


def _infer(path: str) -> str:
    from .sources import infer_format

    return infer_format(path)


# ---------------------------------------------------------------- planning


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:48]


def plan_tasks(spec: DataSpec, rows_per_shard: int = ROWS_PER_SHARD) -> list[dict]:
    """The job's tasks, in a fixed order (sorted files, row groups in order): one shard each."""
    tasks: list[dict] = []
    for split in ("train", "val"):
        if split == "val" and not spec.val_sources and spec.val_fraction == 0:
            continue
        plans = plan_split(spec, split)
        if split == "train":
            probe(plans)  # a source with no usable text fails here, naming it
        for plan in plans:
            src = plan.source
            base = {"split": split, "source_index": plan.index, "name": src.label,
                    "weight": src.weight, "source": src.path, "fmt": plan.fmt,
                    "keep": plan.keep, "doc_fraction": plan.doc_fraction,
                    "text_field": src.text_field, "hub_config": src.hub_config,
                    "hub_split": src.hub_split, "file": "", "row_groups": None}
            parts: list[dict] = []
            if plan.fmt == "hub":
                parts.append({})
            for f in plan.files:
                fmt = plan.fmt if plan.fmt != "auto" else _infer(f)
                if fmt != "parquet":
                    parts.append({"file": f})
                    continue
                try:
                    sizes = parquet_row_groups(f)
                except (OSError, ValueError):
                    parts.append({"file": f})  # unreadable: the task counts it as such
                    continue
                group: list[int] = []
                rows = 0
                for g, n in enumerate(sizes):
                    group.append(g)
                    rows += n
                    if rows >= rows_per_shard:
                        parts.append({"file": f, "row_groups": group})
                        group, rows = [], 0
                if group or not sizes:
                    parts.append({"file": f, "row_groups": group})
            for k, part in enumerate(parts):
                prefix = f"{split}-{plan.index:02d}-{_label(src.label)}-{k:05d}"
                tasks.append({**base, **part, "prefix": prefix})
    return tasks


# ---------------------------------------------------------------- one task -> one shard


_TOKENIZERS: dict[str, Tokenizer] = {}


def _storage(out: str) -> tuple[Any, str, bool]:
    fs, path = fsspec.core.url_to_fs(out)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return fs, path.rstrip("/"), "file" in protocols or "local" in protocols


def _commit(fs: Any, local: bool, src: str, dest: str) -> None:
    """Upload one finished file: a rename on a local disk, a single PUT on an object store; in
    both cases the object under `dest` is either absent or whole."""
    if local:
        tmp = f"{dest}.tmp-{os.getpid()}"
        fs.put_file(src, tmp)
        os.replace(tmp, dest)
    else:
        fs.put_file(src, dest)


def run_task(task: dict, tok: Tokenizer, out: str) -> dict:
    """Tokenize one task into one shard under `out` and commit it; returns its marker."""
    from .pretok import megatron_datasets

    indexed = megatron_datasets()[0]
    t0 = time.perf_counter()
    dtype = indexed.DType.optimal_dtype(tok.vocab_size)
    fs, root, local = _storage(out)
    counts = {"docs": 0, "tokens": 0, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        bin_path = os.path.join(tmp, task["prefix"] + ".bin")
        builder = indexed.IndexedDatasetBuilder(bin_path, dtype=dtype)

        def flush(texts: list[str]) -> None:
            for ids in tok.encode_batch(texts):
                doc = np.empty(len(ids) + 1, dtype=dtype)
                doc[:-1] = ids
                doc[-1] = tok.eos_id
                builder.add_document(doc, [len(doc)])
                counts["docs"] += 1
                counts["tokens"] += len(doc)

        texts: list[str] = []
        chars = 0
        for rec in task_records(task):
            if rec["skip"]:
                counts["skipped"][rec["skip"]] = counts["skipped"].get(rec["skip"], 0) + 1
                continue
            texts.append(rec["text"])
            chars += len(rec["text"])
            if len(texts) == ENCODE_BATCH:
                flush(texts)
                texts = []
        flush(texts)
        idx_path = os.path.join(tmp, task["prefix"] + ".idx")
        builder.finalize(idx_path)
        marker = {"prefix": task["prefix"], **counts, "dtype": np.dtype(dtype).name,
                  "bin_bytes": os.path.getsize(bin_path), "idx_bytes": os.path.getsize(idx_path),
                  "tokenizer_sha256": tok.sha256, "chars": chars}
        for path in (bin_path, idx_path):
            _commit(fs, local, path, f"{root}/{os.path.basename(path)}")
        done = os.path.join(tmp, task["prefix"] + ".done.json")
        # Seconds of this task (read, tokenize, write, upload) for throughput; not part of the
        # shard's bytes.
        marker["seconds"] = round(time.perf_counter() - t0, 4)
        with open(done, "w") as f:
            json.dump(marker, f, sort_keys=True)
        _commit(fs, local, done, f"{root}/{task['prefix']}.done.json")  # the commit point
    delay = float(os.environ.get("TRMGPT_DATA_TASK_DELAY_S", "0") or 0)
    if delay:  # tests only: stretches the job so that a kill lands halfway through it
        time.sleep(delay)
    return marker


def finished_shards(out: str, tasks: list[dict], tok: Tokenizer) -> dict[str, dict]:
    """Markers of the committed shards whose files are there with the recorded sizes."""
    fs, root, _ = _storage(out)
    if not fs.exists(root):
        return {}
    sizes = {os.path.basename(p["name"]): p.get("size") for p in fs.ls(root, detail=True)}
    done: dict[str, dict] = {}
    for t in tasks:
        if f"{t['prefix']}.done.json" not in sizes:
            continue
        with fs.open(f"{root}/{t['prefix']}.done.json", "rt") as f:
            marker = json.load(f)
        if (marker.get("tokenizer_sha256") == tok.sha256
                and sizes.get(t["prefix"] + ".bin") == marker["bin_bytes"]
                and sizes.get(t["prefix"] + ".idx") == marker["idx_bytes"]):
            done[t["prefix"]] = marker
    return done


# ---------------------------------------------------------------- engines


def _worker_fn(tok_ref: Any, out: str) -> Any:
    def fn(row: dict) -> dict:
        import ray

        key = tok_ref.hex()
        if key not in _TOKENIZERS:
            # One rayon thread per Ray CPU: Ray already runs one task per CPU, and a pool per
            # worker as wide as the machine would oversubscribe it.
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(cpus))))
            _TOKENIZERS[key] = tokenizer_from_str(ray.get(tok_ref))
        marker = run_task(json.loads(row["task"]), _TOKENIZERS[key], out)
        return {"marker": json.dumps(marker)}

    return fn


def _run_ray(tasks: list[dict], tok: Tokenizer, out: str, workers: int | None,
             on_done: Any) -> None:
    import ray
    import ray.data

    from .pretok import init_ray

    started = init_ray(workers)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks],
                                 override_num_blocks=len(tasks))
        # One task per block, each a whole shard: Ray Data schedules them over every CPU of the
        # cluster and retries a task whose worker died (a task is idempotent).
        ds = ds.map(_worker_fn(ray.put(tok.to_str()), out), num_cpus=1)
        for row in ds.iter_rows():
            on_done(json.loads(row["marker"]))
    finally:
        ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


def run_job(spec: DataSpec | str, tok: Tokenizer, out: str, workers: int | None = None,
            rows_per_shard: int = ROWS_PER_SHARD, progress: bool = True) -> dict[str, Any]:
    """Plan, resume or run every task, then write the manifest. Returns the manifest."""
    spec = DataSpec.parse(spec)
    if spec.is_pretokenized:
        raise ValueError(f"{spec.name!r} is already tokenized")
    out = out.rstrip("/")
    fs, root, _ = _storage(out)
    tasks = plan_tasks(spec, rows_per_shard)
    job = {"format": MANIFEST_FORMAT, "spec": spec.to_dict(), "tokenizer_sha256": tok.sha256,
           "rows_per_shard": rows_per_shard, "tasks": tasks}
    job_path = f"{root}/{JOB_FILE}"
    if fs.exists(job_path):
        with fs.open(job_path, "rt") as f:
            old = json.load(f)
        if old != job:
            what = ("tokenizer" if old.get("tokenizer_sha256") != tok.sha256 else
                    "data spec or its files" if old.get("tasks") != tasks else "settings")
            raise ValueError(f"{out} holds another job's shards (its {what} differ): give a new "
                             "--out, or remove the folder to start over")
    else:
        fs.makedirs(root, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, JOB_FILE)
            with open(p, "w") as f:
                json.dump(job, f, indent=1, sort_keys=True)
            _commit(fs, _storage(out)[2], p, job_path)
    done = finished_shards(out, tasks, tok)
    pending = [t for t in tasks if t["prefix"] not in done]
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    log(f"data job: {len(tasks)} shards, {len(done)} already committed (resumed), "
        f"{len(pending)} to make -> {out}")
    from .pretok import megatron_datasets

    megatron_datasets()  # its import (seconds) is not tokenization time
    t0 = time.time()
    made: list[dict] = []

    def on_done(marker: dict) -> None:
        made.append(marker)
        done[marker["prefix"]] = marker
        log(f"  committed {marker['prefix']}: {marker['docs']:,} docs, "
            f"{marker['tokens']:,} tokens ({len(done)}/{len(tasks)})")

    if pending and workers == 0:
        for t in pending:
            on_done(run_task(t, tok, out))
    elif pending:
        _run_ray(pending, tok, out, workers, on_done)
    seconds = time.time() - t0
    manifest = build_manifest(spec, tok, tasks, done, seconds, made,
                              "in-process" if workers == 0 else "ray-data")
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "manifest.json")
        with open(p, "w") as f:
            json.dump(manifest, f, indent=1)
        _commit(fs, _storage(out)[2], p, f"{root}/manifest.json")
    return manifest


def build_manifest(spec: DataSpec, tok: Tokenizer, tasks: list[dict], done: dict[str, dict],
                   seconds: float, made: list[dict], engine: str) -> dict[str, Any]:
    """The manifest `spec_from_manifest` reads: one entry per shard (its weight is the source's
    weight times the shard's share of the source's tokens, so megatron's blend over shards
    draws each source by its weight), plus per-source and total counts."""
    per_source: dict[tuple[str, int], dict] = {}
    for t in tasks:
        m = done[t["prefix"]]
        s = per_source.setdefault((t["split"], t["source_index"]), {
            "split": t["split"], "name": t["name"], "source": t["source"], "weight": t["weight"],
            "docs": 0, "tokens": 0, "skipped": {}, "shards": 0})
        s["docs"] += m["docs"]
        s["tokens"] += m["tokens"]
        s["shards"] += 1
        for kind, n in m["skipped"].items():
            s["skipped"][kind] = s["skipped"].get(kind, 0) + n
    for s in per_source.values():
        if s["split"] == "train" and s["docs"] == 0:
            raise ValueError(f"no usable text in source {s['source']!r} "
                             f"(skipped: {s['skipped']})")
    entries: dict[str, list[dict]] = {"train": [], "val": []}
    for t in tasks:
        m = done[t["prefix"]]
        if m["docs"] == 0:  # an empty shard (all records skipped) is no dataset for megatron
            continue
        s = per_source[(t["split"], t["source_index"])]
        entries[t["split"]].append({
            "split": t["split"], "name": t["name"], "prefix": t["prefix"],
            "source": t["source"], "file": t["file"], "row_groups": t["row_groups"],
            "weight": t["weight"] * m["tokens"] / s["tokens"], "docs": m["docs"],
            "tokens": m["tokens"], "skipped": m["skipped"], "bin_bytes": m["bin_bytes"],
            "idx_bytes": m["idx_bytes"]})
    skipped: dict[str, int] = {}
    for s in per_source.values():
        for kind, n in s["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
    new_tokens = sum(m["tokens"] for m in made)
    dtypes = {m["dtype"] for m in done.values()}
    return {
        "format": MANIFEST_FORMAT,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tokenizer": {"path": tok.path, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "padded_vocab_size": tok.padded_vocab_size, "eos_id": tok.eos_id,
                      "bos_id": tok.bos_id},
        "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
        "eos_appended": True,
        "spec": spec.to_dict(),
        "sources": sorted(per_source.values(), key=lambda s: (s["split"] != "train", s["name"])),
        "train": entries["train"],
        "val": entries["val"],
        "totals": {
            "docs": sum(s["docs"] for s in per_source.values()),
            "tokens": sum(s["tokens"] for s in per_source.values()),
            "train_tokens": sum(s["tokens"] for s in per_source.values()
                                if s["split"] == "train"),
            "val_tokens": sum(s["tokens"] for s in per_source.values() if s["split"] == "val"),
            "skipped": skipped,
            "shards": len(tasks),
            "shards_made_this_run": len(made),
            "seconds": round(seconds, 3),
            "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
            # per worker CPU: tokens over the summed seconds of the tasks (fixed start-up costs
            # of Ray and its workers left out)
            "tokens_per_task_s": round(new_tokens / max(sum(m.get("seconds", 0) for m in made),
                                                        1e-9), 1),
            "engine": engine,
        },
    }


def format_report(manifest: dict[str, Any], out: str) -> str:
    t = manifest["totals"]
    lines = [f"tokenized into {out} ({t['engine']}, dtype {manifest['dtype']}, tokenizer "
             f"sha256 {manifest['tokenizer']['sha256'][:12]}, vocab "
             f"{manifest['tokenizer']['vocab_size']})",
             f"{'split':<6} {'source':<28} {'shards':>6} {'docs':>11} {'tokens':>15}  skipped"]
    for s in manifest["sources"]:
        sk = ", ".join(f"{k}={v}" for k, v in sorted(s["skipped"].items())) or "-"
        lines.append(f"{s['split']:<6} {s['name'][:28]:<28} {s['shards']:>6} {s['docs']:>11,} "
                     f"{s['tokens']:>15,}  {sk}")
    sk = ", ".join(f"{k}={v}" for k, v in sorted(t["skipped"].items())) or "none"
    lines.append(f"total: {t['docs']:,} docs, {t['tokens']:,} tokens ({t['train_tokens']:,} "
                 f"train, {t['val_tokens']:,} val); skipped: {sk}; this run made "
                 f"{t['shards_made_this_run']}/{t['shards']} shards in {t['seconds']:.1f} s, "
                 f"{t['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)


# ---------------------------------------------------------------- the check training makes


def check_tokenized(data: str, tokenizer: str | Tokenizer, make_hint: str = "") -> dict:
    """Refuse (ValueError/FileNotFoundError, one line that says what to run) unless `data` is
    a finished `make data` output for this tokenizer with all its shards in place."""
    hint = f": {make_hint}" if make_hint else ""
    fs, root, _ = _storage(data)
    manifest_path = f"{root}/manifest.json"
    if not fs.exists(manifest_path):
        if fs.exists(f"{root}/{JOB_FILE}"):
            raise ValueError(f"data {data} is unfinished (a `make data` job stopped before its "
                             f"manifest); run the same `make data` again to resume it{hint}")
        raise FileNotFoundError(f"tokenized data {data} is missing (no manifest.json){hint}")
    with fs.open(manifest_path, "rt") as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path} is not a trmgpt tokenized-data manifest")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    info = manifest["tokenizer"]
    if info["sha256"] != tok.sha256:
        raise ValueError(f"data {data} was tokenized with another tokenizer (sha256 "
                         f"{info['sha256'][:12]}, vocab {info['vocab_size']}) than "
                         f"{tok.path} (sha256 {tok.sha256[:12]}, vocab {tok.vocab_size}): "
                         f"re-tokenize with this one{hint}")
    sizes = {os.path.basename(p["name"]): p.get("size") for p in fs.ls(root, detail=True)}
    for e in manifest["train"] + manifest["val"]:
        for ext in ("bin", "idx"):
            want = e.get(f"{ext}_bytes")
            got = sizes.get(f"{e['prefix']}.{ext}")
            if got is None or (want is not None and got != want):
                raise ValueError(f"data {data}: shard {e['prefix']}.{ext} is missing or has "
                                 f"{got} bytes where the manifest says {want}{hint}")
    if not manifest["val"]:
        raise ValueError(f"data {data} has no validation shards: bits per byte cannot be "
                         f"measured{hint}")
    return manifest


# ---------------------------------------------------------------- a Ray job on a cluster


def submit_data_job(argv: list[str], address: str) -> str:
    """Run `python -m data_pipeline data ARGV` as a Ray job on the cluster at `address` (the
    job API's http:// address); its driver joins the cluster (`auto`) and Ray Data spreads the
    tasks over every node. Returns the submission id."""
    from ray.job_submission import JobSubmissionClient

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = " ".join(shlex.quote(a) for a in ["python", "-m", "data_pipeline", "data", *argv])
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # refused, unreachable, auth: one line naming where we looked
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"no Ray cluster answers at RAY_ADDRESS={address} ({first}); open the "
                         "tunnel with `make dashboard`, or unset RAY_ADDRESS to run on this "
                         "machine's Ray") from None
    env = {"RAY_ADDRESS": "auto", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "0")}
    return client.submit_job(
        entrypoint=cmd,
        runtime_env={"working_dir": repo, "env_vars": env,
                     "excludes": ["runs", "storage", "**/__pycache__", ".venv", "tests",
                                  ".pytest_cache"]},
        metadata={"trmgpt": "data", "argv": json.dumps(argv)})
