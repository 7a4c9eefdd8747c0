"""`build_loader`: one entry point for the streaming and the pre-tokenized path."""

from __future__ import annotations

import os
from typing import Any

from .spec import DataSpec
from .tokenizer import Tokenizer, load_tokenizer

PATHS = ("auto", "stream", "pretok")


def build_loader(
    spec: DataSpec | str | os.PathLike,
    tok: Tokenizer | str | os.PathLike,
    split: str = "train",
    batch_size: int = 8,
    seq_len: int = 256,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    path: str = "auto",
    num_samples: int | None = None,
    block_docs: int = 256,
) -> Any:
    """A loader yielding (inputs, targets) LongTensors of shape (batch_size, seq_len).

    Each row is a window of seq_len + 1 tokens: inputs = window[:-1], targets = window[1:].
    `path`: "pretok" reads a directory written by `python -m data_pipeline tokenize`
    (global sample order, resumable on any world size); "stream" tokenizes on the fly
    (exact resume on the same topology); "auto" picks pretok for a tokenized directory.
    `num_samples`: global samples to draw (repeating epochs as needed); None is one pass.
    Loaders have `state_dict()`, `load_state_dict(d)` and `stats()`.
    Missing sources raise FileNotFoundError and sources without usable text ValueError,
    both here, before any batch is drawn.
    """
    spec = DataSpec.parse(spec)
    if not isinstance(tok, Tokenizer):
        tok = load_tokenizer(tok)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        path = "pretok" if spec.is_pretokenized else "stream"
    if path == "pretok":
        if not spec.is_pretokenized:
            raise ValueError(
                f"path='pretok' needs tokenized data; run `python -m data_pipeline tokenize "
                f"--data {spec.name or 'SPEC'} --out DIR` and pass DIR"
            )
        from .pretok import PretokLoader

        return PretokLoader(spec, tok, split, batch_size, seq_len, rank, world_size, seed,
                            num_workers, num_samples)
    if spec.is_pretokenized:
        raise ValueError(f"{spec.name!r} is tokenized data: use path='pretok' (or 'auto')")
    from .sources import plan_split, probe
    from .stream import StreamConfig, StreamLoader

    plans = plan_split(spec, split)
    probe(plans)
    cfg = StreamConfig(split=split, batch_size=batch_size, seq_len=seq_len, rank=rank,
                       world_size=world_size, seed=seed, num_workers=num_workers,
                       num_samples=num_samples, block_docs=block_docs)
    return StreamLoader(cfg, plans, tok)
