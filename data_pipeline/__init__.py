"""trmgpt data pipeline: data specs, tokenizer, streaming and pre-tokenized loaders.

    from data_pipeline import DataSpec, load_tokenizer, build_loader, embedded_corpus
    spec = DataSpec.parse("shakespeare")
    tok = load_tokenizer("configs/tokenizers/shakespeare-4k")
    loader = build_loader(spec, tok, split="train", batch_size=8, seq_len=256)
    for inputs, targets in loader: ...
"""

from __future__ import annotations

from .corpus import cache_dir, embedded_corpus
from .loader import build_loader
from .spec import DataSpec, Source
from .tokenizer import DEFAULT_TOKENIZER, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_TOKENIZER",
    "DataSpec",
    "Source",
    "Tokenizer",
    "build_loader",
    "cache_dir",
    "embedded_corpus",
    "load_tokenizer",
    "train_tokenizer",
]
