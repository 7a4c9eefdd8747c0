"""Bad input to the model gets a ValueError that says what is wrong (SPEC section 5)."""

from __future__ import annotations

import pytest
import torch

from model import RecursiveGPT


@pytest.fixture
def model(tiny_config) -> RecursiveGPT:
    return RecursiveGPT(tiny_config(halting=True))  # vocab 64, sequence_len 32


GOOD = torch.zeros(2, 8, dtype=torch.long)

BAD_IDX = [
    ("float", GOOD.float(), "int64"),
    ("int32", GOOD.int(), "int64"),
    ("list", [[1, 2, 3]], "int64"),
    ("1-D", torch.zeros(8, dtype=torch.long), "shape"),
    ("3-D", torch.zeros(2, 8, 1, dtype=torch.long), "shape"),
    ("empty seq", torch.zeros(2, 0, dtype=torch.long), "shape"),
    ("empty batch", torch.zeros(0, 8, dtype=torch.long), "shape"),
    ("too long", torch.zeros(1, 33, dtype=torch.long), "sequence_len"),
    ("id == vocab", torch.full((1, 4), 64, dtype=torch.long), "token ids"),
    ("negative id", torch.tensor([[3, -1, 2]]), "token ids"),
]


@pytest.mark.parametrize(("what", "idx", "words"), BAD_IDX, ids=[b[0] for b in BAD_IDX])
def test_bad_idx_is_refused(model, what, idx, words):
    with pytest.raises(ValueError, match=words):
        model(idx)
    with pytest.raises(ValueError, match=words):
        model.supervision_step(idx)
    with pytest.raises(ValueError, match=words):
        model.generate(idx, 1)


def test_messages_give_the_numbers(model):
    with pytest.raises(ValueError, match=r"33 tokens .* sequence_len \(32\)"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\).*\[0, 70\]"):
        model(torch.tensor([[0, 70]]))
    with pytest.raises(ValueError, match="float32"):
        model(GOOD.float())
    with pytest.raises(ValueError, match=r"\(8,\)"):
        model(torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize(("targets", "words"), [
    (torch.zeros(2, 7, dtype=torch.long), "shape"),
    (torch.zeros(2, 8, dtype=torch.int32), "int64"),
    (torch.full((2, 8), 64, dtype=torch.long), r"targets must be in \[0, 64\)"),
    (torch.full((2, 8), -2, dtype=torch.long), "-1"),
])
def test_bad_targets_are_refused(model, targets, words):
    with pytest.raises(ValueError, match=words):
        model(GOOD, targets)


def test_ignored_targets_and_full_length_are_accepted(model):
    tgt = torch.full((1, 32), -1, dtype=torch.long)
    tgt[0, 0] = 63
    out = model(torch.full((1, 32), 63, dtype=torch.long), tgt)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": -1}, {"max_new_tokens": 1, "temperature": -0.5},
    {"max_new_tokens": 1, "top_k": 0},
])
def test_bad_generation_settings_are_refused(model, kwargs):
    with pytest.raises(ValueError, match="max_new_tokens|temperature|top_k"):
        model.generate(GOOD, **kwargs)
