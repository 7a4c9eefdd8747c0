"""The depth tasks (data_pipeline/tasks.py): answers right, seeded, held-out set fixed and never
trained on, usable as a data source alone or mixed into text, and the exact-match scorer."""

from __future__ import annotations

import random

import pytest
import torch

from data_pipeline import build_loader, load_tokenizer
from data_pipeline.spec import DataSpec
from data_pipeline.tasks import (
    VOCAB,
    AdditionTask,
    CycleTask,
    GroupTask,
    PermTask,
    PointerTask,
    answer_correct,
    encode,
    heldout_set,
    heldout_texts,
    parse_task_path,
    task_batch,
    task_records,
    text_of,
    train_examples,
)

TOKENIZER = "configs/tokenizers/shakespeare-4k"


def resolve_pointer(text: str) -> list[str]:
    """The answers of a pointer example, by following the assignments."""
    body, *queries = text.split("?")
    env = {body[i]: body[i + 2] for i in range(0, len(body), 3)}
    out = []
    for q in queries:
        v = q.split("=")[0]
        while not v.isdigit():
            v = env[v]
        out.append(v)
    return out


@pytest.mark.parametrize("k", [1, 3, 6])
def test_pointer_answers_follow_k_hops(k: int) -> None:
    task = PointerTask(n_chains=3)
    rng = random.Random(k)
    for _ in range(20):
        segs = task.example(rng, k)
        text = text_of(segs)
        assert len(text) == task.length(k)
        answers = [t for t, is_ans in segs if is_ans]
        assert answers == resolve_pointer(text)
        # every query needs exactly k lookups from its variable to a digit
        body = text.split("?")[0]
        env = {body[i]: body[i + 2] for i in range(0, len(body), 3)}
        for q in text.split("?")[1:]:
            v, hops = q.split("=")[0], 0
            while not v.isdigit():
                v, hops = env[v], hops + 1
            assert hops == k + 1  # k variable-to-variable hops, then the root's digit


def test_addition_sum_msb_first() -> None:
    task = AdditionTask()
    rng = random.Random(0)
    for n in (1, 4, 9):
        segs = task.example(rng, n)
        prompt, answer = segs[0][0], segs[1][0]
        a, b = prompt.rstrip("=").split("+")
        assert len(a) == len(b) == n and len(answer) == n + 1
        assert int(answer) == int(a) + int(b)


def test_bad_difficulty_is_refused() -> None:
    with pytest.raises(ValueError, match="hops must be in"):
        PointerTask(n_chains=3).example(random.Random(0), 9)
    with pytest.raises(ValueError, match="difficulty must be a range"):
        parse_task_path("task:pointer?difficulty=0-2")
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_path("task:sorting")


def test_heldout_fixed_and_never_trained_on() -> None:
    task = PointerTask(n_chains=2)
    a, b = heldout_set(task, [1, 2], 50), heldout_set(task, [1, 2], 50)
    assert a == b  # the same on every call (and machine: string seeds, no global RNG)
    held = heldout_texts(task, [1, 2], 50)
    gen = train_examples(task, [1, 2], seed=0, exclude=held)
    seen = [text_of(next(gen)[1]) for _ in range(3000)]
    assert not set(seen) & held
    # the guard works: texts the raw stream yields are skipped once excluded
    raw = train_examples(task, [1, 2], seed=0, exclude=set())
    first = [text_of(next(raw)[1]) for _ in range(20)]
    guarded = train_examples(task, [1, 2], seed=0, exclude=set(first[::2]))
    assert [text_of(next(guarded)[1]) for _ in range(10)] == first[1::2]
    # seeded: the same seed gives the same stream, another seed another one
    again = train_examples(task, [1, 2], seed=0, exclude=held)
    assert [text_of(next(again)[1]) for _ in range(3000)] == seen
    other = train_examples(task, [1, 2], seed=1, exclude=held)
    assert [text_of(next(other)[1]) for _ in range(50)] != seen[:50]


def test_batch_targets_only_on_answers_and_exact_match() -> None:
    task = AdditionTask()
    rng = random.Random(0)
    ex = [(3, task.example(rng, 3)) for _ in range(4)]
    idx, tgt, aid, diff = task_batch(ex, task.length(3) - 1)
    assert (tgt >= 0).sum(1).tolist() == [4] * 4  # the 4 digits of the sum
    assert diff.tolist() == [3] * 4
    for b, (_, segs) in enumerate(ex):
        answer = segs[1][0]
        assert "".join(VOCAB[int(t)] for t in tgt[b][tgt[b] >= 0]) == answer
    # a perfect prediction scores 1 per answer; one wrong digit makes that answer wrong
    logits = torch.full((*tgt.shape, 64), -10.0)
    logits.scatter_(-1, tgt.clamp_min(0).unsqueeze(-1), 10.0)
    c, n = answer_correct(logits, tgt, aid)
    assert c.tolist() == n.tolist() == [1.0] * 4
    pos = int((tgt[2] >= 0).nonzero()[1])
    logits[2, pos] = logits[2, pos].roll(1)
    c, _ = answer_correct(logits, tgt, aid)
    assert c.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_task_source_alone_and_mixed_into_text() -> None:
    tok = load_tokenizer(TOKENIZER)
    path = "task:pointer?difficulty=1-2&n_chains=2&val_per_difficulty=8"
    # val: the fixed held-out set, whole
    vals = [r["text"] for r in task_records(path, "val")]
    assert len(vals) == 16 and all(resolve_pointer(t) for t in vals)
    # alone: endless train batches of the tokenized task text
    alone = build_loader({"sources": [{"path": path}]}, tok, split="train", batch_size=2,
                         seq_len=32, seed=0, num_samples=40)
    batches = [b for _, b in zip(range(20), alone, strict=False)]
    assert len(batches) == 20
    text = tok.decode(batches[0][0][0].tolist())
    assert "?" in text and "=" in text
    # mixed into Shakespeare by weight
    spec = DataSpec.from_dict({"sources": [{"path": "shakespeare", "weight": 1.0},
                                           {"path": path, "weight": 1.0}]})
    assert spec.sources[1].path == path
    mixed = build_loader({"sources": [
        {"path": str(DataSpec.parse("shakespeare").sources[0].path), "weight": 1.0},
        {"path": path, "weight": 1.0}]}, tok, split="train", batch_size=4, seq_len=64, seed=0,
        num_samples=64)
    texts = [tok.decode(row.tolist())
             for b, _ in zip(mixed, range(8), strict=False) for row in b[0]]
    assert any("?" in t and "=" in t for t in texts)          # task windows
    assert any(" the " in t.lower() for t in texts)           # text windows


@pytest.mark.parametrize("k", [1, 2, 5])
def test_perm_answers_are_k_hops_and_entries_are_one_token(k: int) -> None:
    task = PermTask(n_symbols=10, n_queries=6)
    rng = random.Random(k)
    for _ in range(20):
        segs = task.example(rng, k)
        table, queries = text_of(segs).split("|")
        pi = dict(e.split(">") for e in table.split())
        assert sorted(pi) == sorted(pi.values()) == list("0123456789")  # a permutation
        asked = [q.split("=")[0] for q in queries.split()]
        assert len(set(asked)) == 6  # distinct queries: no answer can be copied
        for q in queries.split():
            x, y = q.split("=")
            for _ in range(k):
                x = pi[x]
            assert x == y
        ids, ans = encode(segs)
        assert len(ids) == task.length(k) and max(ans) == 5


def test_cycle_is_one_cycle_so_every_hop_counts() -> None:
    """On one n-cycle no k-hop answer (k < n) is the query itself and the k-hop answers of a
    symbol differ for every k: no shortcut through short cycles (a random permutation of 6
    symbols answers about a third of its 4-hop queries with the query itself)."""
    task = CycleTask(n_symbols=6, n_queries=3)
    assert task.max_difficulty() == 5
    with pytest.raises(ValueError, match="cycle: hops must be in"):
        task.example(random.Random(0), 6)
    fixed = {"perm": 0, "cycle": 0}
    for name, t in (("perm", PermTask(n_symbols=6, n_queries=3)), ("cycle", task)):
        rng = random.Random(1)
        for _ in range(200):
            segs = t.example(rng, 4)
            table, queries = text_of(segs).split("|")
            pi = dict(e.split(">") for e in table.split())
            for q in queries.split():
                x, y = q.split("=")
                fixed[name] += x == y
            if name == "cycle":
                x, seen = "0", []
                for _ in range(6):
                    seen.append(x)
                    x = pi[x]
                assert x == "0" and sorted(seen) == list("012345")  # one cycle through all
    assert fixed["cycle"] == 0 and fixed["perm"] > 100, fixed
    path_task, _, _ = parse_task_path("task:cycle?difficulty=1-4&n_symbols=6&n_queries=3")
    assert path_task == task


def test_group_word_is_the_product_in_order_and_short_words_are_trained_not_scored() -> None:
    """The S_3 word problem: the answer is the product of the word's permutations applied left
    to right (checked here as permutation matrices), it depends on the order, and a length
    whose whole space is small (6^3 = 216 words < 4 x 128) is trained on, not held out."""
    task = GroupTask()
    els = task.elements()
    assert len(els) == 6 and len(GroupTask(n_items=4).elements()) == 24

    def matrix(p: tuple[int, ...]) -> torch.Tensor:  # row i has its 1 at column p[i]
        return torch.eye(3)[list(p)]

    rng = random.Random(0)
    order_matters = 0
    for k in (1, 2, 5, 9):
        for _ in range(100):
            word, answer = (t for t, _ in task.example(rng, k))
            assert len(word) == k + 1 and word[-1] == "="
            m = torch.eye(3)
            for c in word[:-1]:
                m = m @ matrix(els["abcdef".index(c)])
            # m maps e_i to e_{p(i)} composed left to right: row 0 of m is where 0 ends up
            got = tuple(int(m[i].argmax()) for i in range(3))
            assert els["abcdef".index(answer)] == got, (word, answer)
            if k == 2:
                swapped = task_product(els, word[1] + word[0])
                order_matters += swapped != got
    assert order_matters > 20  # S_3 is not abelian: about a third of the pairs do not commute
    with pytest.raises(ValueError, match="group: word length must be in"):
        task.example(rng, 0)
    with pytest.raises(ValueError, match="n_items must be 3 or 4"):
        GroupTask(n_items=5)
    held = heldout_set(task, [1, 2, 3, 4, 5], 128)
    assert {d for d, _ in held} == {4, 5}  # 6, 36 and 216 words: a table, trained whole
    exclude = heldout_texts(task, [1, 2, 3, 4, 5], 128)
    drawn = train_examples(task, [1, 2, 3, 4, 5], 0, exclude)
    seen = [next(drawn) for _ in range(2000)]
    assert {d for d, _ in seen} == {1, 2, 3, 4, 5}
    assert not any(text_of(s) in exclude for _, s in seen)
    path_task, diffs, _ = parse_task_path("task:group?difficulty=2-8&n_items=3")
    assert path_task == task and diffs == list(range(2, 9))


def task_product(els: list[tuple[int, ...]], word: str) -> tuple[int, ...]:
    acc = (0, 1, 2)
    for c in word:
        g = els["abcdef".index(c)]
        acc = tuple(g[a] for a in acc)
    return acc


def test_leak_check_passes_causal_configs_and_catches_a_planted_leak() -> None:
    from bench.depth_study import causal_leak_check
    from model import GPTConfig, RecursiveGPT

    torch.manual_seed(0)
    for extra in ({}, {"step_conditioning": True, "state_init": "zero"}):
        cfg = GPTConfig.preset("tiny", n_embd=32, n_head=2, n_kv_head=1, vocab_size=192,
                               sequence_len=24, N_sup=2, N_sup_inference=3,
                               zero_init_out=False, **extra)
        model = RecursiveGPT(cfg)
        if model.step_cond is not None:  # make the conditioning matter
            torch.nn.init.normal_(model.step_cond, std=0.5)
        assert causal_leak_check(model, 24) < 1e-4
        assert cfg.num_params() == sum(
            p.numel() for n, p in model.named_parameters()
            if not n.startswith(("tok_emb", "lm_head")))

    class Leaky(RecursiveGPT):  # a planted defect: position t sees the last token
        def supervision_step(self, idx, *a, **k):  # type: ignore[no-untyped-def]
            return super().supervision_step(idx.roll(1, dims=1), *a, **k)

    with pytest.raises(AssertionError, match="causal leak"):
        causal_leak_check(Leaky(cfg), 24)


def test_task_source_cannot_be_pretokenized(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from data_pipeline.pretok import tokenize_spec

    with pytest.raises(ValueError, match="generated task: stream it"):
        tokenize_spec({"sources": [{"path": "task:addition?difficulty=1-2"}]},
                      load_tokenizer(TOKENIZER), str(tmp_path / "out"), workers=0,
                      progress=False)
