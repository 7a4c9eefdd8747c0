"""Tokenizer: the committed Shakespeare tokenizer, training, loading, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest_data import ASSETS, REPO, fixture_tok  # noqa: F401
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from data_pipeline import load_tokenizer, train_tokenizer
from data_pipeline.__main__ import main


def test_committed_tokenizer(tok):
    assert tok.vocab_size == 4096 and tok.padded_vocab_size == 4096
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    text = (ASSETS / "shakespeare" / "val" / "tempest.txt").read_text()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids[:50])) == tok.decode(ids[:50])
    assert len(text) / len(ids) > 2.5  # it learned English words, not bytes
    assert tok.encode_batch([text[:500], "x"]) == [tok.encode(text[:500]), tok.encode("x")]


def test_train_pad_save_load(tmp_path):
    texts = [p.read_text() for p in (ASSETS / "shakespeare" / "train").glob("*.txt")]
    trained = train_tokenizer(texts, vocab_size=300)
    assert trained.vocab_size == 300 and trained.padded_vocab_size == 320
    loaded = load_tokenizer(trained.save(tmp_path / "t"))
    assert loaded.encode(texts[0][:1000]) == trained.encode(texts[0][:1000])
    assert load_tokenizer(tmp_path / "t" / "tokenizer.json").sha256 == trained.sha256
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_foreign_tokenizer_json(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).eos_id == 0 and load_tokenizer(tmp_path).bos_id is None
    hf = HFTokenizer(models.BPE())
    hf.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="end-of-document"):
        load_tokenizer(tmp_path / "noeos.json")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")


def test_cli_tokenizer_train(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(ASSETS / "shakespeare" / "train"),
                 "--vocab", "512", "--out", str(out), "--quiet"]) == 0
    assert "vocab_size=512" in capsys.readouterr().out
    assert load_tokenizer(out).vocab_size == 512
    assert main(["tokenizer", "train", "--data", str(tmp_path / "nothing"), "--vocab", "512",
                 "--out", str(out)]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_cli_help_runs():
    for args in (["--help"], ["tokenize", "--help"], ["inspect", "--help"]):
        done = subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr
