"""Generated depth tasks: seeded, endless problems whose answers need serial computation.

Five tasks, each with a difficulty knob:
  * perm:     k-hop lookup in an in-context permutation. A table of n_symbols entries `x>y`
              (a random permutation of the digits, entries shuffled) then `|` and n_queries
              queries `x=` whose answer is pi^k(x). In the study's tokens every table entry is
              ONE token, so one hop is one attention lookup: a 2-layer plain GPT can do about
              two, the recursion as many as it has applications. Queries are distinct symbols
              (no query repeats an earlier one, so no answer can be copied).
  * cycle:    perm on a permutation that is one cycle through all symbols (no short cycle
              lets a query be answered without taking every hop).
  * pointer:  variable binding with k hops. `n_chains` chains `v0=d; v1=v0; ...; vk=v(k-1)`
              (all assignments shuffled together), then one query `?vk=` for one chain whose
              answer is that chain's root digit (one query only: with a query per chain the
              last answer follows by elimination, a shortcut a 2-layer GPT finds at once).
              Resolving a query takes k lookups in a row; a transformer does about one lookup
              per layer application, so a 2-layer plain GPT can do ~1 hop.
  * group:    the word problem of the symmetric group S_n (n_items 3: six elements, n_items 4:
              24), each element one letter: k letters, `=`, then the letter of their product
              g1 g2 ... gk (apply g1 first). S_3 is not abelian, so the answer depends on the
              order and no counting shortcut gives it; each letter needs the state the previous
              ones left, a chain as long as the word. A position that reads its left neighbour
              and composes takes one step per layer application: a 2-layer plain GPT can fold
              a few letters, the recursion as many as it has applications.
  * addition: `a+b=` with two `difficulty`-digit numbers, the sum written most-significant digit
              first (difficulty+1 digits, zero-padded): the first answer digit depends on the
              carry out of every lower digit, a chain as long as the number.

An example is a list of (text, is_answer) segments. The same examples serve two uses:
  * a data source like any other (`task:pointer?difficulty=1-4`, see `task_records`): documents
    are the plain text of an example, tokenized by the run's tokenizer, endless for train and a
    fixed held-out set for val (train never yields a held-out example);
  * the depth study and its tests (`task_batch`, `heldout_set`, `answer_accuracy`): characters
    as tokens in the small vocabulary `VOCAB`, targets only on answer tokens, and exact-match
    accuracy per answer by difficulty and by supervision step.

Pure Python plus torch for the tensor helpers; it never imports model/.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import torch

SCHEME = "task:"
PAD = 0
VOCAB = "_0123456789abcdefghijklmnopqrstuvwxyz=;?+|"  # index 0 is padding
CHAR_ID = {c: i for i, c in enumerate(VOCAB)}
# a perm table entry `x>y` is one token (after the characters): one hop, one lookup
PAIR_ID = {f"{a}>{b}": len(VOCAB) + 10 * a + b for a in range(10) for b in range(10)}
N_TOKENS = len(VOCAB) + 100
VARS = "abcdefghijklmnopqrstuvwxyz"
Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class PointerTask:
    """k-hop variable binding: chains of assignments, one query for one of them."""

    n_chains: int = 3
    name: str = "pointer"

    def __post_init__(self) -> None:
        if not 1 <= self.n_chains <= 10:
            raise ValueError(f"pointer: n_chains must be in [1, 10], got {self.n_chains}")

    def max_difficulty(self) -> int:
        return len(VARS) // self.n_chains - 1  # every variable is used once

    def example(self, rng: random.Random, k: int) -> Segments:
        if not 1 <= k <= self.max_difficulty():
            raise ValueError(f"pointer: hops must be in [1, {self.max_difficulty()}] with "
                             f"{self.n_chains} chains, got {k}")
        names = rng.sample(VARS, self.n_chains * (k + 1))
        roots = rng.sample("0123456789", self.n_chains)
        assigns, queries = [], []
        for c in range(self.n_chains):
            chain = names[c * (k + 1):(c + 1) * (k + 1)]
            assigns.append(f"{chain[0]}={roots[c]}")
            assigns += [f"{chain[i]}={chain[i - 1]}" for i in range(1, k + 1)]
            queries.append((chain[-1], roots[c]))
        rng.shuffle(assigns)
        var, root = rng.choice(queries)
        # no separator between assignments: each is 3 characters, the '=' marks its middle
        return [("".join(assigns), False), (f"?{var}=", False), (root, True)]

    def length(self, k: int) -> int:
        """Characters of an example of difficulty k."""
        return self.n_chains * (k + 1) * 3 + 4


@dataclass(frozen=True)
class AdditionTask:
    """n-digit addition, the sum most-significant digit first."""

    name: str = "addition"

    def max_difficulty(self) -> int:
        return 30

    def example(self, rng: random.Random, n: int) -> Segments:
        if not 1 <= n <= self.max_difficulty():
            raise ValueError(f"addition: digits must be in [1, {self.max_difficulty()}], got {n}")
        a, b = (rng.randrange(10 ** n) for _ in range(2))
        return [(f"{a:0{n}d}+{b:0{n}d}=", False), (f"{a + b:0{n + 1}d}", True)]

    def length(self, n: int) -> int:
        return 2 * n + 2 + n + 1


@dataclass(frozen=True)
class PermTask:
    """k-hop lookup in an in-context permutation of n_symbols digits, n_queries queries."""

    n_symbols: int = 10
    n_queries: int = 6
    name: str = "perm"

    def __post_init__(self) -> None:
        if not 2 <= self.n_symbols <= 10 or not 1 <= self.n_queries <= self.n_symbols:
            raise ValueError(f"perm: need 2 <= n_symbols <= 10 and 1 <= n_queries <= "
                             f"n_symbols, got {self.n_symbols}, {self.n_queries}")

    def max_difficulty(self) -> int:
        return 16

    def example(self, rng: random.Random, k: int) -> Segments:
        if not 1 <= k <= self.max_difficulty():
            raise ValueError(f"{self.name}: hops must be in [1, {self.max_difficulty()}], "
                             f"got {k}")
        sym = "0123456789"[:self.n_symbols]
        pi = self.permutation(rng, sym)
        table = [f"{x}>{pi[x]}" for x in rng.sample(sym, len(sym))]
        segs: Segments = [(" ".join(table) + " |", False)]
        for x in rng.sample(sym, self.n_queries):
            y = x
            for _ in range(k):
                y = pi[y]
            segs += [(f" {x}=", False), (y, True)]
        return segs

    def permutation(self, rng: random.Random, sym: str) -> dict[str, str]:
        return dict(zip(sym, rng.sample(sym, len(sym)), strict=True))

    def length(self, k: int) -> int:
        """Tokens of an example (table entries are one token each; spaces are not tokens)."""
        return self.n_symbols + 1 + 3 * self.n_queries


@dataclass(frozen=True)
class CycleTask(PermTask):
    """perm whose permutation is one cycle through every symbol. A random permutation of a few
    symbols has short cycles (pi^k(x) = x for every x on a cycle whose length divides k), which
    lets a model answer many k-hop queries without chasing; on one n-cycle pi^k(x) != x for
    every k < n, and the k-hop answers of x are all different, so each hop must be taken."""

    name: str = "cycle"

    def max_difficulty(self) -> int:
        return self.n_symbols - 1  # pi^n is the identity

    def permutation(self, rng: random.Random, sym: str) -> dict[str, str]:
        order = rng.sample(sym, len(sym))
        return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


@dataclass(frozen=True)
class GroupTask:
    """The word problem of S_n: the product of k group elements, one letter each."""

    n_items: int = 3
    name: str = "group"

    def __post_init__(self) -> None:
        if self.n_items not in (3, 4):
            raise ValueError(f"group: n_items must be 3 or 4 (S_3: 6 elements, S_4: 24, one "
                             f"letter each), got {self.n_items}")

    def elements(self) -> list[tuple[int, ...]]:
        return sorted(itertools.permutations(range(self.n_items)))

    def max_difficulty(self) -> int:
        return 64

    def example(self, rng: random.Random, k: int) -> Segments:
        if not 1 <= k <= self.max_difficulty():
            raise ValueError(f"group: word length must be in [1, {self.max_difficulty()}], "
                             f"got {k}")
        els = self.elements()
        word = [rng.randrange(len(els)) for _ in range(k)]
        acc = tuple(range(self.n_items))
        for w in word:  # apply g1 first: (g1 g2)(i) = g2(g1(i))
            g = els[w]
            acc = tuple(g[a] for a in acc)
        return [("".join(VARS[w] for w in word) + "=", False), (VARS[els.index(acc)], True)]

    def length(self, k: int) -> int:
        return k + 2

    def space(self, k: int) -> int:
        """Distinct examples of word length k. Where they are fewer than 4x the held-out
        examples per difficulty the words are a table to learn, not a problem to generalise to:
        that difficulty is trained on whole and not scored (`heldout_set`)."""
        return len(self.elements()) ** k


TASKS = {"pointer": PointerTask, "addition": AdditionTask, "perm": PermTask, "cycle": CycleTask,
         "group": GroupTask}
Task = PointerTask | AdditionTask | PermTask | CycleTask | GroupTask


def make_task(name: str, **params: Any) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**params)


def text_of(segs: Segments) -> str:
    return "".join(t for t, _ in segs)


# ----------------------------------------------------------------------------- held-out set
HELDOUT_SEED = 1_000_003  # the held-out stream's seed; train streams never use it


def heldout_set(task: Task, difficulties: list[int],
                n_per: int) -> list[tuple[int, Segments]]:
    """The fixed held-out examples: n_per per difficulty, the same on every machine (none for a
    difficulty whose whole space is under 4 * n_per examples, where the task says so)."""
    out = []
    for d in difficulties:
        rng = random.Random(f"{task}|{d}|{HELDOUT_SEED}")
        if hasattr(task, "space") and task.space(d) < 4 * n_per:
            continue  # a small table (a short group word): trained on whole, not scored
        out += [(d, task.example(rng, d)) for _ in range(n_per)]
    return out


def heldout_texts(task: Task, difficulties: list[int],
                  n_per: int) -> set[str]:
    return {text_of(s) for _, s in heldout_set(task, difficulties, n_per)}


def train_examples(task: Task, difficulties: list[int], seed: Any,
                   exclude: set[str]) -> Iterator[tuple[int, Segments]]:
    """Endless training examples, difficulty uniform over `difficulties`, none in `exclude`."""
    rng = random.Random(str(seed))
    while True:
        d = rng.choice(difficulties)
        segs = task.example(rng, d)
        if text_of(segs) not in exclude:
            yield d, segs


# ----------------------------------------------------------------------------- tensors
def encode(segs: Segments) -> tuple[list[int], list[int]]:
    """Character ids, and for each character the index of its answer (-1: not an answer)."""
    ids: list[int] = []
    ans: list[int] = []
    n = 0
    for text, is_answer in segs:
        i = 0
        while i < len(text):
            if text[i] == " ":  # spaces are for reading the text form only
                i += 1
                continue
            if text[i + 1:i + 2] == ">":
                tok, i = PAIR_ID.get(text[i:i + 3]), i + 3
            else:
                tok, i = CHAR_ID.get(text[i]), i + 1
            if tok is None:
                raise ValueError(f"{text!r} has a character outside the task vocabulary")
            ids.append(tok)
            ans.append(n if is_answer else -1)
        n += is_answer
    return ids, ans


def task_batch(examples: list[tuple[int, Segments]], seq_len: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, targets, answer_id, difficulty) for a list of examples, right-padded.

    idx/targets are (B, seq_len): targets are the next characters on answer positions and -1
    elsewhere (the loss is on answers only); answer_id (B, seq_len) names the answer a target
    belongs to (-1 elsewhere), for exact match over multi-token answers; difficulty is (B,).
    """
    B = len(examples)
    idx = torch.full((B, seq_len), PAD, dtype=torch.long)
    tgt = torch.full((B, seq_len), -1, dtype=torch.long)
    aid = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, (_, segs) in enumerate(examples):
        ids, ans = encode(segs)
        if len(ids) > seq_len + 1:
            raise ValueError(f"an example of {len(ids)} characters does not fit seq_len "
                             f"{seq_len} (+1 for the shifted targets)")
        n = len(ids) - 1
        idx[b, :n] = torch.tensor(ids[:-1])
        nxt, a = torch.tensor(ids[1:]), torch.tensor(ans[1:])
        tgt[b, :n] = torch.where(a >= 0, nxt, -1)
        aid[b, :n] = a
    diff = torch.tensor([d for d, _ in examples], dtype=torch.long)
    return idx, tgt, aid, diff


def answer_correct(logits: torch.Tensor, tgt: torch.Tensor, aid: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact match per answer: (correct, count), both (B,), counting answers of each row.

    An answer is correct when the argmax is right on every one of its tokens."""
    ok = (logits.argmax(-1) == tgt) | (aid < 0)
    n_ans = int(aid.max()) + 1 if aid.numel() else 0
    correct = torch.zeros(tgt.size(0))
    count = torch.zeros(tgt.size(0))
    for a in range(n_ans):
        m = aid == a
        has = m.any(-1)
        correct += (has & (ok | ~m).all(-1)).float()
        count += has.float()
    return correct, count


# ----------------------------------------------------------------------------- data source
def is_task_path(path: str) -> bool:
    return path.startswith(SCHEME)


def parse_task_path(path: str) -> tuple[Task, list[int], int]:
    """`task:NAME?difficulty=1-4&n_chains=3&val_per_difficulty=64` -> (task, difficulties,
    held-out examples per difficulty)."""
    if not is_task_path(path):
        raise ValueError(f"not a task path: {path!r} (expected {SCHEME}NAME?key=value&...)")
    parts = urlsplit(path[len(SCHEME):])
    params = dict(parse_qsl(parts.query))
    diff = params.pop("difficulty", "1-4")
    val_per = int(params.pop("val_per_difficulty", "64"))
    lo, _, hi = diff.partition("-")
    difficulties = list(range(int(lo), int(hi or lo) + 1))
    task = make_task(parts.path, **{k: int(v) for k, v in params.items()})
    if not difficulties or not 1 <= difficulties[0] <= difficulties[-1] <= task.max_difficulty():
        raise ValueError(f"{path!r}: difficulty must be a range inside [1, "
                         f"{task.max_difficulty()}], got {diff!r}")
    return task, difficulties, val_per


def task_records(path: str, split: str, seed: Any = 0, worker: int = 0,
                 n_workers: int = 1) -> Iterator[dict]:
    """Records `{"text", "skip"}` of a task source: endless for train (seeded by seed and
    worker, held-out examples skipped), the fixed held-out set for val (every n_workers-th)."""
    task, difficulties, val_per = parse_task_path(path)
    if split == "val":
        for i, (_, segs) in enumerate(heldout_set(task, difficulties, val_per)):
            if i % n_workers == worker:
                yield {"text": text_of(segs), "skip": ""}
        return
    exclude = heldout_texts(task, difficulties, val_per)
    for _, segs in train_examples(task, difficulties, [seed, worker, zlib.crc32(path.encode())],
                                  exclude):
        yield {"text": text_of(segs), "skip": ""}
