"""Data specs: which sources, with which mixture weights, and how validation is split off.

`DataSpec.parse` accepts
  * `"shakespeare"`: the embedded corpus (train plays / 3 held-out plays for val),
  * a `.yaml`/`.yml`/`.json` spec file (see `configs/data/`),
  * a directory written by `python -m data_pipeline tokenize` (has `manifest.json`),
  * any other string: one source path, glob, URL (`s3://`, `gs://`, `hf://`, `memory://`,
    ...) or HF hub dataset name (`owner/name`).

Validation split (when no explicit `val_sources` are given): a source with n files holds
out round(n * val_fraction) whole files (chosen by a hash of their names); when that rounds
to zero, or the source is a hub dataset, documents are assigned by a hash of their text.
Both rules are deterministic and identical on every rank and in both loader paths.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from .corpus import EMBEDDED_SCHEME

FORMATS = ("auto", "txt", "jsonl", "parquet", "hub", "indexed", "task")
DEFAULT_VAL_FRACTION = 0.01


@dataclass
class Source:
    """One data source. `path` is a local path, glob, fsspec URL, hub name or indexed prefix."""

    path: str
    weight: float = 1.0
    text_field: str = "text"
    format: str = "auto"
    name: str | None = None
    hub_config: str | None = None  # only for format "hub": dataset config name
    hub_split: str = "train"  # only for format "hub": which split of the hub dataset

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"source {self.path!r}: unknown format {self.format!r}, use {FORMATS}")
        if not self.weight > 0:
            raise ValueError(f"source {self.path!r}: weight must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        """Short name for stats, manifests and shard prefixes."""
        if self.name:
            return self.name
        # The last path component that is no glob, without its extensions.
        parts = [p for p in self.path.rstrip("/").split("/") if p and not set(p) & set("*?[")]
        return parts[-1].split(".")[0] if parts and parts[-1].split(".")[0] else "source"


@dataclass
class DataSpec:
    """Sources with mixture weights plus a validation split."""

    sources: list[Source]
    val_sources: list[Source] = field(default_factory=list)
    val_fraction: float = DEFAULT_VAL_FRACTION
    name: str = ""
    tokenized_dir: str | None = None  # set when parsed from a `tokenize` output directory
    manifest: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("a data spec needs at least one source")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def is_pretokenized(self) -> bool:
        return all(s.format == "indexed" for s in self.sources + self.val_sources)

    def split_sources(self, split: str) -> list[Source]:
        """Sources feeding `split`; for val without explicit val sources, the train sources."""
        if split == "train":
            return self.sources
        if split == "val":
            return self.val_sources or self.sources
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def val_holdout(self, split: str) -> tuple[str, float]:
        """(split to keep, fraction held out for val) to apply to `split_sources(split)`."""
        if self.val_sources:  # explicit val data: nothing is held out of the train sources
            return "all", 0.0
        if split == "val" and self.val_fraction == 0.0:
            raise ValueError(f"spec {self.name!r} has no val_sources and val_fraction=0")
        return split, self.val_fraction

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "val_fraction": self.val_fraction,
            "sources": [asdict(s) for s in self.sources],
            "val_sources": [asdict(s) for s in self.val_sources],
        }
        if self.tokenized_dir:
            out["tokenized_dir"] = self.tokenized_dir
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | None = None) -> DataSpec:
        unknown = set(d) - {"name", "val_fraction", "sources", "val_sources", "tokenized_dir"}
        if unknown:
            raise ValueError(f"unknown data spec keys: {sorted(unknown)}")

        def mk(items: list[Any]) -> list[Source]:
            out = []
            for item in items or []:
                item = {"path": item} if isinstance(item, str) else dict(item)
                item["path"] = _rebase(str(item["path"]), base_dir)
                out.append(Source(**item))
            return out

        return cls(
            sources=mk(d.get("sources", [])),
            val_sources=mk(d.get("val_sources", [])),
            val_fraction=float(d.get("val_fraction", DEFAULT_VAL_FRACTION)),
            name=str(d.get("name", "")),
        )

    @classmethod
    def parse(cls, spec: str | os.PathLike | dict[str, Any] | DataSpec) -> DataSpec:
        """Build a spec from a corpus name, spec file, tokenized dir, path, glob or URL."""
        if isinstance(spec, DataSpec):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        text = os.fspath(spec)
        if text == "shakespeare":
            return shakespeare_spec()
        lower = text.lower()
        if lower.endswith((".yaml", ".yml")):
            return _load_spec_file(text)
        if lower.endswith(".json") and _exists(text):
            loaded = _read_json(text)
            if isinstance(loaded, dict) and "sources" in loaded:
                return cls.from_dict(loaded, base_dir=_parent(text))
        manifest_path = text.rstrip("/") + "/manifest.json"
        if "*" not in text and _exists(manifest_path):
            return spec_from_manifest(text.rstrip("/"), _read_json(manifest_path))
        return cls(sources=[Source(path=text)], name=text)


def shakespeare_spec() -> DataSpec:
    """The embedded corpus: training plays vs 3 held-out plays (resolved lazily)."""
    root = EMBEDDED_SCHEME + "shakespeare"
    return DataSpec(
        sources=[Source(path=f"{root}/train/*.txt", name="shakespeare")],
        val_sources=[Source(path=f"{root}/val/*.txt", name="shakespeare")],
        val_fraction=0.0,
        name="shakespeare",
    )


def spec_from_manifest(directory: str, manifest: dict[str, Any]) -> DataSpec:
    """Spec over the indexed shards listed in a `tokenize` manifest."""
    if manifest.get("format") != "trmgpt-pretok-v1":
        raise ValueError(f"{directory}/manifest.json is not a trmgpt tokenized-data manifest")

    def mk(entries: list[dict[str, Any]]) -> list[Source]:
        return [
            Source(path=f"{directory}/{e['prefix']}", weight=float(e["weight"]),
                   format="indexed", name=e["name"])
            for e in entries
        ]

    return DataSpec(
        sources=mk(manifest["train"]),
        val_sources=mk(manifest["val"]),
        val_fraction=0.0,
        name=manifest.get("spec", {}).get("name", "") or directory,
        tokenized_dir=directory,
        manifest=manifest,
    )


def _load_spec_file(path: str) -> DataSpec:
    import yaml

    if not _exists(path):
        raise FileNotFoundError(f"data spec file not found: {path}")
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        loaded = yaml.safe_load(f)
    if not isinstance(loaded, dict) or "sources" not in loaded:
        raise ValueError(f"data spec file {path} must be a mapping with a 'sources' list")
    return DataSpec.from_dict(loaded, base_dir=_parent(path))


def _rebase(path: str, base_dir: str | None) -> str:
    """Relative local paths in a spec file are relative to the file's directory."""
    if base_dir is None or "://" in path or os.path.isabs(path) or path.startswith("~"):
        return os.path.expanduser(path)
    candidate = f"{base_dir.rstrip('/')}/{path}"
    # A bare `owner/name` that is no local path is a hub dataset name: keep it as is.
    if looks_like_hub(path) and not _exists(candidate):
        return path
    return candidate


DATA_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".ndjson", ".parquet", ".gz", ".zst")


def looks_like_hub(path: str) -> bool:
    """`owner/name` with no scheme, glob or data-file suffix: a HF hub dataset name."""
    parts = path.split("/")
    return (
        len(parts) == 2
        and "://" not in path
        and not any(c in path for c in "*?[")
        and all(p and not p.startswith(".") for p in parts)
        and not parts[1].lower().endswith(DATA_SUFFIXES)
    )


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def _exists(path: str) -> bool:
    try:
        fs, p = fsspec.core.url_to_fs(path)
        return bool(fs.exists(p))
    except (ImportError, ValueError, OSError):
        return False


def _read_json(path: str) -> Any:
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)
