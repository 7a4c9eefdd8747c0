"""Reading documents from sources through fsspec, counting bad records by kind.

Formats (by suffix, or `Source.format`):
  * txt (`.txt`, `.text`, `.md`): one document per file (the whole file).
  * jsonl (`.jsonl`, `.json`, `.ndjson`): one JSON object per line, text in `text_field`.
  * parquet: one row per document, text in column `text_field`.
  * hub: a HF hub dataset name, streamed with `datasets.load_dataset(..., streaming=True)`.
Any file may be compressed as `.gz` or `.zst`.

Bad records never stop a run: each one becomes a record with `skip` set to its kind
(see `SKIP_KINDS`) and is counted by the consumer, so counts survive process boundaries.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from .corpus import resolve_embedded
from .spec import DataSpec, Source, looks_like_hub
from .tasks import is_task_path, parse_task_path, task_records

SKIP_KINDS = (
    "undecodable", "bad_json", "missing_field", "empty", "truncated_gz", "truncated_zst",
    "unreadable",
)
TXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CHUNK = 1 << 20


@dataclass
class SourcePlan:
    """What one split reads from one source: its files and how documents are kept."""

    index: int  # position of the source in spec.split_sources(split)
    source: Source
    split: str  # "train" | "val"
    files: list[str]  # empty for hub sources
    fmt: str
    keep: str  # "all" | "train" | "val": documents kept by the text-hash split
    doc_fraction: float  # val fraction of the text-hash split (0 when whole files are split)

    @property
    def emit_skips(self) -> bool:
        # With a text-hash split both splits read the same records: count bad ones once.
        return not (self.keep == "val" and self.doc_fraction > 0)


def new_stats() -> dict[str, Any]:
    return {"docs": 0, "tokens": 0, "skipped": {}}


def add_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    total["docs"] += part["docs"]
    total["tokens"] += part["tokens"]
    for kind, n in part["skipped"].items():
        total["skipped"][kind] = total["skipped"].get(kind, 0) + n
    return total


def infer_format(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith(TXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"cannot tell the format of {path!r}: set `format` in the data spec")


def is_hub(source: Source) -> bool:
    if source.format == "hub":
        return True
    path = source.path
    return source.format == "auto" and looks_like_hub(path) and not os.path.exists(path)


def is_task(source: Source) -> bool:
    return source.format == "task" or (source.format == "auto" and is_task_path(source.path))


def expand_files(source: Source) -> list[str]:
    """Sorted files of a path, directory or glob; FileNotFoundError naming it if none."""
    path = resolve_embedded(source.path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if any(c in fs_path for c in "*?["):
        found = [p for p in fs.glob(fs_path) if fs.isfile(p)]
    elif fs.isdir(fs_path):
        found = [p for p in fs.find(fs_path) if _known_suffix(p) or source.format != "auto"]
    elif fs.exists(fs_path):
        found = [fs_path]
    else:
        found = []
    if not found:
        raise FileNotFoundError(f"data source {source.path!r} matches no files")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return sorted(p if local else fs.unstrip_protocol(p) for p in found)


def _known_suffix(path: str) -> bool:
    try:
        infer_format(path)
        return True
    except ValueError:
        return False


def _name_hash(path: str) -> int:
    return zlib.crc32(path.rsplit("/", 1)[-1].encode("utf-8"))


def text_in_val(text: str, fraction: float) -> bool:
    """Text-hash split: stable across runs, ranks and paths; duplicates share a split."""
    return zlib.crc32(text.encode("utf-8")) < fraction * 2**32


def plan_split(spec: DataSpec, split: str) -> list[SourcePlan]:
    """Resolve files and the val rule for every source of `split` (raises if files missing)."""
    keep, fraction = spec.val_holdout(split)
    plans = []
    for i, source in enumerate(spec.split_sources(split)):
        if source.format == "indexed":
            raise ValueError(f"source {source.path!r} is pre-tokenized; use path='pretok'")
        if is_hub(source):
            plans.append(SourcePlan(i, source, split, [], "hub", keep, fraction))
            continue
        if is_task(source):  # generated (data_pipeline/tasks.py): its own fixed held-out set
            parse_task_path(source.path)  # a bad task path fails here, naming it
            plans.append(SourcePlan(i, source, split, [], "task", "all", 0.0))
            continue
        files = expand_files(source)
        fmt = source.format if source.format != "auto" else None
        if fmt is None:
            for f in files:
                infer_format(f)  # fail here, naming the file, not later in a worker
        n_val = round(len(files) * fraction)
        doc_fraction = fraction
        if keep != "all" and 1 <= n_val < len(files):
            # Hold out whole files: cheaper to read and no document is ever split.
            val = set(sorted(files, key=_name_hash)[:n_val])
            files = [f for f in files if (f in val) == (keep == "val")]
            doc_fraction = 0.0
        plans.append(SourcePlan(i, source, split, files, fmt or "auto", keep, doc_fraction))
    return plans


def iter_plan_records(plan: SourcePlan, files: list[str] | None = None) -> Iterator[dict]:
    """Records `{"text": str, "skip": kind or ""}` of a plan (optionally a subset of files)."""
    for path in plan.files if files is None else files:
        fmt = plan.fmt if plan.fmt != "auto" else infer_format(path)
        yield from _filter_split(iter_file_records(path, fmt, plan.source.text_field), plan)


def _filter_split(records: Iterator[dict], plan: SourcePlan) -> Iterator[dict]:
    for rec in records:
        if rec["skip"]:
            if plan.emit_skips:
                yield rec
        elif plan.doc_fraction == 0 or plan.keep == "all":
            yield rec
        elif text_in_val(rec["text"], plan.doc_fraction) == (plan.keep == "val"):
            yield rec


def _ok(text: str) -> dict:
    return {"text": text, "skip": "" if text.strip() else "empty"}


def _bad(kind: str) -> dict:
    return {"text": "", "skip": kind}


def iter_file_records(path: str, fmt: str, text_field: str = "text") -> Iterator[dict]:
    """Records of one file; a file that cannot be parsed at all yields one `unreadable`."""
    if fmt not in ("txt", "jsonl", "parquet"):
        raise ValueError(f"unknown file format {fmt!r} for {path}")
    try:
        if fmt == "parquet":
            yield from _parquet_records(path, text_field)
        elif fmt == "jsonl":
            yield from _jsonl_records(path, text_field)
        else:
            try:
                data = b"".join(_chunks(path)).removeprefix(b"\xef\xbb\xbf")
            except _Truncated as t:
                yield _bad(t.kind)
                return
            try:
                yield _ok(data.decode("utf-8"))
            except UnicodeDecodeError:
                yield _bad("undecodable")
    except FileNotFoundError:
        raise  # vanished mid-run: a real error, not a bad record
    except (OSError, zlib.error, ValueError):
        # Corrupt container (bad gzip header, broken parquet footer, ...): skip the file.
        yield _bad("unreadable")


class _Truncated(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of a file; raises _Truncated when a .gz/.zst stream ends early."""
    lower = path.lower()
    with fsspec.open(path, "rb") as raw:
        if lower.endswith(".gz"):
            yield from _decompress(raw, lambda: zlib.decompressobj(31), "truncated_gz")
        elif lower.endswith(".zst"):
            import zstandard

            yield from _decompress(
                raw, lambda: zstandard.ZstdDecompressor().decompressobj(), "truncated_zst"
            )
        else:
            while chunk := raw.read(CHUNK):
                yield chunk


def _decompress(raw: Any, make: Any, kind: str) -> Iterator[bytes]:
    # Own loop instead of gzip/zstd file objects: a truncated .zst otherwise ends silently.
    dec, fed = make(), False
    while chunk := raw.read(CHUNK):
        while chunk:
            fed = True
            out = dec.decompress(chunk)
            if out:
                yield out
            chunk = b""
            if dec.eof:  # a new gzip member / zstd frame may follow
                chunk, dec, fed = dec.unused_data, make(), False
    if fed and not dec.eof:
        raise _Truncated(kind)


def _jsonl_records(path: str, text_field: str) -> Iterator[dict]:
    tail = b""
    try:
        for chunk in _chunks(path):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if line.strip():
                    yield _json_record(line, text_field)
    except _Truncated as t:
        yield _bad(t.kind)  # the partial last line is dropped with the truncation
        return
    if tail.strip():
        yield _json_record(tail, text_field)


def _json_record(line: bytes, text_field: str) -> dict:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return _bad("undecodable")
    try:
        obj = json.loads(decoded)
    except ValueError:
        return _bad("bad_json")
    if not isinstance(obj, dict):
        return _bad("bad_json")
    text = obj.get(text_field)
    if not isinstance(text, str):
        return _bad("missing_field")
    return _ok(text)


def _parquet_records(path: str, text_field: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            for _ in range(pf.metadata.num_rows):
                yield _bad("missing_field")
            return
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield _ok(text) if isinstance(text, str) else _bad("missing_field")


def hub_records(plan: SourcePlan, rank: int = 0, world_size: int = 1) -> Any:
    """A streaming hub dataset mapped to `{"text", "skip"}` records of the plan's split.

    Needs network access to the hub (not testable offline); the mapping and the split
    filter are the same functions the file sources use.
    """
    from datasets import load_dataset

    src = plan.source
    try:
        ds = load_dataset(src.path, src.hub_config, split=src.hub_split, streaming=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the source named
        raise FileNotFoundError(f"hub dataset {src.path!r} could not be opened: {err}") from err
    field = src.text_field

    def to_record(ex: dict) -> dict:
        text = ex.get(field)
        return _ok(text) if isinstance(text, str) else _bad("missing_field")

    ds = ds.map(to_record, remove_columns=list(ds.column_names or []))

    def keep(rec: dict) -> bool:
        return any(True for _ in _filter_split(iter([rec]), plan))

    return ds.filter(keep)


def probe(plans: list[SourcePlan]) -> None:
    """Fail early, naming the source, when a split of a source has no usable document."""
    for plan in plans:
        skipped: dict[str, int] = {}
        records = (iter(hub_records(plan)) if plan.fmt == "hub" else
                   task_records(plan.source.path, plan.split) if plan.fmt == "task" else
                   iter_plan_records(plan))
        for rec in records:
            if not rec["skip"]:
                break
            skipped[rec["skip"]] = skipped.get(rec["skip"], 0) + 1
        else:
            raise ValueError(
                f"no usable text for split {plan.split!r} in source {plan.source.path!r} "
                f"({len(plan.files)} files; skipped records: {skipped or 'none'})"
            )
