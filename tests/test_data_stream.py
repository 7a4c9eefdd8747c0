"""Streaming path: exact packing, disjoint rank/worker splits, exact resume, mixtures."""

from __future__ import annotations

import json
from itertools import zip_longest

import numpy as np
import pytest
import torch
from conftest_data import (  # noqa: F401
    fixture_tok,
    resume_in_subprocess,
    speeches,
    take,
    write_jsonl,
    write_txt_corpus,
)

from data_pipeline import DataSpec, Source, build_loader

T = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    docs = speeches()
    txt = write_txt_corpus(root / "txt", docs[:60])
    jsonl = write_jsonl(root / "one.jsonl", docs[60:160])
    return {"docs": docs, "txt": txt, "jsonl": jsonl}


def _spec(path, **kw) -> DataSpec:
    return DataSpec(sources=[Source(str(path), **kw)], val_fraction=0.0)


def _round_robin(streams):
    """What the DataLoader delivers: one batch per worker in turn, skipping finished ones."""
    return [b for group in zip_longest(*streams) for b in group if b is not None]


def test_packing_is_exact(corpus, tok):
    loader = build_loader(_spec(corpus["txt"]), tok, batch_size=1, seq_len=T)
    docs = list(loader.worker_documents(0))
    assert sorted(map(tuple, docs)) == sorted(tuple(tok.encode(d)) for d in corpus["docs"][:60])
    windows = np.concatenate([b[0] for b in loader.worker_batches(0)])
    joined = np.concatenate([np.append(d, tok.eos_id) for d in docs])
    assert len(windows) % (T + 1) == 0
    assert np.array_equal(windows, joined[: len(windows)])
    assert len(joined) - len(windows) < T + 1  # only the final partial window is left out
    # The loader itself yields exactly these windows, shifted into inputs/targets.
    got = [torch.cat([x, y[:, -1:]], dim=1) for x, y in loader]
    assert np.array_equal(torch.cat(got).flatten().numpy(), windows)
    assert loader.stats()["docs"] == 60 and loader.stats()["tokens"] == len(joined)


@pytest.mark.parametrize("source", ["txt", "jsonl"])  # whole files vs every k-th document
def test_two_ranks_two_workers_disjoint_and_complete(corpus, tok, source):
    spec = _spec(corpus[source])
    loaders = [build_loader(spec, tok, batch_size=2, seq_len=T, rank=r, world_size=2,
                            num_workers=2, seed=3) for r in range(2)]
    parts = [list(ld.worker_documents(w)) for ld in loaders for w in range(2)]
    assert all(parts), "every (rank, worker) gets data"
    seen = [tuple(d) for part in parts for d in part]
    expected = corpus["docs"][:60] if source == "txt" else corpus["docs"][60:160]
    assert len(seen) == len(set(seen)) == len(expected)  # disjoint, nothing dropped
    assert set(seen) == {tuple(tok.encode(d)) for d in expected}


def test_dataloader_workers_deliver_round_robin(corpus, tok):
    loader = build_loader(_spec(corpus["txt"]), tok, batch_size=2, seq_len=T, rank=1,
                          world_size=2, num_workers=2)
    got = [torch.cat([x, y[:, -1:]], dim=1).numpy() for x, y in loader]
    expected = _round_robin([list(loader.worker_batches(w)) for w in range(2)])
    assert len(got) == len(expected) > 4
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert loader.stats()["docs"] > 0


@pytest.mark.slow
def test_resume_in_a_new_process_is_exact(corpus, tok):
    kwargs = {"batch_size": 2, "seq_len": T, "num_workers": 2, "seed": 5, "block_docs": 8}
    spec = _spec(corpus["txt"])
    full = [[x.tolist(), y.tolist()] for x, y in build_loader(spec, tok, **kwargs)]
    loader = build_loader(spec, tok, **kwargs)
    head = take(loader, 5)  # odd: the next batch comes from worker 1
    assert [[x.tolist(), y.tolist()] for x, y in head] == full[:5]
    state = json.loads(json.dumps(loader.state_dict()))  # JSON only, no pickles
    stats = loader.stats()
    out = resume_in_subprocess(spec.to_dict(), kwargs, state, n=7)
    assert out["batches"] == full[5:12]
    assert out["state"]["batches"] == 12
    # Resuming in this process works the same way, and the stats resume too.
    again = build_loader(spec, tok, **kwargs)
    again.load_state_dict(state)
    assert again.stats() == stats
    assert [[x.tolist(), y.tolist()] for x, y in again] == full[5:]
    for k in (1, len(full) - 2, len(full) - 1):  # near the end one worker has finished
        loader = build_loader(spec, tok, **kwargs)
        take(loader, k)
        again = build_loader(spec, tok, **kwargs)
        again.load_state_dict(loader.state_dict())
        assert [[x.tolist(), y.tolist()] for x, y in again] == full[k:]
    with pytest.raises(ValueError, match="same topology"):
        build_loader(spec, tok, **{**kwargs, "num_workers": 1}).load_state_dict(state)


def test_mixture_weights_hold(tmp_path, tok):
    docs = speeches()[:200]
    lower = [d.lower() for d in docs[:10]]  # far less text than its 20% share of the windows
    write_jsonl(tmp_path / "upper.jsonl", [d.upper() for d in docs])
    write_jsonl(tmp_path / "lower.jsonl", lower)
    spec = DataSpec(sources=[Source(str(tmp_path / "upper.jsonl"), weight=0.8),
                             Source(str(tmp_path / "lower.jsonl"), weight=0.2)],
                    val_fraction=0.0)
    n = 600
    loader = build_loader(spec, tok, batch_size=4, seq_len=T, num_samples=n)
    assert len(loader) == n // 4
    windows = [row for x, _ in loader for row in x.tolist()]
    assert len(windows) == n
    text = [tok.decode(w, skip_special_tokens=True) for w in windows]
    upper = sum(1 for t in text if not any(c.islower() for c in t))
    frac = upper / n
    assert abs(frac - 0.8) < 4 * (0.8 * 0.2 / n) ** 0.5, frac
    # num_samples past one epoch repeats the smaller source instead of stopping: its share of
    # the n windows needs more tokens than it holds, yet all n came, still mixed by weight
    assert 0.2 * n * (T + 1) > 1.5 * sum(len(tok.encode(d)) for d in lower)
    assert n - upper > 0.15 * n


def test_val_split_and_epochs(corpus, tok):
    spec = DataSpec(sources=[Source(str(corpus["txt"]))], val_fraction=0.1)
    val = build_loader(spec, tok, split="val", batch_size=1, seq_len=T)
    train = build_loader(spec, tok, split="train", batch_size=1, seq_len=T)
    val_docs = {tuple(d) for d in val.worker_documents(0)}
    train_docs = {tuple(d) for d in train.worker_documents(0)}
    assert len(val_docs) == 6 and len(train_docs) == 54 and not val_docs & train_docs
    one_epoch = sum(1 for _ in train)
    two = build_loader(spec, tok, batch_size=1, seq_len=T, num_samples=2 * one_epoch + 3)
    assert sum(1 for _ in two) == 2 * one_epoch + 3
    assert two.stats()["docs"] > 54


def test_cli_inspect(capsys):
    from conftest_data import ASSETS

    from data_pipeline.__main__ import main

    assert main(["inspect", "--data", str(ASSETS / "othello_speeches.jsonl"), "--seq-len",
                 "32", "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- window") == 2 and '"docs"' in out and "stream loader" in out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_a_larger_num_samples_continues_the_stream(corpus, tok, num_workers):
    """A run extended with a larger max_steps resumes its loader with a larger num_samples: the
    batches after the checkpoint are exactly those an uninterrupted run of the larger size
    draws there, past the end of the first epoch too (not a restart, not a repeat)."""
    kwargs = {"batch_size": 2, "seq_len": T, "num_workers": num_workers, "seed": 5,
              "block_docs": 8}
    spec = _spec(corpus["txt"])
    one_epoch = sum(1 for _ in build_loader(spec, tok, **kwargs)) * 2  # samples in one pass
    short, long = one_epoch // 2, 2 * one_epoch
    full = [[x.tolist(), y.tolist()] for x, y in
            build_loader(spec, tok, **kwargs, num_samples=long)]
    assert len(full) == long // 2
    first = build_loader(spec, tok, **kwargs, num_samples=short)
    head = [[x.tolist(), y.tolist()] for x, y in first]
    assert head == full[:len(head)] and len(head) == short // 2
    extended = build_loader(spec, tok, **kwargs, num_samples=long)
    extended.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [[x.tolist(), y.tolist()] for x, y in extended] == full[len(head):]
