"""ZeRO 1, 2 and 3 against plain data parallel (stage 0) on `tiny`, 2 real processes over gloo.

The shared stack is applied 24 times per supervision step here (2 layers x 3 applications x
T=2 x ... ) and its parameters are reused by every application: ZeRO-3 must gather them inside
each engine call and DeepSpeed's gradient hooks must sum (not double count, not drop) the
contributions, with and without activation checkpointing, in both supervision modes.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import SMALL_TINY, random_batch

STEPS = 10
CASES = [  # (zero stage, update mode, activation checkpointing)
    (0, "accumulate", "off"), (1, "accumulate", "off"), (2, "accumulate", "off"),
    (3, "accumulate", "off"), (3, "accumulate", "torch"), (2, "accumulate", "deepspeed"),
    (0, "per_step", "off"), (1, "per_step", "off"), (2, "per_step", "off"),
    (3, "per_step", "off"),
]


def losses_for_cases(cases: list[tuple[int, str, str]]) -> dict:
    from launcher.engine.config import resolve
    from launcher.engine.dist import init_distributed
    from launcher.engine.parallelize import parallelize
    from launcher.engine.step import train_step

    info = init_distributed()
    out = {}
    for stage, mode, ac in cases:
        over = {**SMALL_TINY, "zero_stage": stage, "update_mode": mode, "warmup_steps": 2,
                "max_steps": STEPS, "activation_checkpointing": ac != "off",
                "checkpoint_impl": "torch" if ac == "off" else ac}
        run = resolve("tiny", over, world_size=info.world_size)
        engine, model, _, _ = parallelize(run, info.world_size)
        # each rank its own batch, the same every step: the loss must fall, so updates matter
        batch = random_batch(100 + info.rank)
        losses = []
        for _ in range(STEPS):
            step_losses, ok = train_step(engine, [batch], run.model.N_sup, mode)
            assert ok
            losses.append(step_losses)
        # a poisoned batch (NaN objective) must leave the weights exactly as they were
        before = probe_loss(engine, batch)
        _, ok = train_step(engine, [batch], run.model.N_sup, mode, nan_at_step=True)
        out[f"nan/{stage}/{mode}/{ac}"] = [ok, before, probe_loss(engine, batch)]
        out[f"{stage}/{mode}/{ac}"] = losses  # plain lists: tensors would not outlive the worker
        out[f"weights/{stage}/{mode}/{ac}"] = weights_digest(model, stage)
        del engine
    return out


def weights_digest(model, stage: int) -> str:
    """sha256 of every parameter's bytes, in name order; under ZeRO-3 the full parameters,
    gathered from their partitions (every rank takes part in the gather)."""
    import contextlib
    import hashlib

    import deepspeed

    params = list(model.named_parameters())
    gather = (deepspeed.zero.GatheredParameters([p for _, p in params]) if stage == 3
              else contextlib.nullcontext())
    h = hashlib.sha256()
    with gather:
        for name, p in sorted(params):
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def probe_loss(engine, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        _, carry, _, _ = engine(batch[0], None, None, batch[1], 0, None)
    return carry.loss.item()


@pytest.fixture(scope="module")
def results():
    return run_distributed(losses_for_cases, world=2, args=(CASES,))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["accumulate", "per_step"])
def test_zero_stages_match_plain_data_parallel(results, mode):
    rank0 = results[0]
    ref = torch.tensor(rank0[f"0/{mode}/off"], dtype=torch.float64)
    assert ref[-1].mean() < ref[0].mean() - 0.1, "training did not move the loss"
    others = [f"{stage}/{m}/{ac}" for stage, m, ac in CASES if m == mode and stage != 0]
    assert len(others) == (5 if mode == "accumulate" else 3)
    for key in others:
        got = torch.tensor(rank0[key], dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.slow
def test_modes_differ_and_ranks_agree(results):
    # per-step mode takes N_sup optimizer steps per batch: its losses must differ from accumulate
    a = torch.tensor(results[0]["0/accumulate/off"])
    p = torch.tensor(results[0]["0/per_step/off"])
    assert not torch.allclose(a[1:], p[1:])
    # every rank trained on its own data (so its losses differ) and yet ends with bit-identical
    # weights, under every stage and mode: the gradient reduction (and ZeRO's all-gather of the
    # updated partitions) reached every parameter on every rank
    for stage, mode, ac in CASES:
        assert results[0][f"{stage}/{mode}/{ac}"] != results[1][f"{stage}/{mode}/{ac}"]
        key = f"weights/{stage}/{mode}/{ac}"
        assert results[0][key] == results[1][key], f"ranks hold different weights: {key}"
    # and training moved them: the two modes end on different weights
    assert results[0]["weights/0/accumulate/off"] != results[0]["weights/0/per_step/off"]


@pytest.mark.slow
def test_nan_batch_is_not_applied_under_any_stage(results):
    cases = {k: v for k, v in results[0].items() if k.startswith("nan/")}
    assert len(cases) == len(CASES)
    for key, (ok, before, after) in cases.items():
        assert ok is False, key
        assert before == after, f"{key}: weights moved on a skipped step ({before} -> {after})"
