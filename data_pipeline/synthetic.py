"""A corpus in FineWeb-Edu's shape, made locally (no network), for tests and benchmarks.

FineWeb-Edu (HuggingFaceFW/fineweb-edu) is parquet: `sample/10BT/000_00000.parquet`, ... with
the columns text, id, dump, url, date, file_path, language, language_score, token_count, score,
int_score. `write_fineweb_like` writes files with those columns and types, text from any list of
documents, and breaks some records the way real dumps are broken: null text, empty text, a file
whose text column is binary with invalid UTF-8 in some rows, and one whose text column has the
wrong type (integers). Each file is written in several row groups, as the hub's files are.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import fsspec

COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score",
           "token_count", "score", "int_score")


def paragraphs(texts: Sequence[str], min_chars: int = 400) -> list[str]:
    """Documents of at least `min_chars` cut from longer texts at blank lines."""
    docs: list[str] = []
    for text in texts:
        cur = ""
        for para in text.split("\n\n"):
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= min_chars:
                docs.append(cur.strip())
                cur = ""
        if cur.strip():
            docs.append(cur.strip())
    return docs


def _meta(i: int, text_len: int, rng: random.Random) -> dict[str, Any]:
    score = round(rng.uniform(2.5, 5.0), 6)
    dump = f"CC-MAIN-2024-{10 + i % 4:02d}"
    return {
        "id": f"<urn:uuid:{rng.getrandbits(128):032x}>",
        "dump": dump,
        "url": f"https://example.org/doc/{i}",
        "date": f"2024-0{1 + i % 9}-1{i % 10}T0{i % 10}:00:00Z",
        "file_path": f"s3://commoncrawl/crawl-data/{dump}/segments/{i % 97}/warc/x.warc.gz",
        "language": "en",
        "language_score": round(rng.uniform(0.65, 1.0), 6),
        "token_count": max(1, text_len // 4),
        "score": score,
        "int_score": int(round(score)),
    }


def write_fineweb_like(root: str, docs: Sequence[str], files: int = 4, rows_per_group: int = 64,
                       seed: int = 0, broken: bool = True) -> dict[str, Any]:
    """Write `docs` as `root/sample/10BT/NNN_00000.parquet` (fsspec URL or local folder).

    With `broken`: every 23rd record of the string files has null text and every 29th empty
    text; file 1 (if there are >= 3 files) stores text as binary with every 7th row invalid
    UTF-8; the last file stores its text column as int64 (each of its rows a wrong type).
    Returns what was written and the bad records by the reason the pipeline gives them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    fs, base = fsspec.core.url_to_fs(root.rstrip("/"))
    folder = f"{base}/sample/10BT"
    fs.makedirs(folder, exist_ok=True)
    per = -(-len(docs) // files)
    expect = {"missing_field": 0, "empty": 0, "undecodable": 0, "wrong_type": 0, "good": 0}
    paths = []
    for k in range(files):
        chunk = list(docs[k * per:(k + 1) * per])
        rows = [_meta(k * per + j, len(t), rng) for j, t in enumerate(chunk)]
        binary = broken and files >= 3 and k == 1
        wrong = broken and files >= 2 and k == files - 1
        texts: list[Any] = []
        for j, t in enumerate(chunk):
            if wrong:
                texts.append(len(t))
                expect["wrong_type"] += 1
            elif binary and j % 7 == 3:
                texts.append(t.encode("utf-8")[:50] + b"\xff\xfe" + t.encode("utf-8")[50:])
                expect["undecodable"] += 1
            elif broken and not binary and j % 23 == 5:
                texts.append(None)
                expect["missing_field"] += 1
            elif broken and not binary and j % 29 == 7:
                texts.append("  \n ")
                expect["empty"] += 1
            else:
                texts.append(t.encode("utf-8") if binary else t)
                expect["good"] += 1
        text_type = pa.int64() if wrong else pa.binary() if binary else pa.string()
        table = pa.table({
            "text": pa.array(texts, type=text_type),
            **{c: [r[c] for r in rows] for c in COLUMNS[1:]},
        })
        path = f"{folder}/{k:03d}_00000.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=rows_per_group)
        paths.append(path)
    return {"files": paths, "expect": expect, "docs": len(docs)}
