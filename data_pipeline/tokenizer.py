"""HF `tokenizers` wrapper: byte-level BPE training and loading any `tokenizer.json`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
EOS = "<|eos|>"
# Accepted end-of-document tokens when loading a foreign tokenizer.json, in order.
EOS_CANDIDATES = (EOS, "<|endoftext|>", "</s>", "<eos>")
BOS_CANDIDATES = (BOS, "<|begin_of_text|>", "<s>", "<bos>")
VOCAB_MULTIPLE = 64
DEFAULT_TOKENIZER = str(
    Path(__file__).resolve().parent.parent / "configs" / "tokenizers" / "shakespeare-4k"
)


class Tokenizer:
    """A loaded tokenizer with the ids the pipeline and the model need.

    `eos_id` separates documents in packed windows; `padded_vocab_size` is the model's
    embedding size: the vocab rounded up to a multiple of 64.
    """

    def __init__(self, tok: HFTokenizer, path: str | None = None) -> None:
        self.tok = tok
        self.path = path
        vocab = tok.get_vocab(with_added_tokens=True)
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise ValueError(
                f"tokenizer {path or ''} has no end-of-document token (one of {EOS_CANDIDATES})"
            )
        self.eos_id: int = vocab[eos]
        bos = next((t for t in BOS_CANDIDATES if t in vocab), None)
        self.bos_id: int | None = vocab[bos] if bos is not None else None
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.padded_vocab_size: int = -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        self.sha256: str = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list, numpy array or 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, out_dir: str | os.PathLike, info: dict | None = None) -> str:
        """Write `tokenizer.json` (and `info` as `tokenizer_info.json`) into a local folder or
        any fsspec URL (s3://, gs://); each file appears whole or not at all."""
        import json

        import fsspec

        out = os.fspath(out_dir).rstrip("/")
        fs, root = fsspec.core.url_to_fs(out)
        fs.makedirs(root, exist_ok=True)
        files = {"tokenizer.json": self.tok.to_str(pretty=True)}
        if info is not None:
            files["tokenizer_info.json"] = json.dumps(info, indent=1, sort_keys=True) + "\n"
        for name, text in files.items():
            dest = f"{root}/{name}"
            protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
            tmp = f"{dest}.tmp-{os.getpid()}" if "file" in protocols else dest
            with fs.open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            if tmp != dest:
                os.replace(tmp, dest)
        return f"{out}/tokenizer.json"

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"padded_vocab_size={self.padded_vocab_size}, eos_id={self.eos_id})")


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` (or a directory holding one), local or any fsspec URL."""
    import fsspec

    path = os.fspath(path_or_dir)
    if not path.endswith(".json"):
        path = path.rstrip("/") + "/tokenizer.json"
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"tokenizer not found: {path} (train one with `make tokenizer DATA=<spec> "
            f"VOCAB=<n> OUT={os.path.dirname(path)}`)") from None
    return Tokenizer(HFTokenizer.from_str(text), path)


def tokenizer_from_str(text: str) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_str(text))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, show_progress: bool = False
) -> Tokenizer:
    """Byte-level BPE with `<|bos|>` and `<|eos|>` as its first two ids (0 and 1)."""
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be >= 258 (bytes + 2 specials), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
