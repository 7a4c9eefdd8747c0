"""Pre-tokenized path: Ray Data tokenization into megatron shards, global order, resume."""

from __future__ import annotations

import filecmp
import gzip
import json

import fsspec
import numpy as np
import pytest
import torch
from conftest_data import (  # noqa: F401
    ASSETS,
    fixture_module_cache,
    fixture_tok,
    fixture_trm_cache,
    resume_in_subprocess,
    speeches,
    take,
    write_jsonl,
    write_txt_corpus,
)

from data_pipeline import DataSpec, Source, build_loader, train_tokenizer
from data_pipeline.__main__ import main
from data_pipeline.pretok import megatron_datasets, tokenize_spec

T = 16


@pytest.fixture(scope="module")
def indexed():
    return megatron_datasets()[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, module_cache, tok):
    root = tmp_path_factory.mktemp("pretok")
    docs = speeches()[:150]
    write_txt_corpus(root / "plays", docs[:100])
    write_jsonl(root / "extra.jsonl", docs[100:150])
    spec = DataSpec(sources=[Source(str(root / "plays"), name="plays"),
                             Source(str(root / "extra.jsonl"), name="extra", weight=0.5)],
                    val_fraction=0.1)
    out = root / "tok"
    manifest = tokenize_spec(spec, tok, str(out), workers=0, progress=False)
    return {"root": root, "spec": spec, "out": out, "manifest": manifest, "docs": docs}


def _rows(batches) -> list[list[int]]:
    """Each sample as its seq_len + 1 token window."""
    return [row for x, y in batches for row in torch.cat([x, y[:, -1:]], dim=1).tolist()]


def test_shards_are_megatron_indexed_datasets(data, tok, indexed):
    m = data["manifest"]
    assert [p["prefix"] for p in m["train"]] == ["train-00-plays", "train-01-extra"]
    assert [p["prefix"] for p in m["val"]] == ["val-00-plays", "val-01-extra"]
    assert m["tokenizer"]["vocab_size"] == 4096 and m["dtype"] == "uint16"
    seen = []
    for p in m["train"] + m["val"]:
        ds = indexed.IndexedDataset(str(data["out"] / p["prefix"]))
        assert len(ds) == p["docs"] and int(ds.sequence_lengths.sum()) == p["tokens"]
        for i in range(len(ds)):
            assert ds[i][-1] == tok.eos_id
            seen.append(tuple(ds[i][:-1].tolist()))
    assert sorted(seen) == sorted(tuple(tok.encode(d)) for d in data["docs"])
    assert m["val"][0]["docs"] == 10  # 10 of the 100 files held out whole


def test_dataset_written_by_megatron_builder_is_read(tmp_path, tok, indexed, trm_cache):
    prefix = str(tmp_path / "mega")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs, start = [], 2
    for k in range(40):
        doc = list(range(start, start + 10 + k % 7)) + [tok.eos_id]
        start += len(doc)
        docs.append(doc)
        builder.add_document(np.array(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(prefix + ".idx")
    spec = DataSpec(sources=[Source(prefix, format="indexed")], val_fraction=0.0)
    loader = build_loader(spec, tok, batch_size=2, seq_len=8)
    assert loader.path == "pretok"
    rows = _rows(loader)
    total = sum(map(len, docs))
    assert len(rows) == (total - 1) // 8 // 2 * 2
    covered = set()
    for row in rows:  # every window is pieces of documents, in order, split at EOS
        for a, b in zip(row, row[1:], strict=False):
            assert b == a + 1 or a == tok.eos_id or b == tok.eos_id
        covered |= set(row)
    assert len({t for d in docs for t in d} - covered) <= 8 + 1
    assert loader.stats()["docs"] == 40


def test_global_order_across_ranks_and_resume_on_other_world_sizes(data, tok):
    out = str(data["out"])
    ref = _rows(build_loader(out, tok, batch_size=1, seq_len=T, seed=7))  # sample order
    two = [build_loader(out, tok, batch_size=3, seq_len=T, seed=7, rank=r, world_size=2,
                        num_workers=2) for r in range(2)]
    steps = [list(ld) for ld in two]
    for i in range(len(steps[0])):
        for r in range(2):
            assert _rows([steps[r][i]]) == ref[6 * i + 3 * r: 6 * i + 3 * r + 3]
    assert len(steps[0]) == len(ref) // 6  # disjoint, complete up to the last global batch

    # Stop the 2-rank run after 2 steps; resume on 3 ranks with the same global batch 6.
    two = [build_loader(out, tok, batch_size=3, seq_len=T, seed=7, rank=r, world_size=2)
           for r in range(2)]
    for ld in two:
        take(ld, 2)
    state = json.loads(json.dumps(two[0].state_dict()))
    assert state["consumed_samples"] == 12 and two[1].state_dict() == {**state}
    three = [build_loader(out, tok, batch_size=2, seq_len=T, seed=7, rank=r, world_size=3)
             for r in range(3)]
    for ld in three:
        ld.load_state_dict(state)
    nxt = [take(ld, 2) for ld in three]
    for j in range(2):
        assert _rows([nxt[r][j] for r in range(3)]) == ref[12 + 6 * j: 18 + 6 * j]

    # ... or on 1 rank with 2 micro-steps per optimizer step: rank 0's, then rank 1's batch.
    one = build_loader(out, tok, batch_size=3, seq_len=T, seed=7)
    one.load_state_dict(state)
    a, b = take(one, 2)
    cont = [take(ld, 1)[0] for ld in two]  # the un-stopped 2-rank run's next step
    assert _rows([a]) == _rows([cont[0]]) and _rows([b]) == _rows([cont[1]])
    with pytest.raises(ValueError, match="seed"):
        build_loader(out, tok, batch_size=3, seq_len=T, seed=8).load_state_dict(state)


def test_extending_the_sample_budget_continues(data, tok):
    """A resumed run with a larger --max-steps (a larger num_samples) goes on where it stopped:
    within the first epoch, exactly the un-extended order's continuation; past it, megatron's
    order for the new budget from the same offset. A one-pass order can't become budgeted."""
    out = str(data["out"])
    kw = {"batch_size": 2, "seq_len": T, "seed": 3}
    epoch = len(build_loader(out, tok, **kw).dataset)
    short = build_loader(out, tok, **kw, num_samples=20)
    take(short, 4)
    state = json.loads(json.dumps(short.state_dict()))
    longer = build_loader(out, tok, **kw, num_samples=40)
    longer.load_state_dict(state)
    assert longer.rebudgeted == (20, 40) and longer.consumed == 8
    whole = _rows(take(build_loader(out, tok, **kw, num_samples=20), 10))
    assert _rows(take(longer, 6)) == _rows(take(build_loader(out, tok, **kw, num_samples=40),
                                                10))[8:20]
    assert _rows(take(build_loader(out, tok, **kw, num_samples=40), 10))[:20] == whole
    # past the first epoch: the new budget's order from the offset
    far = build_loader(out, tok, **kw, num_samples=3 * epoch)
    far.load_state_dict(state)
    ref = _rows(take(build_loader(out, tok, **kw, num_samples=3 * epoch), 6))
    assert _rows(take(far, 2)) == ref[8:12]
    with pytest.raises(ValueError, match="num_samples"):
        build_loader(out, tok, **kw).load_state_dict(state)


@pytest.mark.slow
def test_resume_in_a_new_process(data, tok):
    kwargs = {"batch_size": 2, "seq_len": T, "seed": 1, "num_workers": 2}
    out = str(data["out"])
    full = [[x.tolist(), y.tolist()] for x, y in take(build_loader(out, tok, **kwargs), 9)]
    loader = build_loader(out, tok, **kwargs)
    take(loader, 4)
    res = resume_in_subprocess(out, kwargs, loader.state_dict(), n=5)
    assert res["batches"] == full[4:9]
    assert res["state"]["consumed_samples"] == 18


def test_val_split_and_stats(data, tok):
    val = build_loader(str(data["out"]), tok, split="val", batch_size=2, seq_len=T)
    rows = _rows(val)
    assert rows and val.stats()["docs"] == sum(p["docs"] for p in data["manifest"]["val"])
    stats = build_loader(str(data["out"]), tok, batch_size=2, seq_len=T).stats()
    # every document is in exactly one split
    held_out = sum(p["docs"] for p in data["manifest"]["val"])
    assert stats["docs"] == len(data["docs"]) - held_out and stats["consumed_samples"] == 0


def test_mixture_weights_hold(tmp_path, tok, trm_cache):
    docs = speeches()[:120]
    write_jsonl(tmp_path / "upper.jsonl", [d.upper() for d in docs])
    write_jsonl(tmp_path / "lower.jsonl", [d.lower() for d in docs])
    spec = DataSpec(sources=[Source(str(tmp_path / "upper.jsonl"), weight=0.3),
                             Source(str(tmp_path / "lower.jsonl"), weight=0.7)],
                    val_fraction=0.0)
    tokenize_spec(spec, tok, str(tmp_path / "tok"), workers=0, progress=False)
    n = 500
    rows = _rows(build_loader(str(tmp_path / "tok"), tok, batch_size=4, seq_len=T,
                              num_samples=n))
    assert len(rows) == n
    text = [tok.decode(r, skip_special_tokens=True) for r in rows]
    upper = sum(1 for t in text if not any(c.islower() for c in t)) / n
    assert abs(upper - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5, upper
    # Without num_samples: one epoch's worth of samples, still mixed by weight (megatron's blend
    # is deterministic, so the share is close to the weight, not just within sampling noise).
    epoch = [tok.decode(r, skip_special_tokens=True)
             for r in _rows(build_loader(str(tmp_path / "tok"), tok, batch_size=4, seq_len=T))]
    share = sum(1 for t in epoch if not any(c.islower() for c in t)) / len(epoch)
    assert len(epoch) >= 100 and abs(share - 0.3) < 0.05, (len(epoch), share)


def test_shards_on_object_storage_are_cached_locally(data, tok, trm_cache):
    fs = fsspec.filesystem("memory")
    fs.put(str(data["out"]), "/remote-tok", recursive=True)
    spec = DataSpec.parse("memory://remote-tok")
    assert spec.is_pretokenized and spec.sources[0].path.startswith("memory://")
    remote = _rows(take(build_loader(spec, tok, batch_size=2, seq_len=T), 5))
    local = _rows(take(build_loader(str(data["out"]), tok, batch_size=2, seq_len=T), 5))
    assert remote == local
    assert list((trm_cache / "shards").glob("*/train-00-plays.bin"))
    fs.rm("/remote-tok", recursive=True)


def test_errors(data, tok, tmp_path):
    with pytest.raises(ValueError, match="tokenize"):
        build_loader(data["spec"], tok, path="pretok")
    other = train_tokenizer(speeches()[:50], vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        build_loader(str(data["out"]), other)
    spec = DataSpec(sources=[Source(str(tmp_path / "gone"), format="indexed")], val_fraction=0)
    with pytest.raises(FileNotFoundError, match="gone"):
        build_loader(spec, tok)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        tokenize_spec(str(tmp_path / "missing-dir"), tok, str(tmp_path / "o"), workers=0)


@pytest.mark.slow
def test_ray_data_tokenize_on_the_assets(tmp_path, tok, capsys, trm_cache):
    import ray

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bad.jsonl").write_bytes(
        b'{"text": "fine words"}\nnot json\n{"body": 1}\n{"text": "caf\xe9"}\n{"text": ""}\n')
    lines = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in speeches()[:50])
    (bad / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:-40])
    spec = DataSpec(
        sources=[Source(str(ASSETS / "shakespeare" / "train"), name="plays"),
                 Source(str(ASSETS / "othello_speeches.jsonl"), name="othello", weight=0.5),
                 Source(str(bad), name="bad", weight=0.1)],
        val_sources=[Source(str(ASSETS / "shakespeare" / "val"), name="val-plays")])
    (tmp_path / "spec.yaml").write_text(json.dumps(spec.to_dict()))
    assert main(["tokenize", "--data", str(tmp_path / "spec.yaml"), "--out",
                 str(tmp_path / "ray"), "--workers", "2", "--quiet"]) == 0
    assert not ray.is_initialized()  # it shut down the Ray it started
    printed = capsys.readouterr().out
    assert "ray-data" in printed and "tokens/s" in printed and "truncated_gz=1" in printed
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert m["totals"]["skipped"] == {"bad_json": 1, "missing_field": 1, "undecodable": 1,
                                      "empty": 1, "truncated_gz": 1}
    plays = len(list((ASSETS / "shakespeare" / "train").glob("*.txt")))  # one document a file
    speeches_n = len((ASSETS / "othello_speeches.jsonl").read_text().splitlines())
    val_plays = len(list((ASSETS / "shakespeare" / "val").glob("*.txt")))
    assert [p["docs"] for p in m["train"]][:2] == [plays, speeches_n]
    assert m["val"][0]["docs"] == val_plays
    # Same bytes as the in-process tokenizer: Ray changes the speed, not the data.
    local = tokenize_spec(spec, tok, str(tmp_path / "local"), workers=0, progress=False)
    assert local["train"] == m["train"] and local["val"] == m["val"]
    for p in m["train"] + m["val"]:
        for ext in (".bin", ".idx"):
            name = p["prefix"] + ext
            assert filecmp.cmp(tmp_path / "ray" / name, tmp_path / "local" / name, shallow=False)
    assert main(["tokenize", "--data", str(tmp_path / "nope.yaml"), "--out", "x"]) == 2


def test_under_torch_distributed_the_index_cache_keeps_the_global_order(data, tok, trm_cache):
    """With a process group up, megatron builds its index through the distributed path (rank 0
    builds, the others wait at a barrier): the cache it writes gives the same global order as
    the plain path. One rank only: sharing the cache across nodes that share no filesystem (through
    the bucket) is issue 15's open work."""
    import torch.distributed as dist

    out = str(data["out"])
    plain = _rows(take(build_loader(out, tok, batch_size=2, seq_len=T, seed=2), 4))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows = _rows(take(build_loader(out, tok, batch_size=2, seq_len=T, seed=2), 4))
    finally:
        dist.destroy_process_group()
    assert rows == plain  # the cache location never changes the global order
    assert list((trm_cache / "megatron_index").glob("*BlendedDataset-train-dataset_index.npy"))
