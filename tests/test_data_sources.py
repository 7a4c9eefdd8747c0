"""Bad input is skipped and counted by kind; missing or empty sources fail early."""

from __future__ import annotations

import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest_data import ASSETS, fixture_tok, fixture_trm_cache, speeches, write_jsonl  # noqa: F401

from data_pipeline import DataSpec, Source, build_loader
from data_pipeline.sources import iter_file_records

GOOD = [f"good document number {i}, with some words." for i in range(6)]


def _counts(records):
    out = {}
    for r in records:
        out[r["skip"] or "ok"] = out.get(r["skip"] or "ok", 0) + 1
    return out


def _bad_jsonl_bytes() -> bytes:
    lines = [json.dumps({"text": t}).encode() for t in GOOD]
    lines += [
        b'{"text": "broken',  # bad_json
        b"[1, 2, 3]",  # bad_json: not an object
        b'{"body": "no text field"}',  # missing_field
        b'{"text": 42}',  # missing_field: not a string
        b'{"text": "   \\n "}',  # empty
        b'{"text": "caf\xe9 latin-1"}',  # undecodable
    ]
    return b"\n".join(lines) + b"\n"


def test_jsonl_bad_records_counted_by_kind(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_bad_jsonl_bytes())
    assert _counts(iter_file_records(str(path), "jsonl")) == {
        "ok": 6, "bad_json": 2, "missing_field": 2, "empty": 1, "undecodable": 1}


def test_truncated_gz_and_zst_keep_what_came_before(tmp_path):
    docs = speeches()
    lines = [json.dumps({"text": d}).encode() + b"\n" for d in docs]
    data = b"".join(lines)
    gz = gzip.compress(data)
    # zstd decodes whole blocks only: several frames, so a cut stream still yields some.
    zc = zstandard.ZstdCompressor()
    zst = b"".join(zc.compress(b"".join(lines[i:i + 50])) for i in range(0, len(lines), 50))
    (tmp_path / "ok.jsonl.gz").write_bytes(gz)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (tmp_path / "two.jsonl.gz").write_bytes(gzip.compress(data[:100]) + gzip.compress(data[100:]))
    n = len(docs)
    assert _counts(iter_file_records(str(tmp_path / "ok.jsonl.gz"), "jsonl")) == {"ok": n}
    assert _counts(iter_file_records(str(tmp_path / "two.jsonl.gz"), "jsonl"))["ok"] == n
    for name, kind in [("cut.jsonl.gz", "truncated_gz"), ("cut.jsonl.zst", "truncated_zst")]:
        counts = _counts(iter_file_records(str(tmp_path / name), "jsonl"))
        assert counts[kind] == 1 and 0 < counts["ok"] < n, (name, counts)


def test_txt_parquet_and_unreadable(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    assert _counts(iter_file_records(str(tmp_path / "latin1.txt"), "txt")) == {"undecodable": 1}
    assert _counts(iter_file_records(str(tmp_path / "blank.txt"), "txt")) == {"empty": 1}
    pq.write_table(pa.table({"content": GOOD + [None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"other": ["x", "y"]}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    assert _counts(iter_file_records(str(tmp_path / "a.parquet"), "parquet", "content")) == {
        "ok": 6, "missing_field": 1}
    assert _counts(iter_file_records(str(tmp_path / "b.parquet"), "parquet")) == {
        "missing_field": 2}
    assert _counts(iter_file_records(str(tmp_path / "c.parquet"), "parquet")) == {"unreadable": 1}


def test_stream_loader_runs_through_bad_input_and_reports_it(tmp_path, tok):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.jsonl").write_bytes(_bad_jsonl_bytes())
    good = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in speeches()[:40])
    (tmp_path / "data" / "cut.jsonl.gz").write_bytes(gzip.compress(good)[:-30])
    spec = DataSpec(sources=[Source(str(tmp_path / "data"))], val_fraction=0.0)
    loader = build_loader(spec, tok, batch_size=2, seq_len=16)
    n = sum(1 for _ in loader)
    stats = loader.stats()
    assert n > 10
    assert stats["skipped"] == {"bad_json": 2, "missing_field": 2, "empty": 1,
                                "undecodable": 1, "truncated_gz": 1}
    cut = _counts(iter_file_records(str(tmp_path / "data" / "cut.jsonl.gz"), "jsonl"))["ok"]
    assert stats["docs"] == 6 + cut and stats["tokens"] >= n * 2 * 17


def test_hub_code_path_on_a_local_dataset_dir(tmp_path, tok):
    # A local directory is a valid `load_dataset` name: the hub code path, run offline.
    docs = speeches()[:120]
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs)
    spec = DataSpec(sources=[Source(str(tmp_path / "ds"), format="hub")], val_fraction=0.2)
    train = build_loader(spec, tok, batch_size=2, seq_len=16, world_size=2, rank=1,
                         num_workers=2)
    val = build_loader(spec, tok, split="val", batch_size=2, seq_len=16)
    assert sum(1 for _ in train) > 0 and sum(1 for _ in val) > 0
    other = build_loader(spec, tok, batch_size=2, seq_len=16, world_size=2, rank=0)
    assert sum(1 for _ in other) > 0
    n_train = train.stats()["docs"] + other.stats()["docs"]
    assert n_train + val.stats()["docs"] == len(docs)
    assert 0.1 < val.stats()["docs"] / len(docs) < 0.3


def test_memory_filesystem_source(tok):
    fs = fsspec.filesystem("memory")
    with fs.open("/corpus/a.jsonl", "wb") as f:
        f.write(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in speeches()[:30]))
    spec = DataSpec.parse("memory://corpus/*.jsonl")
    spec.val_fraction = 0.0
    loader = build_loader(spec, tok, batch_size=2, seq_len=32)
    batches = list(loader)
    assert batches and loader.stats()["docs"] == 30
    fs.rm("/corpus", recursive=True)


def test_missing_path_and_no_usable_text_fail_before_training(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_loader(str(tmp_path / "does-not-exist" / "*.jsonl"), tok)
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        build_loader(str(tmp_path / "nothing.txt"), tok)
    write_jsonl(tmp_path / "junk" / "a.jsonl", ["", "  "], field="text")
    (tmp_path / "junk" / "b.jsonl").write_text('{"body": "x"}\nnot json\n')
    spec = DataSpec(sources=[Source(str(tmp_path / "junk"))], val_fraction=0.0)
    with pytest.raises(ValueError, match="no usable text.*junk.*empty.*2"):
        build_loader(spec, tok)


def test_val_split_without_val_data_is_a_clear_error(tok):
    spec = DataSpec(sources=[Source(str(ASSETS / "othello_speeches.jsonl"))], val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction=0"):
        build_loader(spec, tok, split="val")
