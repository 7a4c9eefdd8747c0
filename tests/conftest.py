"""Shared fixtures of the test suite.

Model tests (tests/test_model_*.py) get: a seeded RNG, a small-config factory, a hand-written
reference attention, the per-step training step the launcher runs, and a short English corpus for
char-level training. torch is imported inside the fixtures so that test modules that never touch
the model do not pay for it.
"""

from __future__ import annotations

import math

import pytest

from tests.helpers import per_step_backward

# A short English text written for these tests (char-level training needs no tokenizer).
ENGLISH_TEXT = """\
The lighthouse keeper climbed the stairs every evening before the sun went down. He carried a
small lamp, a book, and a tin of biscuits that he never finished. From the top of the tower he
could see the harbour, the fishing boats coming home, and the long grey line of the cliffs. The
wind was always stronger up there, and it sang through the rails like a tired old violin.
When the light was lit, he sat by the window and read until the words ran together. Sometimes a
ship answered with its horn, and he waved, although nobody on the deck could see him. In winter
the storms came from the west. The sea rose over the rocks, the rain struck the glass, and the
whole tower seemed to breathe. On those nights he did not read. He watched the beam turn, slow
and patient, and he counted the seconds between each flash, because a sailor far away was
counting them too. In the morning the water was calm again, the gulls were loud, and the keeper
walked down the stairs, put out the lamp, and made a pot of strong black tea.
The village below knew him as a quiet man who spoke about the weather and little else. Children
said he had a cat that could swim, and a parrot that knew the names of every boat. None of that
was true, but he liked the stories and never corrected them. Once a year, on the first day of
spring, he opened the door of the tower to anyone who wished to climb it, and the whole village
came up, one by one, to look at the sea from the place where he spent his nights.
"""


@pytest.fixture(autouse=True)
def model_test_setup(request: pytest.FixtureRequest):
    """Every model test starts from the same RNG state and runs on one intra-op thread.

    The model tests run thousands of small ops; with two OpenMP threads on a 2-core machine that
    is also running other work, every op waits on a descheduled thread and the tests run 10-20x
    slower than on one thread. The previous thread count is restored afterwards.
    """
    if not request.module.__name__.startswith("test_model"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config():
    """make(**overrides) -> the tiny preset shrunk for unit tests (vocab 64, sequence 32)."""
    from model import GPTConfig

    def make(**overrides):
        return GPTConfig.preset("tiny", **{"vocab_size": 64, "sequence_len": 32, **overrides})

    return make


@pytest.fixture
def reference_attention():
    """attend(attn, x, cos, sin, kv_repeat="interleave") -> causal GQA written out by hand.

    softmax(Q K^T / sqrt(d) + causal mask) V with RoPE on Q and K (RMS-normed first when the
    module has qk_norm), K/V heads repeated so that
    query head h reads kv head h // (n_head / n_kv_head) (repeat_interleave). kv_repeat="tile"
    uses the other grouping (h % n_kv_head), to show that the grouping is actually checked.
    """
    import torch

    from model.layers import apply_rope

    def attend(attn, x, cos, sin, kv_repeat: str = "interleave"):
        B, T, C = x.shape
        H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
        q = (x @ attn.q.weight.T).view(B, T, H, D).transpose(1, 2)      # (B, H, T, D)
        k = (x @ attn.k.weight.T).view(B, T, Hkv, D).transpose(1, 2)    # (B, Hkv, T, D)
        v = (x @ attn.v.weight.T).view(B, T, Hkv, D).transpose(1, 2)
        if attn.qk_norm:  # RMSNorm without weights over each head's dims
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + attn.eps)
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + attn.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_repeat == "interleave":
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        else:
            k, v = k.repeat(1, H // Hkv, 1, 1), v.repeat(1, H // Hkv, 1, 1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)                  # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(-1) @ v                                     # (B, H, T, D)
        return out.transpose(1, 2).reshape(B, T, C) @ attn.o.weight.T

    return attend


@pytest.fixture
def per_step_train():
    """per_step_backward, as a fixture."""
    return per_step_backward


@pytest.fixture(scope="session")
def char_corpus():
    """(ids, vocab_size): ENGLISH_TEXT as ids of a dense character alphabet, vocab padded to
    a multiple of 64."""
    import torch

    alphabet = sorted(set(ENGLISH_TEXT))
    lookup = {ch: i for i, ch in enumerate(alphabet)}
    ids = torch.tensor([lookup[ch] for ch in ENGLISH_TEXT], dtype=torch.long)
    return ids, 64 * math.ceil(len(alphabet) / 64)


@pytest.fixture(scope="module")
def s3():
    """A real S3-protocol server (moto) on 127.0.0.1 for a module's tests: `s3.bucket()` makes a
    bucket and returns its s3:// URL, `s3.fs()` an s3fs filesystem, `s3.env` the environment a
    subprocess needs to reach it (already set in this process while the fixture lives)."""
    from s3server import s3_server

    with s3_server() as server:
        yield server
