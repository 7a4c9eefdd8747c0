"""Streaming path: HF `datasets` streaming, tokenized and packed in DataLoader workers.

Per rank, `num_workers` logical workers each read a disjoint part of every source:
logical worker `lw = rank * n + w` of `world_size * n` gets its files (or every k-th
document when a source has fewer files than workers) via `split_dataset_by_node`.
A worker reads `block_docs` records at a time, shuffles the block with a seeded RNG
(train only; file order is also reshuffled each epoch), tokenizes it with
`encode_batch` and packs documents, each followed by EOS, into windows of
`seq_len + 1` tokens with stride `seq_len + 1` (no padding; documents cross windows).
With several sources, the source of each window is drawn by weight.

Resume is exact on the same topology: a worker's state is the `datasets` state at the
start of its current block plus (block no, document, windows emitted from it, the
packer carry-over before that document), so resuming re-reads one block and skips.
The torch DataLoader hands out workers' batches round-robin; the loader records which
worker comes next and, on resume, rotates the worker ids so the order continues.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Imported here, not in the workers: forked DataLoader workers inherit the loaded modules
# instead of each spending seconds importing `datasets` on every epoch start.
from datasets import Features, IterableDataset, Value
from datasets.distributed import split_dataset_by_node
from datasets.packaged_modules.generator import generator as _hf_generator  # noqa: F401

from .sources import SourcePlan, add_stats, hub_records, iter_plan_records, new_stats
from .tasks import task_records
from .tokenizer import Tokenizer

FEATURES_SPEC = {"text": "string", "skip": "string"}
RNG_BLOCK = 1024


@dataclass
class StreamConfig:
    split: str
    batch_size: int
    seq_len: int
    rank: int
    world_size: int
    seed: int
    num_workers: int
    num_samples: int | None
    block_docs: int = 256

    @property
    def n_workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def shuffle(self) -> bool:
        return self.split == "train"

    @property
    def repeat(self) -> bool:
        # Epochs repeat only when a sample budget says how long to go on.
        return self.num_samples is not None


def _plan_records(files: list[str], plan: SourcePlan) -> Iterator[dict]:
    # Module-level so `datasets` can fingerprint the generator cheaply.
    yield from iter_plan_records(plan, files)


class SourceStream:
    """Documents and packed windows of one source for one logical worker."""

    def __init__(self, cfg: StreamConfig, plan: SourcePlan, tok: Tokenizer, lw: int, n_lw: int):
        self.cfg, self.plan, self.tok, self.lw, self.n_lw = cfg, plan, tok, lw, n_lw

    def fresh_state(self) -> dict[str, Any]:
        return {"epoch": 0, "block": 0, "hf": None, "doc": 0, "win": 0, "carry": [],
                "done": False, "stats": new_stats()}

    def dataset(self, epoch: int) -> Any:
        """This worker's part of the source as a `datasets.IterableDataset` of records."""
        if self.plan.fmt == "hub":
            return split_dataset_by_node(hub_records(self.plan), self.lw, self.n_lw)
        if self.plan.fmt == "task":  # generated: endless for train, held-out set for val
            return IterableDataset.from_generator(
                task_records, features=Features({k: Value(v) for k, v in FEATURES_SPEC.items()}),
                gen_kwargs={"path": self.plan.source.path, "split": self.plan.split,
                            "seed": [self.cfg.seed, self.plan.index, epoch],
                            "worker": self.lw, "n_workers": self.n_lw})
        files = list(self.plan.files)
        if self.cfg.shuffle:
            rng = np.random.default_rng([self.cfg.seed, self.plan.index, epoch])
            files = [files[i] for i in rng.permutation(len(files))]
        ds = IterableDataset.from_generator(
            _plan_records,
            features=Features({k: Value(v) for k, v in FEATURES_SPEC.items()}),
            gen_kwargs={"files": files, "plan": self.plan},
        )
        # Whole files per worker when there are enough; else every n-th document.
        strategy = "shards" if len(files) >= self.n_lw else "examples"
        return split_dataset_by_node(ds, self.lw, self.n_lw, strategy=strategy)

    def blocks(self, st: dict[str, Any]) -> Iterator[tuple[list[list[int]], bool]]:
        """Tokenized, shuffled blocks of documents; updates `st` (epoch, block, hf, skips).

        Yields (docs, resumed): `resumed` is True for a block re-read to resume inside it.
        """
        resumed = st["doc"] > 0 or st["win"] > 0
        while not st["done"]:
            ds = self.dataset(st["epoch"])
            if st["hf"] is not None:
                ds.load_state_dict(st["hf"])
            had_docs = st["block"] > 0
            for block in ds.iter(batch_size=self.cfg.block_docs):
                texts = [t for t, s in zip(block["text"], block["skip"], strict=True) if not s]
                had_docs = had_docs or bool(texts)
                if not resumed:
                    skipped = st["stats"]["skipped"]
                    for s in block["skip"]:
                        if s:
                            skipped[s] = skipped.get(s, 0) + 1
                if self.cfg.shuffle:
                    rng = np.random.default_rng(
                        [self.cfg.seed, self.plan.index, self.lw, st["epoch"], st["block"]])
                    texts = [texts[i] for i in rng.permutation(len(texts))]
                yield (self.tok.encode_batch(texts) if texts else []), resumed
                resumed = False
                st.update(hf=ds.state_dict(), block=st["block"] + 1, doc=0, win=0)
            if self.cfg.repeat and had_docs:
                st.update(epoch=st["epoch"] + 1, block=0, hf=None)
            else:  # one pass, or this worker's share is empty: repeating would spin forever
                st["done"] = True

    def documents(self, st: dict[str, Any] | None = None) -> Iterator[list[int]]:
        """The documents in the order the packer sees them (for checks and inspection)."""
        for docs, _ in self.blocks(st or self.fresh_state()):
            yield from docs

    def windows(self, st: dict[str, Any]) -> Iterator[np.ndarray]:
        """Packed windows of `seq_len + 1` tokens; `st` always describes the position after
        the last window yielded."""
        width = self.cfg.seq_len + 1
        eos = np.array([self.tok.eos_id], dtype=np.int64)
        carry = np.array(st["carry"], dtype=np.int64)
        for docs, resumed in self.blocks(st):
            first = st["doc"] if resumed else 0
            for d in range(first, len(docs)):
                ids = np.asarray(docs[d], dtype=np.int64)
                if not (resumed and d == first):  # a resumed document was counted already
                    st["stats"]["docs"] += 1
                    st["stats"]["tokens"] += len(ids) + 1
                buf = np.concatenate([carry, ids, eos])
                n = len(buf) // width
                for k in range(st["win"] if resumed and d == first else 0, n):
                    st.update(doc=d, win=k + 1, carry=carry.tolist())
                    yield buf[k * width:(k + 1) * width]
                carry = buf[n * width:]
            st["carry"] = carry.tolist()


class WorkerStream:
    """One logical worker: per-source streams mixed by weight into batches."""

    def __init__(self, cfg: StreamConfig, plans: list[SourcePlan], tok: Tokenizer, w: int):
        self.cfg = cfg
        n_lw = cfg.world_size * cfg.n_workers
        self.lw = cfg.rank * cfg.n_workers + w
        self.sources = [SourceStream(cfg, p, tok, self.lw, n_lw) for p in plans]
        weights = np.array([p.source.weight for p in plans], dtype=np.float64)
        self.weights = weights / weights.sum()
        self._u_block = (-1, np.zeros(0))

    def fresh_state(self) -> dict[str, Any]:
        return {"n": 0, "sources": [s.fresh_state() for s in self.sources]}

    def _pick(self, n: int, active: list[bool]) -> int:
        if len(self.sources) == 1:
            return 0
        # Counter-based draws: the choice for window n needs no RNG state to resume.
        if self._u_block[0] != n // RNG_BLOCK:
            rng = np.random.default_rng([self.cfg.seed, self.lw, n // RNG_BLOCK, 7])
            self._u_block = (n // RNG_BLOCK, rng.random(RNG_BLOCK))
        u = self._u_block[1][n % RNG_BLOCK]
        w = self.weights * np.array(active, dtype=np.float64)
        return int(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right").clip(0, len(w) - 1))

    def batches(self, state: dict[str, Any] | None = None) -> Iterator[tuple[Any, dict]]:
        """Batches (batch_size, seq_len + 1) with the state after each one.

        When the data ends, one last (None, state) reports the final counts; the tail of
        fewer than batch_size windows is dropped. A stream resumed at its end yields nothing.
        """
        st = copy.deepcopy(state) if state is not None else self.fresh_state()
        gens = [s.windows(s_st) for s, s_st in zip(self.sources, st["sources"], strict=True)]
        active = [not s_st["done"] for s_st in st["sources"]]
        if not any(active):
            return
        batch: list[np.ndarray] = []
        while any(active):
            i = self._pick(st["n"], active)
            try:
                window = next(gens[i])
            except StopIteration:
                active[i] = False
                continue
            batch.append(window)
            st["n"] += 1
            if len(batch) == self.cfg.batch_size:
                yield np.stack(batch), copy.deepcopy(st)
                batch = []
        yield None, copy.deepcopy(st)


class StreamDataset(torch.utils.data.IterableDataset):
    """What DataLoader workers run: physical worker p plays logical worker (p + rotate) % n."""

    def __init__(self, cfg: StreamConfig, plans: list[SourcePlan], tok: Tokenizer,
                 states: list[dict | None], rotate: int) -> None:
        super().__init__()
        self.cfg, self.plans, self.tok, self.states, self.rotate = cfg, plans, tok, states, rotate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w = ((info.id if info else 0) + self.rotate) % self.cfg.n_workers
        stream = WorkerStream(self.cfg, self.plans, self.tok, w)
        for arr, st in stream.batches(self.states[w]):
            # JSON text so the DataLoader's collation leaves the state untouched.
            tokens = None if arr is None else torch.from_numpy(arr)
            yield {"tokens": tokens, "worker": w, "state": json.dumps(st)}


class StreamLoader:
    """Iterable of (inputs, targets) LongTensor (B, T) batches with exact same-topology resume."""

    path = "stream"

    def __init__(self, cfg: StreamConfig, plans: list[SourcePlan], tok: Tokenizer) -> None:
        self.cfg, self.plans, self.tok = cfg, plans, tok
        self._states: list[dict | None] = [None] * cfg.n_workers
        self._next = 0
        self._batches = 0
        if cfg.num_workers > 0:
            # Workers tokenize in parallel already; rayon threads inside forked workers
            # would only oversubscribe the cores (and tokenizers warns after fork).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def _limit(self) -> int | None:
        if self.cfg.num_samples is None:
            return None
        return self.cfg.num_samples // (self.cfg.world_size * self.cfg.batch_size)

    def __len__(self) -> int:
        limit = self._limit()
        if limit is None:
            raise TypeError("a one-pass stream has no known length; pass num_samples")
        return limit

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        limit = self._limit()
        if limit is not None and self._batches >= limit:
            return
        ds = StreamDataset(self.cfg, self.plans, self.tok, list(self._states), self._next)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.cfg.num_workers,
            prefetch_factor=4 if self.cfg.num_workers else None,
        )
        for item in loader:
            w = item["worker"]
            self._states[w] = json.loads(item["state"])
            # Every item takes a turn in the DataLoader's round-robin, the final one too.
            self._next = (w + 1) % self.cfg.n_workers
            tokens = item["tokens"]
            if tokens is None:
                continue
            self._batches += 1
            yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            if limit is not None and self._batches >= limit:
                return

    def worker_batches(self, w: int) -> Iterator[np.ndarray]:
        """Logical worker w's batches from the start, computed in this process."""
        for arr, _ in WorkerStream(self.cfg, self.plans, self.tok, w).batches():
            if arr is not None:
                yield arr

    def worker_documents(self, w: int, source: int = 0) -> Iterator[list[int]]:
        """Logical worker w's tokenized documents of one source, in packing order."""
        stream = WorkerStream(self.cfg, self.plans, self.tok, w).sources[source]
        yield from stream.documents()

    def state_dict(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "path": "stream", "version": 1, "split": c.split, "rank": c.rank,
            "world_size": c.world_size, "num_workers": c.n_workers, "batch_size": c.batch_size,
            "seq_len": c.seq_len, "seed": c.seed, "num_samples": c.num_samples,
            "sources": [p.source.path for p in self.plans],
            "batches": self._batches, "next_worker": self._next,
            "workers": copy.deepcopy(self._states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("path") != "stream":
            raise ValueError(f"not a stream loader state (path={state.get('path')!r})")
        mine = self.state_dict()
        keys = ("split", "rank", "world_size", "num_workers", "batch_size", "seq_len", "seed",
                "sources")
        diff = {k: (state.get(k), mine[k]) for k in keys if state.get(k) != mine[k]}
        # The sample budget only says where to stop, not what comes next: a run extended with a
        # larger --max-steps (or cut short) continues the same order. A one-pass stream (None)
        # and a repeating one do differ in order, so that change is still refused.
        if (state.get("num_samples") is None) != (mine["num_samples"] is None):
            diff["num_samples"] = (state.get("num_samples"), mine["num_samples"])
        if diff:
            raise ValueError(
                "the stream path resumes exactly only on the same topology and settings; "
                f"differences (saved, now): {diff}"
            )
        self._states = copy.deepcopy(state["workers"])
        self._next = int(state["next_worker"])
        self._batches = int(state["batches"])

    def stats(self) -> dict[str, Any]:
        total = new_stats()
        for st in self._states:
            for s_st in (st or {}).get("sources", []):
                add_stats(total, s_st["stats"])
        total.update(path="stream", split=self.cfg.split, batches=self._batches)
        return total
