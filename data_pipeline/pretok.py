"""Pre-tokenized path: Ray Data tokenization into megatron-core indexed shards, and a
loader over megatron-core's GPTDataset / BlendedMegatronDatasetBuilder.

Layout of a tokenized directory: `manifest.json` plus one `.bin`/`.idx` pair per source
and split (`train-00-<name>`, `val-00-<name>`), one document per sequence with EOS
appended, written with `IndexedDatasetBuilder`.

Global order: sample i of the (seeded, blended) megatron dataset is global sample i.
Global micro-batch k covers samples [k*W*B, (k+1)*W*B) and rank r reads the slice
[k*W*B + r*B, k*W*B + (r+1)*B). The loader state is `consumed_samples`, so a run can
resume on any world size: with the same global batch it continues the same sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from .corpus import cache_dir
from .sources import SourcePlan, hub_records, iter_plan_records, plan_split, probe
from .spec import DataSpec, Source
from .tokenizer import Tokenizer, tokenizer_from_str

MANIFEST_FORMAT = "trmgpt-pretok-v1"
BATCH_DOCS = 256


def megatron_datasets():
    """Import megatron-core's dataset modules (slow: ~9 s) only when needed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    return indexed_dataset, BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig


# ---------------------------------------------------------------- tokenize: tasks and workers


def build_tasks(spec: DataSpec) -> tuple[list[dict], list[dict]]:
    """(prefixes, read tasks): one prefix per source and split, one task per file."""
    prefixes: list[dict] = []
    tasks: list[dict] = []
    for split in ("train", "val"):
        if split == "val" and not spec.val_sources and spec.val_fraction == 0:
            continue
        plans = plan_split(spec, split)
        if split == "train":
            probe(plans)  # an empty val split only warns (see tokenize_spec)
        for plan in plans:
            if plan.fmt == "task":  # data_pipeline/tasks.py: generated without end
                raise ValueError(f"source {plan.source.path!r} is a generated task: stream it "
                                 "(an endless source cannot be pre-tokenized)")
            label = re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.source.label)[:48]
            prefixes.append({
                "split": split, "name": plan.source.label, "weight": plan.source.weight,
                "prefix": f"{split}-{plan.index:02d}-{label}", "source": plan.source.path,
            })
            base = {"prefix": len(prefixes) - 1, "split": split, "fmt": plan.fmt,
                    "keep": plan.keep, "doc_fraction": plan.doc_fraction,
                    "source": plan.source.path, "text_field": plan.source.text_field,
                    "hub_config": plan.source.hub_config, "hub_split": plan.source.hub_split}
            for f in plan.files or [""]:  # hub sources: one task streams the whole dataset
                tasks.append({**base, "file": f})
    return prefixes, tasks


def read_task(task: dict) -> Iterator[dict]:
    """Records `{"prefix", "text", "skip"}` of one task (runs in Ray workers)."""
    hub = task["fmt"] == "hub"
    source = Source(path=task["source"], text_field=task["text_field"],
                    format="hub" if hub else "auto", hub_config=task["hub_config"],
                    hub_split=task["hub_split"])
    plan = SourcePlan(0, source, task["split"], [] if hub else [task["file"]], task["fmt"],
                      task["keep"], task["doc_fraction"])
    records = hub_records(plan) if hub else iter_plan_records(plan)
    for rec in records:
        yield {"prefix": task["prefix"], "text": rec["text"], "skip": rec["skip"]}


def tokenize_records(texts: list[str], skips: list[str], tok: Tokenizer) -> list[list[int]]:
    """Token ids per record; skipped records get no ids."""
    keep = [i for i, s in enumerate(skips) if not s]
    ids: list[list[int]] = [[] for _ in texts]
    for i, enc in zip(keep, tok.encode_batch([texts[i] for i in keep]), strict=True):
        ids[i] = enc
    return ids


_TOKENIZERS: dict[str, Tokenizer] = {}


def _ray_tokenize_fn(tok_ref: Any) -> Any:
    """A map_batches function that loads the tokenizer once per Ray worker process."""

    def tokenize(batch: Any) -> Any:
        import pyarrow as pa
        import ray

        key = tok_ref.hex()
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = tokenizer_from_str(ray.get(tok_ref))
        texts = batch.column("text").to_pylist()
        skips = batch.column("skip").to_pylist()
        ids = tokenize_records(texts, skips, _TOKENIZERS[key])
        return pa.table({
            "prefix": batch.column("prefix"),
            "skip": batch.column("skip"),
            "ids": pa.array(ids, type=pa.list_(pa.int32())),
        })

    return tokenize


# ---------------------------------------------------------------- tokenize: driver


class _Writer:
    """IndexedDatasetBuilder per prefix, plus per-prefix counts."""

    def __init__(self, out_dir: str, prefixes: list[dict], tok: Tokenizer) -> None:
        indexed, *_ = megatron_datasets()
        self.dtype = indexed.DType.optimal_dtype(tok.vocab_size)
        self.eos = tok.eos_id
        self.prefixes = prefixes
        self.builders = [
            indexed.IndexedDatasetBuilder(os.path.join(out_dir, p["prefix"] + ".bin"),
                                          dtype=self.dtype)
            for p in prefixes
        ]
        self.out_dir = out_dir
        for p in prefixes:
            p.update(docs=0, tokens=0, skipped={})

    def add(self, prefix: int, ids: np.ndarray | list[int], skip: str) -> int:
        entry = self.prefixes[prefix]
        if skip:
            entry["skipped"][skip] = entry["skipped"].get(skip, 0) + 1
            return 0
        doc = np.empty(len(ids) + 1, dtype=self.dtype)
        doc[:-1] = ids
        doc[-1] = self.eos
        self.builders[prefix].add_document(doc, [len(doc)])
        entry["docs"] += 1
        entry["tokens"] += len(doc)
        return len(doc)

    def finalize(self) -> None:
        for p, builder in zip(self.prefixes, self.builders, strict=True):
            builder.finalize(os.path.join(self.out_dir, p["prefix"] + ".idx"))


def init_ray(workers: int | None) -> bool:
    """Start local Ray on `workers` CPUs, or join `$RAY_ADDRESS`; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    pkg = os.path.dirname(os.path.abspath(__file__))
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if os.environ.get("RAY_ADDRESS"):
        # Other machines lack this package: ship it with the job.
        ray.init(runtime_env={"py_modules": [pkg]}, **kwargs)
    else:
        # Local workers only need the path (packaging costs seconds per run).
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(pkg),
                                                           os.environ.get("PYTHONPATH")]))}
        ray.init(address="local", num_cpus=workers or os.cpu_count(),
                 runtime_env={"env_vars": env}, **kwargs)
    return True


def _iter_ray(tasks: list[dict], tok: Tokenizer, workers: int | None) -> Iterator[tuple]:
    import ray
    import ray.data

    started = init_ray(workers)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    try:
        ctx.execution_options.preserve_order = True  # deterministic shard contents
        ctx.enable_progress_bars = False  # our own bar counts documents
        ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
        ds = ds.flat_map(read_task)
        ds = ds.map_batches(_ray_tokenize_fn(ray.put(tok.to_str())), batch_size=BATCH_DOCS,
                            batch_format="pyarrow")
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids = batch.column("ids").combine_chunks()
            offsets = ids.offsets.to_numpy()
            values = ids.values.to_numpy(zero_copy_only=False)
            prefix = batch.column("prefix").to_pylist()
            skip = batch.column("skip").to_pylist()
            for j in range(batch.num_rows):
                yield prefix[j], values[offsets[j]:offsets[j + 1]], skip[j]
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


def _iter_local(tasks: list[dict], tok: Tokenizer) -> Iterator[tuple]:
    for task in tasks:
        batch: list[dict] = []
        for rec in read_task(task):
            batch.append(rec)
            if len(batch) == BATCH_DOCS:
                yield from _tokenize_local(batch, tok)
                batch = []
        yield from _tokenize_local(batch, tok)


def _tokenize_local(batch: list[dict], tok: Tokenizer) -> Iterator[tuple]:
    ids = tokenize_records([r["text"] for r in batch], [r["skip"] for r in batch], tok)
    for rec, doc in zip(batch, ids, strict=True):
        yield rec["prefix"], doc, rec["skip"]


def tokenize_spec(spec: DataSpec | str, tokenizer: Tokenizer, out: str,
                  workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Tokenize every source and split of `spec` into indexed shards under `out`.

    `workers`: Ray Data on that many local CPUs (None: all; or the cluster at
    `$RAY_ADDRESS`); 0 runs in this process without Ray (same bytes out).
    Returns the manifest (also written to `out/manifest.json`).
    """
    spec = DataSpec.parse(spec)
    if spec.is_pretokenized:
        raise ValueError(f"{spec.name!r} is already tokenized")
    megatron_datasets()  # its ~9 s import is not tokenization time
    t0 = time.time()
    prefixes, tasks = build_tasks(spec)
    remote = "://" in out and not out.startswith("file://")
    local_out = tempfile.mkdtemp(prefix="tokenize-", dir=cache_dir()) if remote else out
    os.makedirs(local_out, exist_ok=True)
    writer = _Writer(local_out, prefixes, tok=tokenizer)
    records = _iter_local(tasks, tokenizer) if workers == 0 else _iter_ray(tasks, tokenizer,
                                                                          workers)
    bar = _progress(progress)
    total_tokens = n_records = 0
    for prefix, ids, skip in records:
        total_tokens += writer.add(prefix, ids, skip)
        n_records += 1
        if n_records % 256 == 0:
            bar.update(256)
            bar.set_postfix(tokens=f"{total_tokens:,}", refresh=False)
    bar.update(n_records % 256)
    bar.close()
    writer.finalize()
    seconds = time.time() - t0

    train = [p for p in prefixes if p["split"] == "train"]
    for p in train:
        if p["docs"] == 0:
            raise ValueError(f"no usable text in source {p['source']!r} (skipped: {p['skipped']})")
    val = [p for p in prefixes if p["split"] == "val" and p["docs"] > 0]
    for p in prefixes:
        if p["split"] == "val" and p["docs"] == 0:
            print(f"warning: no validation documents from {p['source']!r}; "
                  f"dropping {p['prefix']}", file=sys.stderr)
            for ext in (".bin", ".idx"):
                os.remove(os.path.join(local_out, p["prefix"] + ext))
    skipped: dict[str, int] = {}
    for p in prefixes:
        for kind, n in p["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tokenizer": {"path": tokenizer.path, "sha256": tokenizer.sha256,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "bos_id": tokenizer.bos_id},
        "dtype": np.dtype(writer.dtype).name,
        "eos_appended": True,
        "spec": spec.to_dict(),
        "train": train,
        "val": val,
        "totals": {
            "docs": sum(p["docs"] for p in prefixes),
            "tokens": sum(p["tokens"] for p in prefixes),
            "skipped": skipped,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(total_tokens / max(seconds, 1e-9), 1),
            "engine": "in-process" if workers == 0 else "ray-data",
        },
    }
    with open(os.path.join(local_out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if remote:
        import fsspec

        fs, path = fsspec.core.url_to_fs(out)
        fs.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(local_out)):
            fs.put_file(os.path.join(local_out, name), f"{path.rstrip('/')}/{name}")
        shutil.rmtree(local_out, ignore_errors=True)
    return manifest


def _progress(enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(unit=" records", disable=not enabled, mininterval=0.5, file=sys.stderr)


def format_summary(manifest: dict[str, Any], out: str) -> str:
    """The table `tokenize` prints: docs, tokens, skipped by kind, seconds, tokens/s."""
    lines = [f"tokenized into {out} ({manifest['totals']['engine']}, dtype "
             f"{manifest['dtype']})",
             f"{'split':<6} {'prefix':<40} {'docs':>9} {'tokens':>13}  skipped"]
    for p in manifest["train"] + manifest["val"]:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(p["skipped"].items())) or "-"
        lines.append(f"{p['split']:<6} {p['prefix']:<40} {p['docs']:>9,} {p['tokens']:>13,}"
                     f"  {skipped}")
    t = manifest["totals"]
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(t["skipped"].items())) or "none"
    lines.append(f"total: docs={t['docs']:,} tokens={t['tokens']:,} skipped: {skipped}; "
                 f"{t['seconds']:.1f} s, {t['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)


# ---------------------------------------------------------------- reading


def localize_prefix(prefix: str) -> str:
    """A local path prefix for an indexed dataset, wherever it lives.

    Remote shards (any fsspec URL) are copied into the cache (atomically, re-used when the
    sizes match). Local ones are symlinked into the cache so megatron writes its index
    cache there, never next to the data.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(prefix)
    remote = "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    identity = [prefix]
    for ext in (".idx", ".bin"):
        if not fs.exists(path + ext):
            raise FileNotFoundError(f"indexed dataset file not found: {prefix}{ext}")
        info = fs.info(path + ext)
        # Size and modification time in the key: re-tokenized data never meets the
        # megatron index cache of the old data.
        identity += [str(info.get(k)) for k in ("size", "mtime", "LastModified", "updated")]
    digest = hashlib.sha1("|".join(identity).encode("utf-8")).hexdigest()[:16]
    dest_dir = cache_dir() / "shards" / digest
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = str(dest_dir / os.path.basename(path))
    for ext in (".idx", ".bin"):
        target = dest + ext
        if remote:
            if os.path.exists(target) and os.path.getsize(target) == fs.size(path + ext):
                continue
            tmp = f"{target}.tmp{os.getpid()}"
            fs.get_file(path + ext, tmp)
            os.replace(tmp, target)
        else:
            real = os.path.abspath(path + ext)
            if os.path.islink(target) and os.readlink(target) == real:
                continue
            tmp = f"{target}.tmp{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            os.symlink(real, tmp)
            os.replace(tmp, target)
    return dest


def _index_cache() -> str:
    return os.environ.get("TRMGPT_INDEX_CACHE") or str(cache_dir() / "megatron_index")


def _lengths(indexed: Any, prefix: str) -> np.ndarray:
    """Document lengths of an indexed dataset, copied: its mmap closes with the object."""
    ds = indexed.IndexedDataset(prefix)
    lengths = np.array(ds.sequence_lengths, dtype=np.int64)
    del ds
    return lengths


class _MegatronTokenizer:
    """The attributes megatron's GPTDataset reads from a tokenizer."""

    def __init__(self, tok: Tokenizer) -> None:
        self.vocab_size = tok.vocab_size
        self.eod = tok.eos_id
        # Part of megatron's dataset cache key.
        self.unique_identifiers = {"class": "trmgpt", "sha256": tok.sha256,
                                   "vocab_size": tok.vocab_size}


class _Samples:
    """Map-style view: global sample i -> (inputs, targets) of length seq_len."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        item = self.dataset[i]
        return item["tokens"], item["labels"]


class _RankBatches:
    """Batch sampler: this rank's slice of each global micro-batch from `start` on."""

    def __init__(self, start: int, total: int, world: int, batch: int, rank: int) -> None:
        self.start, self.total, self.world, self.batch, self.rank = start, total, world, batch, rank

    def __iter__(self) -> Iterator[list[int]]:
        step = self.world * self.batch
        for base in range(self.start, self.total - step + 1, step):
            first = base + self.rank * self.batch
            yield list(range(first, first + self.batch))

    def __len__(self) -> int:
        return max(0, (self.total - self.start) // (self.world * self.batch))


class PretokLoader:
    """Iterable of (inputs, targets) over megatron GPTDataset samples in global order."""

    path = "pretok"

    def __init__(self, spec: DataSpec, tok: Tokenizer, split: str, batch_size: int,
                 seq_len: int, rank: int, world_size: int, seed: int, num_workers: int,
                 num_samples: int | None) -> None:
        import torch

        self.spec, self.tok, self.split = spec, tok, split
        self.batch_size, self.seq_len, self.rank, self.world_size = (
            batch_size, seq_len, rank, world_size)
        self.seed, self.num_workers, self.num_samples = seed, num_workers, num_samples
        self.sources = spec.sources if split == "train" else spec.val_sources
        if not self.sources:
            raise ValueError(f"tokenized data {spec.name!r} has no {split} shards")
        self.sources = self._drop_short_shards(self.sources)
        self._check_tokenizer()
        self.dataset = self._build()
        self.total = len(self.dataset) if num_samples is None else num_samples
        if self.total < world_size * batch_size:
            raise ValueError(
                f"{split} data of {spec.name!r} has {self.total} samples of {seq_len + 1} "
                f"tokens: fewer than one global batch ({world_size} x {batch_size})"
            )
        self.consumed = 0
        self.rebudgeted: tuple[int, int] | None = None  # (saved, now) sample budget on resume
        self._torch = torch

    def _drop_short_shards(self, sources: list[Source]) -> list[Source]:
        """Shards shorter than one sample (seq_len + 1 tokens): megatron's GPTDataset cannot
        index them (it asserts). `make data` writes one shard per file or row-group range, so a
        held-out split spread thin over many files, or a file's last row groups, can make one;
        its few documents are left out of this split (same ones every run at this seq_len)."""
        entries = {e["prefix"]: e for e in (self.spec.manifest or {}).get(self.split, [])}
        keep = [s for s in sources
                if (e := entries.get(os.path.basename(s.path))) is None
                or e["tokens"] >= self.seq_len + 2]
        if keep and len(keep) < len(sources) and self.rank == 0:
            left = [os.path.basename(s.path) for s in sources if s not in keep]
            print(f"note: {len(left)} {self.split} shard(s) of {self.spec.name!r} hold fewer "
                  f"than {self.seq_len + 2} tokens and are left out: {', '.join(left[:5])}"
                  f"{' ...' if len(left) > 5 else ''}", flush=True)
        return keep or sources

    def _check_tokenizer(self) -> None:
        info = (self.spec.manifest or {}).get("tokenizer")
        if not info:
            return  # shards written by other tools carry no tokenizer record
        if info["vocab_size"] != self.tok.vocab_size or info["eos_id"] != self.tok.eos_id:
            raise ValueError(
                f"tokenizer mismatch: {self.spec.tokenized_dir} was tokenized with vocab "
                f"{info['vocab_size']} / eos {info['eos_id']}, the given tokenizer has vocab "
                f"{self.tok.vocab_size} / eos {self.tok.eos_id}"
            )
        if info["sha256"] != self.tok.sha256:
            warnings.warn(f"tokenizer differs from the one that tokenized "
                          f"{self.spec.tokenized_dir} (same vocab size and eos id)", stacklevel=3)

    def _build(self) -> Any:
        import torch.distributed as dist

        indexed, builder_cls, gpt_cls, config_cls = megatron_datasets()
        prefixes = [localize_prefix(s.path) for s in self.sources]
        weights = [float(s.weight) for s in self.sources]
        size: int | None = self.num_samples
        if len(prefixes) > 1 and (size is not None or self.split == "train"):
            if size is None:  # one epoch's worth of samples, mixed by weight
                size = sum(self._epoch_samples(indexed, p) for p in prefixes)
            blend = (prefixes, weights)
        else:
            blend = (prefixes, None)  # one source, or val: everything, by size
        distributed = dist.is_available() and dist.is_initialized()
        config = config_cls(
            random_seed=self.seed,
            sequence_length=self.seq_len,
            blend_per_split=[blend if self.split == "train" else None,
                             blend if self.split == "val" else None, None],
            tokenizer=_MegatronTokenizer(self.tok),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            # Distributed: megatron builds on rank 0 and the other ranks load its files, so
            # all ranks must see this directory (one node: the cache; several nodes: set
            # $TRMGPT_INDEX_CACHE to a shared path). Single process: megatron's default next
            # to the (symlinked) prefix, inside our cache; a path here would make its
            # BlendedDataset call torch.distributed.get_rank() and fail.
            path_to_cache=_index_cache() if distributed else None,
            mid_level_dataset_surplus=0.05,
        )
        sizes = [size if self.split == "train" else None,
                 size if self.split == "val" else None, None]
        datasets = builder_cls(gpt_cls, sizes, lambda: True, config).build()
        dataset = datasets[0 if self.split == "train" else 1]
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{self.split} data of {self.spec.name!r} is shorter than one "
                             f"sample of {self.seq_len + 1} tokens")
        return dataset

    def _epoch_samples(self, indexed: Any, prefix: str) -> int:
        return max(1, (_lengths(indexed, prefix).sum() - 1) // self.seq_len)

    def __len__(self) -> int:
        return len(self._sampler())

    def _sampler(self) -> _RankBatches:
        return _RankBatches(self.consumed, self.total, self.world_size, self.batch_size,
                            self.rank)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        torch = self._torch
        loader = torch.utils.data.DataLoader(
            _Samples(self.dataset), batch_sampler=self._sampler(),
            num_workers=self.num_workers, prefetch_factor=4 if self.num_workers else None,
        )
        for inputs, targets in loader:
            self.consumed += self.world_size * self.batch_size
            yield inputs, targets

    def _identity(self) -> dict[str, Any]:
        return {"split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                "num_samples": self.num_samples,
                "sources": [[s.name or s.path, float(s.weight)] for s in self.sources]}

    def state_dict(self) -> dict[str, Any]:
        return {"path": "pretok", "version": 1, "consumed_samples": self.consumed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("path") != "pretok":
            raise ValueError(f"not a pretok loader state (path={state.get('path')!r})")
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        saved_n = state.get("num_samples")
        # A run extended (or cut short) with another --max-steps changes the sample budget.
        # Megatron's convention: the order is rebuilt for the new budget and the run goes on at
        # its consumed-samples offset. Every sample already trained stays trained; what follows
        # is the new order's. While no source starts another epoch it is exactly the old
        # order's continuation; past that, megatron reshuffles the epochs it adds, so a few
        # samples of the old plan may come again or not at all. A one-pass order (None) and a
        # budgeted one differ in kind: still refused.
        if (saved_n is not None and self.num_samples is not None
                and saved_n != self.num_samples):
            del diff["num_samples"]
            self.rebudgeted = (saved_n, self.num_samples)
            if self.rank == 0:
                print(f"note: the {self.split} sample budget changed {saved_n} -> "
                      f"{self.num_samples}; the global order is rebuilt for it (megatron) and "
                      f"continues at sample {state['consumed_samples']}: the same order while "
                      "no source begins another epoch", flush=True)
        if diff:
            raise ValueError(f"cannot resume: the global sample order differs; "
                             f"(saved, now): {diff}")
        self.consumed = int(state["consumed_samples"])

    def stats(self) -> dict[str, Any]:
        entries = {e["prefix"]: e for e in (self.spec.manifest or {}).get(self.split, [])}
        out: dict[str, Any] = {"docs": 0, "tokens": 0, "skipped": {}}
        indexed = None
        for s in self.sources:
            e = entries.get(os.path.basename(s.path))
            if e is None:  # no manifest: count from the index itself
                indexed = indexed or megatron_datasets()[0]
                lengths = _lengths(indexed, localize_prefix(s.path))
                e = {"docs": len(lengths), "tokens": int(lengths.sum()), "skipped": {}}
            out["docs"] += e["docs"]
            out["tokens"] += e["tokens"]
            for kind, n in e["skipped"].items():
                out["skipped"][kind] = out["skipped"].get(kind, 0) + n
        out.update(path="pretok", split=self.split, samples=self.total,
                   consumed_samples=self.consumed)
        return out
